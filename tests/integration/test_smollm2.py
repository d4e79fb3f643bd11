"""The embedded SmolLM2 end to end, on short slices of the perplexity protocol."""
import numpy as np
import pytest
import torch

import presso
from presso import eval as ev
from presso.testing import assert_unchanged, snapshot

pytestmark = pytest.mark.integration
WINDOWS = 4  # of 256 tokens: a short slice of the protocol's 64


@pytest.fixture(scope="module")
def exported(smollm2, tmp_path_factory):
    model, tokenizer = smollm2
    before = snapshot(model)
    compiled = presso.compile(model, [], example_inputs=torch.randint(3, 1000, (1, 16)))
    path = compiled.export(tmp_path_factory.mktemp("smollm2"), tokenizer=tokenizer)
    assert_unchanged(model, before)
    return compiled, presso.runtime.load(path)


@pytest.mark.slow  # a float export of the whole model (over a minute); make test's real model is the CLI test
def test_fp32_perplexity_agrees_across_eager_compiled_and_ort(smollm2, exported):
    model, tokenizer = smollm2
    compiled, runtime_model = exported
    eager = ev.perplexity(model, tokenizer, windows=WINDOWS, progress=False)
    assert 20 < eager < 60  # SmolLM2-135M on WikiText-2
    for other in (compiled, runtime_model):
        assert abs(ev.perplexity(other, tokenizer, windows=WINDOWS, progress=False) / eager - 1) < 0.005


def test_greedy_decoding_matches_hf_generate(smollm2, exported):
    model, tokenizer = smollm2
    _, runtime_model = exported
    prompt = tokenizer("The history of the Roman Empire", return_tensors="pt").input_ids
    eos = model.generation_config.eos_token_id
    expected = model.generate(prompt, max_new_tokens=32, do_sample=False)
    got = runtime_model.generate(prompt, max_new_tokens=32, eos_token_id=eos)
    assert torch.equal(got, expected)


def test_decode_step_reads_the_cache_instead_of_the_prompt(exported):
    _, runtime_model = exported
    context = np.random.default_rng(0).integers(3, 1000, (1, 40))
    _, past = runtime_model.step(context[:, :-1], runtime_model.empty_cache(1))
    logits_step, present = runtime_model.step(context[:, -1:], past)
    assert logits_step.shape[1] == 1  # one new position computed, not the whole prompt
    assert present[0].shape[2] == 40 and present[0].shape[1] == 3  # GQA: 3 kv heads, not 9
    full, _ = runtime_model.step(context, runtime_model.empty_cache(1))
    assert np.abs(full[:, -1] - logits_step[:, 0]).max() < 1e-3


@pytest.mark.slow
def test_int4_gptq_with_packed_embeddings_is_small_and_runs_in_ort(smollm2, tmp_path):
    model, tokenizer = smollm2
    calibration = ev.calibration_batches(tokenizer, n=4, seq_len=128, batch_size=4)
    p = presso.make_pass("quantize_weights", bits=4, group_size=64, method="gptq", embeddings="int8",
                         refit=1)  # one refit round keeps the suite fast; benchmarks use the default 2
    compiled = presso.compile(model, [p], example_inputs=torch.randint(3, 1000, (1, 16)), calibration=calibration)
    path = compiled.export(tmp_path / "int4", tokenizer=tokenizer)
    fp32_bytes = sum(t.numel() * 4 for t in model.state_dict().values()) - model.lm_head.weight.numel() * 4  # tied
    assert compiled.report["bytes_on_disk"] < 0.2 * fp32_bytes
    assert compiled.report["export_check"]["checked_on"] == ["prefill", "decode step"]  # the file, against torch
    ort_ppl = ev.perplexity(presso.runtime.load(path), tokenizer, windows=WINDOWS, progress=False)
    fp32 = ev.perplexity(model, tokenizer, windows=WINDOWS, progress=False)
    assert ort_ppl / fp32 - 1 < 0.35  # int4 g64 with 4 short calibration windows; 64-window results in docs
    stats = compiled.report["passes"][0]["stats"]
    assert stats["embeddings"]["tied_linears"] == ["lm_head"] and stats["calibration_memory"]["hessian_bytes"] > 0
