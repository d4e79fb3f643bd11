"""Calibration shared by two gloo processes against one process: the same model, failures
reported by the failing rank, a stopped run resumed."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from models import build

import presso

METHODS = {"rtn": ("quantize_weights", dict(bits=4, group_size=16)),
           "gptq": ("quantize_weights", dict(bits=4, group_size=16, method="gptq")),
           "awq": ("quantize_weights", dict(bits=4, group_size=16, method="awq")),
           "whiten": ("split_low_rank", dict(ratio=0.3, method="whiten", targets=("*mlp*",)))}


def _setup():
    model, example = build("llama")
    torch.manual_seed(1)
    calibration = [torch.randint(3, 96, (2, 12)) for _ in range(4)]  # two batches a rank
    return model, example, calibration


def _compile(method: str, resume=None):
    """On one thread, as each worker runs: a sum over another thread count rounds differently."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _compile_here(method, resume)
    finally:
        torch.set_num_threads(threads)


def _compile_here(method: str, resume=None):
    model, example, calibration = _setup()
    name, options = METHODS[method]
    p = presso.make_pass(name, **options)
    return presso.compile(model, [p], example_inputs=example, calibration=calibration if method != "rtn" else None,
                          device="cpu", resume=resume), example


def _worker(rank: int, world: int, init: str, out: str, methods: list[str], fail_on: str, fail_at: int,
            resume: str | None):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        if fail_on and rank == 1:  # this rank's rounding of an up_proj breaks (the fail_at-th it owns)
            from presso.passes.quantization import quantize_weights as qw

            real, seen = qw._round, []

            def broken(weight, h, fmt, cfg):
                if weight.shape == (64, 32):  # gate and up; rank 1 owns up_proj (the 6th linear)
                    seen.append(1)
                    if len(seen) == fail_at:
                        raise RuntimeError(fail_on)
                return real(weight, h, fmt, cfg)

            qw._round = broken
        for method in methods:  # one start of the processes for every method
            try:
                compiled, example = _compile_here(method, resume)
            except Exception as exc:  # noqa: BLE001 - the parent reads what each rank saw
                torch.save({"error": f"{type(exc).__name__}: {exc}"}, f"{out}/{method}-rank{rank}.pt")
                continue
            torch.save({"logits": compiled(example).logits, "state": compiled.module.state_dict(),
                        "report": compiled.report["passes"]}, f"{out}/{method}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run_two(tmp_path, methods, fail_on="", fail_at=1, resume=None) -> dict[str, list[dict]]:
    """Per method: what rank 0 and rank 1 saved."""
    init = tmp_path / f"init-{os.urandom(4).hex()}"
    mp.start_processes(_worker, args=(2, str(init), str(tmp_path), list(methods), fail_on, fail_at, resume),
                       nprocs=2, start_method="spawn")
    return {m: [torch.load(tmp_path / f"{m}-rank{r}.pt", weights_only=False) for r in range(2)] for m in methods}


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.slow  # a single and a two-process calibration; make test keeps the failing-rank case
def test_two_processes_give_the_single_process_model(tmp_path):
    """The same model as one process on the same thread count: the statistics' sums are exact
    here (float64 sums of few rows), so even GPTQ, AWQ and whitening come out identical."""
    runs = _run_two(tmp_path, METHODS)
    for method, ranks in runs.items():
        one, example = _compile(method)
        for got in ranks:
            assert "error" not in got, (method, got)
            assert torch.isfinite(got["logits"]).all()
        for name, t in ranks[0]["state"].items():  # every rank holds the same compressed model
            assert torch.equal(t, ranks[1]["state"][name]), (method, name)
        assert torch.equal(ranks[0]["logits"], one(example).logits), method
        if method in ("gptq", "awq"):
            codes = [n for n in ranks[0]["state"] if n.endswith("packed")]
            assert codes and all(torch.equal(ranks[0]["state"][n], one.module.state_dict()[n]) for n in codes)
            stats = ranks[0]["report"][0]["stats"]
            assert stats["processes"] == 2 and stats["calibration_batches"] == 4


def test_a_failing_rank_stops_both_with_its_error(tmp_path):
    (ranks,) = _run_two(tmp_path, ["gptq"], fail_on="rounding broke on purpose").values()
    assert "RuntimeError: rounding broke on purpose" in ranks[1]["error"]
    assert "rank 1 of 2 failed during rounding" in ranks[0]["error"]
    assert "rounding broke on purpose" in ranks[0]["error"]


@pytest.mark.slow  # three runs of two processes; resuming one process is in tests/unit/test_progress.py
def test_a_failed_run_resumes_after_its_last_finished_block(tmp_path):
    """Rank 1 fails in the second block; the rerun keeps the first block and redoes the second."""
    resume, first = tmp_path / "resume", tmp_path / "first"
    first.mkdir()
    (failed,) = _run_two(first, ["gptq"], fail_on="stopped", fail_at=2, resume=str(resume)).values()
    assert "rank 1 of 2 failed" in failed[0]["error"]
    (block0,) = resume.rglob("block-0000.pt")
    assert not list(resume.rglob("block-0001.pt"))
    assert len(list(resume.rglob("inputs-0001-rank*-of2.pt"))) == 2  # each rank's share of block 1's inputs
    saved_at = block0.stat().st_mtime_ns
    (ranks,) = _run_two(tmp_path, ["gptq"], resume=str(resume)).values()
    assert block0.stat().st_mtime_ns == saved_at  # block 0 came back from disk, not redone
    assert list(resume.rglob("block-0001.pt"))
    one, example = _compile("gptq")
    assert rel(ranks[0]["logits"], one(example).logits) < 1e-4
