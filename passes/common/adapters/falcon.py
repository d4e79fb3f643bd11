"""Falcon: one fused ``query_key_value`` and ``dense``. Only the multi-query layout ([q | k | v],
one key/value head) is read as [q | k | v] rows; the per-head interleaved and grouped layouts
keep their kv heads whole. Falcon's config derives ``head_dim`` from ``hidden_size`` and the
head count, so a new head count cannot be written to it."""
from __future__ import annotations

from presso.passes.common.adapters import Adapter, AdapterError, Attention


class FalconAdapter(Adapter):
    name = "falcon"
    attention_classes = ("FalconAttention",)

    def attention(self, root, path, module) -> Attention:
        return Attention(path, module, module.query_key_value, None, None, module.dense, module.head_dim, self)

    def fused_kv_heads(self, att: Attention) -> int:
        m = att.module
        return 1 if m.multi_query and not m.new_decoder_architecture else m.num_kv_heads

    def fused_rows(self, att: Attention):
        m = att.module
        if m.new_decoder_architecture or not m.multi_query:
            raise AdapterError("Falcon's interleaved q/k/v layout (new_decoder_architecture, or multi_query=False) "
                               "cannot be read as [q | k | v] rows",
                               hint="share_attention_heads supports Falcon's multi-query layout only")
        return super().fused_rows(att)

    def set_heads(self, att: Attention, heads: int, kv_heads: int) -> None:
        super().set_heads(att, heads, kv_heads)
        att.module.split_size = heads * att.head_dim

    def config_keys(self) -> dict[str, str]:
        return {}  # num_attention_heads also sets head_dim (hidden_size // heads): not expressible
