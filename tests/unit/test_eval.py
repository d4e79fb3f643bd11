import math

import pytest
import torch

from presso import PressoError
from presso import eval as ev


class CharTokenizer:
    """One token per character: enough to test the windowing arithmetic."""

    vocab_size = 256

    def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
        class Out:
            input_ids = torch.tensor([[min(ord(c), 255) for c in text]])
        return Out()


class Uniform(torch.nn.Module):
    def forward(self, ids, use_cache=False):
        return torch.zeros(*ids.shape, 256)


def test_uniform_model_has_vocab_perplexity():
    ppl = ev.perplexity(Uniform(), CharTokenizer(), text="abcdefgh" * 100, seq_len=16, windows=4, progress=False)
    assert math.isclose(ppl, 256, rel_tol=1e-5)


def test_text_shorter_than_a_window():
    with pytest.raises(PressoError, match="fewer than one window"):
        ev.perplexity(Uniform(), CharTokenizer(), text="short", seq_len=16, windows=4, progress=False)


def test_shipped_splits_and_calibration_from_valid():
    assert ev.wikitext2("test").lstrip().startswith("= Robert")
    valid = ev.wikitext2("valid")
    batches = ev.calibration_batches(CharTokenizer(), n=3, seq_len=32)
    assert [b.shape for b in batches] == [(1, 32)] * 3
    assert "".join(chr(c) for c in batches[0][0].tolist()) == valid[:32]
    with pytest.raises(PressoError, match="unknown WikiText-2 split"):
        ev.wikitext2("train")
