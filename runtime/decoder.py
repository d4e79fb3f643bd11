"""Causal LMs with a KV cache: the export wrapper, and greedy decoding in ONNX Runtime.

The exported graph takes ``input_ids``, ``attention_mask`` (past + new positions),
``position_ids`` and ``past_key_{i}`` / ``past_value_{i}`` of shape
``[batch, kv_heads, past_len, head_dim]`` (``past_len`` may be 0), and returns ``logits``
and the ``present_*`` caches. Grouped-query models keep their smaller cache.
"""
from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from presso.errors import ExportError


@dataclass
class CacheLayout:
    num_layers: int
    kv_heads: int
    head_dim: int
    position_ids: bool

    @property
    def past_names(self) -> list[str]:
        return [f"past_{kind}_{i}" for i in range(self.num_layers) for kind in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [f"present_{kind}_{i}" for i in range(self.num_layers) for kind in ("key", "value")]

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", "attention_mask"] + (["position_ids"] if self.position_ids else []) + self.past_names

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face decoder-only model that can generate."""
    config = getattr(model, "config", None)
    can_generate = getattr(model, "can_generate", lambda: False)()
    return bool(can_generate) and not getattr(config, "is_encoder_decoder", False)


@torch.no_grad()
def cache_layout(model: nn.Module) -> CacheLayout:
    """Read the cache geometry from one real forward with ``use_cache=True``."""
    out = model(torch.zeros(1, 2, dtype=torch.long), use_cache=True, return_dict=True)
    layers = out.past_key_values.layers
    _, kv_heads, _, head_dim = layers[0].keys.shape
    uses_positions = "position_ids" in inspect.signature(model.forward).parameters
    return CacheLayout(len(layers), kv_heads, head_dim, uses_positions)


class DecoderWithCache(nn.Module):
    """``forward(input_ids, attention_mask, [position_ids], *past) -> (logits, *present)``."""

    def __init__(self, model: nn.Module, layout: CacheLayout):
        super().__init__()
        self.model = model
        self.layout = layout

    def forward(self, input_ids, attention_mask, *rest):
        from transformers import DynamicCache

        kwargs = {}
        if self.layout.position_ids:
            kwargs["position_ids"], rest = rest[0], rest[1:]
        cache = DynamicCache(config=self.model.config)
        for i in range(self.layout.num_layers):
            cache.update(rest[2 * i], rest[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                         use_cache=True, return_dict=True, **kwargs)
        presents = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *presents)


def example_step(layout: CacheLayout, batch: int = 2, new: int = 3, past: int = 4) -> tuple[torch.Tensor, ...]:
    """Inputs for tracing: sizes above 1 so that every dimension stays dynamic."""
    ids = torch.randint(3, 50, (batch, new))
    mask = torch.ones(batch, past + new, dtype=torch.long)
    positions = torch.arange(past, past + new).expand(batch, new).contiguous()
    caches = [torch.randn(batch, layout.kv_heads, past, layout.head_dim) for _ in layout.past_names]
    return (ids, mask) + ((positions,) if layout.position_ids else ()) + tuple(caches)


def trace_decoder(model: nn.Module, fused: bool = True) -> tuple[torch.export.ExportedProgram, CacheLayout, dict]:
    """The KV-cache decoder traced: the fused forward where it covers the model. The dict says
    what was fused (``packed`` matmul groups) or why not (``not_fused``)."""
    from presso.graph import _quiet_export_logs
    from presso.runtime.fused.llama import FusedDecoder, why_not

    reason = why_not(model) if fused else "fusion turned off (fuse=False)"
    if reason is None:
        wrapper = FusedDecoder(model).eval()
        layout, details = wrapper.layout(), {"packed": wrapper.packed()}
    else:
        layout, details = cache_layout(model), {"not_fused": reason}
        wrapper = DecoderWithCache(model, layout)
    args = example_step(layout)
    auto = torch.export.Dim.AUTO
    dims = [{0: auto, 1: auto} if a.dim() == 2 else {0: auto, 2: auto} for a in args]
    shapes = (dims[0], dims[1], tuple(dims[2:]))  # forward(input_ids, attention_mask, *rest)
    try:
        with _quiet_export_logs():
            program = torch.export.export(wrapper, args, dynamic_shapes=shapes, strict=False)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"could not trace {type(model).__name__} with a KV cache: {type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
                          hint="export without the cache: presso.compile(..., backend='onnxruntime')") from exc
    return program, layout, details


class OrtDecoder:
    """An exported causal LM with a KV cache: ``model(ids).logits`` and greedy ``generate``."""

    def __init__(self, session: Any, layout: CacheLayout, manifest: dict[str, Any], path: Path):
        self.session = session
        self.layout = layout
        self.manifest = manifest
        self.path = path

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.layout.kv_heads, 0, self.layout.head_dim)
        return [np.zeros(shape, np.float32) for _ in self.layout.past_names]

    def feed(self, ids: np.ndarray, past: list[np.ndarray]) -> dict[str, np.ndarray]:
        """The session inputs for new tokens ``ids`` [batch, new] after the cache ``past``."""
        batch, new = ids.shape
        past_len = past[0].shape[2]
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((batch, past_len + new), np.int64)}
        if self.layout.position_ids:
            feed["position_ids"] = np.broadcast_to(np.arange(past_len, past_len + new), (batch, new)).copy()
        feed.update(zip(self.layout.past_names, past))
        return feed

    def step(self, ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run new tokens ``ids`` [batch, new] after ``past``; returns logits and the grown cache."""
        logits, *present = self.session.run(None, self.feed(ids, past))
        return logits, present

    def __call__(self, input_ids: torch.Tensor, **unused: Any) -> Any:
        from transformers.modeling_outputs import CausalLMOutput

        ids = input_ids.detach().cpu().numpy()
        logits, _ = self.step(ids, self.empty_cache(ids.shape[0]))
        return CausalLMOutput(logits=torch.from_numpy(logits))

    @property
    def shares_cache(self) -> bool:
        """A fused decoder's attention kernel appends to the cache in place (one buffer per layer
        for past and present), where the exporter's graph returns a grown copy each step."""
        return "GroupQueryAttention" in self.manifest.get("fusions", {}).get("operators", {})

    def start(self, batch: int, capacity: int) -> Any:
        """A decoding run: ``run.step(ids) -> logits``, the cache kept between steps (in place
        when :attr:`shares_cache`, for up to ``capacity`` positions)."""
        return SharedCacheRun(self, batch, capacity) if self.shares_cache else CopiedCacheRun(self, batch)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32,
                 eos_token_id: int | None = None) -> torch.Tensor:
        """Greedy decoding: the prompt once, then one token per step against the cache."""
        ids = input_ids.detach().cpu().numpy().astype(np.int64)
        run = self.start(ids.shape[0], ids.shape[1] + max_new_tokens)
        logits = run.step(ids)
        out = [ids]
        for i in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1)[:, None]
            out.append(nxt)
            if i == max_new_tokens - 1 or (eos_token_id is not None and (nxt == eos_token_id).all()):
                break
            logits = run.step(nxt)
        return torch.from_numpy(np.concatenate(out, axis=1))


class CopiedCacheRun:
    """Each step feeds the cache and takes back the grown one."""

    def __init__(self, decoder: OrtDecoder, batch: int):
        self.decoder, self.past = decoder, decoder.empty_cache(batch)

    def step(self, ids: np.ndarray) -> np.ndarray:
        logits, self.past = self.decoder.step(ids, self.past)
        return logits


class SharedCacheRun:
    """One buffer per cache tensor, bound as both past input and present output:
    ``GroupQueryAttention`` writes the new keys and values into it, so no step copies the cache
    (the attention mask says how much of it is filled)."""

    def __init__(self, decoder: OrtDecoder, batch: int, capacity: int):
        import onnxruntime as ort

        layout, self.session = decoder.layout, decoder.session
        self.binding, self.length, self.batch = self.session.io_binding(), 0, batch
        shape = (batch, layout.kv_heads, capacity, layout.head_dim)
        self.binding.bind_output("logits")  # bound first: get_outputs()[0]
        for past, present in zip(layout.past_names, layout.present_names):
            buffer = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32))
            self.binding.bind_ortvalue_input(past, buffer)
            self.binding.bind_ortvalue_output(present, buffer)
        self.capacity = capacity

    def step(self, ids: np.ndarray) -> np.ndarray:
        new = ids.shape[1]
        if self.length + new > self.capacity:
            raise ExportError(f"the cache holds {self.capacity} positions; {self.length + new} asked",
                              hint="start the run with a larger capacity")
        self.binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        self.binding.bind_cpu_input("attention_mask", np.ones((self.batch, self.length + new), np.int64))
        self.binding.bind_output("logits")  # unallocated again: its shape changes from step to step
        self.session.run_with_iobinding(self.binding)
        self.length += new
        return self.binding.get_outputs()[0].numpy()
