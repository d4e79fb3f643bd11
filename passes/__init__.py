"""Built-in passes, a subpackage per family; registered by ``presso.plugins.builtin``.

- ``quantization``: int8 dynamic/static, SmoothQuant, residual rotation, weight-only int4/int8
- ``pruning``: structured pruning with dependency groups and least-squares recovery
- ``low_rank``: low-rank splits (SVD, ASVD, whitening)
- ``head_sharing``: attention head sharing (MHA to GQA/MQA)
- ``common``: what every family shares: module selection, the calibration toolkit (hooks,
  statistics, the block runner, damped solves), scale groups, channel axes and dependency groups

A pass module imports from ``common`` and from its own family, never from another pass.
"""
