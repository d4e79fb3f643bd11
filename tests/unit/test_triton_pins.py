"""Pinned kernel configurations: the lookup by device and shape (pure Python: no GPU, no triton)."""
import json

import pytest
import torch

from presso import ConfigError
from presso.runtime.triton import pins

KEY = pins.pin_key(4096, 4096, 1, 4, 128, True, torch.bfloat16)
CONFIG = {"BLOCK_N": 256, "TILE_W": 8, "SPLIT_K": 32, "DEQUANT": 2, "num_warps": 4, "num_stages": 3}


def test_the_key_names_shape_rows_format_and_dtype():
    assert KEY == "4096x4096 m1 int4 g128 sym bfloat16"
    assert pins.pin_key(576, 1536, 16, 8, 1536, False, torch.float16) == "576x1536 m16 int8 g1536 asym float16"


def test_a_pin_is_found_only_for_its_device_kernel_and_key(tmp_path):
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(pins.with_pins({"gemv_words": []}, "gemv_words", "GPU A", {KEY: CONFIG})))
    found = pins.pinned_config("gemv_words", "GPU A", KEY, path)
    assert found == CONFIG
    found["SPLIT_K"] = 1  # the caller's copy: the next lookup is unchanged
    assert pins.pinned_config("gemv_words", "GPU A", KEY, path) == CONFIG
    assert pins.pinned_config("gemv_words", "GPU B", KEY, path) is None
    assert pins.pinned_config("gemm_words", "GPU A", KEY, path) is None
    assert pins.pinned_config("gemv_words", "GPU A", KEY.replace("m1", "m16"), path) is None
    assert json.loads(path.read_text())["gemv_words"] == []  # the autotune candidates stay beside the pins


def test_no_file_means_no_pins_and_a_corrupt_one_says_how_to_recover(tmp_path):
    assert pins.pinned_config("gemv_words", "GPU A", KEY, tmp_path / "absent.json") is None
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not a tuned-configurations file") as err:
        pins.pinned_config("gemv_words", "GPU A", KEY, bad)
    assert "gpu_sweep --write" in err.value.hint


def test_off_cuda_nothing_is_pinned():
    assert pins.pinned_on("gemv_words", torch.device("cpu"), KEY) is None


def test_shipped_pins_are_well_formed():
    shipped = json.loads(pins.TUNED.read_text()).get("pinned", {})
    for kernels in shipped.values():
        for kernel, by_key in kernels.items():
            assert kernel in ("gemv_words", "gemm_words")
            for key, config in by_key.items():
                assert key.split()[1].startswith("m") and {"SPLIT_K", "TILE_W", "num_warps"} <= set(config)


def test_the_swapped_kernel_route_is_read_from_its_setting():
    assert pins.swapped_rows("") == {}
    assert pins.swapped_rows("4:32, 8:16") == {4: 32, 8: 16}
    for bad in ("4", "3:16", "4:many", "int4:16"):
        with pytest.raises(ConfigError, match="PRESSO_SWAPPED_ROWS"):
            pins.swapped_rows(bad)
