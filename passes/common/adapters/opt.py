"""OPT: separate ``q_proj``/``k_proj``/``v_proj`` and ``out_proj``.

OPT's attention reshapes keys and values with ``num_heads``, so after merging kv heads it
would fail. :meth:`OPTAdapter.merge_heads` switches such a module to a subclass whose forward
reshapes with ``num_key_value_heads``, updates the cache with the shared heads only (a
smaller KV cache), then repeats them for the attention kernel. Weights and the state dict are
unchanged.
"""
from __future__ import annotations

import functools

import torch

from presso.passes.common.adapters import Adapter, Attention


def _repeat(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def _opt_forward(self, hidden_states, past_key_values=None, attention_mask=None, output_attentions=False,
                 cache=None, **kwargs):
    from transformers.models.opt import modeling_opt

    cache = cache if cache is not None else past_key_values  # transformers >= 5.24 calls it `cache`
    bsz, tgt_len, _ = hidden_states.size()
    shape = (bsz, -1, self.num_key_value_heads, self.head_dim)
    query = (self.q_proj(hidden_states) * self.scaling).view(bsz, -1, self.num_heads, self.head_dim).transpose(1, 2)
    key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
    value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx)
    groups = self.num_heads // self.num_key_value_heads
    interface = modeling_opt.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                   modeling_opt.eager_attention_forward)
    out, weights = interface(self, query, _repeat(key, groups), _repeat(value, groups), attention_mask,
                             dropout=0.0 if not self.training else self.dropout, scaling=1.0, **kwargs)
    return self.out_proj(out.reshape(bsz, tgt_len, -1).contiguous()), weights


@functools.cache
def _shared_kv_class(base: type) -> type:
    return type(f"SharedKV{base.__name__}", (base,), {"forward": _opt_forward, "__module__": __name__})


class OPTAdapter(Adapter):
    name = "opt"
    attention_classes = ("OPTAttention",)

    def attention(self, root, path, module) -> Attention:
        return Attention(path, module, module.q_proj, module.k_proj, module.v_proj, module.out_proj,
                         module.head_dim, self)

    def merge_heads(self, att: Attention, kv_heads: int) -> None:
        """Make ``module`` run with ``kv_heads`` shared heads (it repeats them itself)."""
        module = att.module
        if not type(module).__name__.startswith("SharedKV"):
            module.__class__ = _shared_kv_class(type(module))
        module.num_key_value_heads = kv_heads
        module.num_key_value_groups = 1  # repeated here; the sdpa wrapper must not repeat again

    def set_heads(self, att: Attention, heads: int, kv_heads: int) -> None:
        super().set_heads(att, heads, kv_heads)
        if type(att.module).__name__.startswith("SharedKV"):
            att.module.num_key_value_groups = 1  # its forward repeats the shared heads itself

    def config_keys(self) -> dict[str, str]:
        return {"heads": "num_attention_heads"}
