"""Llama-style attention: separate ``q_proj``/``k_proj``/``v_proj``/``o_proj`` (Llama, SmolLM2,
Mistral, Qwen2/3, Gemma and their kin), and the decoder layout a residual rotation rewrites."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from presso.passes.common.adapters import Adapter, AdapterError, Attention

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass
class DecoderLayout:
    """The modules a residual rotation touches."""

    embed: nn.Embedding
    final_norm: nn.Module
    head: nn.Linear
    base: nn.Module  # owns ``embed_tokens`` and ``norm``
    layers: list[nn.Module]


class LlamaAdapter(Adapter):
    name = "llama"
    attention_classes = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention",
                         "GemmaAttention", "Gemma2Attention", "SmolLM3Attention")

    def handles(self, module: nn.Module) -> bool:
        # the class names above, and any module with the same four projections and a head size
        return super().handles(module) or (
            all(isinstance(getattr(module, n, None), nn.Module) for n in PROJECTIONS)
            and isinstance(getattr(module, "head_dim", None), int))

    def attention(self, root, path, module) -> Attention:
        return Attention(path, module, module.q_proj, module.k_proj, module.v_proj, module.o_proj,
                         module.head_dim, self)

    def decoder(self, model: nn.Module) -> DecoderLayout:
        base, head = getattr(model, "model", None), getattr(model, "lm_head", None)
        layers = getattr(base, "layers", None)
        if not (isinstance(head, nn.Linear) and isinstance(getattr(base, "embed_tokens", None), nn.Embedding)
                and layers is not None and all(_is_llama_layer(layer) for layer in layers)):
            raise AdapterError(
                f"rotate_residual supports Llama-style decoders (Llama, Mistral, Qwen2, SmolLM2); "
                f"{type(model).__name__} does not have model.embed_tokens, model.layers[i].self_attn."
                f"{{q,k,v,o}}_proj, mlp.{{gate,up,down}}_proj, model.norm and lm_head",
                hint="run rotate_residual first, before passes that replace linears; for other models "
                     "leave it out (smooth_quant works on any norm -> linear)")
        return DecoderLayout(base.embed_tokens, base.norm, head, base, list(layers))


def _is_llama_layer(layer: nn.Module) -> bool:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    return (all(isinstance(getattr(attn, n, None), nn.Linear) for n in PROJECTIONS)
            and all(isinstance(getattr(mlp, n, None), nn.Linear) for n in MLP))
