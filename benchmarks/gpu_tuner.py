"""Is the autotuner's choice stable? Two fresh processes tune the same shapes; their choices and times compared.

    python3 -m benchmarks.gpu_tuner [--timer graph|events] [--rows 1,16,64]

Each process tunes presso's int4 g128 kernels (word layout) on the four large shapes and
prints, per shape and row count, the configuration chosen and the tuner's time for it.
``--timer events`` runs Triton's own timer (one pair of events per launch) for comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]


def tune(rows: list[int]) -> list[dict]:
    import torch

    from benchmarks.gpu import int4_operands
    from presso.runtime.triton import gemm_words, gemv_words, weight_only
    from presso.runtime.triton.gemv_words import prepare_words

    out = []
    for n, k in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        operands = int4_operands(w)[0]
        words = prepare_words(*operands)
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            weight_only.weight_only_matmul(x, *operands[:2], None, k, 4, words=words)
            kernel = gemv_words._gemv_words_kernel if m == 1 else gemm_words._gemm_words_kernel
            best = kernel.best_config
            ms = kernel.configs_timings[best]
            ms = ms[0] if isinstance(ms, list) else ms
            out.append(dict(shape=f"{n}x{k}", m=m, config=str(best), us=1e3 * ms))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timer", default="graph", choices=["graph", "events"])
    parser.add_argument("--rows", default="1,16,64")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    rows = [int(m) for m in args.rows.split(",")]
    if args.child:
        print(json.dumps(tune(rows)))
        return
    env = dict(os.environ, PRESSO_TUNER=args.timer)
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_tuner", "--child", "--rows", args.rows],
                              env=env, capture_output=True, text=True, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"| timer: {args.timer} | M | same configuration | time, run 1 (µs) | run 2 | difference |")
    print("|---|---:|---|---:|---:|---:|")
    same = 0
    for a, b in zip(*runs):
        diff = abs(a["us"] - b["us"]) / min(a["us"], b["us"])
        same += a["config"] == b["config"]
        print(f"| {a['shape']} | {a['m']} | {'yes' if a['config'] == b['config'] else 'no'} | {a['us']:.2f} "
              f"| {b['us']:.2f} | {100 * diff:.1f}% |")
        if a["config"] != b["config"]:
            print(f"|  | | {a['config']} / {b['config']} | | | |")
    print(f"- {same}/{len(runs[0])} shapes chose the same configuration in both runs")


if __name__ == "__main__":
    main()
