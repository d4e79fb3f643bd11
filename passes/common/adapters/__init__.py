"""What presso knows about Hugging Face model families, in one place: one adapter a family.

An adapter finds a model's attention modules and says how they are laid out (separate
q/k/v/o projections, or one fused q/k/v projection as in GPT-2, Phi-3 and Falcon), how many
query and key/value heads they hold, which module attributes and config keys must follow
when a pass changes those counts, and (for the Llama family) the decoder layout that a
residual rotation rewrites. Passes ask :func:`attentions` and :func:`adapter_for`; they do
not test class or attribute names themselves.

Plugins add adapters for new architectures through the ``presso_register_adapters`` hook; a
model with attention modules that no adapter knows gets an :class:`AdapterError` naming its
class and that hook.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from presso.errors import ConfigError
from presso.passes.common.modules import linear_shape

HOOK = "presso_register_adapters"


class AdapterError(ConfigError):
    """No adapter knows this model (or this part of it)."""


@dataclass
class Attention:
    """One attention module: its projections as (out, in) linears, whatever the layout."""

    path: str
    module: nn.Module
    q: nn.Module  # the query projection, or the fused q/k/v projection when ``k`` is None
    k: nn.Module | None
    v: nn.Module | None
    o: nn.Module
    head_dim: int
    adapter: Adapter = field(repr=False)

    @property
    def fused(self) -> bool:
        return self.k is None

    @property
    def heads(self) -> int:
        return linear_shape(self.o)[1] // self.head_dim

    @property
    def kv_heads(self) -> int:
        if not self.fused:
            return linear_shape(self.k)[0] // self.head_dim
        return self.adapter.fused_kv_heads(self)


class Adapter:
    """Base of every adapter; a family overrides what differs.

    ``attention_classes``: class names of the attention modules this adapter handles.
    """

    name: str = ""
    attention_classes: tuple[str, ...] = ()

    def handles(self, module: nn.Module) -> bool:
        return type(module).__name__ in self.attention_classes or any(
            c.__name__ in self.attention_classes for c in type(module).__mro__)

    def attention(self, root: nn.Module, path: str, module: nn.Module) -> Attention:  # pragma: no cover
        raise NotImplementedError

    def fused_kv_heads(self, att: Attention) -> int:
        """Key/value heads of a fused [q | k | v] projection: what is left after the queries."""
        return (linear_shape(att.q)[0] // att.head_dim - att.heads) // 2

    def fused_rows(self, att: Attention) -> tuple[slice, slice, slice]:
        """Rows of q, k and v in the fused projection's output: [q | k | v] by default."""
        e, kv = att.heads * att.head_dim, att.kv_heads * att.head_dim
        return slice(0, e), slice(e, e + kv), slice(e + kv, e + 2 * kv)

    def set_heads(self, att: Attention, heads: int, kv_heads: int) -> None:
        """Make the module's own attributes match ``heads`` and ``kv_heads``."""
        m, hd = att.module, att.head_dim
        for attr, value in (("num_heads", heads), ("num_attention_heads", heads), ("num_key_value_heads", kv_heads),
                            ("num_kv_heads", kv_heads), ("num_key_value_groups", heads // max(kv_heads, 1)),
                            ("all_head_size", heads * hd)):
            if isinstance(getattr(m, attr, None), int):
                setattr(m, attr, value)

    def config_keys(self) -> dict[str, str]:
        """Config attributes that hold the head counts (``heads``, ``kv_heads``)."""
        return {"heads": "num_attention_heads", "kv_heads": "num_key_value_heads"}

    def merge_heads(self, att: Attention, kv_heads: int) -> None:
        """Called after ``share_attention_heads`` merged kv heads: make the forward work with them."""
        self.set_heads(att, att.heads, kv_heads)
        att.module.num_key_value_groups = att.heads // kv_heads  # read by transformers' repeat_kv

    def decoder(self, model: nn.Module) -> Any:
        """The decoder layout a residual rotation rewrites; only families that allow it."""
        raise AdapterError(f"rotate_residual supports Llama-style decoders with RMS norms; "
                           f"{type(model).__name__} (adapter {self.name!r}) is not one",
                           hint="leave rotate_residual out for this model (smooth_quant works on any norm -> linear)")


def _registered() -> list[Adapter]:
    from presso.plugins.registry import get_registry

    return list(get_registry().adapters)


def adapter_for(module: nn.Module) -> Adapter | None:
    return next((a for a in _registered() if a.handles(module)), None)


def attentions(root: nn.Module, required: bool = True) -> list[Attention]:
    """Every attention module of ``root`` an adapter knows, in module order.

    ``required``: a module that looks like attention (its class name ends in ``Attention``)
    but that no adapter knows is an :class:`AdapterError` naming its class and the hook.
    """
    found, unknown = [], []
    for path, module in root.named_modules():
        adapter = adapter_for(module)
        if adapter is not None:
            att = adapter.attention(root, path, module)
            if att is not None:
                found.append(att)
        elif type(module).__name__.endswith("Attention"):
            unknown.append((path, module))
    for path, module in unknown:  # a wrapper around a known attention (BERT's BertAttention) is fine
        related = any(a.path.startswith(path + ".") or path.startswith(a.path + ".") for a in found)
        if required and not related:
            raise unknown_model(root, type(module).__name__)
    return found


def model_adapter(root: nn.Module) -> Adapter:
    """The adapter of the model's family: the one that knows its attention modules."""
    found = attentions(root)
    if not found:
        raise unknown_model(root, "any attention module")
    return found[0].adapter


def unknown_model(root: nn.Module, what: str) -> AdapterError:
    return AdapterError(f"no model-family adapter knows {what} in {type(root).__name__}",
                        hint=f"write an adapter (presso.passes.common.adapters.Adapter) and register it "
                             f"through the {HOOK} hook; see docs/writing-a-plugin.md")


def update_head_config(root: nn.Module, found: list[Attention]) -> tuple[dict[str, int], list[str]]:
    """Write the attentions' head counts to ``root.config`` under each family's keys.

    Returns what changed and what the config cannot say (layers that differ, or a family
    whose config derives other sizes from the head count).
    """
    config = getattr(root, "config", None)
    if config is None or not found:
        return {}, []
    changed, not_expressible = {}, []
    keys = found[0].adapter.config_keys()
    for family, counts in (("heads", {a.heads for a in found}), ("kv_heads", {a.kv_heads for a in found})):
        key = keys.get(family)
        if key is None or not hasattr(config, key):
            plain_mha = family == "kv_heads" and all(a.kv_heads == a.heads for a in found)
            if not plain_mha:  # a config without the key cannot say it
                not_expressible.append(f"{family}: {type(config).__name__} has no key for {sorted(counts)}")
            continue
        if len(counts) != 1:
            not_expressible.append(f"{family}: layers differ ({sorted(counts)})")
            continue
        try:
            setattr(config, key, next(iter(counts)))
        except AttributeError:  # a derived property
            not_expressible.append(f"{family}: {type(config).__name__}.{key} cannot be set")
            continue
        changed[key] = next(iter(counts))
    return changed, not_expressible


def builtin_adapters() -> list[Adapter]:
    from presso.passes.common.adapters import bert, falcon, gpt2, llama, opt, phi3

    return [llama.LlamaAdapter(), phi3.Phi3Adapter(), falcon.FalconAdapter(), gpt2.GPT2Adapter(),
            opt.OPTAdapter(), bert.BertAdapter()]
