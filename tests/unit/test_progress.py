"""A block-by-block pass that stops starts again after its last finished block."""
from __future__ import annotations

import pytest
import torch

import presso
import presso.passes.quantization.quantize_weights as qw
from presso.errors import PassError
from tests.models import small_llama

IDS = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
CALIBRATION = [torch.randint(3, 1000, (2, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]
PER_BLOCK = 7  # linears GPTQ rounds in one Llama block (refit=0: one rounding each)


def _gptq():
    return presso.make_pass("quantize_weights", method="gptq", refit=0)


def _compile(model, resume=None):
    return presso.compile(model, [_gptq()], example_inputs=IDS, calibration=CALIBRATION, resume=resume)


def test_a_stopped_run_resumes_after_its_last_finished_block(tmp_path, monkeypatch):
    model = small_llama()
    uninterrupted = _compile(model)(IDS).logits
    calls = []
    real = qw.gptq_quantize

    def dies_in_block_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 * PER_BLOCK + 1:  # the first linear of block 2
            raise MemoryError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(qw, "gptq_quantize", dies_in_block_2)
    with pytest.raises(PassError, match="killed"):
        _compile(model, resume=tmp_path)
    saved = sorted(p.name for p in tmp_path.glob("*/block-*.pt"))
    assert saved == ["block-0000.pt", "block-0001.pt"]
    assert not list(tmp_path.glob("*/*.partial"))  # nothing half-written is left for finished

    calls.clear()
    monkeypatch.setattr(qw, "gptq_quantize", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    resumed = _compile(model, resume=tmp_path)(IDS).logits
    assert len(calls) == 2 * PER_BLOCK + 1  # blocks 2 and 3, then lm_head: blocks 0 and 1 not redone
    assert torch.equal(resumed, uninterrupted)


def test_other_options_do_not_resume_old_blocks(tmp_path, monkeypatch):
    model = small_llama()
    _compile(model, resume=tmp_path)
    calls = []
    real = qw.gptq_quantize
    monkeypatch.setattr(qw, "gptq_quantize", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    p = presso.make_pass("quantize_weights", method="gptq", refit=0, group_size=64)
    presso.compile(model, [p], example_inputs=IDS, calibration=CALIBRATION, resume=tmp_path)
    assert len(calls) == 4 * PER_BLOCK + 1  # every block again
    assert len(list(tmp_path.iterdir())) == 1  # the stale pass folder was replaced


def test_a_run_resumed_after_its_last_block_only_rounds_the_head(tmp_path, monkeypatch):
    model = small_llama()
    first = _compile(model, resume=tmp_path)(IDS).logits
    calls = []
    real = qw.gptq_quantize
    monkeypatch.setattr(qw, "gptq_quantize", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    again = _compile(model, resume=tmp_path)(IDS).logits
    assert len(calls) == 1  # lm_head, fed the saved outputs of the last block
    assert torch.equal(again, first)


KILLED_RUN = """
import os, signal, sys
import torch
sys.path.insert(0, {root!r})
import presso
import presso.passes.quantization.quantize_weights as qw
from presso.progress import PassProgress
from tests.models import small_llama
from tests.unit.test_progress import CALIBRATION, IDS, _compile

kill_at = os.environ.get("KILL_AT")  # "block:K" after block K is saved, "between:K" inside its save
save, atomic = PassProgress.save, __import__("presso.progress", fromlist=["atomic_save"]).atomic_save

def dying_save(self, index, block, calls):
    if kill_at == f"between:{{index}}":  # the block is written, its successor's inputs are not
        atomic(block, self.folder / f"block-{{index:04d}}.pt")
        os.kill(os.getpid(), signal.SIGKILL)
    save(self, index, block, calls)
    if kill_at == f"block:{{index}}":
        os.kill(os.getpid(), signal.SIGKILL)

PassProgress.save = dying_save
rounded = []
real = qw.gptq_quantize
qw.gptq_quantize = lambda *a, **k: (rounded.append(1), real(*a, **k))[1]
logits = _compile(small_llama(), resume=sys.argv[1])(IDS).logits
torch.save({{"logits": logits, "rounded": len(rounded)}}, sys.argv[2])
"""


@pytest.mark.slow  # two fresh Python processes per case
@pytest.mark.integration
@pytest.mark.parametrize("kill_at,redone", [("block:1", 2), ("between:2", 2)])
def test_a_killed_process_restarts_after_its_last_finished_block(tmp_path, kill_at, redone):
    """The process is killed (SIGKILL, no clean-up) after block 1 is saved, or between writing
    block 2 and the inputs of block 3; started again, it redoes only what was not finished."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN.format(root=str(root)))
    progress, out = tmp_path / "progress", tmp_path / "out.pt"
    env = {**os.environ, "KILL_AT": kill_at}
    killed = subprocess.run([sys.executable, str(script), str(progress), str(out)], env=env, cwd=root,
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not out.exists() and not list(progress.glob("*/*.partial"))
    env.pop("KILL_AT")
    resumed = subprocess.run([sys.executable, str(script), str(progress), str(out)], env=env, cwd=root,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    result = torch.load(out)
    assert result["rounded"] == redone * PER_BLOCK + 1  # the blocks not finished, then lm_head
    assert torch.equal(result["logits"], _compile(small_llama())(IDS).logits)
