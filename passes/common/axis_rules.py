"""How each aten op couples the dimensions of its inputs and outputs (see :mod:`.axes`).

``read_graph`` walks an exported program once (:mod:`.axis_reader`); each function here is
the rule of the ops it is registered for: it gets the reader, the node, the output's atoms
and a description of where it is, and unifies the atoms that must stay equal. Importing this
module registers the rules.
"""
from __future__ import annotations

import sympy
import torch
from torch import fx

from presso.passes.common.axes import cat, concrete, prod, shape_of
from presso.passes.common.axis_reader import (
    broadcast,
    op_name,
    pointwise,
    read_graph,
    rule,
)

__all__ = ["read_graph"]

SAME_SHAPE = {"clone", "contiguous", "alias", "detach", "dropout", "_to_copy", "to", "softmax", "_softmax",
              "log_softmax", "_log_softmax", "type_as", "lift_fresh_copy", "feature_dropout"}
REDUCTIONS = {"mean", "sum", "amax", "amin", "var", "std", "norm", "logsumexp", "max", "min"}


@rule(*SAME_SHAPE)
def same_shape(r, node, out, where):
    return pointwise(r, node, out, where)


@rule(*REDUCTIONS)
def reduction(r, node, out, where):
    src, shape = r.of(node.args[0]), shape_of(node.args[0])
    if out is None or src is None or isinstance(out[0], list):
        return False
    arg = node.args[1] if len(node.args) > 1 else None  # the reduced dims; absent: all of them
    dims = arg if isinstance(arg, (list, tuple)) else [arg] if isinstance(arg, int) else range(len(shape))
    reduced = {d % len(shape) for d in dims}
    kept = [i for i in range(len(shape)) if i not in reduced]
    kept_out = kept if len(out) == len(shape) else range(len(out))  # keepdim keeps the positions
    for i, j in zip(kept, kept_out):
        r.axes.unify(src[i], out[j], where)


@rule("getitem")
def getitem(r, node, out, where):
    src = r.dims.get(node.args[0])
    if src is None or not isinstance(src, list) or not src or not isinstance(src[node.args[1]], list):
        return None
    r.dims[node] = src[node.args[1]]


@rule("linear")
def linear(r, node, out, where):
    x, w = r.of(node.args[0]), r.of(node.args[1])
    b = r.of(node.args[2]) if len(node.args) > 2 else None
    r.tie(x[:-1], out[:-1], where)
    r.axes.unify(x[-1], w[1], where)
    r.axes.unify(out[-1], w[0], where)
    if b is not None:
        r.axes.unify(out[-1], b[0], where)


@rule("addmm")
def addmm(r, node, out, where):
    b, m1, m2 = (r.of(a) for a in node.args[:3])
    r.axes.unify(m1[0], out[0], where)
    r.axes.unify(m1[1], m2[0], where)
    r.axes.unify(m2[1], out[1], where)
    if b is not None:
        r.axes.unify(b[-1], out[1], where)


@rule("mm", "bmm", "matmul")
def matmul(r, node, out, where):
    a, b = r.of(node.args[0]), r.of(node.args[1])
    if len(a) < 2 or len(b) < 2:
        return False
    r.axes.unify(a[-1], b[-2], where)
    r.axes.unify(a[-2], out[-2], where)
    r.axes.unify(b[-1], out[-1], where)
    for src in (a, b):
        sa = shape_of(node.args[0] if src is a else node.args[1])
        for k in range(3, len(src) + 1):
            if sa[-k] != 1:
                r.axes.unify(src[-k], out[-k], where)


@rule("scaled_dot_product_attention")
def sdpa(r, node, out, where):
    q, k, v = (r.of(a) for a in node.args[:3])
    r.axes.unify(q[-1], k[-1], where)
    r.axes.unify(v[-1], out[-1], where)
    r.axes.unify(k[-2], v[-2], where)
    r.tie(q[:-1], out[:-1], where)
    r.tie(k[:-3], q[:-3], where)
    r.axes.unify(k[-3], v[-3], where)
    hq, hk = shape_of(node.args[0])[-3], shape_of(node.args[1])[-3]
    if hq == hk:
        r.axes.unify(q[-3], k[-3], where)
    else:  # enable_gqa: query head = (kv head, index within its group)
        r.axes.unify(q[-3], prod([k[-3], r.axes.new(concrete(hq) // concrete(hk))]), where)
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if isinstance(mask, fx.Node):
        broadcast(r, mask, out, where)


@rule("conv1d", "conv2d", "conv3d", "convolution")
def conv(r, node, out, where):
    x, w = r.of(node.args[0]), r.of(node.args[1])
    b = r.of(node.args[2]) if len(node.args) > 2 else None
    groups = node.args[6] if len(node.args) > 6 else 1
    if op_name(node) == "convolution":
        groups = node.args[8]
    r.axes.unify(x[0], out[0], where)
    r.axes.unify(out[1], w[0], where)
    for k in w[2:]:
        r.axes.freeze(k, f"kernel size of {where}")
    if b is not None:
        r.axes.unify(out[1], b[0], where)
    if groups == 1:
        r.axes.unify(x[1], w[1], where)
        return None
    g = r.axes.new(groups)  # channels = (group, index within group), on both sides
    r.axes.unify(x[1], prod([g, w[1]]), where)
    r.axes.unify(out[1], prod([g, r.axes.new(shape_of(node.args[1])[0] // groups)]), where)
    if shape_of(node.args[1])[1] != 1:  # a grouped (not depthwise) conv: its group count stays
        r.axes.freeze(g, f"groups of grouped convolution {where}")


@rule("batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit_functional",
      "native_batch_norm", "instance_norm")
def batch_norm(r, node, out, where):
    x = r.of(node.args[0])
    first = out[0] if out and isinstance(out[0], list) else out
    r.tie(x, first, where)
    for a in node.args[1:5]:
        if r.of(a) is not None:
            r.axes.unify(x[1], r.of(a)[0], where)


@rule("layer_norm", "rms_norm", "native_layer_norm")
def layer_norm(r, node, out, where):
    x = r.of(node.args[0])
    first = out[0] if out and isinstance(out[0], list) else out
    r.tie(x, first, where)
    n = len(node.args[1])
    for a in node.args[2:4]:
        if r.of(a) is not None:
            r.tie(x[-n:], r.of(a), where)


@rule("embedding")
def embedding(r, node, out, where):
    w, ids = r.of(node.args[0]), r.of(node.args[1])
    r.tie(ids, out[:-1], where)
    r.axes.unify(w[1], out[-1], where)


@rule("view", "reshape", "_unsafe_view", "flatten", "unflatten", "view_as", "reshape_as")
def reshape(r, node, out, where):
    src = r.of(node.args[0])
    a, b = shape_of(node.args[0]), shape_of(node)
    ia = [i for i, d in enumerate(a) if d != 1]
    ib = [j for j, d in enumerate(b) if d != 1]
    while ia or ib:
        ga, gb = _match(a, b, ia, ib)
        if ga is None:
            r.axes.freeze(prod(src[i] for i in ia), f"unaligned reshape {where}")
            r.axes.freeze(prod(out[j] for j in ib), f"unaligned reshape {where}")
            return None
        la, lb = [src[i] for i in ga], [out[j] for j in gb]
        if any(concrete(a[i]) is None for i in ga) or any(concrete(b[j]) is None for j in gb):
            if any(x is not None for x in la + lb):
                r.axes.freeze(prod(la), f"reshape mixes a dynamic dimension {where}")
                r.axes.freeze(prod(lb), f"reshape mixes a dynamic dimension {where}")
        else:
            r.axes.unify(prod(la), prod(lb), where)
        ia, ib = ia[len(ga):], ib[len(gb):]


def _expr(d):
    return d.node.expr if isinstance(d, torch.SymInt) else sympy.Integer(d)


def _match(a, b, ia, ib):
    """The shortest leading groups of ``ia`` and ``ib`` with equal products."""
    for total in range(2, 9):
        for p in range(1, total):
            q = total - p
            if p > len(ia) or q > len(ib):
                continue
            pa = sympy.Mul(*[_expr(a[i]) for i in ia[:p]])
            pb = sympy.Mul(*[_expr(b[j]) for j in ib[:q]])
            if sympy.simplify(pa - pb) == 0:
                return ia[:p], ib[:q]
    return None, None


@rule("transpose", "t", "permute", "swapaxes", "numpy_T")
def permute(r, node, out, where):
    src = r.of(node.args[0])
    n = len(src)
    if op_name(node) == "permute":
        order = [d % n for d in node.args[1]]
    elif op_name(node) == "numpy_T":  # ``x.T``: every dimension reversed
        order = list(reversed(range(n)))
    else:
        order = list(range(n))
        if n >= 2:
            d0, d1 = (node.args[1] % n, node.args[2] % n) if len(node.args) > 2 else (0, 1)
            order[d0], order[d1] = order[d1], order[d0]
    for j, i in enumerate(order):
        r.axes.unify(src[i], out[j], where)


@rule("unsqueeze", "squeeze")
def squeeze(r, node, out, where):
    src = r.of(node.args[0])
    r.tie([d for d in src if d is not None], [d for d in out if d is not None], where)


@rule("expand", "expand_as", "broadcast_to")
def expand(r, node, out, where):
    src, shape = r.of(node.args[0]), shape_of(node.args[0])
    for k in range(1, len(src) + 1):
        if shape[-k] != 1:
            r.axes.unify(src[-k], out[-k], where)


@rule("slice")
def slice_(r, node, out, where):
    src, shape = r.of(node.args[0]), shape_of(node.args[0])
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(shape)
    step = node.args[4] if len(node.args) > 4 else 1
    for i in range(len(src)):
        if i != dim:
            r.axes.unify(src[i], out[i], where)
    n, got = concrete(shape[dim]), concrete(shape_of(node)[dim])
    if src[dim] is None or n is None:
        return None
    if step != 1 or got is None:
        r.axes.freeze(src[dim], f"strided slice {where}")
        return None
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    start = max(0, min(n, start + n if start < 0 else start)) if isinstance(start, int) else None
    if start is None:
        r.axes.freeze(src[dim], f"dynamic slice {where}")
        return None
    parts = [r.axes.new(start), out[dim], r.axes.new(n - start - got)]
    r.axes.unify(src[dim], cat([p for p in parts if p is not None]), where)


@rule("cat", "concat")
def concat(r, node, out, where):
    tensors = [t for t in node.args[0] if shape_of(t) is not None and len(shape_of(t)) == len(out)]
    dim = (node.args[1] if len(node.args) > 1 else 0) % len(out)
    for t in tensors:
        src = r.of(t)
        for i in range(len(out)):
            if i != dim and shape_of(t)[i] != 1:
                r.axes.unify(src[i], out[i], where)
    parts = [r.of(t)[dim] for t in tensors]
    if any(p is None for p in parts) or out[dim] is None:
        for p in parts + [out[dim]]:
            r.axes.freeze(p, f"concatenation with a dynamic part {where}")
        return None
    r.axes.unify(out[dim], cat(parts), where)


@rule("split", "split_with_sizes", "chunk")
def split(r, node, out, where):
    src, shape = r.of(node.args[0]), shape_of(node.args[0])
    dim = (node.args[2] if len(node.args) > 2 else 0) % len(shape)
    pieces = [o for o in out if o is not None]
    for o in pieces:
        for i in range(len(shape)):
            if i != dim:
                r.axes.unify(src[i], o[i], where)
    sizes = [concrete(v.shape[dim]) for v in node.meta.get("val", ())]
    parts = [o[dim] if o[dim] is not None or size != 1 else r.axes.unit(f"a one-position piece {where}")
             for o, size in zip(pieces, sizes)]  # Falcon's single kv head cut from a fused projection
    if src[dim] is None or any(p is None for p in parts):
        for p in parts + [src[dim]]:
            r.axes.freeze(p, f"split with a dynamic part {where}")
        return None
    r.axes.unify(src[dim], cat(parts), where)


@rule("select")
def select(r, node, out, where):
    src = r.of(node.args[0])
    dim = node.args[1] % len(src)
    r.axes.freeze(src[dim], f"a single index is selected {where}")
    r.tie(src[:dim] + src[dim + 1:], out, where)


@rule("max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "max_pool1d", "avg_pool1d", "adaptive_avg_pool1d",
      "upsample_nearest2d", "upsample_bilinear2d", "max_pool2d_with_indices")
def pool(r, node, out, where):
    src = r.of(node.args[0])
    first = out[0] if out and isinstance(out[0], list) else out
    r.tie(src[:-2], first[:-2], where)
    if out and isinstance(out[0], list):
        r.tie(src[:-2], out[1][:-2], where)


@rule("constant_pad_nd", "pad")
def pad(r, node, out, where):
    src = r.of(node.args[0])
    padded = len(node.args[1]) // 2
    r.tie(src[:len(src) - padded], out[:len(out) - padded], where)


@rule("arange", "zeros", "ones", "full", "empty", "new_ones", "new_zeros", "new_full", "new_empty",
      "scalar_tensor", "zeros_like", "ones_like", "full_like", "empty_like", "rand", "randn")
def creation(r, node, out, where):
    return None  # a fresh tensor couples nothing

