"""Quantization passes: int8 dynamic and static Q/DQ, SmoothQuant, residual rotation,
weight-only int4/int8 (RTN, GPTQ, AWQ), and their algorithms."""
