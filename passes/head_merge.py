"""Head sharing mechanism: views of Hugging Face attention modules, groupings, merges, refits.

An :class:`AttentionView` reads and writes one attention's projections as
``(out, in)`` matrices whatever the module layout (separate q/k/v, GPT-2's fused
``c_attn``), so grouping and merging are written once.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from presso.graph import Graph
from presso.pass_api import Context
from presso.passes import shared_kv_attention
from presso.passes.common import linear_weight
from presso.passes.prune_stats import record_inputs

DAMP = 0.01


def _set(m: nn.Module, w: torch.Tensor, b: torch.Tensor | None) -> None:
    conv1d = type(m).__name__ == "Conv1D"
    m.weight = nn.Parameter((w.t() if conv1d else w).contiguous().clone())
    if b is not None:
        m.bias = nn.Parameter(b.contiguous().clone())
    if conv1d:
        m.nf = w.shape[0]
    else:
        m.out_features, m.in_features = w.shape


@dataclass
class AttentionView:
    path: str
    module: nn.Module
    kind: str  # "separate" (q/k/v projections) or "fused" (GPT-2 c_attn)
    q: nn.Module
    k: nn.Module | None
    v: nn.Module | None
    o: nn.Module
    heads: int
    kv_heads: int
    head_dim: int

    def kv_matrices(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        if self.kind == "fused":
            w, b = linear_weight(self.q)
            e, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
            cut = lambda t: (t[e:e + kv], t[e + kv:e + 2 * kv]) if t is not None else (None, None)  # noqa: E731
            (wk, wv), (bk, bv) = cut(w), cut(b)
            return wk, wv, bk, bv
        (wk, bk), (wv, bv) = linear_weight(self.k), linear_weight(self.v)
        return wk, wv, bk, bv

    def merge(self, groups: list[list[int]]) -> None:
        """New kv head ``j`` = mean of old heads ``groups[j]``; query heads follow their kv head."""
        hd, per_kv = self.head_dim, self.heads // self.kv_heads
        q_order = [h for g in groups for old in g for h in range(old * per_kv, (old + 1) * per_kv)]
        rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in q_order])
        wk, wv, bk, bv = self.kv_matrices()
        mean = lambda t: None if t is None else torch.cat(  # noqa: E731
            [t.view(self.kv_heads, hd, *t.shape[1:])[g].mean(0) for g in groups])
        wq, bq = linear_weight(self.q)
        e = self.heads * hd
        wq, bq = wq[:e][rows], (bq[:e][rows] if bq is not None else None)
        if self.kind == "fused":
            _set(self.q, torch.cat([wq, mean(wk), mean(wv)]),
                 None if bq is None else torch.cat([bq, mean(bk), mean(bv)]))
            self.module.split_size = [e, len(groups) * hd, len(groups) * hd]
        else:
            _set(self.q, wq, bq)
            _set(self.k, mean(wk), mean(bk))
            _set(self.v, mean(wv), mean(bv))
        wo, bo = linear_weight(self.o)
        _set(self.o, wo[:, rows], bo)
        self.kv_heads = len(groups)
        self.module.num_key_value_groups = self.heads // self.kv_heads
        if hasattr(self.module, "num_key_value_heads"):
            self.module.num_key_value_heads = self.kv_heads
        if shared_kv_attention.needs_adapter(self.module):
            shared_kv_attention.adapt(self.module, self.kv_heads)


def attention_views(root: nn.Module) -> list[AttentionView]:
    views = []
    for path, m in root.named_modules():
        hd = getattr(m, "head_dim", None) or getattr(m, "attention_head_size", None)
        if not isinstance(hd, int):
            continue
        if all(hasattr(m, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            q, k, v, o, kind = m.q_proj, m.k_proj, m.v_proj, m.o_proj, "separate"
        elif shared_kv_attention.needs_adapter(m):
            q, k, v, o, kind = m.q_proj, m.k_proj, m.v_proj, m.out_proj, "separate"
        elif all(hasattr(m, n) for n in ("query", "key", "value")) and path.endswith(".self"):
            q, k, v, kind = m.query, m.key, m.value, "separate"
            o = root.get_submodule(path.rsplit(".", 1)[0]).output.dense  # BERT: the sibling BertSelfOutput
        elif hasattr(m, "c_attn") and hasattr(m, "c_proj") and not getattr(m, "is_cross_attention", False):
            q, k, v, o, kind = m.c_attn, None, None, m.c_proj, "fused"
        else:
            continue
        heads = linear_weight(o)[0].shape[1] // hd
        kv = heads if kind == "fused" and not isinstance(getattr(m, "split_size", 0), list) else \
            (linear_weight(k)[0].shape[0] // hd if k is not None else (linear_weight(q)[0].shape[0] // hd - heads) // 2)
        views.append(AttentionView(path, m, kind, q, k, v, o, heads, kv, hd))
    return views


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


def kv_similarity(graph: Graph, ctx: Context, views: list[AttentionView]) -> dict[str, torch.Tensor]:
    """Per attention: cosine similarity of the kv heads' key and value outputs on calibration data.

    With ``G = X^T X`` of the projection's input, ``<K_a, K_b> = tr(W_a G W_b^T)``: no
    activations are stored.
    """
    inputs = {v.path: (v.k if v.k is not None else v.q) for v in views}
    grams = record_inputs(graph, ctx, inputs, grams=set(inputs), desc="share_attention_heads: similarity").gram
    out = {}
    for v in views:
        g = grams[v.path].double()
        wk, wv, _, _ = v.kv_matrices()
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
def refit_outputs(graph: Graph, ctx: Context, views: list[AttentionView], original: nn.Module) -> list[str]:
    """Least-squares refit of each output projection: new block inputs -> original block outputs.

    Both models run on the same calibration batches; with ``Z`` the new output projection's
    input and ``Z0`` the original's, ``W' = W (Z0^T Z) (Z^T Z + damp)^-1``.
    """
    ztz: dict[str, torch.Tensor] = {}
    z0tz: dict[str, torch.Tensor] = {}
    captured: dict[str, torch.Tensor] = {}
    old_views = {v.path: v for v in attention_views(original)}
    hooks = []
    for v in views:
        hooks.append(old_views[v.path].o.register_forward_pre_hook(
            lambda _m, a, p=v.path: captured.__setitem__(p, a[0].detach().double().reshape(-1, a[0].shape[-1]))))
        hooks.append(v.o.register_forward_pre_hook(lambda _m, a, p=v.path: _accumulate(p, a[0], captured, ztz, z0tz)))
    try:
        for batch in ctx.calibration_batches(desc="share_attention_heads: refit"):
            for path in list(captured):
                captured.pop(path)
            _run(original, graph, batch)
            graph.run(batch)
    finally:
        for h in hooks:
            h.remove()
    for v in views:
        w, b = linear_weight(v.o)
        g = ztz[v.path]
        g = g + torch.eye(len(g), dtype=g.dtype) * DAMP * g.diagonal().mean().clamp(min=1e-12)
        w_old = linear_weight(old_views[v.path].o)[0].double()
        _set(v.o, torch.linalg.solve(g, (w_old @ z0tz[v.path]).t()).t().float(), b)
    return [v.path for v in views]


def _accumulate(path, z, captured, ztz, z0tz) -> None:
    z = z.detach().double().reshape(-1, z.shape[-1])
    z0 = captured[path]
    ztz[path] = ztz.get(path, 0) + z.t() @ z
    z0tz[path] = z0tz.get(path, 0) + z0.t() @ z


def _run(model: nn.Module, graph: Graph, batch) -> None:
    from presso.signature import Traceable

    Traceable(model, graph.spec)(*graph.spec.flatten_inputs(batch.args, batch.kwargs))
