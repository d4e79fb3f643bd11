"""prune_structured on the embedded SmolLM2: budget met, config reloads, recovery helps."""
import pytest
import torch

import presso
from presso import eval as ev
from presso.testing import assert_unchanged, snapshot

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_heads_and_mlp_at_a_fifth_of_the_parameters_with_recovery(smollm2, tmp_path):
    model, tokenizer = smollm2
    before = snapshot(model)
    calibration = ev.calibration_batches(tokenizer, n=8, seq_len=128, batch_size=4)
    ppl = {}
    for recover in (False, True):
        p = presso.make_pass("prune_structured", target=("heads", "mlp"), params_ratio=0.2, importance="activation",
                             recover=recover, round_to=8)
        compiled = presso.compile(model, [p], example_inputs=calibration[0][:1, :16], calibration=calibration)
        stats = compiled.report["passes"][0]["stats"]
        assert abs(stats["params_removed"] - 0.2) <= 0.01
        ppl[recover] = ev.perplexity(compiled, tokenizer, windows=2, progress=False)
    assert_unchanged(model, before)
    assert (model.config.intermediate_size, model.config.num_attention_heads) == (1536, 9)  # the caller's config
    base = ev.perplexity(model, tokenizer, windows=2, progress=False)
    assert base < ppl[True] < ppl[False]
    assert (ppl[False] - base) > 1.25 * (ppl[True] - base)  # recovery closes more than a fifth of the gap
    config = stats["config"]
    assert config["num_attention_heads"] == 6 and config["intermediate_size"] % 8 == 0
    assert "not_expressible" not in config
    compiled.module.save_pretrained(tmp_path)
    reloaded = type(compiled.module).from_pretrained(tmp_path).eval()
    ids = calibration[0][:1, :32]
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, compiled.module(ids).logits, atol=1e-4)
