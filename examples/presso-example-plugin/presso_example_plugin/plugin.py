"""The module named by the ``presso`` entry point: hook implementations only."""
from presso.plugins import hookimpl
from presso_example_plugin.fold_batchnorm import FoldBatchNorm


@hookimpl
def presso_register_passes(registrar):
    registrar.add_pass(FoldBatchNorm)
