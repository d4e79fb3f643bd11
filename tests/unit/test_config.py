import json
from dataclasses import FrozenInstanceError, dataclass

import pytest

import presso
from presso import ConfigError, PassConfig


@dataclass(frozen=True, kw_only=True)
class DemoConfig(PassConfig):
    ratio: float = 0.5
    bits: int = 8
    skip: tuple[str, ...] = ()
    mode: str = "a"

    def validate(self):
        if not 0 <= self.ratio < 1:
            raise ConfigError(f"ratio must be in [0, 1), got {self.ratio}")


def test_defaults_and_json_round_trip():
    cfg = DemoConfig.from_dict({"ratio": 0.25, "skip": ["lm_head"]})
    assert cfg.skip == ("lm_head",)
    again = DemoConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_frozen_and_keyword_only():
    cfg = DemoConfig()
    with pytest.raises(FrozenInstanceError):
        cfg.ratio = 0.1
    with pytest.raises(TypeError):
        DemoConfig(0.1)


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ConfigError, match="unknown option.*'ratoi'") as info:
        DemoConfig.from_dict({"ratoi": 0.1})
    assert "ratio: float = 0.5" in str(info.value) and "bits: int = 8" in str(info.value)


@pytest.mark.parametrize("options", [{"ratio": "high"}, {"bits": 8.5}, {"bits": True}, {"skip": [1]}])
def test_wrong_type_is_named(options):
    name = next(iter(options))
    with pytest.raises(ConfigError, match=f"option '{name}'"):
        DemoConfig.from_dict(options)


def test_validate_hook_runs():
    with pytest.raises(ConfigError, match="ratio must be"):
        DemoConfig(ratio=1.5)


def test_cli_strings_are_coerced():
    cfg = DemoConfig.from_dict({"ratio": "0.3", "bits": "4", "skip": "a,b"})
    assert (cfg.ratio, cfg.bits, cfg.skip) == (0.3, 4, ("a", "b"))


def test_make_pass_unknown_name_lists_passes():
    with pytest.raises(presso.PressoError, match="unknown pass 'quantise'") as info:
        presso.make_pass("quantise")
    assert "quantize_dynamic_int8" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_make_pass_bad_option():
    with pytest.raises(ConfigError, match="unknown option.*'skpi'.*quantize_dynamic_int8") as info:
        presso.make_pass("quantize_dynamic_int8", skpi=["lm_head"])
    assert "skip" in str(info.value)
    with pytest.raises(ConfigError, match="option 'skip'"):
        presso.make_pass("quantize_dynamic_int8", skip=3)


def test_list_passes_has_builtins():
    assert "quantize_dynamic_int8" in presso.list_passes()


def test_cli_strings_fit_optional_and_tuple_options():
    p = presso.make_pass("prune_structured", target="heads,mlp", params_ratio="0.2", recover="true")
    assert (p.config.target, p.config.params_ratio, p.config.ratio, p.config.recover) == (
        ("heads", "mlp"), 0.2, None, True)
    with pytest.raises(ConfigError, match="params_ratio"):
        presso.make_pass("prune_structured", params_ratio="a fifth")


def test_list_importances_has_builtins():
    assert {"magnitude", "taylor", "activation"} <= set(presso.list_importances())
