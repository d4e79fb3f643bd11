"""A Hugging Face folder of safetensors files as a model whose weights stay on disk.

``open_checkpoint(folder)`` builds the model from ``config.json`` on the meta device
(buffers such as rotary tables are real: they are small and not in the files) and returns
it with a :class:`presso.lazy.LazyWeights` that reads each tensor from its shard, memory
mapped, when a block is processed. Every shard is checked before any work starts: a
missing shard, a file cut short, or a tensor the model needs that no shard holds is an
error naming the file and the way out.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from torch import nn

from presso.errors import PressoError
from presso.lazy import LazyWeights

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class SafetensorsSource:
    """Tensor name -> shard file, every shard's header checked against its size."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files = _weight_map(folder)
        for file in sorted(set(self.files.values())):
            _check_shard(folder / file)

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self.files.get(name)
        if file is None:
            raise PressoError(f"no shard in {self.folder} holds {name!r}",
                              hint="the checkpoint is incomplete or for another architecture than config.json")
        # opened for each read: a shard kept mapped would keep every page read so far resident
        with safe_open(str(self.folder / file), framework="pt") as shard:
            return shard.get_tensor(name)


def open_checkpoint(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> tuple[nn.Module, LazyWeights]:
    """The model of ``folder`` with its weights on disk; ``dtype`` defaults to the checkpoint's."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from presso.passes.common.blocks import find_blocks

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise PressoError(f"{path} is not a Hugging Face model folder (no config.json)",
                          hint="give the folder that save_pretrained() wrote, or an nn.Module")
    source = SafetensorsSource(path)
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    dtype = dtype or getattr(config, "torch_dtype", None) or torch.float32
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or [])) or "lm_head.weight" in source.files
    with init_empty_weights(include_buffers=False):
        model = (AutoModelForCausalLM if causal else AutoModel).from_config(config, dtype=dtype)
    model.tie_weights()
    missing = [n for n, _ in model.named_parameters() if n not in source.files]
    if missing:
        raise PressoError(f"{path}: no shard holds {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}",
                          hint="the checkpoint is incomplete or for another architecture than config.json")
    return model.eval(), LazyWeights(model, source, [b for _, b in find_blocks(model)])


def _weight_map(folder: Path) -> dict[str, str]:
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise PressoError(f"{index} is not a safetensors index ({exc})",
                              hint="write the folder again with save_pretrained()") from exc
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise PressoError(f"{folder}: shard(s) named in {INDEX} are missing: {', '.join(missing)}",
                              hint="copy the missing files into the folder (or download the checkpoint again)")
        return weight_map
    if (folder / SINGLE).is_file():
        return dict.fromkeys(_header(folder / SINGLE)[0], SINGLE)
    raise PressoError(f"{folder} holds no safetensors weights ({INDEX} or {SINGLE})",
                      hint="save the model with save_pretrained(safe_serialization=True)")


def _header(file: Path) -> tuple[dict[str, dict], int]:
    """The tensors a shard declares and where its data starts, without reading the data."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise _truncated(file, size, 8)
        (length,) = struct.unpack("<Q", raw)
        if 8 + length > size:
            raise _truncated(file, size, 8 + length)
        try:
            header = json.loads(f.read(length))
        except ValueError as exc:
            raise PressoError(f"{file} is not a safetensors file (unreadable header)",
                              hint="the file is corrupt: copy it again") from exc
    header.pop("__metadata__", None)
    return header, 8 + length


def _check_shard(file: Path) -> None:
    header, start = _header(file)
    end = start + max((t["data_offsets"][1] for t in header.values()), default=0)
    if end > file.stat().st_size:
        raise _truncated(file, file.stat().st_size, end)


def _truncated(file: Path, size: int, need: int) -> PressoError:
    return PressoError(f"{file} is cut short: {size} bytes, its header needs {need}",
                       hint="the file is incomplete (an interrupted copy or download): copy it again")
