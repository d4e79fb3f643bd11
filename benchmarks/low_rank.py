"""Low-rank splits and attention head sharing on the embedded SmolLM2, next to structured pruning.

    python -m benchmarks.low_rank [--ratios 0.1,0.2,0.3] [--windows 64] [--calibration 32] [--out FILE]

Rows: ``split_low_rank`` over every linear but ``lm_head`` at each fraction of the model's
parameters, for each method (``svd``, ``asvd``, ``whiten``); at 20% of the MLP parameters
each method against ``prune_structured`` removing the same MLP parameters; the same
budgets pruned (heads+MLP) for the plot; ``share_attention_heads`` to one kv head with
each grouping and merge. Perplexity by the shared protocol in torch (equal to ONNX Runtime
for fp32: docs/results.md); rows marked ``export`` are exported and timed in ONNX
Runtime: prefill of 128 tokens, decode at 128 and at ``--long`` tokens of context, and KV
cache bytes per token. Methods at one ratio have identical shapes, so only ``whiten`` rows
are timed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import presso
from benchmarks.llm import disk_mb, machine, measure_latency
from presso import eval as ev
from presso import models

METHODS = ("svd", "asvd", "whiten")


def recipes(ratios: list[float], share_of_linears: float, share_of_mlp: float) -> list[dict]:
    mp = presso.make_pass
    rows = []
    for r in ratios:
        for m in METHODS:  # r of the model's parameters, as a ratio of the selected linears'
            rows.append(dict(label=f"split_low_rank {m} {r:.0%} of model", family=f"low-rank {m}", budget=r,
                             export=m == "whiten", passes=[mp("split_low_rank", ratio=r / share_of_linears, method=m)]))
        rows.append(dict(label=f"prune_structured heads+mlp {r:.0%} of model + recover", family="pruning",
                         budget=r, passes=[mp("prune_structured", params_ratio=r, target=("heads", "mlp"),
                                              importance="activation", round_to=8, recover=True)]))
    for m in METHODS:
        rows.append(dict(label=f"split_low_rank {m} 20% of MLP", family="mlp", budget=0.2 * share_of_mlp,
                         export=m == "whiten", passes=[mp("split_low_rank", ratio=0.2, method=m, targets=("*mlp*",))]))
    rows.append(dict(label="split_low_rank whiten 20% of MLP, allocate=sensitivity", family="mlp",
                     budget=0.2 * share_of_mlp, passes=[mp("split_low_rank", ratio=0.2, targets=("*mlp*",),
                                                           allocate="sensitivity")]))
    rows.append(dict(label="split_low_rank whiten one-shot 20% of MLP (sequential=False, weigh_outputs=False)",
                     family="mlp", budget=0.2 * share_of_mlp,
                     passes=[mp("split_low_rank", ratio=0.2, targets=("*mlp*",), sequential=False,
                                weigh_outputs=False)]))
    for recover in (False, True):
        rows.append(dict(label="prune_structured 20% of MLP neurons" + (" + recover" if recover else ""),
                         family="mlp", budget=0.2 * share_of_mlp, export=not recover,
                         passes=[mp("prune_structured", ratio=0.2, target=("mlp",), importance="activation",
                                    recover=recover)]))
    for grouping in ("adjacent", "similarity"):
        for merge in ("mean", "lstsq"):
            rows.append(dict(label=f"share_attention_heads kv_heads=1 {grouping} {merge}", family="share",
                             budget=None, export=(grouping, merge) == ("adjacent", "mean"),
                             passes=[mp("share_attention_heads", kv_heads=1, grouping=grouping, merge=merge)]))
    return rows


def kv_bytes_per_token(decoder) -> int:
    layout = decoder.layout
    return 2 * layout.num_layers * layout.kv_heads * layout.head_dim * 4  # keys and values, float32


def long_context_decode_ms(decoder, context: int, steps: int = 16) -> float:
    ids = np.random.default_rng(0).integers(3, 1000, (1, context))
    _, past = decoder.step(ids, decoder.empty_cache(1))
    token, times = np.array([[42]]), []
    for _ in range(steps):
        start = time.perf_counter()
        _, past = decoder.step(token, past)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) * 1e3


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    model, tokenizer = models.load("smollm2-135m")
    n_params = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n != "lm_head")
    mlp = sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)
    calibration = ev.calibration_batches(tokenizer, n=args.calibration, seq_len=256, batch_size=8)
    example = torch.randint(3, 1000, (1, 16))
    workdir = Path(tempfile.mkdtemp(prefix="presso-lowrank-"))
    ratios = [float(r) for r in args.ratios.split(",")]
    chosen = [r for r in recipes(ratios, linear / n_params, mlp / n_params)
              if not args.only or any(k in r["label"] for k in args.only.split(","))]
    fp32 = dict(label="fp32", family="fp32", budget=0.0, export=True, compiled=None, seconds=0.0, params=n_params)
    rows = [fp32]
    for row in chosen:
        print(f"{row['label']} ...", flush=True)
        start = time.perf_counter()
        compiled = presso.compile(model, row.pop("passes"), example_inputs=example, calibration=calibration)
        row.update(seconds=time.perf_counter() - start, params=compiled.report["params_after"], compiled=compiled,
                   stats=compiled.report["passes"][0]["stats"])
        row["ppl"] = ev.perplexity(compiled, tokenizer, windows=args.windows)
        print(f"  perplexity {row['ppl']:.2f}, params {row['params'] / 1e6:.2f} M", flush=True)
        if not row.get("export"):
            row.pop("compiled")  # keep memory flat: only timed rows keep their model
        rows.append(row)
    fp32["ppl"] = ev.perplexity(model, tokenizer, windows=args.windows)
    timed = [r for r in rows if r.get("export")]
    for row in timed:
        print(f"export {row['label']} ...", flush=True)
        compiled = row.pop("compiled") or presso.compile(model, [], example_inputs=example)
        path = compiled.export(workdir / row["label"].replace(" ", "_").replace("%", "").replace("=", ""))
        row["decoder"] = presso.runtime.load(path, providers=["CPUExecutionProvider"], threads=args.threads)
        row["mb"], row["kv_bytes"] = disk_mb(path), kv_bytes_per_token(row["decoder"])
    measure_latency(timed, rounds=args.rounds)
    for row in timed:
        if row["family"] in ("fp32", "share"):
            row["long_decode"] = statistics.median(long_context_decode_ms(row["decoder"], args.long)
                                                   for _ in range(args.rounds))
    for row in rows:
        row["removed"] = 1 - row["params"] / n_params
    return rows


def table(rows: list[dict], long: int) -> str:
    fp32 = rows[0]
    lines = ["| pipeline | params (M) | removed | perplexity | Δ ppl vs fp32 | size (MB) | prefill 128 (ms) "
             f"| decode @128 (ms/token) | decode @{long} (ms/token) | KV cache (KB/token) | compress (s) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        timed = "decoder" in r
        kv = f"{r['kv_bytes'] / 1024:.1f}" if "kv_bytes" in r else ""
        cell = lambda key, fmt, rel=False: (  # noqa: E731
            (fmt.format(r[key]) + (f" ({r[key] / fp32[key]:.2f}x)" if rel else "")) if key in r else "")
        lines.append(f"| {r['label']} | {r['params'] / 1e6:.1f} | {100 * r['removed']:.1f}% | {r['ppl']:.2f} "
                     f"| {100 * (r['ppl'] / fp32['ppl'] - 1):+.1f}% | {cell('mb', '{:.1f}')} "
                     f"| {cell('prefill', '{:.1f}', timed)} | {cell('decode', '{:.2f}', timed)} "
                     f"| {cell('long_decode', '{:.2f}', True)} | {kv} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for family in ("low-rank svd", "low-rank asvd", "low-rank whiten", "pruning"):
        pts = [rows[0]] + sorted((r for r in rows if r["family"] == family), key=lambda r: r["removed"])
        label = {"pruning": "prune_structured heads+mlp + recover"}.get(family, f"split_low_rank {family[9:]}")
        ax.plot([100 * r["removed"] for r in pts], [r["ppl"] for r in pts], marker="o", label=label)
    for r in rows:
        if r["family"] in ("mlp", "share"):
            ax.scatter(100 * r["removed"], r["ppl"], marker="s", s=25)
            ax.annotate(r["label"], (100 * r["removed"], r["ppl"]), fontsize=6, xytext=(4, 2),
                        textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("parameters removed (%)")
    ax.set_ylabel("WikiText-2 perplexity (log scale, lower is better)")
    ax.set_title("SmolLM2-135M: low-rank splits, head sharing and structured pruning")
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
    parser.add_argument("--long", type=int, default=1024, help="context length for the long decode timing")
    parser.add_argument("--calibration", type=int, default=32, help="calibration sequences of 256 tokens")
    parser.add_argument("--only", help="comma-separated label fragments: run only those rows (and fp32)")
    parser.add_argument("--plot", type=Path, help="write perplexity vs parameters removed here (PNG)")
    parser.add_argument("--out", help="write the markdown table here as well")
    parser.add_argument("--json", type=Path, help="write the rows here (for replotting)")
    args = parser.parse_args()
    rows = run(args)
    if args.json:
        keep = ("label", "family", "params", "removed", "ppl", "mb", "prefill", "decode", "long_decode", "kv_bytes",
                "seconds")
        args.json.write_text(json.dumps([{k: r[k] for k in keep if k in r} for r in rows], indent=1))
    text = table(rows, args.long)
    print(text)
    if args.out:
        Path(args.out).write_text(f"<!-- generated by python -m benchmarks.low_rank -->\n\nMachine: {machine(args)}\n\n"
                                  f"{text}\n")
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
