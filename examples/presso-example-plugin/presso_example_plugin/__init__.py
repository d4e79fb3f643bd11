"""Example presso plugin: the ``fold_batchnorm`` pass."""
