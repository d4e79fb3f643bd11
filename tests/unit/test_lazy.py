"""Weights read as they are needed: from the caller's model or from safetensors shards on disk."""
from __future__ import annotations

import json
import weakref

import pytest
import torch

import presso
from presso import lazy
from presso.checkpoint import open_checkpoint
from presso.errors import PressoError
from tests.models import fast_only, small_llama

IDS = torch.randint(3, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
CALIBRATION = [torch.randint(3, 1000, (2, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A 4-layer bf16 Llama written as five shards, and the same model loaded back whole."""
    import transformers

    path = tmp_path_factory.mktemp("llama-shards")
    small_llama().to(torch.bfloat16).save_pretrained(path, max_shard_size="2MB")
    whole = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    return path, whole


def _logits(compiled):
    return compiled(IDS).logits


@pytest.mark.parametrize("method", fast_only(["rtn", "gptq"], ("rtn",)))
def test_a_folder_compiles_exactly_like_the_loaded_model(folder, method):
    path, whole = folder
    p = presso.make_pass("quantize_weights", method=method)
    from_disk = presso.compile(path, [p], example_inputs=IDS, calibration=CALIBRATION)
    from_module = presso.compile(whole, [p], example_inputs=IDS, calibration=CALIBRATION)
    assert torch.equal(_logits(from_disk), _logits(from_module))
    assert _logits(from_disk).dtype == torch.bfloat16


def test_at_most_one_float_block_is_in_memory(folder, monkeypatch):
    """While quantize_weights runs from disk, the float weights held are those outside the
    blocks plus at most one block's (and the norms of the blocks done): never the whole model."""
    path, whole = folder
    block = sum(p.numel() * p.element_size() for p in whole.model.layers[0].parameters())
    norms = sum(p.numel() * p.element_size() for n, p in whole.named_parameters() if "norm" in n)
    outside = sum(p.numel() * p.element_size() for n, p in whole.named_parameters() if ".layers." not in n)
    held = []
    install = lazy.LazyWeights._install
    # every parameter made from here on (loads, copies and .to() all construct one), weakly: a pass
    # that keeps replaced modules alive would keep their weights in this set too; scanning
    # the garbage collector's objects instead costs seconds a block in a test process that has run many tests
    created = weakref.WeakSet()
    make = torch.nn.Parameter.__new__

    def tracked(cls, data=None, requires_grad=True):
        param = make(cls, data, requires_grad)
        created.add(param)
        return param

    def watched(self, entry):
        real = install(self, entry)
        if entry.name.endswith(("down_proj.weight", "lm_head.weight")):  # a block's last read, the head
            new = [p for p in created if p.is_floating_point() and not p.is_meta]
            held.append(sum(p.numel() * p.element_size() for p in new))
        return real

    monkeypatch.setattr(torch.nn.Parameter, "__new__", tracked)
    monkeypatch.setattr(lazy.LazyWeights, "_install", watched)
    presso.compile(path, [presso.make_pass("quantize_weights", method="gptq")], example_inputs=IDS,
                   calibration=CALIBRATION)
    total = sum(p.numel() * p.element_size() for p in whole.parameters())
    assert held and max(held) <= outside + block + norms < total


def test_the_callers_model_is_read_block_by_block_not_copied_whole():
    model = small_llama()
    work, weights = lazy.lazy_copy(model)
    assert all(p.is_meta for p in work.parameters())
    assert work.lm_head.weight is work.model.embed_tokens.weight or not model.config.tie_word_embeddings
    weights.load(work.model.layers[0])
    assert not any(p.is_meta for p in work.model.layers[0].parameters())
    assert all(p.is_meta for p in work.model.layers[1].parameters())
    loaded = work.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(loaded, model.model.layers[0].self_attn.q_proj.weight)
    assert loaded.data_ptr() != model.model.layers[0].self_attn.q_proj.weight.data_ptr()  # a copy


def test_a_pass_that_reads_every_weight_is_refused_when_they_do_not_fit(folder, monkeypatch):
    path, _ = folder
    monkeypatch.setattr(lazy, "available_memory", lambda: 1000)
    with pytest.raises(PressoError, match="prune_structured.* needs every weight in memory") as err:
        presso.compile(path, [presso.make_pass("prune_structured", ratio=0.2)], example_inputs=IDS,
                       calibration=CALIBRATION)
    assert "block by block" in err.value.hint


def _copy(folder, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def test_a_missing_shard_is_named_before_any_work(folder, tmp_path):
    path = _copy(folder[0], tmp_path)
    shard = sorted(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())[-1]
    (path / shard).unlink()
    with pytest.raises(PressoError, match=f"missing: {shard}"):
        open_checkpoint(path)


def test_a_truncated_shard_is_named_before_any_work(folder, tmp_path):
    path = _copy(folder[0], tmp_path)
    shard = sorted(path.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(PressoError, match="cut short") as err:
        presso.compile(path, ["quantize_weights"], example_inputs=IDS)
    assert "copy it again" in err.value.hint


def test_a_folder_without_weights_or_config_is_refused(tmp_path):
    with pytest.raises(PressoError, match="no config.json"):
        open_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(PressoError, match="no safetensors weights"):
        open_checkpoint(tmp_path)
