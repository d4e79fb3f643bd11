"""The fused decoder of the Llama family (Llama, Qwen2, Mistral and their kin: pre-norm RMSNorm
blocks, rotary attention, a gated MLP), as ONNX Runtime's own model builder lays it out.

Per block: one ``SkipSimplifiedLayerNormalization`` (the residual add and the norm), the
block's q/k/v linears, one ``GroupQueryAttention`` (rotary, cache, causal attention), o_proj,
a second skip-norm, the MLP. The linears are the compiled model's modules, called as they
are, so every quantization format, pruned width and low-rank factor lowers as it does in the
exporter's graph; where q/k/v (or gate/up) share a quantized format they are packed into one
matmul (:mod:`.packing`), whose output the attention kernel reads as it is. :func:`why_not`
names the first thing the fused forward cannot prove it computes like the model; such a model
keeps the exporter's graph.
"""
from __future__ import annotations

import torch
from torch import nn

from presso.runtime.decoder import CacheLayout
from presso.runtime.fused.attention import group_query_attention, group_query_attention_packed
from presso.runtime.fused.norms import rms_norm, skip_rms_norm
from presso.runtime.fused.packing import pack_linears

FAMILIES = ("llama", "qwen2", "mistral")
ROPE_TYPES = ("default", "llama3", "linear")  # their tables depend on the position alone


def _parts(model: nn.Module):
    inner = getattr(model, "model", None)
    return inner, getattr(inner, "layers", None), getattr(model, "lm_head", None)


def why_not(model: nn.Module) -> str | None:
    """The first reason the fused forward does not cover ``model``, or None."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        return f"model type {family!r} has no fused decoder (fused: {', '.join(FAMILIES)})"
    inner, layers, head = _parts(model)
    if inner is None or layers is None or head is None or not hasattr(inner, "rotary_emb"):
        return "the model does not have the model.layers / model.norm / lm_head layout of its family"
    rope = getattr(inner.rotary_emb, "rope_type", "default")
    if rope not in ROPE_TYPES:
        return f"rotary scaling {rope!r} depends on the sequence length (fused: {', '.join(ROPE_TYPES)})"
    windowed = getattr(config, "use_sliding_window", False) or family == "mistral"
    if windowed and getattr(config, "sliding_window", None):
        return "sliding-window attention"
    heads = set()
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return f"layer {i} has no q/k/v/o projections"
        for part in (layer, attn, layer.input_layernorm, layer.post_attention_layernorm):
            if not as_shipped(part, family):
                return f"layer {i}'s {type(part).__name__} runs a forward of its own"
        if any(hasattr(attn, n) for n in ("q_norm", "k_norm")):
            return f"layer {i} normalizes q and k"
        if attn.head_dim % 16:
            return f"head size {attn.head_dim} (GroupQueryAttention needs a multiple of 16)"
        heads.add(_head_counts(layer, attn.head_dim))
    if len({kv for _, kv in heads}) != 1:
        return "the layers have different numbers of kv heads (the cache layout has one)"
    if any(h % kv for h, kv in heads):
        return "a layer's heads are not a multiple of its kv heads"
    return None


def as_shipped(module: nn.Module, family: str) -> bool:
    """The module's forward is the one transformers ships for the family (a pass that rewrote
    it, head sharing say, computes something the fused forward does not)."""
    return type(module).forward.__module__ == f"transformers.models.{family}.modeling_{family}"


def ships_gated_mlp(mlp: nn.Module) -> bool:
    """``mlp`` is the gated MLP transformers ships for a fused family: ``down(silu(gate(x)) * up(x))``."""
    config = getattr(mlp, "config", None)
    return (any(as_shipped(mlp, family) for family in FAMILIES) and getattr(config, "hidden_act", None) == "silu"
            and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")))


@torch.no_grad()
def _head_counts(layer: nn.Module, head_dim: int) -> tuple[int, int]:
    """Heads and kv heads from what q_proj and k_proj return (pruned layers have fewer)."""
    attn = layer.self_attn
    probe = torch.zeros(1, 1, layer.input_layernorm.weight.shape[0], dtype=layer.input_layernorm.weight.dtype,
                        device=layer.input_layernorm.weight.device)
    return attn.q_proj(probe).shape[-1] // head_dim, attn.k_proj(probe).shape[-1] // head_dim


def rotary_tables(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[max_positions, head_dim / 2]`` as the model's rotary embedding computes them."""
    rotary = model.model.rotary_emb
    positions = model.config.max_position_embeddings
    angles = torch.arange(positions, dtype=torch.float32)[:, None] * rotary.inv_freq.float().cpu()[None, :]
    scale = float(getattr(rotary, "attention_scaling", 1.0))
    return angles.cos() * scale, angles.sin() * scale


class FusedDecoder(nn.Module):
    """``forward(input_ids, attention_mask, *past) -> (logits, *present)``: the interface of
    :class:`presso.runtime.decoder.DecoderWithCache` without ``position_ids`` (the attention
    kernel derives positions from the cache length)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        cos, sin = rotary_tables(model)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        layers = model.model.layers
        self.heads = [_head_counts(layer, layer.self_attn.head_dim) for layer in layers]
        # packed copies of quantized weights (small); float linears are called one by one
        self.qkv, self.gate_up = nn.ModuleDict(), nn.ModuleDict()
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            if (qkv := pack_linears([attn.q_proj, attn.k_proj, attn.v_proj])) is not None:
                self.qkv[str(i)] = qkv
            if ships_gated_mlp(mlp):
                if (gate_up := pack_linears([mlp.gate_proj, mlp.up_proj])) is not None:
                    self.gate_up[str(i)] = gate_up

    def packed(self) -> dict[str, int]:
        """How many q/k/v and gate/up groups run as one matmul (for the manifest)."""
        return {"qkv": len(self.qkv), "gate_up": len(self.gate_up)}

    def layout(self) -> CacheLayout:
        layers = self.model.model.layers
        return CacheLayout(len(layers), self.heads[0][1], layers[0].self_attn.head_dim, position_ids=False)

    def forward(self, input_ids, attention_mask, *past):
        inner = self.model.model
        seqlens = (attention_mask.sum(-1) - 1).to(torch.int32)  # index of each row's last token
        total = torch.ones_like(attention_mask[0]).sum().to(torch.int32)  # past + new, a scalar
        hidden, residual, present = inner.embed_tokens(input_ids), None, []
        for i, layer in enumerate(inner.layers):
            norm = layer.input_layernorm
            if residual is None:
                x, residual = rms_norm(hidden, norm.weight, norm.variance_epsilon), hidden
            else:
                x, residual = skip_rms_norm(hidden, residual, norm.weight, norm.variance_epsilon)
            out, key, value = self._attention(i, layer.self_attn, x, past[2 * i], past[2 * i + 1], seqlens, total)
            present += [key, value]
            norm = layer.post_attention_layernorm
            x, residual = skip_rms_norm(layer.self_attn.o_proj(out), residual, norm.weight, norm.variance_epsilon)
            hidden = self._mlp(i, layer.mlp, x)
        x, _ = skip_rms_norm(hidden, residual, inner.norm.weight, inner.norm.variance_epsilon)
        return (self.model.lm_head(x), *present)

    def _attention(self, i: int, attn: nn.Module, x, past_k, past_v, seqlens, total):
        heads, kv_heads = self.heads[i]
        common = (seqlens, total, self.cos, self.sin, heads, kv_heads, float(attn.scaling))
        if str(i) in self.qkv:
            return group_query_attention_packed(self.qkv[str(i)](x), past_k, past_v, *common)
        return group_query_attention(attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), past_k, past_v, *common)

    def _mlp(self, i: int, mlp: nn.Module, x):
        if str(i) not in self.gate_up:
            return mlp(x)
        gate, up = self.gate_up[str(i)](x).split([mlp.gate_proj.out_features, mlp.up_proj.out_features], dim=-1)
        return mlp.down_proj(nn.functional.silu(gate) * up)
