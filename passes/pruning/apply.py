"""The pruning mechanism: cut every coupled slice at once, then make the modules agree.

``decisions`` maps a :class:`DepGroup` name to a boolean keep mask over its units. Each
parameter gets one keep mask per dimension (several groups may cut one parameter: q_proj
loses rows for heads and columns for the hidden size); parameters shared by several
modules (tied embeddings) are cut once and stay shared. Then module attributes
(``in_features``, ``num_heads``, ``groups`` ...) and the Hugging Face config follow the
new shapes, so ``generate()``, ``save_pretrained`` and export keep working.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from presso.passes.common.adapters import attentions, update_head_config
from presso.passes.common.dep_groups import DepGraph
from presso.passes.common.modules import is_conv1d

# attributes a module may keep about its own width; a module type we cannot resize must
# not have one equal to a dimension we would cut (nn.MultiheadAttention.embed_dim, say)
RESIZABLE = (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.Embedding,
             nn.RMSNorm)


def keep_masks(dep: DepGraph, decisions: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor | None]]:
    """Per parameter, per dimension: which positions stay (None: the whole dimension)."""
    masks: dict[str, list[torch.Tensor | None]] = {}
    for group in dep.groups:
        keep = decisions.get(group.name)
        if keep is None or bool(keep.all()):
            continue
        for m in group.members:
            dim_mask = (m.units < 0) | keep[m.units.clamp(min=0)]
            dims = masks.setdefault(m.param, [None] * dep.params[m.param].dim())
            dims[m.dim] = dim_mask if dims[m.dim] is None else dims[m.dim] & dim_mask
    return masks


def kept_numel(dep: DepGraph, masks: dict[str, list[torch.Tensor | None]]) -> int:
    """Parameters (not buffers) left after applying ``masks``, tied ones once."""
    total, seen = 0, set()
    for name, t in dep.params.items():
        if not isinstance(t, nn.Parameter) or id(t) in seen:
            continue
        seen.add(id(t))
        n = 1
        for d, size in enumerate(t.shape):
            mask = masks.get(name, [None] * t.dim())[d]
            n *= size if mask is None else int(mask.sum())
        total += n
    return total


@torch.no_grad()
def apply_masks(root: nn.Module, dep: DepGraph, masks: dict[str, list[torch.Tensor | None]]) -> list[str]:
    """Cut the parameters in place of ``root`` (a private copy); returns the modules touched."""
    touched = set()
    for name, dims in masks.items():
        old = dep.params[name]
        new = old.detach()
        for d, mask in enumerate(dims):
            if mask is not None and not bool(mask.all()):
                new = new.index_select(d, mask.nonzero().squeeze(1))
        touched |= _replace(root, old, new.contiguous())
    for path in sorted(touched):
        resize_module(root.get_submodule(path))
    for att in attentions(root, required=False):
        att.adapter.set_heads(att, att.heads, att.kv_heads)  # read from the cut projections
    return sorted(touched)


def _replace(root: nn.Module, old: torch.Tensor, new: torch.Tensor) -> set[str]:
    replacement = nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
    owners = set()
    for path, module in root.named_modules():
        for table in (module._parameters, module._buffers):
            for key, value in table.items():
                if value is old:
                    table[key] = replacement
                    owners.add(path)
    return owners


def resize_module(m: nn.Module) -> None:
    """Make a module's size attributes match its (cut) weights."""
    w = getattr(m, "weight", None)
    if isinstance(m, nn.Linear):
        m.out_features, m.in_features = w.shape
    elif is_conv1d(m):  # Hugging Face GPT-2: weight is (in, out)
        m.nf = w.shape[1]
        if hasattr(m, "nx"):
            m.nx = w.shape[0]
    elif isinstance(m, nn.modules.conv._ConvNd):
        if m.groups > 1 and m.groups == m.in_channels:  # depthwise: one group per input channel
            m.groups = w.shape[0] // (m.out_channels // m.groups)
            m.in_channels = m.groups
        else:
            m.in_channels = w.shape[1] * m.groups
        m.out_channels = w.shape[0]
    elif isinstance(m, nn.modules.batchnorm._BatchNorm):
        m.num_features = w.shape[0] if w is not None else m.running_mean.shape[0]
    elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and w is not None:
        m.normalized_shape = tuple(w.shape)
    elif isinstance(m, nn.Embedding):
        m.num_embeddings, m.embedding_dim = w.shape


def can_resize(m: nn.Module, size: int) -> bool:
    """False for a module of unknown type that records ``size`` as an attribute."""
    if isinstance(m, RESIZABLE) or is_conv1d(m):
        return True
    return not any(isinstance(v, int) and not isinstance(v, bool) and v == size for v in vars(m).values())


# --- the Hugging Face config -----------------------------------------------------------------
CONFIG_KEYS = {
    "hidden": ("hidden_size",),
    "mlp": ("intermediate_size", "ffn_dim", "n_inner"),
}


def update_config(root: nn.Module, sizes: dict[str, set[int]]) -> dict[str, Any]:
    """Write the new sizes to ``root.config``; ``sizes[family]`` holds each layer's new width.

    Head counts are read from the attention modules. Returns what changed, and under
    ``not_expressible`` what the config cannot say (layers of different widths, or head
    counts in a config that derives head size from ``hidden_size``): such a model runs and
    exports, but ``from_pretrained`` on a saved copy would build the old shapes.
    """
    config = getattr(root, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return {}
    changed, not_expressible = {}, []
    found = attentions(root, required=False)
    if found and any(f in sizes for f in ("heads", "kv_heads", "hidden")):
        changed, not_expressible = update_head_config(root, found)
        try:  # explicit, so the head size no longer follows hidden_size / heads
            config.head_dim = found[0].head_dim
            changed["head_dim"] = found[0].head_dim
        except AttributeError:  # a config that derives it (Falcon)
            pass
    for family, widths in sizes.items():
        keys = CONFIG_KEYS.get(family, ())
        key = next((k for k in keys if getattr(config, k, None) is not None), None) or \
            next((k for k in keys if hasattr(config, k)), None)  # GPT-2's n_inner defaults to None
        if key is None:
            continue
        if len(widths) != 1:
            not_expressible.append(f"{family}: layers differ ({sorted(widths)})")
            continue
        setattr(config, key, next(iter(widths)))
        changed[key] = next(iter(widths))
    mismatch = _rebuild_mismatch(root, config)
    if mismatch:
        not_expressible.append(mismatch)
    if not_expressible:
        changed["not_expressible"] = not_expressible
    return changed


def _rebuild_mismatch(root: nn.Module, config) -> str | None:
    """Build the model class from the new config on the meta device and compare shapes."""
    try:
        with torch.device("meta"):
            fresh = type(root)(config)
    except Exception as exc:  # noqa: BLE001 - a model that cannot be rebuilt from its config
        return f"the config no longer builds the model: {type(exc).__name__}: {exc}"
    shapes = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    for k, v in root.state_dict().items():
        if k in shapes and shapes[k] != tuple(v.shape):
            return f"from the config, {k} would be {shapes[k]}, not {tuple(v.shape)}"
    return None
