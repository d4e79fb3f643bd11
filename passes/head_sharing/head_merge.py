"""Head sharing mechanism: groupings, merges and refits of key/value heads.

The layout of each attention (separate q/k/v, or a fused q/k/v projection) comes from its
model-family adapter (:mod:`presso.passes.common.adapters`), so grouping and merging are
written once for every family.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from presso.graph import Graph
from presso.pass_api import Context
from presso.passes.common.adapters import Attention, attentions
from presso.passes.common.modules import linear_weight, set_linear_weight
from presso.passes.common.solve import refit
from presso.passes.common.stats import calibration_input_stats, paired_inputs


def kv_matrices(att: Attention) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Key and value weights (kv_heads * head_dim, in) and biases."""
    if att.fused:
        w, b = linear_weight(att.q)
        _, k, v = att.adapter.fused_rows(att)
        return w[k], w[v], (None if b is None else b[k]), (None if b is None else b[v])
    (wk, bk), (wv, bv) = linear_weight(att.k), linear_weight(att.v)
    return wk, wv, bk, bv


def merge(att: Attention, groups: list[list[int]]) -> None:
    """New kv head ``j`` = mean of old heads ``groups[j]``; query heads follow their kv head."""
    hd, heads, kv_heads = att.head_dim, att.heads, att.kv_heads
    per_kv = heads // kv_heads
    q_order = [h for g in groups for old in g for h in range(old * per_kv, (old + 1) * per_kv)]
    rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in q_order])
    wk, wv, bk, bv = kv_matrices(att)
    mean = lambda t: None if t is None else torch.cat(  # noqa: E731
        [t.view(kv_heads, hd, *t.shape[1:])[g].mean(0) for g in groups])
    wq, bq = linear_weight(att.q)
    q_rows = att.adapter.fused_rows(att)[0] if att.fused else slice(None)
    wq, bq = wq[q_rows][rows], (bq[q_rows][rows] if bq is not None else None)
    if att.fused:
        set_linear_weight(att.q, torch.cat([wq, mean(wk), mean(wv)]),
                          None if bq is None else torch.cat([bq, mean(bk), mean(bv)]))
    else:
        set_linear_weight(att.q, wq, bq)
        set_linear_weight(att.k, mean(wk), mean(bk))
        set_linear_weight(att.v, mean(wv), mean(bv))
    wo, bo = linear_weight(att.o)
    set_linear_weight(att.o, wo[:, rows], bo)
    att.adapter.merge_heads(att, len(groups))


def adjacent_groups(old: int, new: int) -> list[list[int]]:
    size = old // new
    return [list(range(j * size, (j + 1) * size)) for j in range(new)]


def similar_groups(similarity: torch.Tensor, new: int) -> list[list[int]]:
    """Equal-size groups: each seeded by the first free head, filled with its most similar free heads."""
    old = similarity.shape[0]
    size, free, groups = old // new, list(range(old)), []
    while free:
        seed = free.pop(0)
        ranked = sorted(free, key=lambda h: -float(similarity[seed, h]))[: size - 1]
        for h in ranked:
            free.remove(h)
        groups.append(sorted([seed, *ranked]))
    return groups


def kv_similarity(graph: Graph, ctx: Context, views: list[Attention]) -> dict[str, torch.Tensor]:
    """Per attention: cosine similarity of the kv heads' key and value outputs on calibration data.

    With ``G = X^T X`` of the projection's input, ``<K_a, K_b> = tr(W_a G W_b^T)``: no
    activations are stored.
    """
    inputs = {v.path: (v.k if v.k is not None else v.q) for v in views}
    stats = calibration_input_stats(graph, ctx, inputs, grams=inputs, desc="share_attention_heads: similarity")
    out = {}
    for v in views:
        g = stats[v.path].xtx.double()
        wk, wv, _, _ = kv_matrices(v)
        sim = 0
        for w in (wk, wv):
            heads = w.double().view(v.kv_heads, v.head_dim, -1)
            inner = torch.einsum("aik,kl,bil->ab", heads, g, heads)
            norm = inner.diagonal().clamp(min=1e-30).sqrt()
            sim = sim + inner / (norm[:, None] * norm[None, :])
        out[v.path] = sim / 2
    return out


def original_copy(graph: Graph) -> nn.Module:
    """The model before any merge, kept to give the refit its targets."""
    return copy.deepcopy(graph.module)


@torch.no_grad()
def refit_outputs(graph: Graph, ctx: Context, views: list[Attention], original: nn.Module) -> list[str]:
    """Least-squares refit of each output projection: new block inputs -> original block outputs.

    Both models run on the same calibration batches; with ``Z`` the new output projection's
    input and ``Z0`` the original's, ``W' = W (Z0^T Z) (Z^T Z + damp)^-1``.
    """
    old_views = {v.path: v for v in attentions(original)}
    paired = paired_inputs({v.path: old_views[v.path].o for v in views}, {v.path: v.o for v in views},
                           ctx.calibration_batches(desc="share_attention_heads: refit"),
                           lambda b: graph.run(b, module=original), graph.run)
    for v in views:
        _, b = linear_weight(v.o)
        w_old = linear_weight(old_views[v.path].o)[0]
        set_linear_weight(v.o, refit(w_old, paired[v.path].cross, paired[v.path].gram).float(), b)
    return [v.path for v in views]
