"""``share_attention_heads``: fewer key/value heads (MHA or GQA to GQA/MQA), a smaller KV cache.

Policy (``grouping``): which old kv heads merge into each new one, ``adjacent`` (as the GQA
paper's mean-pooling) or ``similarity`` (equal-size clusters of heads whose key and value
outputs on calibration data are most alike; query heads are reordered to follow their kv
head, which is function-preserving). Mechanism (``merge``): the merged key/value
projection is the ``mean`` of the group's; ``lstsq`` then refits the output projection by
least squares so the attention block reproduces the original block's output on calibration
data. The attention layouts come from the model-family adapters (Llama and kin, Phi-3,
Falcon's multi-query layout, OPT, GPT-2's fused ``c_attn``, BERT); their Hugging Face code
repeats kv heads for attention when ``num_key_value_groups`` > 1, so the cache keeps only the
shared heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from presso.errors import ConfigError
from presso.graph import Graph
from presso.pass_api import Context, Pass, PassConfig, PassResult
from presso.passes.common.adapters import Attention, attentions, update_head_config
from presso.passes.head_sharing import head_merge


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

    @property
    def expected_drift(self) -> float:
        # merged kv heads of an untrained model share nothing, so its attention outputs move about
        # as far as their norm; the bound catches a blow-up, not that cost
        return 1.5


class ShareAttentionHeads(Pass):
    name = "share_attention_heads"
    Config = ShareAttentionHeadsConfig
    summary = "Convert attention to fewer shared key/value heads (GQA/MQA): fewer parameters, smaller KV cache."
    conflicts = {"quantized": "share_attention_heads merges float projections: run it before the quantization "
                              "passes"}

    def run(self, graph: Graph, ctx: Context) -> PassResult:
        cfg = self.config
        views = attentions(graph.module)
        if not views:
            raise ConfigError(
                f"no attention module in {type(graph.module).__name__}",
                hint="share_attention_heads merges the key/value heads of Hugging Face attention modules",
            )
        for v in views:
            self._check(v)
        if all(v.kv_heads == cfg.kv_heads for v in views):
            return PassResult(graph, False, {"kv_heads": cfg.kv_heads, "note": "already at this many kv heads"})
        similarity = head_merge.kv_similarity(graph, ctx, views) if cfg.grouping == "similarity" else {}
        original = head_merge.original_copy(graph) if cfg.merge == "lstsq" else None
        groups = {}
        for v in views:
            groups[v.path] = (
                head_merge.similar_groups(similarity[v.path], cfg.kv_heads)
                if similarity
                else head_merge.adjacent_groups(v.kv_heads, cfg.kv_heads)
            )
            head_merge.merge(v, groups[v.path])
        refit = head_merge.refit_outputs(graph, ctx, views, original) if original is not None else []
        return PassResult(
            graph,
            True,
            {
                "kv_heads": cfg.kv_heads,
                "attentions": len(views),
                "groups": groups,
                "refit": refit,
                "config": _config_note(graph.module, views),
            },
        )

    def _check(self, v: Attention) -> None:
        k = self.config.kv_heads
        if v.heads % k or v.kv_heads % k:
            divisors = [d for d in range(1, v.kv_heads + 1) if v.kv_heads % d == 0 and v.heads % d == 0]
            raise ConfigError(
                f"kv_heads={k} does not divide {v.path}'s {v.heads} query heads and {v.kv_heads} kv heads",
                hint=f"use one of {divisors}",
            )


def _config_note(root, views: list[Attention]) -> str:
    changed, not_expressible = update_head_config(root, views)
    if not_expressible:
        return ("not expressible: " + "; ".join(not_expressible) + "; the model runs and exports, but "
                "from_pretrained on a saved copy builds the old shapes")
    return ", ".join(f"{k}={v}" for k, v in changed.items()) or "no config"
