"""Block by block against the whole model at once, on the embedded SmolLM2: same passes, same
calibration data, perplexity of each compiled model.

    python -m benchmarks.block_path [--calibration 64] [--windows 32] [--methods rtn,gptq,awq,whiten]

``sequential=True`` (the default) calibrates one decoder block at a time on the inputs the
already-compressed blocks give it; ``sequential=False`` calibrates every linear at once on
the float model's inputs, with the whole float model in memory. RTN reads no calibration
data, so its two rows must be identical; the calibrated methods may differ a little (each
block sees different inputs), and the block path should be no worse.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

import presso
from presso import eval as ev
from presso import models

PASSES = {
    "rtn": ("quantize_weights", dict(bits=4, group_size=64, method="rtn")),
    "gptq": ("quantize_weights", dict(bits=4, group_size=64, method="gptq")),
    "awq": ("quantize_weights", dict(bits=4, group_size=64, method="awq")),
    "whiten": ("split_low_rank", dict(ratio=0.2, targets=("*mlp*",), method="whiten")),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(PASSES))
    parser.add_argument("--calibration", type=int, default=64, help="sequences of 256 tokens")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = models.load("smollm2-135m")
    calibration = ev.calibration_batches(tokenizer, n=args.calibration, seq_len=256, batch_size=8)
    fp32 = ev.perplexity(model, tokenizer, windows=args.windows)
    rows = ["| method | path | perplexity | vs block path | compile (s) |", "|---|---|---:|---:|---:|"]
    for method in args.methods.split(","):
        name, options = PASSES[method]
        seen = {}
        for sequential in (True, False):
            p = presso.make_pass(name, sequential=sequential, **options)
            start = time.perf_counter()
            compiled = presso.compile(model, [p], example_inputs=torch.randint(3, 1000, (1, 16)),
                                      calibration=calibration)
            seconds = time.perf_counter() - start
            seen[sequential] = ev.perplexity(compiled, tokenizer, windows=args.windows)
            path = "block by block" if sequential else "whole model"
            rows.append(f"| {method} | {path} | {seen[sequential]:.3f} | "
                        f"{100 * (seen[sequential] / seen[True] - 1):+.2f}% | {seconds:.0f} |")
            print(rows[-1], flush=True)
    print(f"\nfp32 perplexity {fp32:.3f} ({args.windows} windows of 256 tokens), calibration "
          f"{args.calibration} x 256 tokens\n\n" + "\n".join(rows) +
          f"\n\nMachine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}")


if __name__ == "__main__":
    main()
