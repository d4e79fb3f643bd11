from dataclasses import dataclass

import pytest
import torch
from torch import nn

import presso
from presso import Context, Pass, PassConfig, PassError, PassResult
from presso.manager import order_passes


def make(name, requires=(), provides=(), invalidates=()):
    return type(name, (Pass,), {"name": name, "requires": frozenset(requires), "provides": frozenset(provides),
                                "invalidates": frozenset(invalidates),
                                "run": lambda self, g, c: PassResult(g, False)})()


def test_order_keeps_user_order_when_satisfied():
    a, b, c = make("a"), make("b"), make("c")
    assert [p.name for p in order_passes([c, a, b], set())] == ["c", "a", "b"]


def test_provider_moves_before_consumer():
    consumer, provider = make("consumer", requires={"groups"}), make("provider", provides={"groups"})
    assert [p.name for p in order_passes([consumer, provider], set())] == ["provider", "consumer"]


def test_missing_fact_names_pass_and_way_out():
    with pytest.raises(PassError, match="'needs' requires calibration.*passes before it: first") as info:
        order_passes([make("first"), make("needs", requires={"calibration"})], set())
    assert "calibration=" in str(info.value)


def test_invalidated_fact_is_missing_again():
    p = make("p", provides={"f"})
    breaker = make("breaker", invalidates={"f"})
    user = make("user", requires={"f"})
    with pytest.raises(PassError, match="'user' requires f.*invalidated by 'breaker'"):
        order_passes([p, breaker, user], set())
    assert [x.name for x in order_passes([p, user, breaker], set())] == ["p", "user", "breaker"]


def test_conflicting_fact_is_refused_before_any_pass_runs_with_the_way_out():
    quantizer = make("quantizer", provides={"quantized"})
    rotate = type("rotate", (Pass,), {"name": "rotate", "conflicts": {"quantized": "run rotate first"},
                                      "run": lambda self, g, c: PassResult(g, False)})()
    with pytest.raises(PassError, match="'rotate' cannot run after 'quantizer'.*'quantized'") as info:
        order_passes([quantizer, rotate], set())
    assert info.value.hint == "run rotate first"
    assert [x.name for x in order_passes([rotate, quantizer], set())] == ["rotate", "quantizer"]


def test_builtin_ordering_rules_are_data():
    rotate, quantize = presso.make_pass("rotate_residual"), presso.make_pass("quantize_dynamic_int8")
    with pytest.raises(PassError, match="'rotate_residual' cannot run after 'quantize_dynamic_int8'"):
        order_passes([quantize, rotate], set())
    split = presso.make_pass("split_low_rank", ratio=0.2, method="svd")
    prune = presso.make_pass("prune_structured", ratio=0.2)
    with pytest.raises(PassError, match="'prune_structured' cannot run after 'split_low_rank'.*shared_factor"):
        order_passes([split, prune], set())
    unshared = presso.make_pass("split_low_rank", ratio=0.2, method="svd", share_inputs=False)
    assert [x.name for x in order_passes([unshared, prune], set())] == ["split_low_rank", "prune_structured"]


def test_each_pass_states_its_drift_from_its_options_and_a_user_can_override_it():
    assert presso.make_pass("quantize_weights", bits=4).tolerance > presso.make_pass("quantize_weights", bits=8,
                                                                                        group_size=-1).tolerance
    assert presso.make_pass("prune_structured", ratio=0.5).tolerance > presso.make_pass("prune_structured",
                                                                                        ratio=0.1).tolerance
    assert presso.make_pass("quantize_weights", tolerance=0.02).tolerance == 0.02
    assert presso.make_pass("smooth_quant").tolerance == 1e-4  # function-preserving: exact
    with pytest.raises(presso.ConfigError, match="tolerance"):
        presso.make_pass("quantize_weights", tolerance=0.0)


def test_a_tighter_tolerance_than_the_drift_is_a_pass_error_naming_the_option():
    net, x = Net(), torch.randn(8, 4)
    with pytest.raises(PassError, match="above its tolerance 1e-06") as info:
        presso.compile(net, [presso.make_pass("quantize_dynamic_int8", tolerance=1e-6)], example_inputs=x)
    assert "quantize_dynamic_int8(tolerance=...)" in info.value.hint


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x)


@dataclass(frozen=True, kw_only=True)
class ScaleConfig(PassConfig):
    factor: float = 1.0


class Scale(Pass):
    name = "scale_weights"
    Config = ScaleConfig

    def run(self, graph, ctx):
        with torch.no_grad():
            graph.module.fc.weight.mul_(self.config.factor)
        return PassResult(graph, modified=True, stats={"factor": self.config.factor})


class Boom(Pass):
    name = "boom"

    def run(self, graph, ctx):
        raise RuntimeError("kaput")


def test_nan_guard_names_pass_and_previous():
    net, x = Net(), torch.randn(2, 4)
    with pytest.raises(PassError, match=r"'scale_weights' produced NaN/Inf.*passes before it: none"):
        presso.compile(net, [Scale(factor=float("nan"))], example_inputs=x)


def test_failure_names_pass_and_passes_before():
    net, x = Net(), torch.randn(2, 4)
    message = r"pass 'boom' failed with RuntimeError: kaput \(passes before it: scale_weights\)"
    with pytest.raises(PassError, match=message):
        presso.compile(net, [Scale(factor=1.0), Boom()], example_inputs=x)


def test_tolerance_is_checked_and_can_be_waived():
    net, x = Net(), torch.randn(2, 4)
    with pytest.raises(PassError, match="above its tolerance"):
        presso.compile(net, [Scale(factor=2.0)], example_inputs=x)
    compiled = presso.compile(net, [Scale(factor=2.0)], example_inputs=x, verify=False)
    record = compiled.report["passes"][0]
    assert record["name"] == "scale_weights" and record["seconds"] >= 0
    assert record["stats"] == {"factor": 2.0}
    assert record["rel_error_total"] > 0.5
    torch.testing.assert_close(compiled(x), net(x) * 2 - net.fc.bias)  # weights doubled, bias kept


def test_context_without_calibration_refuses_batches():
    ctx = Context(example_inputs=None)
    with pytest.raises(presso.ConfigError, match="calibration"):
        next(ctx.calibration_batches())
