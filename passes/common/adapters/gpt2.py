"""GPT-2: one fused ``c_attn`` (a transposed ``Conv1D``, [q | k | v] columns) and ``c_proj``."""
from __future__ import annotations

from presso.passes.common.adapters import Adapter, Attention


class GPT2Adapter(Adapter):
    name = "gpt2"
    attention_classes = ("GPT2Attention",)

    def attention(self, root, path, module) -> Attention | None:
        if getattr(module, "is_cross_attention", False):
            return None
        return Attention(path, module, module.c_attn, None, None, module.c_proj, module.head_dim, self)

    def fused_kv_heads(self, att: Attention) -> int:
        split = getattr(att.module, "split_size", 0)
        if isinstance(split, list):  # after share_attention_heads: [q, k, v] widths
            return split[1] // att.head_dim
        return att.heads

    def set_heads(self, att: Attention, heads: int, kv_heads: int) -> None:
        super().set_heads(att, heads, kv_heads)
        m, hd = att.module, att.head_dim
        m.split_size = heads * hd if kv_heads == heads else [heads * hd, kv_heads * hd, kv_heads * hd]

    def config_keys(self) -> dict[str, str]:
        return {"heads": "n_head"}
