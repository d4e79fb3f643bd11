"""Where the batch-1 int4 GEMV (:mod:`presso.runtime.triton.gemv_words`) spends its time: ablations.

    PYTHONPATH=. python3 benchmarks/gemv_ablation.py      # on a CUDA machine, about 4 minutes

Symmetric int4, group 128, bf16 activations, the four large shapes of ``benchmarks.gpu``,
timed the same way (CUDA-graph replays over weight copies that overflow L2):

- V0: the autotuned kernel as ``presso`` runs it: the split-K output is zeroed, then the kernel
  (a memset in the two documented runs; since then a zeroing kernel, both dependent-launched
  on Hopper: ``benchmarks/gemv_pdl.py``).
- V1: V0's chosen configuration without the memset (the output is wrong; the time is the kernel's alone).
- V2: a kernel that only loads the same tiles: the ceiling of this memory layout and grid.
- V3: split K into an fp32 workspace with a per-column-block counter; the last program writes
  the output and zeroes the workspace, so no memset is needed.
- V4: stream-K over (column block, K tile) pairs on a grid of a few programs per SM, with V3's workspace.
- V5: V2 with the tiles fetched by the tensor memory accelerator (TMA descriptors) instead of per-thread loads.
- V6: V0's arithmetic on TMA-fetched tiles (the output zeroed first, as V0).

And for int8 weight-only (per-channel scales): presso's autotuned kernel against V2 on the
int8 words, the ceiling of the int8 layout.
Results and the conclusions drawn: docs/history/benchmarks-2026-11.md, "Where the batch-1 int4 kernel's time goes".
"""
import itertools
import sys

import torch
import triton
import triton.language as tl

from benchmarks.gpu import ROTATE_BYTES, copy_bandwidth, graph_us, int4_operands, int8_operands
from presso.runtime.nbits import dequantize_packed
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
def _tile_dot(x_ptr, w_ptr, s_ptr, rn, mask_n, t, N, K, WORDS, GROUP: tl.constexpr, TILE_W: tl.constexpr):
    """One (TILE_W words x BLOCK_N columns) tile's partial sums, as V0's symmetric int4 path computes them."""
    rw = t * TILE_W + tl.arange(0, TILE_W)
    words = tl.load(w_ptr + rw[:, None] * N + rn[None, :], mask=(rw < WORDS)[:, None] & mask_n[None, :], other=0)
    return _words_dot(words, x_ptr, s_ptr, rn, mask_n, t, N, K, WORDS, GROUP, TILE_W)


@triton.jit
def _words_dot(words, x_ptr, s_ptr, rn, mask_n, t, N, K, WORDS, GROUP: tl.constexpr, TILE_W: tl.constexpr):
    CPW: tl.constexpr = 8
    rw = t * TILE_W + tl.arange(0, TILE_W)
    mask_w = rw < WORDS
    block = (t * TILE_W) // (GROUP // CPW)
    scale = tl.load(s_ptr + block * N + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    base = rw * CPW
    dot = gw._dot8_half2(words, gw._x_pair(x_ptr, base, 0, K, mask_w), gw._x_pair(x_ptr, base, 1, K, mask_w),
                         gw._x_pair(x_ptr, base, 2, K, mask_w), gw._x_pair(x_ptr, base, 3, K, mask_w))
    return dot * (scale * 16.0)


@triton.jit
def gemv_ws(x_ptr, w_ptr, s_ptr, ws_ptr, cnt_ptr, out_ptr, N, K, WORDS, GROUP: tl.constexpr,
            BLOCK_N: tl.constexpr, TILE_W: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rn < N
    tiles = tl.cdiv(WORDS, TILE_W)
    per_split = tl.cdiv(tiles, SPLIT_K)
    acc = tl.zeros((TILE_W, BLOCK_N), dtype=tl.float32)
    for t in range(pid_k * per_split, min((pid_k + 1) * per_split, tiles)):
        acc += _tile_dot(x_ptr, w_ptr, s_ptr, rn, mask_n, t, N, K, WORDS, GROUP, TILE_W)
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
def read_only_tma(w_desc, out_ptr, N, WORDS, BLOCK_N: tl.constexpr, TILE_W: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tiles = tl.cdiv(WORDS, TILE_W)
    per_split = tl.cdiv(tiles, SPLIT_K)
    acc = tl.zeros((TILE_W, BLOCK_N), dtype=tl.int32)
    for t in range(pid_k * per_split, min((pid_k + 1) * per_split, tiles)):
        acc ^= w_desc.load([t * TILE_W, pid_n * BLOCK_N])  # out-of-bounds parts come back as zeros
    tl.store(out_ptr + pid_k * N + rn, tl.sum(acc, axis=0), mask=rn < N)


@triton.jit
def gemv_tma(x_ptr, w_desc, s_ptr, out_ptr, N, K, WORDS, GROUP: tl.constexpr,
             BLOCK_N: tl.constexpr, TILE_W: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = rn < N
    tiles = tl.cdiv(WORDS, TILE_W)
    per_split = tl.cdiv(tiles, SPLIT_K)
    acc = tl.zeros((TILE_W, BLOCK_N), dtype=tl.float32)
    for t in range(pid_k * per_split, min((pid_k + 1) * per_split, tiles)):
        words = w_desc.load([t * TILE_W, pid_n * BLOCK_N])
        acc += _words_dot(words, x_ptr, s_ptr, rn, mask_n, t, N, K, WORDS, GROUP, TILE_W)
    tl.atomic_add(out_ptr + rn, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=mask_n, sem="relaxed")


@triton.jit
def gemv_sk(x_ptr, w_ptr, s_ptr, ws_ptr, cnt_ptr, out_ptr, N, K, WORDS, GROUP: tl.constexpr,
            BLOCK_N: tl.constexpr, TILE_W: tl.constexpr, PROGRAMS: tl.constexpr):
    """Stream-K: program p takes an equal run of the (column block, K tile) tiles, flushing into ws."""
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
        acc += _tile_dot(x_ptr, w_ptr, s_ptr, rn, mask_n, t, N, K, WORDS, GROUP, TILE_W)
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


def sk_grid() -> list[dict]:
    """Stream-K configurations: a few programs per multiprocessor of this device."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return [dict(BLOCK_N=bn, TILE_W=tw, PROGRAMS=sms * p, num_warps=wp, num_stages=st)
            for bn, tw, p, wp, st in itertools.product((128, 256, 512), (8, 16), (2, 4, 8), (4, 8), (1, 3))]


def sets_for(n, k):
    out = []
    for _ in range(max(2, -(-ROTATE_BYTES // (n * k * 2)))):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        (codes, scales, zeros), packed = int4_operands(w)
        words, st, zt = prepare_words(codes, scales.to(torch.bfloat16), zeros)
        one = dict(w=w, words=words, st=st, ws=torch.zeros(n, device="cuda"),
                   cnt=torch.zeros(n // 16 + 1, device="cuda", dtype=torch.int32))
        if not out:  # the reference's weights: as the codes and scales say
            one["dequantized"] = dequantize_packed(packed.packed.cpu(), packed.group_scales().cpu(), None, k, 4
                                                   ).to("cuda", torch.float64)
        out.append(one)
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
                                   HAS_ZEROS=False, HAS_BIAS=False, DEQUANT=2, PDL=False, **c)
    return out


def run_ro(s, n, k, cfg, buf):
    c = dict(cfg)
    grid = (triton.cdiv(n, c["BLOCK_N"]), c["SPLIT_K"])
    words = s["words"]
    read_only[grid](words, buf, n, words.shape[0], **c)


def descriptor(s, cfg):
    """A TMA descriptor of one weight copy's words, for ``cfg``'s tile, made once per copy and tile."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    key = (cfg["TILE_W"], cfg["BLOCK_N"])
    cache = s.setdefault("descs", {})
    if key not in cache:
        cache[key] = TensorDescriptor.from_tensor(s["words"], list(key))
    return cache[key]


def run_ro_tma(s, n, k, cfg, buf):
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"])
    read_only_tma[grid](descriptor(s, cfg), buf, n, s["words"].shape[0], **cfg)


def run_tma(x, s, n, k, cfg):
    out = torch.zeros(n, device="cuda", dtype=x.dtype)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"])
    gemv_tma[grid](x, descriptor(s, cfg), s["st"], out, n, k, s["words"].shape[0], GROUP=128, **cfg)
    return out


GRID = [dict(BLOCK_N=bn, TILE_W=tw, SPLIT_K=sk, num_warps=wp, num_stages=st)
        for bn, tw, sk, wp, st in itertools.product((256, 512, 1024), (8, 16), (8, 16, 32, 64), (4, 8), (3,))]
# a TMA box is at most 256 elements wide
TMA_GRID = [dict(BLOCK_N=bn, TILE_W=tw, SPLIT_K=sk, num_warps=wp, num_stages=st)
            for bn, tw, sk, wp, st in itertools.product((128, 256), (8, 16), (8, 16, 32, 64), (4, 8), (1, 3))]


def sweep(name, grid, k, timed, check=None):
    """(µs, config) for each configuration in ``grid`` that fits K, fastest first.

    ``check(cfg)`` runs the variant twice and returns its relative error (the
    workspace variants must leave the workspace zeroed for the next call); the reference is
    float64, and a bf16 output rounded once is about 3e-3 off it.
    """
    times = []
    for cfg in grid:
        if cfg["TILE_W"] * cfg.get("SPLIT_K", 1) > k // 8:
            continue
        try:
            err = check(cfg) if check else 0.0
            if err > 1e-2:
                print(name, cfg, f"mismatch {err:.1e}: left out", flush=True)
                continue
            times.append((graph_us(timed(cfg)), cfg, err))
        except Exception as exc:  # noqa: BLE001
            print(name, cfg, "error", str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__)
    times.sort(key=lambda t: t[0])
    print(f"  {name} best 3:", [(round(t, 2), c) for t, c, _ in times[:3]], flush=True)
    return times[0] if times else (float("nan"), None, float("nan"))


def int8_rows() -> list[tuple]:
    """(N, K, bf16 µs, presso int8 µs, loads-only µs) per shape."""
    rows = []
    for n, k in SHAPES:
        sets = []
        for _ in range(max(2, -(-ROTATE_BYTES // (n * k * 2)))):
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            sets.append(dict(w=w, int8w=prepare_words(*int8_operands(w)[0])))
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        bf16 = graph_us([lambda s=s: torch.nn.functional.linear(x, s["w"]) for s in sets])
        int8 = graph_us([lambda s=s: gw.gemv_words(x, s["int8w"][0], s["int8w"][1], s["int8w"][2], k, 8) for s in sets])
        buf = torch.empty(64 * n, device="cuda", dtype=torch.int32)
        words = [dict(words=s["int8w"][0]) for s in sets]
        ceiling = sweep("int8 loads only", GRID, k * 2,  # the fit test counts K / 8 words; int8 has K / 4
                        lambda cfg: [lambda s=s: run_ro(s, n, k, cfg, buf) for s in words])[0]
        print(f"int8 {n}x{k}: bf16 {bf16:.2f} us, presso {int8:.2f} us ({bf16 / int8:.2f}x), "
              f"loads only {ceiling:.2f} us ({bf16 / ceiling:.2f}x)", flush=True)
        rows.append((n, k, bf16, int8, ceiling))
    return rows


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
        ref = (x.double() @ sets[0]["dequantized"].t()).reshape(-1)  # float64, as the kernels' tests
        v0_err = ((gw.gemv_words(x, sets[0]["words"], sets[0]["st"], None, k, 4).double().reshape(-1) - ref).norm()
                  / ref.norm()).item()
        b = dict(best.kwargs, num_warps=best.num_warps, num_stages=best.num_stages)
        b.pop("DEQUANT", None)
        v1 = (graph_us([lambda s=s: run_v1(x, s, n, k, b) for s in sets]) if best.kwargs.get("DEQUANT") == 2
              else float("nan"))
        print(f"  V1 (V0's config, no memset) {v1:.2f} us", flush=True)

        def computing(fn):
            def check(cfg):
                fn(x, sets[0], n, k, cfg)
                o = fn(x, sets[0], n, k, cfg).double()
                return ((o - ref).norm() / ref.norm()).item()
            return (lambda cfg: [lambda s=s: fn(x, s, n, k, cfg) for s in sets]), check

        buf = torch.empty(64 * n, device="cuda", dtype=torch.int32)
        row = dict(bf16=bf16, V0=v0, V1=v1, v0_err=v0_err)
        row["V2"] = sweep("V2 loads only", GRID, k, lambda cfg: [lambda s=s: run_ro(s, n, k, cfg, buf) for s in sets])
        row["V3"] = sweep("V3 workspace", GRID, k, *computing(run_ws))
        row["V4"] = sweep("V4 stream-K", sk_grid(), k, *computing(run_sk))
        row["V5"] = sweep("V5 TMA loads only", TMA_GRID, k,
                          lambda cfg: [lambda s=s: run_ro_tma(s, n, k, cfg, buf) for s in sets])
        row["V6"] = sweep("V6 TMA", TMA_GRID, k, *computing(run_tma))
        summary.append((n, k, ideal, row))
        sets = None  # free the copies before the next shape
        torch.cuda.empty_cache()
    names = ["V0", "V1", "V2", "V3", "V4", "V5", "V6"]
    print("\n| N x K | bf16 | " + " | ".join(names) + " | bytes / copy bw | V0, V6 error |")
    for n, k, ideal, row in summary:
        us = [row[v] if isinstance(row[v], float) else row[v][0] for v in names]
        print(f"| {n}x{k} | {row['bf16']:.2f} | " + " | ".join(f"{t:.2f} ({row['bf16'] / t:.2f}x)" for t in us)
              + f" | {ideal:.2f} | {row['v0_err']:.1e}, {row['V6'][2]:.1e} |")
    print("\n| int8 N x K | bf16 | presso int8 | int8 loads only |")
    for n, k, bf16, int8, ceiling in int8_rows():
        print(f"| {n}x{k} | {bf16:.2f} | {int8:.2f} ({bf16 / int8:.2f}x) | {ceiling:.2f} ({bf16 / ceiling:.2f}x) |")


if __name__ == "__main__":
    sys.exit(main())
