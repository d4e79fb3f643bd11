import pytest
import torch

from presso import TraceError
from presso.signature import CallSpec, normalize_inputs


@pytest.mark.parametrize("bad", [None, 3, [], {}, ("a",), {"x": 1}])
def test_bad_example_inputs_are_named(bad):
    with pytest.raises(TraceError, match="example_inputs must be a tensor"):
        normalize_inputs(bad)


def test_inputs_forms():
    t = torch.zeros(2)
    assert normalize_inputs(t).args == (t,)
    assert normalize_inputs([t, t]).args == (t, t)
    assert normalize_inputs({"a": t}).kwargs == {"a": t}


def test_binding_by_position_and_name():
    spec = CallSpec(input_names=["input_ids", "attention_mask"], n_args=1, hf=True)
    a, b = torch.zeros(1), torch.ones(1)
    assert spec.flatten_inputs((a,), {"attention_mask": b}) == (a, b)
    assert spec.flatten_inputs((), {"attention_mask": b, "input_ids": a}) == (a, b)
    with pytest.raises(TraceError, match="missing \\['attention_mask'\\]"):
        spec.flatten_inputs((a,), {})
    with pytest.raises(TraceError, match="unexpected \\['pixel_values'\\]"):
        spec.flatten_inputs((a, b), {"pixel_values": a})
