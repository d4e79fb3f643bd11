"""Wide configuration sweeps of the word-layout kernels, to choose their autotune lists from.

    python3 -m benchmarks.gpu_sweep [--plans gemv,gemm,int8,decode,decode16,prefill] [--jobs 14]
                                    [--per-plan 120] [--out FILE] [--write runtime/triton/tuned.json]

Each plan draws up to ``--per-plan`` candidate configurations (a fixed-seed sample of a grid, plus
every configuration the kernel's autotuner already holds). Candidates are compiled first by
``--jobs`` processes, which fill Triton's disk cache, then timed one after another in this process
the way the kernel table times (``benchmarks.gpu.graph_us``: one CUDA graph over weight copies that
overflow L2). Per shape and batch it prints cuBLAS bf16, today's autotuned dispatch, torch's int4
kernel at one row, and the fastest candidates. ``decode`` and ``decode16`` time the decoders' other
shapes (Llama-3-8B's packed q/k/v and gate/up, down and head; SmolLM2's o and head) at one and 16
rows, so that the decode benchmark runs pinned configurations throughout. ``prefill`` adds a plain
Triton bf16 GEMM (tiles loaded and multiplied, nothing dequantized): the ceiling of any fused Triton
kernel at those sizes. ``--write`` adds each shape's fastest candidate, where it beats today's
dispatch by over 2%, to the file the kernels' autotune lists read (``tuning.tuned_configs``), and
pins every swept shape's fastest for this device (``pins``: the kernels launch it there without
autotuning). Candidates the kernels' pruning rules would refuse are not timed.
"""
from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from benchmarks.gpu import ROTATE_BYTES, graph_us, int4_operands, int8_operands, tinygemm_operands
from benchmarks.gpu_prefill_refs import bf16_gemm, int4_swap

LARGE = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]
SMOL = [(1536, 576), (576, 1536), (3072, 576), (960, 576)]  # SmolLM2: up, down, packed gate/up, packed q/k/v
# the decoders' other shapes: Llama-3-8B packed q/k/v, packed gate/up, down, head; SmolLM2 o and head
DECODE_8B = [(6144, 4096), (28672, 4096), (4096, 14336), (128256, 4096)]
DECODE = DECODE_8B + [(576, 576), (49152, 576)]


SWAP = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=st)
        for bm, bn, bk, w, st in [(128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3),
                                  (64, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 128, 8, 3),
                                  (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (256, 64, 64, 8, 3),
                                  (128, 256, 128, 8, 2)]]


def _sample(grid: list[dict], existing: list[dict], count: int) -> list[dict]:
    random.Random(0).shuffle(grid)
    seen, out = set(), []
    for c in existing + grid:
        key = tuple(sorted(c.items()))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out[:max(count, len(existing))]


def _existing(kernel) -> list[dict]:
    return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in kernel.configs]


def gemv_candidates(count: int) -> list[dict]:
    from presso.runtime.triton import gemv_words

    grid = [dict(BLOCK_N=bn, TILE_W=tw, SPLIT_K=sk, DEQUANT=dq, num_warps=w, num_stages=st)
            for bn, tw, sk, w, dq, st in itertools.product((64, 128, 256, 512, 1024), (2, 4, 8, 16),
                                                           (1, 2, 4, 8, 16, 32, 64), (2, 4, 8), (1, 2), (2, 3, 4))
            if 2 <= bn * tw // (32 * w) <= 32]
    return _sample(grid, [c for c in _existing(gemv_words._gemv_words_kernel) if c["DEQUANT"] != 0], count)


def gemm_candidates(count: int, rows: tuple[int, ...], bits: int) -> list[dict]:
    from presso.runtime.triton import gemm_words

    kinds = ((0, 0), (1, 0), (0, 1)) if bits == 4 else ((0, 0), (0, 1))
    grid = [dict(BLOCK_M=bm, BLOCK_N=bn, TILE_W=tw, SPLIT_K=sk, PAIRS=p, UNPACK=u, num_warps=w, num_stages=st)
            for bm, bn, tw, sk, w, st, (p, u) in itertools.product(rows, (32, 64, 128, 256), (4, 8, 16),
                                                                   (1, 2, 4, 8, 16), (2, 4, 8), (2, 3, 4, 5), kinds)
            if 4 <= bm * bn // (32 * w) <= 256]
    existing = [c for c in _existing(gemm_words._gemm_words_kernel) if c["BLOCK_M"] in rows
                and (bits == 4 or not c["PAIRS"])]
    return _sample(grid, existing, count)


def prefill_candidates(count: int) -> list[dict]:
    grid = [dict(BLOCK_M=bm, BLOCK_N=bn, TILE_W=tw, SPLIT_K=1, PAIRS=p, UNPACK=u, num_warps=w, num_stages=st)
            for bm, bn, tw, w, st, (p, u) in itertools.product((64, 128, 256), (64, 128, 256), (4, 8, 16), (4, 8),
                                                               (2, 3, 4), ((0, 0), (1, 0), (0, 1)))
            if bm * bn <= 128 * 256 and 32 <= bm * bn // (32 * w) <= 128]
    return _sample(grid, [], count)


CEILING = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=st)
           for bm, bn, bk, w, st in [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 4, 4),
                                     (128, 128, 64, 8, 4), (128, 128, 64, 8, 5), (256, 128, 64, 8, 3),
                                     (64, 256, 64, 4, 4), (128, 256, 32, 8, 5), (128, 128, 128, 8, 3),
                                     (64, 128, 64, 4, 5), (256, 128, 64, 8, 4), (128, 64, 64, 4, 5)]]


EXTRA = [("Triton bf16 GEMM (ceiling)", CEILING, lambda x, s, c: bf16_gemm(x, s["w_t"], c)),
         ("int4 swapped operands", SWAP, lambda x, s, c: int4_swap(x, s["rows"], c)),
         ("int4 swapped, biased codes", SWAP, lambda x, s, c: int4_swap(x, s["rows"], c, biased=True))]


def plans(per_plan: int) -> dict:
    """name: (bits, rows, shapes, candidates, call(x, weights, config))."""
    from presso.runtime.triton import gemm_words, gemv_words

    return {
        "gemv": (4, (1,), LARGE + SMOL, gemv_candidates(per_plan),
                 lambda x, s, c, k: gemv_words.gemv_words(x, *s["words"], k, 4, config=c)),
        "gemm": (4, (16, 64), LARGE, gemm_candidates(per_plan, (16, 32, 64), 4),
                 lambda x, s, c, k: gemm_words.gemm_words(x, *s["words"], k, 4, config=c)),
        "int8": (8, (64,), LARGE, gemm_candidates(per_plan, (16, 32, 64), 8),
                 lambda x, s, c, k: gemm_words.gemm_words(x, *s["words"], k, 8, config=c)),
        "decode": (4, (1,), DECODE, gemv_candidates(per_plan),
                   lambda x, s, c, k: gemv_words.gemv_words(x, *s["words"], k, 4, config=c)),
        "decode16": (4, (16,), DECODE_8B, gemm_candidates(per_plan, (16,), 4),
                     lambda x, s, c, k: gemm_words.gemm_words(x, *s["words"], k, 4, config=c)),
        "prefill": (4, (512, 2048), [(4096, 4096), (14336, 4096)], prefill_candidates(min(per_plan, 40)),
                    lambda x, s, c, k: gemm_words.gemm_words(x, *s["words"], k, 4, config=c)),
    }


def operands(n: int, k: int, bits: int, copies: int) -> list[dict]:
    """``copies`` sets of the same weight (values do not change a timing), each in its own memory."""
    from presso.runtime.triton.gemv_words import prepare_words

    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    rows = (int4_operands if bits == 4 else int8_operands)(w)[0]
    words = prepare_words(*rows)
    one = dict(bf16=w, rows=rows, words=words, w_t=w.t().contiguous())
    try:
        one["tiny"] = tinygemm_operands(w)
    except RuntimeError:
        one["tiny"] = None

    def clone(v):
        if isinstance(v, torch.Tensor):
            return v.clone()
        return None if v is None else tuple(clone(t) for t in v)
    return [one] + [{key: clone(v) for key, v in one.items()} for _ in range(copies - 1)]


def _compile(job: tuple) -> int:
    """One process: run each of its candidates once on every shape and batch (fills Triton's cache)."""
    plan_name, per_plan, indices = job
    bits, rows, shapes, candidates, call = plans(per_plan)[plan_name]
    failed = 0
    for n, k in shapes:
        # Triton specializes on N's divisibility by 16, not its size: a head-sized N compiles
        # on a 16384-wide slice (14 processes holding a 128256-row weight each run out of memory)
        s = operands(n if n <= 16384 or n % 16 else 16384, k, bits, 1)[0]
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            for i in indices:
                try:
                    call(x, s, candidates[i], k)
                except Exception:  # noqa: BLE001 - an invalid candidate is reported when timed
                    failed += 1
            if plan_name == "prefill" and 0 in indices:
                for _, configs, run in EXTRA:
                    for c in configs:
                        try:
                            run(x, s, c)
                        except Exception:  # noqa: BLE001
                            failed += 1
    torch.cuda.synchronize()
    return failed


KERNEL_OF_PLAN = {"gemv": "gemv_words", "gemm": "gemm_words", "int8": "gemm_words", "prefill": "gemm_words",
                  "decode": "gemv_words", "decode16": "gemm_words"}


def time_plan(name: str, per_plan: int, log, winners: dict) -> None:
    from presso.runtime.triton import pins, tuning, weight_only

    bits, rows, shapes, candidates, call = plans(per_plan)[name]
    for n, k in shapes:
        sets = operands(n, k, bits, max(2, -(-ROTATE_BYTES // (n * k * 2))))
        n_words, blocks = sets[0]["words"][0].shape[0], sets[0]["words"][1].shape[0]
        group = n_words * (32 // bits) // blocks  # as the kernels compute it
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            base = graph_us([lambda s=s: F.linear(x, s["bf16"]) for s in sets])
            today = graph_us([lambda s=s: weight_only.weight_only_matmul(x, *s["rows"][:2], None, k, bits,
                                                                         words=s["words"]) for s in sets])
            line = f"## {name} {n}x{k} M={m}: cuBLAS bf16 {base:.2f} µs; dispatch today {today:.2f} µs " \
                   f"({base / today:.2f}x)"
            if m == 1 and sets[0]["tiny"] is not None:
                tiny = graph_us([lambda s=s: torch.ops.aten._weight_int4pack_mm(x, s["tiny"][0], 128, s["tiny"][1])
                                 for s in sets])
                line += f"; torch int4 {tiny:.2f} µs ({base / tiny:.2f}x)"
            results = []
            for c in candidates:
                if "TILE_W" in c and not tuning.split_ok(n_words, c["TILE_W"], c["SPLIT_K"]):
                    continue  # the kernels' pruning would refuse it (too many splits for 16-bit adds)
                try:
                    results.append((graph_us([lambda s=s, c=c: call(x, s, c, k) for s in sets]), c))
                except Exception:  # noqa: BLE001 - a candidate this shape refuses
                    continue
            if name == "prefill":
                reference = F.linear(x, sets[0]["bf16"]).float()
                for kernel, configs, run in EXTRA:
                    for c in configs:
                        try:
                            error = float((run(x, sets[0], c).float() - reference).norm() / reference.norm())
                            us = graph_us([lambda s=s, c=c, run=run: run(x, s, c) for s in sets])
                        except Exception as exc:  # noqa: BLE001
                            why = " / ".join(line.strip() for line in str(exc).splitlines() if line.strip())
                            log(f"- {kernel} {c} refused: {type(exc).__name__}: {why[-400:]}")
                            continue
                        results.append((us, dict(c, kernel=kernel, error=round(error, 4))))
            results.sort(key=lambda r: r[0])
            own = [r for r in results if "kernel" not in r[1]]
            if own and own[0][0] < 0.98 * today:
                winners.setdefault(KERNEL_OF_PLAN[name], []).append(own[0][1])
            if own and name != "prefill":  # prefill rows go to dequantize + cuBLAS, not to these kernels
                key = pins.pin_key(n, k, tuning.rows_key(m), bits, group, True, x.dtype)
                winners.setdefault("pinned", {}).setdefault(KERNEL_OF_PLAN[name], {})[key] = own[0][1]
            log(line + f"; {len(results)} candidates timed")
            for us, c in results[:6]:
                log(f"- {us:.2f} µs ({base / us:.2f}x) {c}")
            for kernel, _, _ in EXTRA if name == "prefill" else ():
                best = [r for r in results if r[1].get("kernel") == kernel][:1]
                for us, c in best:
                    log(f"- best {kernel}: {us:.2f} µs ({base / us:.2f}x cuBLAS) {c}")
        del sets
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", default="gemv,gemm,int8,decode,decode16,prefill")
    parser.add_argument("--per-plan", type=int, default=120)
    parser.add_argument("--jobs", type=int, default=14)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--write", type=Path, help="the tuned-configurations file to add the winners to")
    args = parser.parse_args()
    lines: list[str] = []

    def log(text: str) -> None:
        print(text, flush=True)
        lines.append(text)
        if args.out:
            args.out.write_text("\n".join(lines) + "\n")

    log(f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}")
    names = args.plans.split(",")
    jobs = []
    for name in names:
        count = len(plans(args.per_plan)[name][3])
        jobs += [(name, args.per_plan, list(range(i, count, args.jobs))) for i in range(args.jobs)]
    start = time.time()
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        failed = sum(pool.map(_compile, jobs, chunksize=1))
    log(f"compiled {len(jobs)} jobs in {time.time() - start:.0f} s ({failed} candidate runs refused)")
    winners: dict = {}
    for name in names:
        start = time.time()
        time_plan(name, args.per_plan, log, winners)
        log(f"({name} timed in {time.time() - start:.0f} s)")
        if args.write:
            write_winners(args.write, winners)


def write_winners(path: Path, winners: dict) -> None:
    """Merge ``winners`` into the tuned-configurations file: candidates for the autotune lists (one
    entry per distinct configuration) and, under ``"pinned"``, each swept shape's fastest."""
    from presso.runtime.triton import pins

    tuned = json.loads(path.read_text()) if path.exists() else {}
    for kernel, by_key in winners.get("pinned", {}).items():
        pins.with_pins(tuned, kernel, torch.cuda.get_device_name(), by_key)
    for kernel, configs in winners.items():
        if kernel == "pinned":
            continue
        have = tuned.setdefault(kernel, [])
        for c in configs:
            if c not in have:
                have.append(c)
    tuned["device"] = torch.cuda.get_device_name()
    path.write_text(json.dumps(tuned, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
