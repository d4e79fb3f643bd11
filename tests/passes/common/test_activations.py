"""Calibration inputs past the memory budget go to disk and come back one call at a time."""
from __future__ import annotations

import glob
import tempfile
from collections import namedtuple

import pytest
import torch

import presso
from presso.passes.common import activations
from tests.models import fast_only, small_llama

IDS = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
CALIBRATION = [torch.randint(3, 1000, (2, 32), generator=torch.Generator().manual_seed(i)) for i in range(3)]


def _logits(steps, **options):
    passes = [presso.make_pass(name, **opts) for name, opts in steps]
    compiled = presso.compile(small_llama(), passes, example_inputs=IDS, calibration=CALIBRATION, **options)
    return compiled(IDS).logits


@pytest.fixture(autouse=True)
def own_temp_dir(tmp_path, monkeypatch):
    """Temporary folders of this test only (tests in other workers make theirs meanwhile)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def _leftovers():
    return glob.glob(f"{tempfile.gettempdir()}/presso-activations-*")


@pytest.mark.parametrize("steps", fast_only([
    [("quantize_weights", {"method": "gptq"})],
    [("quantize_weights", {"method": "awq"})],
    [("split_low_rank", {"ratio": 0.3, "method": "whiten"})],
], lambda steps: steps[0][0] == "quantize_weights"))
def test_inputs_on_disk_give_the_same_model(steps, monkeypatch):
    before = set(_leftovers())
    in_memory = _logits(steps)
    written = []
    save = activations.torch.save
    monkeypatch.setattr(activations.torch, "save", lambda obj, f: (written.append(f), save(obj, f))[1])
    monkeypatch.setenv("PRESSO_ACTIVATION_BUDGET", "1")  # every call past the budget
    on_disk = _logits(steps)
    assert written  # the calls did go to disk
    assert torch.equal(on_disk, in_memory)
    assert set(_leftovers()) == before  # the temporary folder is removed


def test_a_resumed_run_reads_its_inputs_from_the_resume_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PRESSO_ACTIVATION_BUDGET", "1")
    steps = [("quantize_weights", {"method": "gptq", "refit": 0})]
    first = _logits(steps, resume=tmp_path)
    assert list(tmp_path.glob("*/activations/gen-*/call-*.pt"))
    assert torch.equal(_logits(steps, resume=tmp_path), first)


def test_no_room_on_disk_is_a_clear_error_and_leaves_nothing(monkeypatch):
    before = set(_leftovers())
    monkeypatch.setenv("PRESSO_ACTIVATION_BUDGET", "1")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(activations.shutil, "disk_usage", lambda _p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(presso.PressoError, match="cannot keep the calibration inputs of a block on disk") as info:
        _logits([("quantize_weights", {"method": "gptq"})])
    assert "resume=" in info.value.hint and "MB free" in str(info.value)
    assert set(_leftovers()) == before


@pytest.mark.parametrize("text,expected", [("2GB", 2 * 10**9), ("512", 512), ("1.5MB", 1_500_000)])
def test_the_budget_reads_sizes(text, expected, monkeypatch):
    monkeypatch.setenv("PRESSO_ACTIVATION_BUDGET", text)
    assert activations.activation_budget(torch.device("cpu")) == expected


def test_a_budget_that_is_no_size_is_named(monkeypatch):
    monkeypatch.setenv("PRESSO_ACTIVATION_BUDGET", "lots")
    with pytest.raises(presso.PressoError, match="PRESSO_ACTIVATION_BUDGET='lots'"):
        activations.activation_budget(torch.device("cpu"))
