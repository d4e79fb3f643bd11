"""Triton kernels and decode speed on one CUDA GPU, against cuBLAS bf16 and torch's int4 kernel.

    python -m benchmarks.gpu [--part kernels,decode] [--models 8b,smollm2] [--out FILE]

Kernel table: ``y = x @ W.T`` for weights (N, K) and batch M, bf16 activations. Rows:
cuBLAS bf16 (``F.linear``); torch's ``_weight_int4pack_mm`` (group 128); presso int4
(group 128, symmetric), int8 weight-only (per channel) and W8A8 (per-token activations).
Each timing captures one call per weight copy (copies together over 512 MB of bf16, so
no weight stays in L2) in a CUDA graph and takes the median over replays; achieved
weight bandwidth counts the bytes of codes and scales once, as a fraction of the measured
device copy bandwidth (bytes read plus written).

Decode: a Llama-shaped decoder with random weights and a static KV cache, one token per
step, each step captured in a CUDA graph on every side; tokens/s = 1 / median step time.
Its linears are ``nn.Linear`` (bf16) or presso's Triton modules built from the modules that
``quantize_weights`` / ``quantize_dynamic_int8`` produce (lm_head included). Each model is
timed twice: the eager step, and the step through ``torch.compile`` (the Triton linears are
custom ops there), both captured the same way.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.gpu_decode import MODELS, decode_rows, decode_table

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096), (1536, 576), (576, 1536)]
BATCHES = [1, 4, 16, 64, 256, 512, 2048]


def copy_bandwidth() -> float:
    """Bytes per second of a 2 GiB device-to-device copy, read plus written."""
    from triton.testing import do_bench

    src = torch.empty(2 ** 30, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


# ---------------------------------------------------------------- operands

def int4_operands(w: torch.Tensor, group: int = 128):
    from presso.runtime.nbits import PackedWeight
    from presso.runtime.quant import WeightFormat, quantize_weight
    from presso.runtime.triton import weight_only

    packed = PackedWeight(quantize_weight(w.float(), WeightFormat(4, group, True)))
    return weight_only.prepare(packed.packed, packed.group_scales(), packed.zeros, 4, torch.bfloat16), packed


def int8_operands(w: torch.Tensor):
    from presso.runtime.nbits import PackedWeight
    from presso.runtime.quant import WeightFormat, quantize_weight
    from presso.runtime.triton import weight_only

    packed = PackedWeight(quantize_weight(w.float(), WeightFormat(8, -1, True)))
    return weight_only.prepare(packed.packed, packed.group_scales(), packed.zeros, 8, torch.bfloat16), packed


def tinygemm_operands(w: torch.Tensor, group: int = 128):
    """torch's int4 layout: uint8-packed codes converted to its tile layout, (scale, zero) pairs."""
    n, k = w.shape
    if k % group:
        raise RuntimeError(f"K={k} is not a multiple of its group size {group}")
    wg = w.float().view(n, k // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-6)
    zero = lo + 8 * scale  # tinygemm: w = (q - 8) * scale + zero
    q = torch.clamp(torch.round((wg - lo[..., None]) / scale[..., None]), 0, 15).to(torch.int32).view(n, k)
    packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    weight = torch.ops.aten._convert_weight_to_int4pack(packed, 8)
    sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return weight, sz


# ---------------------------------------------------------------- kernel table

ROTATE_BYTES = 512 * 2 ** 20  # bf16 weights cycled per timing: well over the L2 cache


def graph_us(calls: list) -> float:
    """Median µs per call, the calls (each on its own weights) captured in one CUDA graph: no launch gaps."""
    for call in calls[:2]:
        call()  # autotuning and lazy casts happen before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    times = []
    for _ in range(15):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times[3:])


def weight_sets(n: int, k: int) -> list[dict]:
    """Random weights in every format, enough copies that one pass over them overflows L2."""
    from presso.runtime.int8 import quantize_per_channel_int8
    from presso.runtime.triton.gemv_words import prepare_words

    sets = []
    for _ in range(max(2, -(-ROTATE_BYTES // (n * k * 2)))):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        q8, s8 = quantize_per_channel_int8(w.float())
        one = dict(bf16=w, int4=int4_operands(w)[0], int8=int8_operands(w)[0], w8a8=(q8.contiguous(), s8.float()))
        one["int4w"] = prepare_words(*one["int4"])
        one["int8w"] = prepare_words(*one["int8"])
        try:
            one["tiny"] = tinygemm_operands(w)
        except RuntimeError as exc:
            one["tiny"] = str(exc).splitlines()[0][:80]
        sets.append(one)
    return sets


def kernel_rows(copy_bw: float, batches: list[int] = BATCHES) -> list[dict]:
    from presso.runtime.triton import dequant, gemm_swapped, gemm_words, w8a8, weight_only

    rows = []
    for n, k in SHAPES:
        sets = weight_sets(n, k)
        first = sets[0]
        for m in batches:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            candidates = {
                "cuBLAS bf16": ([lambda s=s: F.linear(x, s["bf16"]) for s in sets], n * k * 2),
                "torch int4 (_weight_int4pack_mm)": (
                    first["tiny"] if isinstance(first["tiny"], str) else
                    [lambda s=s: torch.ops.aten._weight_int4pack_mm(x, s["tiny"][0], 128, s["tiny"][1]) for s in sets],
                    n * k // 2 + n * k // 128 * 4),
                "presso int4 g128": ([lambda s=s: weight_only.weight_only_matmul(x, s["int4"][0], s["int4"][1], None, k,
                                                                                  4,
                                                                                  words=s["int4w"])
                                      for s in sets], first["int4"][0].numel() + first["int4"][1].numel() * 2),
                "presso int8 weight-only": (
                    [lambda s=s: weight_only.weight_only_matmul(x, s["int8"][0], s["int8"][1], None, k, 8,
                                                                words=s["int8w"]) for s in sets],
                    first["int8"][0].numel() + first["int8"][1].numel() * 2),
                "presso W8A8": ([lambda s=s: w8a8.w8a8_matmul(x, *s["w8a8"]) for s in sets], n * k + n * 4),
                "W8A8, quantization in the GEMM": (
                    [lambda s=s: w8a8.w8a8_fused_matmul(x, *s["w8a8"]) for s in sets], n * k + n * 4),
            }
            if 1 < m < dequant.MIN_ROWS:  # the tensor-core kernels on their own, whichever the dispatch takes
                for bits, key in ((4, "int4"), (8, "int8")):
                    nbytes = first[key][0].numel() + first[key][1].numel() * 2
                    candidates[f"int{bits}, operands swapped alone (gemm_swapped)"] = (
                        [lambda s=s, bits=bits, key=key: gemm_swapped.gemm_swapped(x, *s[key], k, bits)
                         for s in sets], nbytes)
                    candidates[f"int{bits}, word layout alone (gemm_words)"] = (
                        [lambda s=s, bits=bits, key=key: gemm_words.gemm_words(x, *s[key + "w"], k, bits)
                         for s in sets], nbytes)
            if m >= 64:  # both paths of int4 around dequant.MIN_ROWS, whichever the dispatch takes
                int4_bytes = first["int4"][0].numel() + first["int4"][1].numel() * 2
                if m >= dequant.MIN_ROWS:
                    candidates["int4 fused kernel (gemm_words)"] = (
                        [lambda s=s: gemm_words.gemm_words(x, *s["int4w"], k, 4) for s in sets], int4_bytes)
                    candidates["int4 fused kernel, operands swapped (gemm_swapped)"] = (
                        [lambda s=s: gemm_swapped.gemm_swapped(x, *s["int4"], k, 4) for s in sets], int4_bytes)
                candidates["int4 dequantize + cuBLAS"] = (
                    [lambda s=s: dequant.dequantize_matmul(x, *s["int4w"], k, 4) for s in sets], int4_bytes)
            base = None
            for name, (calls, nbytes) in candidates.items():
                row = dict(shape=f"{n}x{k}", n=n, k=k, m=m, kernel=name)
                if isinstance(calls, str):
                    row["error"] = calls
                else:
                    try:
                        us = graph_us(calls)
                    except Exception as exc:  # noqa: BLE001 - a refusing kernel is a row, not a crash
                        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
                    else:
                        base = us if base is None else base
                        row.update(us=us, speedup=base / us, bw=nbytes / (us * 1e-6) / copy_bw)
                rows.append(row)
                print(row, flush=True)
        del sets
        torch.cuda.empty_cache()
    return rows


def sweep_rows(n: int = 4096, k: int = 4096, only: str = "") -> list[dict]:
    """Every configuration of each kernel timed on its own (the autotuner's view, for tuning the config lists)."""
    from presso.runtime.triton import gemm_words, gemv_words, w8a8, weight_only

    sets, rows = weight_sets(n, k), []
    plans = [(1, "int4 gemv", weight_only._gemv_kernel, lambda x, s, c: weight_only.weight_only_matmul(
                 x, s["int4"][0], s["int4"][1], None, k, 4, config=c)),
             (16, "int4 tensor-core", weight_only._weight_only_kernel, lambda x, s, c: weight_only.weight_only_matmul(
                 x, s["int4"][0], s["int4"][1], None, k, 4, config=c)),
             (64, "W8A8", w8a8._w8a8_kernel, lambda x, s, c: w8a8.w8a8_matmul(x, *s["w8a8"], config=c)),
             (1, "int4 words gemv", gemv_words._gemv_words_kernel,
              lambda x, s, c: gemv_words.gemv_words(x, *s["int4w"], k, 4, config=c))]
    plans += [(m, f"int4 words gemm M={m}", gemm_words._gemm_words_kernel,
               lambda x, s, c: gemm_words.gemm_words(x, *s["int4w"], k, 4, config=c)) for m in (16, 64, 256)]
    for m, name, kernel, call in [p for p in plans if only in p[1]]:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        for c in kernel.configs:
            if "BLOCK_K" in c.kwargs and 128 % c.kwargs["BLOCK_K"] and name.startswith("int4"):
                continue
            if name != "int4 gemv" and c.kwargs.get("BLOCK_M", 16) != max(16, m) and name == "W8A8":
                continue
            if name == "int4 tensor-core" and c.kwargs["BLOCK_M"] != 16:
                continue
            cfg = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
            try:
                us = graph_us([lambda s=s, cfg=cfg: call(x, s, cfg) for s in sets])
            except Exception as exc:  # noqa: BLE001
                rows.append(dict(kernel=name, m=m, config=cfg, error=str(exc).splitlines()[0][:80]))
            else:
                rows.append(dict(kernel=name, m=m, config=cfg, us=us))
            print(rows[-1], flush=True)
    return rows


def kernel_table(rows: list[dict]) -> str:
    lines = ["| N x K | M | kernel | µs | vs cuBLAS bf16 | weight bandwidth / copy |", "|---|---:|---|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['m']} | {r['kernel']} | refused: {r['error']} | | |")
        else:
            lines.append(f"| {r['shape']} | {r['m']} | {r['kernel']} | {r['us']:.1f} | {r['speedup']:.2f}x "
                         f"| {100 * r['bw']:.0f}% |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """The issue's targets, read off the table."""
    large = {f"{n}x{k}" for n, k in SHAPES[:4]}

    def pick(kernel, m, shapes=large):
        return [r for r in rows if r["kernel"] == kernel and r["m"] == m and r["shape"] in shapes and "us" in r]

    def med(kernel, m):
        got = pick(kernel, m)
        return statistics.median(r["speedup"] for r in got) if got else float("nan")

    wins = [(r["shape"], r["us"], t["us"]) for r in pick("presso int4 g128", 1, {r["shape"] for r in rows})
            for t in pick("torch int4 (_weight_int4pack_mm)", 1, {r["shape"]})]
    return "\n".join([
        f"- int4 M=1, large shapes: median {med('presso int4 g128', 1):.2f}x cuBLAS bf16 (target >= 2.5x)",
        f"- int4 M=1 vs torch int4 on every shape it runs: "
        f"{sum(p < t for _, p, t in wins)}/{len(wins)} faster ("
        + ", ".join(f"{s}: {t / p:.2f}x" for s, p, t in wins) + ")",
        f"- int4 M=16, large shapes: median {med('presso int4 g128', 16):.2f}x (target >= 2.0x)",
        f"- int4 M=64: median {med('presso int4 g128', 64):.2f}x (target >= 1.0x)",
        f"- int4 M=512: median {med('presso int4 g128', 512):.2f}x, M=2048: {med('presso int4 g128', 2048):.2f}x "
        f"(target >= 0.9x); fused kernel alone {med('int4 fused kernel (gemm_words)', 512):.2f}x / "
        f"{med('int4 fused kernel (gemm_words)', 2048):.2f}x, operands swapped "
        f"{med('int4 fused kernel, operands swapped (gemm_swapped)', 512):.2f}x / "
        f"{med('int4 fused kernel, operands swapped (gemm_swapped)', 2048):.2f}x, dequantize + cuBLAS alone "
        f"{med('int4 dequantize + cuBLAS', 512):.2f}x / {med('int4 dequantize + cuBLAS', 2048):.2f}x",
        f"- W8A8 M=64, large shapes: median {med('presso W8A8', 64):.2f}x (target >= 1.5x); quantization in "
        f"the GEMM: M=1 {med('W8A8, quantization in the GEMM', 1):.2f}x, M=16 "
        f"{med('W8A8, quantization in the GEMM', 16):.2f}x, M=64 {med('W8A8, quantization in the GEMM', 64):.2f}x",
        "- tensor-core kernels alone, M=16 / 64: " + ", ".join(
            f"{name} {med(name, 16):.2f}x / {med(name, 64):.2f}x" for name in (
                "int4, operands swapped alone (gemm_swapped)", "int4, word layout alone (gemm_words)",
                "int8, operands swapped alone (gemm_swapped)", "int8, word layout alone (gemm_words)")),
        f"- int8 weight-only M=1: median {med('presso int8 weight-only', 1):.2f}x (target >= 1.6x), "
        f"M=64: {med('presso int8 weight-only', 64):.2f}x (target >= 1.0x)",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="kernels,decode")
    parser.add_argument("--models", default="8b,smollm2,smollm2-unpacked",
                        help="decode models: " + ", ".join(MODELS))
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--sweep", default="", help="sweep only the kernels whose name holds this")
    parser.add_argument("--sweep-shape", default="4096x4096", help="N x K of the sweep")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="rows of the kernel table")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    copy_bw = copy_bandwidth()
    import triton

    text = [f"Device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, triton "
            f"{triton.__version__}; measured copy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write)."]
    if "sweep" in args.part:
        n, k = map(int, args.sweep_shape.split("x"))
        for r in sweep_rows(n, k, args.sweep):
            text.append(f"- sweep {r['kernel']} M={r['m']} {r['config']}: {r.get('us', r.get('error'))}")
    if "kernels" in args.part:
        rows = kernel_rows(copy_bw, [int(m) for m in args.batches.split(",")])
        text += ["", kernel_table(rows), "", summary(rows)]
    if "decode" in args.part:
        text += ["", decode_table(decode_rows(args.models, args.context), args.context)]
    out = "\n".join(text)
    print(out)
    if args.out:
        args.out.write_text(f"<!-- generated by python -m benchmarks.gpu -->\n\n{out}\n")


if __name__ == "__main__":
    main()
