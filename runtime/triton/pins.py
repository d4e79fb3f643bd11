"""Configurations pinned per device and shape: what ``benchmarks.gpu_sweep`` timed fastest.

The autotuners time each configuration after an L2 flush, in isolation; the sweep times it
as a model runs it (one CUDA graph over weight copies that overflow L2), and the two rankings
differ by a few percent at batch 1, most on small matrices (SmolLM2's 1536x576: 3.1 µs
autotuned against 2.5 µs pinned, one H100). A shape the sweep timed on this device is
launched with its pinned configuration, the same one in every process; any other shape is
autotuned. Pins live in ``tuned.json`` under ``"pinned"``, by device name, kernel, then
:func:`pin_key`; pure Python, so the lookup is tested where triton is not installed.
"""
from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

from presso.errors import ConfigError

TUNED = Path(__file__).with_name("tuned.json")


def pin_key(n: int, k: int, rows: int, bits: int, group: int, symmetric: bool, dtype) -> str:
    """``NxK`` of the weight, the row bucket (a power of two), the format, the activations'
    dtype: ``4096x4096 m1 int4 g128 sym bfloat16``."""
    return f"{n}x{k} m{rows} int{bits} g{group} {'sym' if symmetric else 'asym'} {str(dtype).split('.')[-1]}"


@cache
def _pins(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        pinned = json.loads(path.read_text()).get("pinned", {})
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ConfigError(f"{path} is not a tuned-configurations file: {exc}",
                          hint="restore it from the package, or write it again with "
                               "python3 -m benchmarks.gpu_sweep --write") from exc
    if not isinstance(pinned, dict):
        raise ConfigError(f"{path}: 'pinned' must map device names to kernels",
                          hint="write it again with python3 -m benchmarks.gpu_sweep --write")
    return pinned


def pinned_config(kernel: str, device_name: str, key: str, path: Path = TUNED) -> dict | None:
    """The configuration pinned for ``kernel`` on ``device_name`` at ``key`` (a fresh dict), or None."""
    config = _pins(path).get(device_name, {}).get(kernel, {}).get(key)
    return None if config is None else dict(config)


def with_pins(tuned: dict, kernel: str, device_name: str, pins: dict[str, dict]) -> dict:
    """``tuned`` (the file's contents) with ``pins`` added for ``kernel`` on ``device_name``."""
    tuned.setdefault("pinned", {}).setdefault(device_name, {}).setdefault(kernel, {}).update(pins)
    return tuned


@cache
def _pinned_on_device(kernel: str, index: int, key: str) -> dict | None:
    import torch

    return pinned_config(kernel, torch.cuda.get_device_name(index), key)


def pinned_on(kernel: str, device, key: str) -> dict | None:
    """:func:`pinned_config` for a tensor's ``device`` (looked up once per kernel, device and key;
    the caller must not change it): None off CUDA and under ``PRESSO_PINS=0`` (to time the
    autotuners' own choice)."""
    if device.type != "cuda" or os.environ.get("PRESSO_PINS", "1") == "0":
        return None
    return _pinned_on_device(kernel, device.index, key)


def swapped_rows(spec: str) -> dict[int, int]:
    """``PRESSO_SWAPPED_ROWS``, e.g. ``"4:32,8:16"``: up to how many rows the int4 (int8) products go
    to the swapped-operand kernel (:mod:`.gemm_swapped`) instead of the word layout's; empty: none."""
    routes: dict[int, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        bits, _, rows = item.partition(":")
        if bits not in ("4", "8") or not rows.isdigit():
            raise ConfigError(f"PRESSO_SWAPPED_ROWS={spec!r}: {item!r} is not BITS:ROWS with BITS 4 or 8",
                              hint='write it as "4:32,8:16", or unset it')
        routes[int(bits)] = int(rows)
    return routes
