"""Sequential whitening for ``split_low_rank``: block by block, each linear fit to the original's output.

One-shot whitening fits every linear to its own inputs in the original model, so the errors
of the factored layers add up unchecked. Here the repeated blocks are processed in order (as
GPTQ does): a block sees the calibration inputs that the blocks before it, as already
factored, produce. Inside a block the linears are fit in execution order, in waves of those
that read the same tensor (q/k/v, then o; gate/up, then down). Each is a reduced-rank
regression of the original linear's output on its input in the factored block:

    min over rank-r W'  ||W H - W' H'||_F
    W_ols = W (H^T H') (H'^T H')^-1,  then the whitened truncation of W_ols

with ``H`` the linear's inputs in the original block and ``H'`` in the factored one (on the
same block inputs), so a downstream linear (down_proj) partly undoes the error of those
upstream (gate/up).
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from tqdm.auto import tqdm

from presso import distributed
from presso.graph import Graph
from presso.passes.common.blocks import Call, find_blocks, group_by_input, run_block, walk_blocks
from presso.passes.common.modules import linear_weight
from presso.passes.common.solve import PD_DAMP, refit
from presso.passes.common.stats import paired_inputs
from presso.passes.low_rank.factor import Unit, input_transform, replace_unit, spectrum

MIN_ROWS_PER_INPUT = 4  # calibration rows per input channel below which the weight is not refit


@torch.no_grad()
def factor_sequentially(graph: Graph, batches: list, chosen: dict[Unit, int],
                        out_grams: dict[str, torch.Tensor] | None = None) -> set[Unit]:
    """Factor the units ``chosen`` (unit -> rank) that sit inside repeated blocks, in place.

    A unit is one linear or several that read the same tensor and share one first factor.
    ``out_grams`` (by path): weights on each linear's output error, as :func:`spectrum` takes them.

    Returns the units factored; those outside the blocks are left to the caller.
    """
    done: set[Unit] = set()
    blocks = find_blocks(graph.module)
    inside = {u for u in chosen for b, _ in blocks if u[0].startswith(b + ".")}
    if not inside:
        return done
    steps = tqdm(walk_blocks(graph, distributed.share(batches)), desc="split_low_rank: sequential whitening",
                 unit="block", total=len(blocks), leave=False, disable=not distributed.is_main())
    for step in steps:
        path, block, calls = step.path, step.block, step.calls
        mine = {u[0][len(path) + 1:]: u for u in inside if u[0].startswith(path + ".")}  # by first member
        if mine:
            original = copy.deepcopy(block)
            for wave in execution_waves(block, list(mine), calls[0]):
                grams = paired_grams(original, block, wave, calls)

                def solve(rel, grams=grams):
                    return unit_factors(block, path, mine[rel], grams[rel], chosen[mine[rel]], out_grams)

                def apply(rel, factors):
                    replace_unit(block, [p[len(path) + 1:] for p in mine[rel]], *factors)
                    done.add(mine[rel])

                distributed.divided(wave, solve, apply, graph.device, f"whitening of {path}")
        if len(done) == len(inside):
            break  # the later blocks keep their weights: no need to run them
    return done


def unit_factors(block: nn.Module, prefix: str, unit: Unit, grams: tuple, rank: int,
                 out_grams: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reduced-rank factors ``(A, B)`` of the unit's linears in ``block`` (its members share inputs)."""
    rels = [p[len(prefix) + 1:] for p in unit]
    weight = torch.cat([linear_weight(block.get_submodule(r))[0] for r in rels])
    return reduced_rank_fit(weight, *grams, rank, [out_grams[p] for p in unit] if out_grams else None)


def execution_waves(block: nn.Module, paths: list[str], call: Call) -> list[list[str]]:
    """``paths`` grouped by the tensor they read, groups in the order the block runs them."""
    return group_by_input({p: block.get_submodule(p) for p in paths}, lambda: run_block(block, call))


def paired_grams(original: nn.Module, block: nn.Module, wave: list[str], calls: list[Call]
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """Per linear: ``H'^T H'``, ``H^T H'`` and the row count (inputs in the factored and the original block)."""
    with distributed.guard("whitening statistics"):
        paired = paired_inputs({p: original.get_submodule(p) for p in wave},
                               {p: block.get_submodule(p) for p in wave},
                               calls, lambda c: run_block(original, c), lambda c: run_block(block, c))
    for s in paired.values():  # summed over every rank's share
        distributed.all_reduce_sum([s.gram, s.cross])
        s.rows = distributed.reduce_count(s.rows)
    return {p: (s.gram, s.cross, s.rows) for p, s in paired.items()}


def reduced_rank_fit(weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, rows: int, rank: int,
                     out_grams: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(A, B)`` of the rank-``rank`` ``W'`` closest to ``W H`` on inputs ``H'``.

    ``gram = H'^T H'``, ``cross = H^T H'`` over ``rows`` calibration rows. With ``H = H'`` this
    is plain whitened truncation; so it is with too few rows to refit the weight (the
    regression would fit the calibration noise).
    """
    n = gram.shape[0]
    w_ols = weight.double()
    if rows >= MIN_ROWS_PER_INPUT * n:
        w_ols = refit(w_ols, cross, gram, damp=PD_DAMP)  # tuned with the whitening's damping
    m, m_inv = input_transform("whiten", n, gram, None, 1)
    return spectrum(w_ols, m, m_inv, out_grams).factors(rank)

