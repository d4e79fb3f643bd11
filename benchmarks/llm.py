"""LLM benchmark on the embedded SmolLM2: size, perplexity, latency, against peers.

    python -m benchmarks.llm [--groups int8,int4] [--windows 64] [--threads 2] [--out FILE]

Every row is measured in the same run on the same inputs: perplexity by the shared protocol
(WikiText-2 test, 64 x 256 tokens), prefill of one 128-token prompt and per-token decode
with a KV cache (ONNX Runtime CPU, or PyTorch eager for eager peers), medians after
warm-up. ONNX peers quantize the very fp32 graph that presso exports; every calibrated
method, presso's and the peers', sees the same 128 WikiText-2 validation sequences of 256 tokens.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import presso
from benchmarks import peers
from presso import eval as ev
from presso import models
from presso.runtime.decoder import CacheLayout, OrtDecoder
from presso.runtime.ort_model import session

PROMPT_LEN, DECODE_STEPS, REPEATS = 128, 48, 10


def median_ms(fn, repeats: int = REPEATS, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def ort_latency(decoder: OrtDecoder) -> tuple[float, float]:
    """(prefill ms for a 128-token prompt, median ms per decoded token with the cache)."""
    prompt = np.random.default_rng(0).integers(3, 1000, (1, PROMPT_LEN))
    prefill = median_ms(lambda: decoder.step(prompt, decoder.empty_cache(1)))
    _, past = decoder.step(prompt, decoder.empty_cache(1))
    token = np.array([[42]])
    steps = []
    for _ in range(DECODE_STEPS):
        start = time.perf_counter()
        _, past = decoder.step(token, past)
        steps.append(time.perf_counter() - start)
    return prefill, statistics.median(steps[2:]) * 1e3


@torch.no_grad()
def eager_latency(model) -> tuple[float, float]:
    prompt = torch.randint(3, 1000, (1, PROMPT_LEN))
    prefill = median_ms(lambda: model(prompt, use_cache=True), repeats=5)
    out = model(prompt, use_cache=True)
    past, token, steps = out.past_key_values, torch.tensor([[42]]), []
    for _ in range(DECODE_STEPS):
        start = time.perf_counter()
        past = model(token, past_key_values=past, use_cache=True).past_key_values
        steps.append(time.perf_counter() - start)
    return prefill, statistics.median(steps[2:]) * 1e3


def disk_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*")) / 1e6


def load_decoder(path: Path, layout: CacheLayout, threads: int) -> OrtDecoder:
    return OrtDecoder(session(path, ["CPUExecutionProvider"], threads), layout, {}, path)


def presso_row(label, model, passes, workdir, args, calibration=None, verify=True):
    start = time.perf_counter()
    compiled = presso.compile(model, passes, example_inputs=torch.randint(3, 1000, (1, 16)),
                              calibration=calibration, verify=verify)
    compile_seconds = time.perf_counter() - start
    path = compiled.export(workdir / label.replace(" ", "_").replace("/", "-"))
    decoder = presso.runtime.load(path, providers=["CPUExecutionProvider"], threads=args.threads)
    return path, decoder, dict(label=label, mb=disk_mb(path), params=compiled.report["params_after"],
                               seconds=compile_seconds, decoder=decoder, note=_memory_note(compiled.report))


def _memory_note(report) -> str:
    for p in report["passes"]:
        memory = p["stats"].get("calibration_memory")
        if memory:
            return (f"peak RSS {memory['process_peak_rss_bytes'] / 1e9:.1f} GB; one block's inputs "
                    f"{memory['block_inputs_bytes'] / 1e6:.0f} MB + Hessians {memory['hessian_bytes'] / 1e6:.0f} MB")
    return ""


def onnx_peer_row(label, quantize, fp32_path, layout, workdir, feeds, args) -> dict:
    print(f"peer: {label} ...", flush=True)
    out, seconds, error = peers.run_onnx_peer(label, quantize, fp32_path, workdir, feeds)
    if out is None:
        return dict(label=label, failed=error, seconds=seconds)
    return dict(label=label, mb=disk_mb(out), params=None, seconds=seconds,
                decoder=load_decoder(out, layout, args.threads), note="")


def eager_peer_row(label, quantize, model) -> dict:
    print(f"peer: {label} ...", flush=True)
    quantized, seconds, mb, error = peers.run_eager_peer(label, quantize, model)
    if quantized is None:
        return dict(label=label, failed=error, seconds=seconds)
    return dict(label=label, mb=mb, params=None, seconds=seconds, eager=quantized, note="")


def int8_recipes() -> list[tuple[str, list]]:
    mp = presso.make_pass
    return [("presso quantize_dynamic_int8 (W8A8 dynamic, per-token)", [mp("quantize_dynamic_int8")]),
            ("presso rotate_residual(online) + quantize_dynamic_int8 (W8A8 dynamic, per-token)",
             [mp("rotate_residual", online=True), mp("quantize_dynamic_int8")]),
            ("presso rotate_residual(online) + quantize_dynamic_int8, lm_head float",
             [mp("rotate_residual", online=True), mp("quantize_dynamic_int8", skip=("lm_head",))]),
            ("presso smooth_quant + quantize_static_int8 (W8A8 static)",
             [mp("smooth_quant", search=True), mp("quantize_static_int8", observer="mse", keep_sensitive=SENSITIVE)]),
            ("presso smooth_quant + quantize_static_int8, down_proj per-token, lm_head float (W8A8)",
             [mp("smooth_quant", search=True, skip=("*down_proj",)),
              mp("quantize_static_int8", observer="mse", dynamic=("*down_proj",), skip=("lm_head",))]),
            ("presso quantize_weights int8 per-channel", [mp("quantize_weights", bits=8, group_size=-1)]),
            ("presso quantize_weights int8 per-channel GPTQ",
             [mp("quantize_weights", bits=8, group_size=-1, method="gptq")])]


def int4_recipes(group: int) -> list[tuple[str, list]]:
    mp = presso.make_pass
    ordered = {"act_order": True}  # GPTQ columns by decreasing Hessian diagonal
    rows = [(f"presso int4 sym g{group} {method.upper()} (lm_head float)",
             [mp("quantize_weights", bits=4, group_size=group, method=method, skip=("lm_head",),
                 **(ordered if "gptq" in method else {}))])
            for method in ("rtn", "gptq", "awq")]
    rows += [(f"presso int4 sym g{group} AWQ+GPTQ + int8 embeddings/lm_head, {scales} scales",
              [mp("quantize_weights", bits=4, group_size=group, method="awq+gptq", embeddings="int8", scales=scales,
                  **ordered)])
             for scales in ("float16", "int8")]
    return rows


SENSITIVE = 4  # layers kept in float by the W8A8 recipe (its report names them)


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    model, tokenizer = models.load("smollm2-135m")
    n_params = sum(p.numel() for p in model.parameters())
    workdir = Path(tempfile.mkdtemp(prefix="presso-bench-"))
    calibration = ev.calibration_batches(tokenizer, n=args.calibration, seq_len=256, batch_size=8)
    rows = [dict(label="fp32 eager (PyTorch)", mb=n_params * 4 / 1e6, params=n_params, seconds=0.0, eager=model,
                 note="")]
    fp32_path, _, fp32 = presso_row("fp32 ONNX Runtime", model, [], workdir, args)
    rows.append(fp32)
    layout = fp32["decoder"].layout
    feeds = peers.calibration_feeds(fp32["decoder"], calibration)
    groups = args.groups.split(",")
    if "int8" in groups:
        rows += [onnx_peer_row(label, q, fp32_path, layout, workdir, feeds, args)
                 for label, q in peers.ONNX_PEERS.items()]
        rows += [eager_peer_row(label, q, model) for label, q in peers.EAGER_PEERS.items()]
        rows += [presso_row(label, model, passes, workdir, args, calibration)[2] for label, passes in int8_recipes()]
    if "peers" in groups:  # the calibrated ONNX peers alone
        rows += [onnx_peer_row(label, q, fp32_path, layout, workdir, feeds, args) for label, q in
                 [("ORT quantize_static int8 QDQ (MinMax, per-channel)", peers.ort_quantize_static),
                  *list(peers.onnx_int4_peers(args.group).items())[2:]]]
    if "int8-weights" in groups:  # the rows that read 8-bit MatMulNBits
        rows += [presso_row(label, model, passes, workdir, args, calibration)[2]
                 for label, passes in int8_recipes()[2:] + int4_recipes(args.group)[3:]]
    if "int4" in groups:
        rows += [onnx_peer_row(label, q, fp32_path, layout, workdir, feeds, args)
                 for label, q in peers.onnx_int4_peers(args.group).items()]
        rows += [presso_row(label, model, passes, workdir, args, calibration)[2]
                 for label, passes in int4_recipes(args.group)]
    for row in rows:
        if "failed" in row:
            continue
        print(f"perplexity of {row['label']} ...", flush=True)
        row["ppl"] = ev.perplexity(row.get("eager") or row["decoder"], tokenizer, windows=args.windows)
    measure_latency([r for r in rows if "failed" not in r], rounds=args.rounds)
    return rows


def measure_latency(rows: list[dict], rounds: int) -> None:
    """Interleaved rounds, median of the per-round medians: drift in the machine hits every row alike."""
    samples = {row["label"]: [] for row in rows}
    for r in range(rounds):
        print(f"latency round {r + 1}/{rounds} ...", flush=True)
        for row in rows:
            target = row.get("eager") or row["decoder"]
            samples[row["label"]].append(eager_latency(target) if "eager" in row else ort_latency(target))
    for row in rows:
        prefill, decode = zip(*samples[row["label"]])
        row["prefill"], row["decode"] = statistics.median(prefill), statistics.median(decode)


def table(rows: list[dict]) -> str:
    base = rows[0]["ppl"]
    fp32_prefill = rows[1]["prefill"]
    lines = ["| pipeline | size (MB) | perplexity | Δ ppl vs fp32 | prefill 128 tok (ms) | prefill vs fp32 ORT "
             "| decode (ms/token) | compress (s) | notes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['label']} | | | | | | | {r['seconds']:.0f} | failed: {r['failed']} |")
            continue
        lines.append(f"| {r['label']} | {r['mb']:.1f} | {r['ppl']:.2f} | {100 * (r['ppl'] / base - 1):+.1f}% "
                     f"| {r['prefill']:.1f} | {r['prefill'] / fp32_prefill:.2f}x | {r['decode']:.2f} "
                     f"| {r['seconds']:.0f} | {r.get('note', '')} |")
    return "\n".join(lines)


def machine(args) -> str:
    import onnx

    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads / "
            f"{args.threads} ONNX Runtime intra-op threads, Python {platform.python_version()}, "
            f"torch {torch.__version__}, "
            f"onnxruntime {ort.__version__}, onnx {onnx.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=64, help="perplexity windows of 256 tokens (protocol: 64)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds")
    parser.add_argument("--groups", default="int8,int4",
                        help="row groups: int8, int4; also peers (calibrated ONNX peers), int8-weights")
    parser.add_argument("--group", type=int, default=64, help="int4 group size for every int4 row")
    parser.add_argument("--calibration", type=int, default=128, help="calibration sequences of 256 tokens")
    parser.add_argument("--out", help="write the markdown table here as well")
    args = parser.parse_args()
    rows = run(args)
    text = table(rows)
    print(text)
    if args.out:
        header = "<!-- generated by python -m benchmarks.llm -->"
        Path(args.out).write_text(f"{header}\n\nMachine: {machine(args)}\n\n{text}\n")


if __name__ == "__main__":
    main()
