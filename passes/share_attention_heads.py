"""``share_attention_heads``: fewer key/value heads (MHA or GQA to GQA/MQA), a smaller KV cache.

Policy (``grouping``): which old kv heads merge into each new one, ``adjacent`` (as the GQA
paper's mean-pooling) or ``similarity`` (equal-size clusters of heads whose key and value
outputs on calibration data are most alike; query heads are reordered to follow their kv
head, which is function-preserving). Mechanism (``merge``): the merged key/value
projection is the ``mean`` of the group's; ``lstsq`` then refits the output projection by
least squares so the attention block reproduces the original block's output on calibration
data. Supported attention modules: Llama-family (Llama, Qwen2, Mistral, SmolLM2), OPT, GPT-2
(fused ``c_attn``) and BERT; their Hugging Face code repeats kv heads for attention when
``num_key_value_groups`` > 1, so the cache keeps only the shared heads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from presso.errors import ConfigError
from presso.graph import Graph
from presso.pass_api import Context, Pass, PassConfig, PassResult
from presso.passes import head_merge
from presso.passes.head_merge import AttentionView, attention_views


@dataclass(frozen=True, kw_only=True)
class ShareAttentionHeadsConfig(PassConfig):
    kv_heads: int = 1  # key/value heads per attention after the pass (must divide the query heads)
    grouping: Literal["adjacent", "similarity"] = "adjacent"
    merge: Literal["mean", "lstsq"] = "mean"

    def validate(self) -> None:
        if self.kv_heads < 1:
            raise ConfigError(f"kv_heads={self.kv_heads} must be >= 1", hint="1 is multi-query attention")

    @property
    def needs_calibration(self) -> bool:
        return self.grouping == "similarity" or self.merge == "lstsq"


class ShareAttentionHeads(Pass):
    name = "share_attention_heads"
    Config = ShareAttentionHeadsConfig
    summary = "Convert attention to fewer shared key/value heads (GQA/MQA): fewer parameters, smaller KV cache."
    provides = frozenset({"shared_kv"})
    invalidates = frozenset({"quantized"})
    max_rel_error = 4.0  # lossy by design (perplexity measures the cost); this catches a blown-up model


    def run(self, graph: Graph, ctx: Context) -> PassResult:
        cfg = self.config
        views = attention_views(graph.module)
        if not views:
            raise ConfigError(f"no supported attention module in {type(graph.module).__name__}",
                              hint="supported: Llama-family, GPT-2, BERT and OPT attention (Hugging Face transformers)")
        for v in views:
            self._check(v)
        if all(v.kv_heads == cfg.kv_heads for v in views):
            return PassResult(graph, False, {"kv_heads": cfg.kv_heads, "note": "already at this many kv heads"})
        similarity = head_merge.kv_similarity(graph, ctx, views) if cfg.grouping == "similarity" else {}
        original = head_merge.original_copy(graph) if cfg.merge == "lstsq" else None
        groups = {}
        for v in views:
            groups[v.path] = (head_merge.similar_groups(similarity[v.path], cfg.kv_heads) if similarity
                              else head_merge.adjacent_groups(v.kv_heads, cfg.kv_heads))
            v.merge(groups[v.path])
        refit = head_merge.refit_outputs(graph, ctx, views, original) if original is not None else []
        return PassResult(graph, True, {"kv_heads": cfg.kv_heads, "attentions": len(views), "groups": groups,
                                        "refit": refit, "config": _update_config(graph.module, cfg.kv_heads)})

    def _check(self, v: AttentionView) -> None:
        k = self.config.kv_heads
        if v.heads % k or v.kv_heads % k:
            divisors = [d for d in range(1, v.kv_heads + 1) if v.kv_heads % d == 0 and v.heads % d == 0]
            raise ConfigError(f"kv_heads={k} does not divide {v.path}'s {v.heads} query heads and {v.kv_heads} kv heads",
                              hint=f"use one of {divisors}")


def _update_config(root, kv_heads: int) -> str:
    config = getattr(root, "config", None)
    if config is None:
        return "no config"
    if hasattr(config, "num_key_value_heads"):
        config.num_key_value_heads = kv_heads
        return f"num_key_value_heads={kv_heads}"
    return (f"not expressible: {type(config).__name__} has no num_key_value_heads; the model runs and exports, "
            "but from_pretrained on a saved copy builds the old shapes")
