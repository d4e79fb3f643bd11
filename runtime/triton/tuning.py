"""Helpers shared by the kernels: the autotuner's timer, configuration grids, the split-K output zeroing,
the output tile store, the activation load (gated or not)."""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError

from presso.runtime.triton.pins import TUNED


def rows_key(m: int) -> int:
    """The row count the autotuners key on: ``m`` rounded up to a power of two, so a prefill of a
    new length reuses the choice made for its bucket instead of timing every configuration again
    (the pruning rules, which read ``M``, agree within a bucket)."""
    return triton.next_power_of_2(m)


def tile_grid(m: int, n: int):
    """The launch grid of a tiled matmul kernel: output tiles along N, then M, then the K splits."""
    def grid(meta):
        return triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]), meta["SPLIT_K"]
    return grid


def tiled_launch(kernel, x: torch.Tensor, m: int, n: int, config: dict | None, interpreted: dict | None = None):
    """The output ``(m, n)`` in ``x``'s dtype, the kernel to launch and its configuration: the
    autotuned kernel, or with ``config`` the kernel without autotuning (``.fn``) and the output
    zeroed for split-K adds. Triton's CPU interpreter cannot autotune: it runs ``interpreted``."""
    if config is None and interpreted is not None and os.environ.get("TRITON_INTERPRET") == "1":
        config = interpreted
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if config is not None and config.get("SPLIT_K", 1) > 1:
        out.zero_()
    return out, (kernel if config is None else kernel.fn), config


SMALL_TILES = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, SPLIT_K=1)  # what the interpreter runs


def zero_output(nargs) -> None:
    """Split-K programs add into the output: it starts at zero (run before each timed launch too)."""
    nargs["out_ptr"].zero_()


def grid(keys: tuple[str, ...], rows: list[tuple], flag: str, flag_values: tuple[int, ...] = (0, 1),
         zero=zero_output) -> list[triton.Config]:
    """One config per row (``keys`` values, then ``num_warps``) and per value of the switch ``flag``;
    ``zero(nargs)`` clears the output before split-K configurations."""
    out = []
    for *values, warps in rows:
        split_k = dict(zip(keys, values)).get("SPLIT_K", 1)
        for on in flag_values:
            out.append(triton.Config(dict(zip(keys, values), **{flag: on}), num_warps=warps, num_stages=3,
                                     pre_hook=zero if split_k > 1 else None))
    return out


# Split-K programs add their partial sums into the 16-bit output atomically, each add rounding
# to 16 bits: the error grows with the number of splits that hold work (float64 references:
# 7e-3 to 1e-2 relative at 48-64 on an H100 and an H200, against the kernels' bound of 1e-2).
# A float32 workspace with an arrival counter instead was measured 1-1.5 µs slower per call.
MAX_ACTIVE_SPLITS = 32


def split_ok(words: int, tile_w: int, split_k: int) -> bool:
    """A split-K configuration worth trying on ``words`` words of K: at most ``MAX_ACTIVE_SPLITS``
    splits hold tiles (accuracy), and no more than half of the splits sit idle (an idle program
    is cheap: among the sweep's fastest at K = 576 is one of 32 splits over 18 tiles)."""
    tiles = -(-words // tile_w)
    active = -(-tiles // -(-tiles // split_k))
    return active <= MAX_ACTIVE_SPLITS and split_k <= max(2 * tiles, 1)




def tuned_configs(kernel: str, zero=zero_output, path: Path = TUNED) -> list[triton.Config]:
    """The configurations ``python3 -m benchmarks.gpu_sweep --write`` found fastest for ``kernel``
    (one per shape and row count it swept), added to the kernel's own list; the pruning rules
    still decide which of them a call may use."""
    if not path.exists():
        return []
    out = []
    for entry in json.loads(path.read_text()).get(kernel, []):
        entry = dict(entry)
        warps, stages = entry.pop("num_warps"), entry.pop("num_stages")
        out.append(triton.Config(entry, num_warps=warps, num_stages=stages,
                                 pre_hook=zero if entry.get("SPLIT_K", 1) > 1 else None))
    return out


def merged(configs: list[triton.Config], extra: list[triton.Config]) -> list[triton.Config]:
    """``configs`` then those of ``extra`` not already in them."""
    key = lambda c: (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)  # noqa: E731
    seen = {key(c) for c in configs}
    return configs + [c for c in extra if key(c) not in seen]


@triton.jit
def program_tiles(M, N, tiles, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
    """This program's output rows and columns (grid: :func:`tile_grid`), their masks, its K split and
    the share ``[first, last)`` of the ``tiles`` K tiles that split sums over."""
    pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    per_split = tl.cdiv(tiles, SPLIT_K)
    return rm, rn, rm < M, rn < N, pid_k, pid_k * per_split, min((pid_k + 1) * per_split, tiles)


@triton.jit
def store_tile(acc, bias_ptr, out_ptr, rm, rn, mask_m, mask_n, stride_om, pid_k,
               HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """``acc`` (+ bias, added by the first K split only) into ``out``: a store, or atomic adds under split K."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n & (pid_k == 0), other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm[:, None] * stride_om + rn[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out, acc.to(out_ptr.dtype.element_ty), mask=mask, sem="relaxed")


def as_rows(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x (..., width)`` as the kernels read it: a 2-D view of rows, each with unit column stride."""
    x2 = x.reshape(-1, width)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def silu_gate(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``x = [gate | up]``: in torch, what :func:`load_x` computes as the kernels load."""
    gate, up = x.chunk(2, -1)
    return torch.nn.functional.silu(gate) * up


@triton.jit
def load_x(x_ptr, offsets, k, mask, K, GATED: tl.constexpr):
    """Activations at columns ``k`` (``offsets``: where each row starts); with GATED, ``x_ptr`` holds
    ``[gate | up]`` (2K columns a row) and the activation is ``silu(gate) * up``, rounded to the
    activations' dtype at the same two steps as torch's ``F.silu(gate) * up``."""
    x = tl.load(x_ptr + offsets + k, mask=mask, other=0.0)
    if GATED:
        up = tl.load(x_ptr + offsets + K + k, mask=mask, other=0.0)
        g = x.to(tl.float32)
        x = ((g / (1.0 + tl.exp(-g))).to(x.dtype).to(tl.float32) * up.to(tl.float32)).to(x.dtype)
    return x


_FLUSH: dict = {}
CALLS_PER_GRAPH = 16
REPLAYS = 11


def _flush_buffer(device) -> torch.Tensor:
    """Twice the L2 cache, read before each timed call so that weights come from HBM, as in a model."""
    if device not in _FLUSH:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2 ** 20)
        _FLUSH[device] = torch.zeros(max(2 * l2, 2 ** 20) // 4, dtype=torch.int32, device=device)
    return _FLUSH[device]


def _graph_ms(calls, replays: int) -> list[float]:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        calls()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def bench_in_graph(kernel_call, quantiles=None) -> list[float]:
    """The autotuner's timer: ms per call, medians over replays of a CUDA graph of calls.

    Timing each launch with its own events (Triton's ``do_bench``) adds launch gaps and event
    jitter of about a microsecond to kernels of a few: the choice moved between runs. Here one
    graph holds ``CALLS_PER_GRAPH`` calls, each after an L2 flush; a second graph of the flushes
    alone is subtracted. Medians of both keep the ranking stable from run to run.
    ``PRESSO_TUNER=events`` switches back to Triton's timer.

    The flush reads twice the L2 cache (a reduction) rather than writing it: after a write,
    every line the timed kernel loads first evicts a dirty one, a write-back that a kernel in a
    model, whose neighbours write only activations, does not pay; the fastest batch-1
    configuration in ``benchmarks.gpu_sweep`` (timed as in a model) was not the one chosen.
    ``PRESSO_TUNER_FLUSH=write`` writes it, as before.
    """
    if os.environ.get("PRESSO_TUNER") == "events":  # Triton's own timer, to compare against
        return triton.testing.do_bench(kernel_call, quantiles=quantiles)
    buffer = _flush_buffer(torch.cuda.current_device())
    flush = buffer.zero_ if os.environ.get("PRESSO_TUNER_FLUSH") == "write" else buffer.max
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        try:
            kernel_call()  # compile and warm up outside the capture
        except CompilationError:  # a configuration this compiler cannot build is not a candidate
            return [float("inf")] * len(quantiles) if quantiles else float("inf")
        torch.cuda.synchronize()

        def calls():
            for _ in range(CALLS_PER_GRAPH):
                flush()
                kernel_call()

        def flushes():
            for _ in range(CALLS_PER_GRAPH):
                flush()

        both, alone = _graph_ms(calls, REPLAYS), _graph_ms(flushes, REPLAYS)
    torch.cuda.current_stream().wait_stream(stream)
    ms = max((statistics.median(both) - statistics.median(alone)) / CALLS_PER_GRAPH, 1e-6)
    return [ms] * len(quantiles) if quantiles else ms
