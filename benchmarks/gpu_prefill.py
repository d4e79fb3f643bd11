"""Prefill-sized int4 matmuls on a GPU: presso's fused tensor-core kernel, dequantize + cuBLAS,
and cuBLAS bf16, in one run (medians of CUDA-graph replays, weights rotated past L2).

    python3 -m benchmarks.gpu_prefill [--rows 256,512,2048] [--shapes 4096x4096,14336x4096]
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from benchmarks.gpu import graph_us, int4_operands


def main() -> None:
    from presso.runtime.triton import dequant, gemm_words
    from presso.runtime.triton.gemv_words import prepare_words

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="256,512,2048")
    parser.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008,14336x4096")
    args = parser.parse_args()
    print(f"| N x K | M | cuBLAS bf16 (µs) | fused kernel | dequantize + cuBLAS |  (on {torch.cuda.get_device_name()})")
    print("|---|---:|---:|---:|---:|")
    ratios = {"fused": {}, "dequant": {}}
    for shape in args.shapes.split(","):
        n, k = map(int, shape.split("x"))
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(3)]
        words = [prepare_words(*int4_operands(w)[0]) for w in weights]
        for m in map(int, args.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bf16 = graph_us([lambda w=w: F.linear(x, w) for w in weights])
            fused = graph_us([lambda w=w: gemm_words.gemm_words(x, *w, k, 4) for w in words])
            deq = graph_us([lambda w=w: dequant.dequantize_matmul(x, *w, k, 4) for w in words])
            ratios["fused"].setdefault(m, []).append(bf16 / fused)
            ratios["dequant"].setdefault(m, []).append(bf16 / deq)
            print(f"| {shape} | {m} | {bf16:.1f} | {bf16 / fused:.2f}x | {bf16 / deq:.2f}x |", flush=True)
    for kind, by_m in ratios.items():
        print(f"- {kind}: " + ", ".join(f"M={m} median {statistics.median(v):.2f}x" for m, v in by_m.items()))


if __name__ == "__main__":
    main()
