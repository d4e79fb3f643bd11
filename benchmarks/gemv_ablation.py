"""Where the batch-1 int4 GEMV (:mod:`presso.runtime.triton.gemv_words`) spends its time: ablations.

    PYTHONPATH=. python3 benchmarks/gemv_ablation.py      # on a CUDA machine, about 2 minutes

Symmetric int4, group 128, bf16 activations, the four large shapes of ``benchmarks.gpu``,
timed the same way (CUDA-graph replays over weight copies that overflow L2):

- V0: the autotuned kernel as ``presso`` runs it: the split-K output is zeroed by a memset node, then the kernel.
- V1: V0's chosen configuration without the memset (the output is wrong; the time is the kernel's alone).
- V2: a kernel that only loads the same tiles: the ceiling of this memory layout and grid.
- V3: split K into an fp32 workspace with a per-column-block counter; the last program writes
  the output and zeroes the workspace, so no memset is needed.
- V4: stream-K over (column block, K tile) pairs on a grid of a few programs per SM, with V3's workspace.
Results and the conclusions drawn: docs/benchmarks.md, "Where the batch-1 int4 kernel's time goes".
"""
import itertools
import sys

import torch
import triton
import triton.language as tl

from benchmarks.gpu import copy_bandwidth, graph_us, int4_operands
from presso.runtime.triton import gemv_words as gw
from presso.runtime.triton.gemv_words import prepare_words

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]


@triton.jit
def read_only(w_ptr, out_ptr, N, WORDS, BLOCK_N: tl.constexpr, TILE_W: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rn < N
    tiles = tl.cdiv(WORDS, TILE_W)
    per_split = tl.cdiv(tiles, SPLIT_K)
    acc = tl.zeros((TILE_W, BLOCK_N), dtype=tl.int32)
    for t in range(pid_k * per_split, min((pid_k + 1) * per_split, tiles)):
        rw = t * TILE_W + tl.arange(0, TILE_W)
        acc ^= tl.load(w_ptr + rw[:, None] * N + rn[None, :], mask=(rw < WORDS)[:, None] & mask_n[None, :], other=0)
    tl.store(out_ptr + pid_k * N + rn, tl.sum(acc, axis=0), mask=mask_n)


@triton.jit
def gemv_ws(x_ptr, w_ptr, s_ptr, ws_ptr, cnt_ptr, out_ptr, N, K, WORDS, GROUP: tl.constexpr,
            BLOCK_N: tl.constexpr, TILE_W: tl.constexpr, SPLIT_K: tl.constexpr):
    CPW: tl.constexpr = 8
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rn < N
    WPG: tl.constexpr = GROUP // CPW
    tiles = tl.cdiv(WORDS, TILE_W)
    per_split = tl.cdiv(tiles, SPLIT_K)
    acc = tl.zeros((TILE_W, BLOCK_N), dtype=tl.float32)
    for t in range(pid_k * per_split, min((pid_k + 1) * per_split, tiles)):
        rw = t * TILE_W + tl.arange(0, TILE_W)
        mask_w = rw < WORDS
        words = tl.load(w_ptr + rw[:, None] * N + rn[None, :], mask=mask_w[:, None] & mask_n[None, :], other=0)
        block = (t * TILE_W) // WPG
        scale = tl.load(s_ptr + block * N + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        base = rw * CPW
        dot = gw._dot8_half2(words, gw._x_pair(x_ptr, base, 0, K, mask_w), gw._x_pair(x_ptr, base, 1, K, mask_w),
                             gw._x_pair(x_ptr, base, 2, K, mask_w), gw._x_pair(x_ptr, base, 3, K, mask_w))
        acc += dot * (scale * 16.0)
    result = tl.sum(acc, axis=0)
    if SPLIT_K == 1:
        tl.store(out_ptr + rn, result.to(out_ptr.dtype.element_ty), mask=mask_n)
    else:
        tl.atomic_add(ws_ptr + rn, result, mask=mask_n, sem="relaxed")
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if done == SPLIT_K - 1:
            total = tl.load(ws_ptr + rn, mask=mask_n, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + rn, total.to(out_ptr.dtype.element_ty), mask=mask_n)
            tl.store(ws_ptr + rn, tl.zeros_like(total), mask=mask_n)
            tl.debug_barrier()
            tl.atomic_xchg(cnt_ptr + pid_n, 0)


@triton.jit
def gemv_sk(x_ptr, w_ptr, s_ptr, ws_ptr, cnt_ptr, out_ptr, N, K, WORDS, GROUP: tl.constexpr,
            BLOCK_N: tl.constexpr, TILE_W: tl.constexpr, PROGRAMS: tl.constexpr):
    """Stream-K: program p takes an equal run of the (column block, K tile) tiles, flushing into ws."""
    CPW: tl.constexpr = 8
    WPG: tl.constexpr = GROUP // CPW
    pid = tl.program_id(0)
    tpc = tl.cdiv(WORDS, TILE_W)  # tiles per column block
    total = tl.cdiv(N, BLOCK_N) * tpc
    start = (pid * total) // PROGRAMS
    end = ((pid + 1) * total) // PROGRAMS
    acc = tl.zeros((TILE_W, BLOCK_N), dtype=tl.float32)
    seg = start
    for idx in range(start, end):
        nb = idx // tpc
        t = idx - nb * tpc
        rn = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = rn < N
        rw = t * TILE_W + tl.arange(0, TILE_W)
        mask_w = rw < WORDS
        words = tl.load(w_ptr + rw[:, None] * N + rn[None, :], mask=mask_w[:, None] & mask_n[None, :], other=0)
        block = (t * TILE_W) // WPG
        scale = tl.load(s_ptr + block * N + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        base = rw * CPW
        dot = gw._dot8_half2(words, gw._x_pair(x_ptr, base, 0, K, mask_w), gw._x_pair(x_ptr, base, 1, K, mask_w),
                             gw._x_pair(x_ptr, base, 2, K, mask_w), gw._x_pair(x_ptr, base, 3, K, mask_w))
        acc += dot * (scale * 16.0)
        if (t == tpc - 1) | (idx == end - 1):
            tl.atomic_add(ws_ptr + rn, tl.sum(acc, axis=0), mask=mask_n, sem="relaxed")
            acc = tl.zeros((TILE_W, BLOCK_N), dtype=tl.float32)
            tl.debug_barrier()
            done = idx - seg + 1
            before = tl.atomic_add(cnt_ptr + nb, done, sem="acq_rel")
            if before + done == tpc:
                col = tl.load(ws_ptr + rn, mask=mask_n, other=0.0, cache_modifier=".cg")
                tl.store(out_ptr + rn, col.to(out_ptr.dtype.element_ty), mask=mask_n)
                tl.store(ws_ptr + rn, tl.zeros_like(col), mask=mask_n)
                tl.debug_barrier()
                tl.atomic_xchg(cnt_ptr + nb, 0)
            seg = idx + 1


def run_sk(x, s, n, k, cfg):
    out = torch.empty(n, device="cuda", dtype=x.dtype)
    words = s["words"]
    c = dict(cfg)
    warps, stages = c.pop("num_warps"), c.pop("num_stages")
    gemv_sk[(c["PROGRAMS"],)](x, words, s["st"], s["ws"], s["cnt"], out, n, k, words.shape[0], GROUP=128,
                              num_warps=warps, num_stages=stages, **c)
    return out


SMS = 132
SK_GRID = [dict(BLOCK_N=bn, TILE_W=tw, PROGRAMS=SMS * p, num_warps=wp, num_stages=st)
           for bn, tw, p, wp, st in itertools.product((128, 256, 512), (8, 16), (2, 4, 8), (4, 8), (1, 3))]


def sets_for(n, k):
    out = []
    for _ in range(max(2, -(-512 * 2 ** 20 // (n * k * 2)))):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        (codes, scales, zeros), packed = int4_operands(w)
        words, st, zt = prepare_words(codes, scales.to(torch.bfloat16), zeros)
        out.append(dict(w=w, words=words, st=st, ws=torch.zeros(n, device="cuda"),
                        cnt=torch.zeros(n // 16 + 1, device="cuda", dtype=torch.int32)))
    return out


def run_ws(x, s, n, k, cfg):
    out = torch.empty(n, device="cuda", dtype=x.dtype)
    words = s["words"]
    c = dict(cfg)
    warps, stages = c.pop("num_warps"), c.pop("num_stages")
    grid = (triton.cdiv(n, c["BLOCK_N"]), c["SPLIT_K"])
    gemv_ws[grid](x, words, s["st"], s["ws"], s["cnt"], out, n, k, words.shape[0], GROUP=128, num_warps=warps,
                  num_stages=stages, **c)
    return out


def run_v1(x, s, n, k, cfg):  # current kernel, given config, no zeroing
    out = torch.empty(n, device="cuda", dtype=x.dtype)
    c = dict(cfg)
    grid = (triton.cdiv(n, c["BLOCK_N"]), c["SPLIT_K"])
    words = s["words"]
    gw._gemv_words_kernel.fn[grid](x, words, s["st"], words, s["st"], out, n, k, words.shape[0], BITS=4, GROUP=128,
                                   HAS_ZEROS=False, HAS_BIAS=False, DEQUANT=2, **c)
    return out


def run_ro(s, n, k, cfg, buf):
    c = dict(cfg)
    grid = (triton.cdiv(n, c["BLOCK_N"]), c["SPLIT_K"])
    words = s["words"]
    read_only[grid](words, buf, n, words.shape[0], **c)


GRID = [dict(BLOCK_N=bn, TILE_W=tw, SPLIT_K=sk, num_warps=wp, num_stages=st)
        for bn, tw, sk, wp, st in itertools.product((256, 512, 1024), (8, 16), (8, 16, 32, 64), (4, 8), (3,))]


def main():
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    summary = []
    for n, k in SHAPES:
        sets = sets_for(n, k)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        wbytes = n * k // 2 + n * (k // 128) * 2
        ideal = wbytes / bw * 1e6  # every weight byte read once at copy bandwidth
        bf16 = graph_us([lambda s=s: torch.nn.functional.linear(x, s["w"]) for s in sets])
        v0 = graph_us([lambda s=s: gw.gemv_words(x, s["words"], s["st"], None, k, 4) for s in sets])
        best = gw._gemv_words_kernel.best_config
        print(f"\n{n}x{k}: bf16 {bf16:.2f} us; V0 autotuned {v0:.2f} us ({bf16 / v0:.2f}x) cfg {best}; "
              f"bytes / copy bandwidth {ideal:.2f} us", flush=True)
        # correctness of the workspace kernel
        ref = gw.gemv_words(x, sets[0]["words"], sets[0]["st"], None, k, 4).float()
        b = dict(best.kwargs, num_warps=best.num_warps, num_stages=best.num_stages)
        b.pop("DEQUANT", None)
        v1 = graph_us([lambda s=s: run_v1(x, s, n, k, b) for s in sets]) if best.kwargs.get("DEQUANT") == 2 else float("nan")
        print(f"  V1 (V0's config, no memset) {v1:.2f} us", flush=True)
        res = {"V1": [(v1, b)]}
        for name, fn, grid in (("V3", run_ws, GRID), ("V4", run_sk, SK_GRID)):
            times = []
            for cfg in grid:
                if cfg["TILE_W"] * cfg.get("SPLIT_K", 1) > k // 8:
                    continue
                try:
                    if name in ("V3", "V4"):
                        o = fn(x, sets[0], n, k, cfg)
                        o2 = fn(x, sets[0], n, k, cfg)
                        err = ((o2.float() - o.float()).norm() / o.float().norm()).item()
                        if err > 1e-2:
                            print("V3 mismatch between calls", cfg, err)
                    us = graph_us([lambda s=s, cfg=cfg: fn(x, s, n, k, cfg) for s in sets])
                    times.append((us, cfg))
                except Exception as exc:  # noqa: BLE001
                    print(name, cfg, "error", str(exc).splitlines()[0][:100])
            times.sort(key=lambda t: t[0])
            res[name] = times
            print(f"  {name} best 5:", [(round(t, 2), c) for t, c in times[:5]], flush=True)
        buf = torch.empty(64 * n, device="cuda", dtype=torch.int32)
        ro = []
        for cfg in GRID:
            if cfg["TILE_W"] * cfg["SPLIT_K"] > k // 8:
                continue
            us = graph_us([lambda s=s, cfg=cfg: run_ro(s, n, k, cfg, buf) for s in sets])
            ro.append((us, cfg))
        ro.sort(key=lambda t: t[0])
        print("  V2 read-only best 5:", [(round(t, 2), c) for t, c in ro[:5]], flush=True)
        o = run_ws(x, sets[0], n, k, res["V3"][0][1]).float()
        err = ((o - ref.reshape(-1)).norm() / ref.norm()).item()
        o = run_sk(x, sets[0], n, k, res["V4"][0][1]).float()
        err4 = ((o - ref.reshape(-1)).norm() / ref.norm()).item()
        summary.append((n, k, bf16, v0, res["V1"][0][0], ro[0][0], res["V3"][0][0], res["V4"][0][0], ideal, err, err4))
        del sets
        torch.cuda.empty_cache()
    print("\n| N x K | bf16 | V0 autotuned+memset | V1 best no memset | V2 read-only | V3 ws+counter | V4 stream-K | ideal | errs | V3, V4 vs bf16 |")
    for n, k, bf16, v0, v1, v2, v3, v4, ideal, err, err4 in summary:
        print(f"| {n}x{k} | {bf16:.2f} | {v0:.2f} | {v1:.2f} | {v2:.2f} | {v3:.2f} | {v4:.2f} | {ideal:.2f} | {err:.1e} {err4:.1e} | {bf16 / v3:.2f}x {bf16 / v4:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
