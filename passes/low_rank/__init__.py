"""Low-rank splits of linear layers (SVD, ASVD, whitening), one-shot or block-sequential."""
