"""The block runner: blocks walked one at a time, and the head calibrated on the walk's outputs."""
from __future__ import annotations

import torch

import presso
from presso.passes.quantization import quantize_weights as qw
from tests.models import small_llama

IDS = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
CALIBRATION = [torch.randint(3, 1000, (2, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]


def test_the_head_calibrates_on_the_walks_last_outputs_as_on_a_run_of_the_whole_model(monkeypatch):
    """GPTQ of lm_head (outside the blocks) reads the last block's outputs that the walk left,
    instead of running the model again: the same statistics, so the same weights."""
    model = small_llama()
    assert not model.config.tie_word_embeddings  # lm_head is a linear of its own, after the blocks
    gptq = presso.make_pass("quantize_weights", method="gptq")
    replayed = presso.compile(model, [gptq], example_inputs=IDS, calibration=CALIBRATION, device="cpu")
    walk = qw.walk_blocks
    monkeypatch.setattr(qw, "walk_blocks", lambda graph, batches, finals=None: walk(graph, batches))
    rerun = presso.compile(model, [gptq], example_inputs=IDS, calibration=CALIBRATION, device="cpu")
    assert type(replayed.graph.module.lm_head).__name__ == "WeightOnlyLinear"
    torch.testing.assert_close(replayed(IDS).logits, rerun(IDS).logits, rtol=1e-5, atol=1e-5)
    assert "forward" not in vars(replayed.graph.module.model.layers[-1])  # the blocks run again
