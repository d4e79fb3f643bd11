"""Fused decoders: causal LMs exported with ONNX Runtime's fused operators.

A decoder whose family and shapes the fused operators cover is traced through a forward of
its own (:mod:`.llama`) that calls presso custom ops where ONNX Runtime has one fused kernel:
RMSNorm and residual add (:mod:`.norms`), attention with rotary and KV cache (:mod:`.attention`).
Each op has a torch reference (the trace and the export check run it) and an ONNX lowering.
The compiled model's own linears (quantized, pruned, factored) are called as they are.
A model the forward cannot prove it covers keeps the exporter's graph; the manifest says why.
"""
