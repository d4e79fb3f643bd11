import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


def _share_cores_among_workers() -> None:
    """pytest-xdist runs a process a core; torch's default of a thread a core in each made the
    workers contend for the same cores (a 2-core sample of the suite ran 21% slower)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # and the processes tests start
        torch.set_num_threads(threads)


_share_cores_among_workers()


@pytest.fixture
def fresh_registry():
    """Rebuild the plugin registry after the test, whatever the test registered."""
    from presso.plugins import reload_plugins

    yield reload_plugins
    reload_plugins()
