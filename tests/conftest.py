import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def fresh_registry():
    """Rebuild the plugin registry after the test, whatever the test registered."""
    from presso.plugins import reload_plugins

    yield reload_plugins
    reload_plugins()
