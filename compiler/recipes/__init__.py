"""Recipes: named pass pipelines, shipped as data, each with what it measured.

A recipe is a JSON file beside this module: the passes with their options, how much
calibration data it was measured with, and the result on the results page
(``docs/results.md``). ``presso.compile(model, recipe="w8a8", ...)``,
``presso compile --recipe w8a8`` and ``presso recipes`` read them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from presso.errors import ConfigError


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    passes: tuple[tuple[str, dict[str, Any]], ...]
    calibration: int = 0  # calibration sequences it was measured with (0: none needed)
    seq_len: int = 256
    measured: dict[str, Any] = field(default_factory=dict)

    def make_passes(self) -> list:
        """Fresh pass objects, their options checked against each pass's config."""
        from presso.api import make_pass

        return [make_pass(name, **_tuples(options)) for name, options in self.passes]

    def row(self) -> str:
        """One line for ``presso recipes``."""
        m = self.measured
        if not m:
            return f"{self.name:<16} {self.summary}"
        delta = 100 * (m["perplexity"] / m["fp32_perplexity"] - 1)
        return (f"{self.name:<16} {m['size_mb']:>6.1f} MB  {m['perplexity']:>6.2f} ({delta:+6.1f}%)  "
                f"{m['model']:<13} {self.summary}")


def _tuples(options: dict[str, Any]) -> dict[str, Any]:
    # JSON has lists; pass configs take tuples for their pattern options
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}


def _files() -> dict[str, Any]:
    return {p.name[:-5]: p for p in resources.files(__name__).iterdir() if p.name.endswith(".json")}


def list_recipes() -> list[str]:
    return sorted(_files())


def load_recipe(name: str) -> Recipe:
    files = _files()
    if name not in files:
        raise ConfigError(f"unknown recipe {name!r}", hint=f"available recipes: {', '.join(sorted(files))}")
    data = json.loads(files[name].read_text())
    passes = tuple((p["pass"], p.get("options", {})) for p in data["passes"])
    return Recipe(name, data["summary"], passes, data.get("calibration", 0), data.get("seq_len", 256),
                  data.get("measured", {}))
