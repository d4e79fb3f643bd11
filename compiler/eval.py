"""Perplexity by the shared protocol, and calibration batches.

Protocol: WikiText-2 test text as shipped, tokenized without special tokens; the first
``windows`` non-overlapping windows of ``seq_len`` tokens; mean next-token NLL over all
predicted positions; ppl = exp(mean). Calibration draws from the validation split only.
"""
from __future__ import annotations

import math
from functools import lru_cache
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from presso.errors import PressoError


@lru_cache(maxsize=2)
def wikitext2(split: str = "test") -> str:
    """The shipped WikiText-2 ``test`` or ``valid`` split (CC BY-SA 3.0, see data/ATTRIBUTION.md)."""
    if split not in ("test", "valid"):
        raise PressoError(f"unknown WikiText-2 split {split!r}", hint="use 'test' or 'valid'")
    return resources.files("presso").joinpath(f"data/wikitext-2/{split}.txt").read_text(encoding="utf-8")


def token_ids(tokenizer: Any, text: str, n_tokens: int) -> torch.Tensor:
    """The first ``n_tokens`` tokens of ``text``, tokenizing only a generous prefix."""
    chars = max(4096, n_tokens * 8)
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False, return_tensors="pt").input_ids[0]
        if len(ids) > n_tokens + 64 or chars >= len(text):
            return ids[:n_tokens]  # the margin keeps the cut away from a token boundary artefact
        chars *= 2


def logits_of(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """Logits from an eager HF model, a CompiledModel or an ONNX Runtime model alike."""
    with torch.no_grad():
        out = model(ids, use_cache=False) if isinstance(model, nn.Module) else model(ids)
    return out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)


def perplexity(model: Any, tokenizer: Any, text: str | None = None, seq_len: int = 256, windows: int = 64,
               batch_size: int = 4, progress: bool = True) -> float:
    """exp(mean next-token NLL) over ``windows`` windows of ``seq_len`` tokens of ``text``."""
    from tqdm.auto import tqdm

    ids = token_ids(tokenizer, wikitext2("test") if text is None else text, seq_len * windows)
    n = len(ids) // seq_len
    if n == 0:
        raise PressoError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}",
                          hint="give a longer text or a smaller seq_len")
    batches = ids[: n * seq_len].view(n, seq_len).split(batch_size)
    total, count = 0.0, 0
    for batch in tqdm(batches, desc="perplexity", leave=False, disable=not progress):
        logits = logits_of(model, batch).float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                              reduction="sum")
        total += nll.item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def calibration_batches(tokenizer: Any, n: int = 16, seq_len: int = 128, batch_size: int = 1) -> list[torch.Tensor]:
    """``n`` windows of ``seq_len`` token ids from the validation split, in batches."""
    ids = token_ids(tokenizer, wikitext2("valid"), n * seq_len)
    windows = ids[: (len(ids) // seq_len) * seq_len].view(-1, seq_len)[:n]
    return list(windows.split(batch_size))
