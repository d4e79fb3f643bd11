"""``rotate_residual``: rotate a decoder's residual stream and each value head (QuaRot / SpinQuant R1, R2).

A Llama-style decoder reads its residual stream ``x`` only through RMS norms, and
``rms(x Q) = rms(x)`` for an orthogonal ``Q``. With each norm's gain folded into the linears
it feeds (``W <- W diag(g) Q``) and every writer rotated (``o_proj``, ``down_proj``:
``W <- Q^T W``), the stream becomes ``x Q`` and the model computes the same function
(checked to float tolerance). A Hadamard ``Q`` spreads outlier channels over all channels,
so the inputs of ``q/k/v`` and ``gate/up`` get flat, per-tensor int8 activations lose far
less, and weights get easier to quantize. Each value head is rotated too (``v_proj`` rows,
``o_proj`` columns, per head), which flattens ``o_proj``'s input.

A tied embedding and ``lm_head`` cannot both be rotated in place, so there the stream is
rotated right after the lookup and back before the final norm: two ``hidden x hidden``
float matmuls per token. Untied models are rotated in place, at no cost. Run it before
``smooth_quant``/``quantize_static_int8`` or ``quantize_weights``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from presso.errors import ConfigError
from presso.graph import Graph
from presso.pass_api import Context, Pass, PassConfig, PassResult
from presso.passes.common.adapters import model_adapter
from presso.passes.common.adapters.llama import DecoderLayout
from presso.passes.quantization.rotation import hadamard_factors, kron_apply, kron_split, random_orthogonal

ATTN_INPUTS, MLP_INPUTS = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")


@dataclass(frozen=True, kw_only=True)
class RotateResidualConfig(PassConfig):
    kind: Literal["hadamard", "random"] = "hadamard"  # hadamard falls back to random where none is built
    heads: bool = True  # also rotate each value head (o_proj's input)
    online: bool = False  # also rotate down_proj's input, by small Kronecker matmuls per token
    seed: int = 0


def find_layout(model: nn.Module) -> DecoderLayout:
    """The decoder layout from the model's family adapter, its norms checked to be RMS norms."""
    layout = model_adapter(model).decoder(model)
    layers = layout.layers
    for norm in [layout.final_norm] + [n for layer in layers for n in (layer.input_layernorm,
                                                                         layer.post_attention_layernorm)]:
        _check_rms_norm(norm)
    return layout


def _check_rms_norm(norm: nn.Module) -> None:
    """Rotation commutes only with ``x / rms(x) * g`` (not LayerNorm, not ``(1 + g)`` gains)."""
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if (
        not isinstance(weight, torch.Tensor)
        or weight.dim() != 1
        or eps is None
        or getattr(norm, "bias", None) is not None
    ):
        raise ConfigError(f"rotate_residual needs RMS norms with a gain; got {type(norm).__name__}")
    x = torch.randn(4, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
    want = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + eps) * weight.double()
    rtol = max(1e-3, 2 * torch.finfo(weight.dtype).eps)  # a half-precision norm rounds its output
    if not torch.allclose(norm(x).double(), want, rtol=rtol, atol=1e-4):
        raise ConfigError(
            f"rotate_residual needs norms computing x / rms(x) * weight; {type(norm).__name__} does not",
            hint="leave rotate_residual out for this model",
        )


class RotatedEmbedding(nn.Module):
    """An embedding whose rows come out rotated: ``table[ids] @ rotation``."""

    def __init__(self, embedding: nn.Embedding, rotation: torch.Tensor):
        super().__init__()
        self.embedding = embedding
        self.register_buffer("rotation", rotation)

    @property
    def weight(self) -> torch.Tensor:  # Hugging Face ties and resizes through ``.weight``
        return self.embedding.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids) @ self.rotation


class UnrotatedNorm(nn.Module):
    """The final norm, fed the stream rotated back: ``norm(x @ rotation.T)``."""

    def __init__(self, norm: nn.Module, rotation: torch.Tensor):
        super().__init__()
        self.norm = norm
        self.register_buffer("rotation", rotation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x @ self.rotation.t())


class RotatedInputLinear(nn.Module):
    """``linear(x @ R)`` with ``R = diag(signs) kron(left, right)`` applied per token (QuaRot's online
    Hadamard); ``linear`` holds ``W R``, so the function is unchanged and ``linear`` sees flat inputs."""

    def __init__(self, linear: nn.Linear, signs: torch.Tensor, left: torch.Tensor, right: torch.Tensor):
        super().__init__()
        self.linear = linear
        self.register_buffer("signs", signs)
        self.register_buffer("left", left)
        self.register_buffer("right", right)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(kron_apply(x * self.signs, self.left, self.right))


def _preflight(layout: DecoderLayout, cfg: RotateResidualConfig) -> None:
    for layer in layout.layers:
        n = layer.mlp.down_proj.in_features
        if cfg.online and hadamard_factors(n) is None:
            raise ConfigError(
                f"rotate_residual(online=True): no Hadamard matrix of order {n} is built here "
                f"(orders 2^k times 12s and 20s)",
                hint="pass online=False",
            )
        attn, head_dim = layer.self_attn, getattr(layer.self_attn, "head_dim", None)
        if cfg.heads and (not head_dim or attn.v_proj.out_features % head_dim or attn.o_proj.in_features % head_dim):
            raise ConfigError(
                f"rotate_residual(heads=True) could not read the head size of {type(attn).__name__}",
                hint="pass heads=False",
            )


def rotate_input_online(linear: nn.Linear, seed: int) -> RotatedInputLinear:
    n = linear.in_features
    factors = hadamard_factors(n)
    left, right = (m / m.shape[0] ** 0.5 for m in kron_split(factors))
    signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed + 2)).double() * 2 - 1
    _set(linear, kron_apply(linear.weight.double() * signs, left, right), linear.bias)
    dtype = linear.weight.dtype
    return RotatedInputLinear(linear, signs.to(dtype), left.to(dtype), right.to(dtype))


class RotateResidual(Pass):
    name = "rotate_residual"
    Config = RotateResidualConfig
    summary = "Rotate a decoder's residual stream by a Hadamard matrix (function-preserving) to flatten outliers."
    conflicts = {"quantized": "rotate_residual rewrites float linears: run it before the quantization passes"}

    @torch.no_grad()
    def run(self, graph: Graph, ctx: Context) -> PassResult:
        cfg = self.config
        layout = find_layout(graph.module)
        _preflight(layout, cfg)  # every refusal before the first weight changes
        hidden = layout.embed.embedding_dim
        q = random_orthogonal(hidden, cfg.seed, cfg.kind)
        for layer in layout.layers:
            rotate_layer(layer, q, cfg.heads, cfg.seed)
            if cfg.online:
                layer.mlp.down_proj = rotate_input_online(layer.mlp.down_proj, cfg.seed)
        tied = layout.head.weight is layout.embed.weight
        if tied:
            layout.base.embed_tokens = RotatedEmbedding(layout.embed, q.to(layout.embed.weight.dtype))
            layout.base.norm = UnrotatedNorm(layout.final_norm, q.to(layout.embed.weight.dtype))
        else:
            _set(layout.embed, layout.embed.weight.double() @ q)
            _fold_norm_into(layout.final_norm, [layout.head], q)
        return PassResult(
            graph,
            True,
            {
                "layers": len(layout.layers),
                "hidden": hidden,
                "tied_embedding": tied,
                "online_matmuls": 2 if tied else 0,
                "heads": cfg.heads,
                "online_down_proj": cfg.online,
            },
        )


@torch.no_grad()
def rotate_layer(layer: nn.Module, q: torch.Tensor, heads: bool, seed: int) -> None:
    attn, mlp = layer.self_attn, layer.mlp
    _fold_norm_into(layer.input_layernorm, [getattr(attn, n) for n in ATTN_INPUTS], q)
    _fold_norm_into(layer.post_attention_layernorm, [getattr(mlp, n) for n in MLP_INPUTS], q)
    for writer in (attn.o_proj, mlp.down_proj):
        _set(writer, q.t() @ writer.weight.double(), _rotated_bias(writer, q))
    if heads:
        _rotate_value_heads(attn, seed)


def _rotated_bias(linear: nn.Linear, q: torch.Tensor) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.double() @ q


def _fold_norm_into(norm: nn.Module, readers: list[nn.Linear], q: torch.Tensor) -> None:
    gain = norm.weight.double()
    for linear in readers:
        _set(linear, linear.weight.double() * gain[None, :] @ q)
    norm.weight.fill_(1.0)


def _rotate_value_heads(attn: nn.Module, seed: int) -> None:
    """Each value head's output and ``o_proj``'s matching columns by one ``head_dim`` rotation:
    attention mixes positions, not channels, so it commutes with it (shared kv heads too)."""
    head_dim = attn.head_dim  # checked by _preflight
    h = random_orthogonal(head_dim, seed + 1)
    kv, qh = attn.v_proj.out_features // head_dim, attn.o_proj.in_features // head_dim
    w = attn.v_proj.weight.double().view(kv, head_dim, -1)
    bias = None if attn.v_proj.bias is None else (h.t() @ attn.v_proj.bias.double().view(kv, head_dim, 1)).reshape(-1)
    _set(attn.v_proj, (h.t() @ w).reshape(kv * head_dim, -1), bias)
    wo = attn.o_proj.weight.double().view(-1, qh, head_dim)
    _set(attn.o_proj, (wo @ h).reshape(-1, qh * head_dim), attn.o_proj.bias)


def _set(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    module.weight.copy_(weight.to(module.weight.dtype))
    if bias is not None:
        module.bias.copy_(bias.to(module.bias.dtype))
