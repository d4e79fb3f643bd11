"""The shipped recipes on the embedded SmolLM2: each one compiled, exported, measured.

    python -m benchmarks.recipes [--recipes w8a8,int4] [--calibration N] [--windows 64] [--out FILE]

Every recipe runs as ``presso compile --recipe NAME`` does: its passes, its calibration size
(``--calibration`` overrides it for every calibrated recipe), WikiText-2 validation text.
Perplexity by the shared protocol (WikiText-2 test, 64 windows of 256 tokens) on the
exported file in ONNX Runtime; size on disk; compile and export times. The recipe's stored
result is printed beside the new one, so a change that moves a recipe shows.
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

import presso
from presso import eval as ev
from presso import models
from presso.recipes import list_recipes, load_recipe


def measure(name: str, model, tokenizer, calibration_override: int | None, windows: int, workdir: Path,
            threads: int) -> dict:
    recipe = load_recipe(name)
    passes = recipe.make_passes()
    n = calibration_override or recipe.calibration
    calibration = None
    if any("calibration" in p.requires for p in passes):
        calibration = ev.calibration_batches(tokenizer, n=n, seq_len=recipe.seq_len, batch_size=8)
    start = time.perf_counter()
    compiled = presso.compile(model, passes, example_inputs=torch.randint(3, 1000, (1, 16)), calibration=calibration)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    path = compiled.export(workdir / name)
    export_s = time.perf_counter() - start
    decoder = presso.runtime.load(path, providers=["CPUExecutionProvider"], threads=threads)
    ppl = ev.perplexity(decoder, tokenizer, windows=windows)
    size = sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith(path.name))
    return {"recipe": name, "calibration": n if calibration else 0, "mb": size / 1e6, "ppl": ppl,
            "stored": recipe.measured, "compile_s": compile_s, "export_s": export_s,
            "export_check": compiled.report["export_check"]["rel_error"]}


def table(rows: list[dict], fp32: float) -> str:
    lines = ["| recipe | calibration | size (MB) | perplexity | Δ vs fp32 | stored result | compile (s) "
             "| export + check (s) | export check (rel. error) |", "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        s = r["stored"]
        stored = f"{s['perplexity']:.2f} at {s['size_mb']:.1f} MB" if s else ""
        lines.append(f"| {r['recipe']} | {r['calibration']} | {r['mb']:.1f} | {r['ppl']:.2f} "
                     f"| {100 * (r['ppl'] / fp32 - 1):+.1f}% | {stored} | {r['compile_s']:.0f} | {r['export_s']:.0f} "
                     f"| {r['export_check']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(list_recipes()))
    parser.add_argument("--calibration", type=int, default=None, help="override every recipe's calibration size")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = models.load("smollm2-135m")
    fp32 = ev.perplexity(model, tokenizer, windows=args.windows)
    workdir = Path(tempfile.mkdtemp(prefix="presso-recipes-"))
    rows = []
    for name in args.recipes.split(","):
        print(f"{name} ...", flush=True)
        rows.append(measure(name, model, tokenizer, args.calibration, args.windows, workdir, args.threads))
        print(table(rows[-1:], fp32), flush=True)
    text = (f"fp32 perplexity {fp32:.2f} ({args.windows} windows of 256 tokens)\n\n{table(rows, fp32)}\n\n"
            f"Machine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
