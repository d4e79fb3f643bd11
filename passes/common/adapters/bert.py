"""BERT: ``query``/``key``/``value`` in ``attention.self`` and the output projection in the
sibling ``attention.output.dense``."""
from __future__ import annotations

from presso.passes.common.adapters import Adapter, Attention


class BertAdapter(Adapter):
    name = "bert"
    attention_classes = ("BertSelfAttention", "BertSdpaSelfAttention")

    def attention(self, root, path, module) -> Attention:
        output = root.get_submodule(path.rsplit(".", 1)[0]).output.dense  # BertSelfOutput beside it
        return Attention(path, module, module.query, module.key, module.value, output,
                         module.attention_head_size, self)

    def config_keys(self) -> dict[str, str]:
        return {"heads": "num_attention_heads"}
