"""Attention with rotary positions and a KV cache: ONNX Runtime's ``GroupQueryAttention``
(``com.microsoft``), which also covers plain multi-head attention (as many kv heads as heads).

The kernel rotates q and k (half-split rotary, cos/sin tables as initializers), appends k and
v to the past cache, and attends causally. Its preconditions, which the fused forward checks
before it calls this op: a head size that is a multiple of 16, and batch rows that are all of
the full length (the positions of the new tokens follow from the cache length). The kernel
takes several new tokens after a cache only in a batch of one (a prompt, or one token per row
after it, runs in any batch).
"""
from __future__ import annotations

import torch
from onnxscript import FLOAT, INT32

from presso.runtime.contrib import contrib_op

_GQA = contrib_op(
    "GroupQueryAttention",
    ["query:T", "key:T?", "value:T?", "past_key:T", "past_value:T", "seqlens_k:M", "total_sequence_length:M",
     "cos_cache:T?", "sin_cache:T?"],
    ["output:T", "present_key:T", "present_value:T"], {"T": "float", "M": "int32"},
    {"num_heads": "int", "kv_num_heads": "int", "scale": "float", "do_rotary": "int"})


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _attend(q, k, v, past_k, past_v, cos, sin, num_heads: int, kv_heads: int, scale: float):
    batch, new, _ = q.shape
    d, past = past_k.shape[-1], past_k.shape[2]
    positions = torch.arange(past, past + new, device=q.device)
    c, s = cos[positions].to(q.dtype), sin[positions].to(q.dtype)
    qh = _rotate(q.reshape(batch, new, num_heads, d).transpose(1, 2), c, s)
    kh = _rotate(k.reshape(batch, new, kv_heads, d).transpose(1, 2), c, s)
    keys = torch.cat([past_k, kh], dim=2)
    values = torch.cat([past_v, v.reshape(batch, new, kv_heads, d).transpose(1, 2)], dim=2)
    group = num_heads // kv_heads
    causal = torch.ones(new, past + new, dtype=torch.bool, device=q.device).tril(past)
    out = torch.nn.functional.scaled_dot_product_attention(
        qh, keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1), attn_mask=causal, scale=scale)
    return out.transpose(1, 2).reshape(batch, new, num_heads * d), keys, values


@torch.library.custom_op("presso::group_query_attention", mutates_args=())
def group_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor,
                          past_v: torch.Tensor, seqlens_k: torch.Tensor, total_length: torch.Tensor,
                          cos: torch.Tensor, sin: torch.Tensor, num_heads: int, kv_heads: int, scale: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q`` ``[batch, new, heads * d]``, ``k``/``v`` ``[batch, new, kv_heads * d]``, caches
    ``[batch, kv_heads, past, d]``; returns the attention output ``[batch, new, heads * d]`` and
    the grown caches. ``cos``/``sin``: ``[positions, d / 2]``. ``seqlens_k`` and ``total_length``
    are what the kernel reads; rows are of full length, so the reference needs neither."""
    return _attend(q, k, v, past_k, past_v, cos, sin, num_heads, kv_heads, scale)


@torch.library.custom_op("presso::group_query_attention_packed", mutates_args=())
def group_query_attention_packed(qkv: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                                 seqlens_k: torch.Tensor, total_length: torch.Tensor, cos: torch.Tensor,
                                 sin: torch.Tensor, num_heads: int, kv_heads: int, scale: float
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`group_query_attention` with q, k and v side by side in one tensor
    ``[batch, new, (heads + 2 kv_heads) * d]``: the output of one packed q/k/v matmul."""
    d = past_k.shape[-1]
    q, k, v = qkv.split([num_heads * d, kv_heads * d, kv_heads * d], dim=-1)
    return _attend(q, k, v, past_k, past_v, cos, sin, num_heads, kv_heads, scale)


def _fake_outputs(q_like: torch.Tensor, past_k: torch.Tensor, num_heads: int, kv_heads: int):
    batch, new, _ = q_like.shape
    d = past_k.shape[-1]
    cache = past_k.new_empty((batch, kv_heads, past_k.shape[2] + new, d))
    return q_like.new_empty((batch, new, num_heads * d)), cache, torch.empty_like(cache)


@group_query_attention_packed.register_fake
def _(qkv, past_k, past_v, seqlens_k, total_length, cos, sin, num_heads, kv_heads, scale):
    return _fake_outputs(qkv, past_k, num_heads, kv_heads)


@group_query_attention.register_fake
def _(q, k, v, past_k, past_v, seqlens_k, total_length, cos, sin, num_heads, kv_heads, scale):
    return _fake_outputs(q, past_k, num_heads, kv_heads)


def group_query_attention_onnx(q: FLOAT, k: FLOAT, v: FLOAT, past_k: FLOAT, past_v: FLOAT, seqlens_k: INT32,
                               total_length: INT32, cos: FLOAT, sin: FLOAT, num_heads: int = 1, kv_heads: int = 1,
                               scale: float = 1.0):
    return _GQA(q, k, v, past_k, past_v, seqlens_k, total_length, cos, sin, num_heads=num_heads,
                kv_num_heads=kv_heads, scale=scale, do_rotary=1)


def group_query_attention_packed_onnx(qkv: FLOAT, past_k: FLOAT, past_v: FLOAT, seqlens_k: INT32,
                                      total_length: INT32, cos: FLOAT, sin: FLOAT, num_heads: int = 1,
                                      kv_heads: int = 1, scale: float = 1.0):
    # the kernel reads packed q/k/v from its first input when key and value are left out
    return _GQA(qkv, None, None, past_k, past_v, seqlens_k, total_length, cos, sin, num_heads=num_heads,
                kv_num_heads=kv_heads, scale=scale, do_rotary=1)
