"""Structured pruning benchmark on the embedded SmolLM2, against Torch-Pruning.

    python -m benchmarks.pruning [--ratios 0.1,0.2,0.3] [--windows 64] [--threads 2] [--out FILE]

Rows: fp32; ``prune_structured`` over heads and MLP neurons at each parameter ratio, with
and without recovery; at 20%, each family alone and each importance. Every presso row is
exported to ONNX and measured there (perplexity by the shared protocol, prefill of 128
tokens, decode with KV cache, medians of interleaved rounds). Torch-Pruning runs in a
subprocess with a time limit (``benchmarks.tp_peer``); where it fails, the row says how.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import presso
from benchmarks.llm import disk_mb, machine, measure_latency
from presso import eval as ev
from presso import models

TP_TIMEOUT = 600


def recipes(ratios: list[float]) -> list[tuple[str, float, dict]]:
    both = ("heads", "mlp")
    rows = [(f"presso heads+mlp {r:.0%} activation", r, dict(target=both)) for r in ratios]
    rows += [(f"presso heads+mlp {r:.0%} activation + recover", r, dict(target=both, recover=True)) for r in ratios]
    rows += [(f"presso mlp {r:.0%} activation", r, dict(target=("mlp",))) for r in ratios if r != 0.2]
    rows += [("presso heads 7% activation", 0.066, dict(target=("heads",)))]  # a third of the heads
    rows += [("presso mlp 20% activation", 0.2, dict(target=("mlp",))),
             ("presso mlp 20% activation + recover", 0.2, dict(target=("mlp",), recover=True)),
             ("presso heads+mlp 20% taylor", 0.2, dict(target=both, importance="taylor")),
             ("presso heads+mlp 20% magnitude", 0.2, dict(target=both, importance="magnitude")),
             ("presso heads+mlp+hidden 20% activation + recover", 0.2,
              dict(target=("heads", "mlp", "hidden"), recover=True))]
    return rows


def presso_row(label, model, ratio, options, calibration, workdir, threads) -> dict:
    print(f"{label} ...", flush=True)
    options = {"importance": "activation", "round_to": 8, **options}
    start = time.perf_counter()
    compiled = presso.compile(model, [presso.make_pass("prune_structured", params_ratio=ratio, **options)],
                              example_inputs=torch.randint(3, 1000, (1, 16)), calibration=calibration)
    seconds = time.perf_counter() - start
    stats = compiled.report["passes"][0]["stats"]
    path = compiled.export(workdir / label.replace(" ", "_").replace("%", "").replace("+", "_"))
    decoder = presso.runtime.load(path, providers=["CPUExecutionProvider"], threads=threads)
    note = f"units removed {stats['removed']}"
    if "calibration_loss_after_recovery" in stats:
        note += (f"; calibration NLL {stats['calibration_loss_before_recovery']:.3f} -> "
                 f"{stats['calibration_loss_after_recovery']:.3f} by recovery")
    units = {f: [int(x) for x in v.split("/")] for f, v in stats["removed"].items()}
    return dict(label=label, mb=disk_mb(path), params=stats["params_after"], removed=stats["params_removed"],
                seconds=seconds, decoder=decoder, note=note, budget=ratio,
                mlp_ratio=units.get("mlp", [0, 1])[0] / units.get("mlp", [0, 1])[1],
                head_ratio=units.get("heads", [0, 1])[0] / units.get("heads", [0, 1])[1])


def torch_pruning_row(reference: dict, workdir: Path, threads: int) -> dict:
    """Torch-Pruning at the unit ratios presso chose for the same budget, in a subprocess."""
    label = f"Torch-Pruning heads+mlp {reference['budget']:.0%} (GroupMagnitude L2)"
    print(f"{label} ...", flush=True)
    cmd = [sys.executable, "-m", "benchmarks.tp_peer", "--mlp-ratio", str(reference["mlp_ratio"]),
           "--head-ratio", str(reference["head_ratio"]), "--out", str(workdir / "torch_pruning"),
           "--threads", str(threads), "--timeout", str(TP_TIMEOUT)]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=TP_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        stack = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        frames = [ln.strip() for ln in stack.splitlines() if ln.strip().startswith("File") and "torch_pruning" in ln]
        where = frames[:1] or ["?"]  # faulthandler prints the innermost frame first
        return dict(label=label, failed=f"did not finish in {TP_TIMEOUT} s; busy in {where[0]}",
                    seconds=time.perf_counter() - start)
    result = next((json.loads(ln) for ln in done.stdout.splitlines() if ln.startswith("{")), None)
    if result is None or "error" in result:
        error = (result or {}).get("error") or (done.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(label=label, failed=error, seconds=time.perf_counter() - start)
    decoder = presso.runtime.load(Path(result["onnx"]), providers=["CPUExecutionProvider"], threads=threads)
    return dict(label=label, mb=disk_mb(Path(result["onnx"])), params=result["params"], removed=result["removed"],
                seconds=result["seconds"], decoder=decoder, note="unit ratios copied from the presso 20% row")


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    model, tokenizer = models.load("smollm2-135m")
    n_params = sum(p.numel() for p in model.parameters())
    workdir = Path(tempfile.mkdtemp(prefix="presso-prune-"))
    calibration = ev.calibration_batches(tokenizer, n=args.calibration, seq_len=256, batch_size=8)
    fp32 = presso.compile(model, [], example_inputs=torch.randint(3, 1000, (1, 16)))
    path = fp32.export(workdir / "fp32")
    rows = [dict(label="fp32 ONNX Runtime", mb=disk_mb(path), params=n_params, removed=0.0, seconds=0.0,
                 decoder=presso.runtime.load(path, providers=["CPUExecutionProvider"], threads=args.threads),
                 note="")]
    ratios = [float(r) for r in args.ratios.split(",")]
    chosen = [r for r in recipes(ratios) if not args.only or any(k in r[0] for k in args.only.split(","))]
    for label, ratio, options in chosen:
        rows.append(presso_row(label, model, ratio, options, calibration, workdir, args.threads))
    reference = next((r for r in rows if r["label"] == "presso heads+mlp 20% activation"), None)
    if reference is not None and not args.skip_peer:
        rows.append(torch_pruning_row(reference, workdir, args.threads))
    measured = [r for r in rows if "failed" not in r]
    for row in measured:
        print(f"perplexity of {row['label']} ...", flush=True)
        row["ppl"] = ev.perplexity(row["decoder"], tokenizer, windows=args.windows)
    measure_latency(measured, rounds=args.rounds)
    return rows


def table(rows: list[dict]) -> str:
    base, fp32 = rows[0]["ppl"], rows[0]
    lines = ["| pipeline | params (M) | removed | size (MB) | perplexity | Δ ppl vs fp32 | prefill 128 tok (ms) "
             "| prefill vs fp32 | decode (ms/token) | decode vs fp32 | compress (s) | notes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['label']} | | | | | | | | | | {r['seconds']:.0f} | failed: {r['failed']} |")
            continue
        lines.append(
            f"| {r['label']} | {r['params'] / 1e6:.1f} | {100 * r['removed']:.1f}% | {r['mb']:.1f} | {r['ppl']:.2f} "
            f"| {100 * (r['ppl'] / base - 1):+.1f}% | {r['prefill']:.1f} | {r['prefill'] / fp32['prefill']:.2f}x "
            f"| {r['decode']:.2f} | {r['decode'] / fp32['decode']:.2f}x | {r['seconds']:.0f} | {r.get('note', '')} |")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    both = [r for r in rows if "heads+mlp" in r["label"]]
    series = {"heads+mlp, no recovery": [r for r in both if r["label"].endswith("activation")],
              "heads+mlp + recover": [r for r in both if "activation + recover" in r["label"]
                                      and "hidden" not in r["label"]]}
    for name, pts in series.items():
        pts = [rows[0]] + sorted(pts, key=lambda r: r["removed"])
        ax.plot([100 * r["removed"] for r in pts], [r["ppl"] for r in pts], marker="o", label=f"presso {name}")
    for r in rows:
        if "failed" not in r and r not in sum(series.values(), []) and r is not rows[0]:
            ax.scatter(100 * r["removed"], r["ppl"], marker="s", s=30)
            ax.annotate(r["label"].replace("presso ", ""), (100 * r["removed"], r["ppl"]), fontsize=6,
                        xytext=(4, 2), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("parameters removed (%)")
    ax.set_ylabel("WikiText-2 perplexity (log scale, lower is better)")
    ax.set_title("SmolLM2-135M structured pruning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=130)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.1,0.2,0.3", help="fractions of the model's parameters removed")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calibration", type=int, default=128, help="calibration sequences of 256 tokens")
    parser.add_argument("--skip-peer", action="store_true", help="leave out Torch-Pruning")
    parser.add_argument("--only", help="comma-separated label fragments: run only those rows (and fp32)")
    parser.add_argument("--plot", type=Path, help="write perplexity vs parameters removed here (PNG)")
    parser.add_argument("--out", help="write the markdown table here as well")
    parser.add_argument("--json", type=Path, help="write the rows here (for replotting)")
    args = parser.parse_args()
    rows = run(args)
    if args.json:
        keep = ("label", "mb", "params", "removed", "seconds", "ppl", "prefill", "decode", "note", "failed")
        args.json.write_text(json.dumps([{k: r[k] for k in keep if k in r} for r in rows], indent=1))
    text = table(rows)
    print(text)
    if args.out:
        Path(args.out).write_text(f"<!-- generated by python -m benchmarks.pruning -->\n\nMachine: {machine(args)}\n\n"
                                  f"{text}\n")
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
