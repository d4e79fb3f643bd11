"""The block runner: blocks walked one at a time, and the head calibrated on the walk's outputs."""
from __future__ import annotations

import contextlib

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


def test_rows_rounded_in_slices_give_the_same_weight(monkeypatch):
    """GPTQ and the scale refit are per row given the Hessian: a tall head rounded a slice of
    rows at a time (to bound memory) gets exactly the codes and scales of one pass."""
    from presso.runtime.quant import WeightFormat

    gen = torch.Generator().manual_seed(0)
    weight, x = torch.randn(300, 64, generator=gen), torch.randn(512, 64, generator=gen)
    h = x.t() @ x / 512
    cfg = presso.make_pass("quantize_weights", method="gptq", group_size=32).config
    fmt = WeightFormat(4, 32, True, 16)
    whole = qw.in_row_chunks(lambda w: qw._round(w, h, fmt, cfg), weight)
    monkeypatch.setattr(qw, "ROW_CHUNK_BYTES", 64 * 4 * 70)  # slices of 70 rows, the last of 20
    sliced = qw.in_row_chunks(lambda w: qw._round(w, h, fmt, cfg), weight)
    assert torch.equal(whole.codes, sliced.codes) and torch.equal(whole.scales, sliced.scales)


def test_the_heads_calibration_run_stops_before_the_logits(monkeypatch):
    """Only lm_head's input is needed: the run ends in its pre-hook, so the logits (128k a token
    for a Llama-3 vocabulary) are never computed during calibration."""
    from presso.passes.common import blocks

    model = small_llama()
    stopped = []
    replay = blocks.blocks_replayed

    def watching(graph, paths, finals, device, stop_after=()):
        heads = list(stop_after)
        head_calls = []
        with replay(graph, paths, finals, device, stop_after=heads) as run:
            handles = [m.register_forward_hook(lambda *_: head_calls.append(1)) for m in heads]
            yield run
            for handle in handles:
                handle.remove()
        stopped.append((len(heads), len(head_calls)))

    monkeypatch.setattr(qw, "blocks_replayed", contextlib.contextmanager(watching))
    presso.compile(model, [presso.make_pass("quantize_weights", method="gptq")], example_inputs=IDS,
                   calibration=CALIBRATION, device="cpu")
    assert stopped == [(1, 0)]  # lm_head watched, its forward never completed


def test_a_walk_stopped_early_sends_the_block_home():
    """A pass that breaks out of the walk (every unit it wanted is done) leaves no block on the
    compute device: the block goes back to where the model lives when the walk is closed."""
    from presso.passes.common.blocks import walk_blocks
    from presso.signature import Inputs

    graph = presso.compile(small_llama(), [], example_inputs=IDS).graph
    moves = []
    for step in walk_blocks(graph, [Inputs((ids,), {}) for ids in CALIBRATION]):
        real = step.block.to
        step.block.to = lambda device, real=real: (moves.append(torch.device(device)), real(device))[1]
        break
    assert moves == [torch.device("cpu")]
