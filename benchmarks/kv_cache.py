"""Per-token decode with the KV cache against re-running the whole sequence, ONNX Runtime CPU.

    python -m benchmarks.kv_cache [--context 256] [--threads 2]
"""
from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch

import presso
from benchmarks.llm import median_ms
from presso import models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model, _ = models.load("smollm2-135m")
    compiled = presso.compile(model, [], example_inputs=torch.randint(3, 1000, (1, 16)))
    path = compiled.export(tempfile.mkdtemp(prefix="presso-kv-"))
    decoder = presso.runtime.load(path, providers=["CPUExecutionProvider"], threads=args.threads)
    context = np.random.default_rng(0).integers(3, 1000, (1, args.context))
    _, past = decoder.step(context[:, :-1], decoder.empty_cache(1))
    cached = median_ms(lambda: decoder.step(context[:, -1:], past), repeats=20)
    full = median_ms(lambda: decoder.step(context, decoder.empty_cache(1)), repeats=5)
    print(f"| context | decode with KV cache (ms/token) | re-run the whole sequence (ms/token) | ratio |\n"
          f"|---:|---:|---:|---:|\n| {args.context} | {cached:.1f} | {full:.1f} | {full / cached:.1f}x |")


if __name__ == "__main__":
    main()
