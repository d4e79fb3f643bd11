"""Phi-3: one fused ``qkv_proj`` ([q | k | v] rows) and ``o_proj``. Its forward reads the query
head count from the model config, so that count must follow a cut (the config is shared)."""
from __future__ import annotations

from presso.passes.common.adapters import Adapter, Attention


class Phi3Adapter(Adapter):
    name = "phi3"
    attention_classes = ("Phi3Attention",)

    def attention(self, root, path, module) -> Attention:
        return Attention(path, module, module.qkv_proj, None, None, module.o_proj, module.head_dim, self)

    def set_heads(self, att: Attention, heads: int, kv_heads: int) -> None:
        super().set_heads(att, heads, kv_heads)
        config = getattr(att.module, "config", None)
        if config is not None:
            config.num_attention_heads = heads
