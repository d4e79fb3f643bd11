"""The pass manager: order passes by their facts, run them, time them, check them.

After every pass it runs the model on the example inputs, refuses NaN/Inf, and checks the
drift from the previous step against the pass's ``tolerance``. Any failure is
a :class:`PassError` naming the pass and every pass before it.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from presso.errors import PassError, PressoError
from presso.numerics import (
    FLOOR_FACTOR,
    allowed_error,
    float_dtype,
    max_abs_error,
    noise_floor,
    non_finite,
    rel_error,
    rounding_noise,
)
from presso.pass_api import Context, Pass
from presso.report import count_bytes, count_params

EXACT = 1e-4  # relative tolerance of a pass that states none: float rounding only


@dataclass
class PassRecord:
    name: str
    config: dict[str, Any]
    seconds: float
    modified: bool
    stats: dict[str, Any]
    rel_error_step: float
    rel_error_total: float
    max_abs_error_total: float
    params_after: int = 0  # the model after this step: each step's effect on size reads off the list
    bytes_after: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def order_passes(passes: Sequence[Pass], facts: set[str]) -> list[Pass]:
    """Keep the caller's order, except that a provider moves before the passes needing it."""
    remaining = list(passes)
    ordered: list[Pass] = []
    known = set(facts)
    lost_by: dict[str, str] = {}
    while remaining:
        ready = remaining[0]
        if not ready.requires <= known:
            ready = _provider_of(ready.requires - known, remaining, known) or ready
        if not ready.requires <= known:
            _raise_missing(ready, known, ordered, lost_by)
        _check_conflicts(ready, known, ordered)
        remaining.remove(ready)
        ordered.append(ready)
        known = (known | ready.provides) - ready.invalidates
        lost_by.update({fact: ready.name for fact in ready.invalidates})
    return ordered


def _provider_of(missing: set[str], remaining: list[Pass], known: set[str]) -> Pass | None:
    return next((p for p in remaining if p.provides & missing and p.requires <= known), None)


def _raise_missing(p: Pass, known: set[str], before: list[Pass], lost_by: dict[str, str]) -> None:
    missing = sorted(p.requires - known)
    hint = ("pass calibration=[...] (example inputs) to presso.compile" if "calibration" in missing
            else f"add a pass that provides {', '.join(missing)} before it")
    lost = "".join(f"; {f} was invalidated by {lost_by[f]!r}" for f in missing if f in lost_by)
    raise PassError(
        f"pass {p.name!r} requires {', '.join(missing)}, which nothing before it provides{lost}"
        f" (passes before it: {_names(before)})", hint=hint)


def _check_conflicts(p: Pass, known: set[str], before: list[Pass]) -> None:
    for fact in sorted(set(p.conflicts) & known):
        by = next((q.name for q in reversed(before) if fact in q.provides), "the input")
        raise PassError(f"pass {p.name!r} cannot run after {by!r}, which made the model {fact!r}"
                        f" (passes before it: {_names(before)})", hint=p.conflicts[fact])


def _names(passes: Sequence[Pass]) -> str:
    return ", ".join(p.name for p in passes) or "none"


@dataclass
class PassManager:
    passes: list[Pass]
    verify: bool = True
    records: list[PassRecord] = field(default_factory=list)
    original_outputs: tuple = ()  # of the untouched copy, on the example inputs

    def run(self, graph: Any, ctx: Context) -> Any:
        self.passes = order_passes(self.passes, ctx.facts)
        original = prev = self.original_outputs = graph.run()
        for i, p in enumerate(self.passes):
            graph, outs, record = self._run_one(p, graph, ctx, prev, original, self.passes[:i])
            self.records.append(record)
            prev = outs
        return graph

    def _run_one(self, p: Pass, graph: Any, ctx: Context, prev, original, before: list[Pass]):
        start = time.perf_counter()
        if graph.progress is not None:
            graph.progress.begin(len(before), p.name, p.config.to_dict(), graph.module, ctx.calibration)
        if not p.streams:  # it reads weights anywhere: all of them in memory first
            graph.materialize(why=f"pass {p.name!r}")
        try:
            result = p.run(graph, ctx)
        except PressoError:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised naming the pass
            raise PassError(f"pass {p.name!r} failed with {type(exc).__name__}: {exc} "
                            f"(passes before it: {_names(before)})",
                            hint="check the pass options; run with fewer passes to isolate it") from exc
        seconds = time.perf_counter() - start
        graph = result.graph
        if graph.progress is not None:
            graph.progress.end()
        if result.modified:
            graph.invalidate()
        ctx.facts = (ctx.facts | p.provides) - p.invalidates
        try:
            outs = graph.run()
        except Exception as exc:  # noqa: BLE001 - the pass left a model that does not run
            raise PassError(f"the model no longer runs after pass {p.name!r}: {type(exc).__name__}: {exc} "
                            f"(passes before it: {_names(before)})",
                            hint="the pass rewrote the model inconsistently; report it to its author") from exc
        self._check(p, outs, prev, before, graph)
        record = PassRecord(p.name, p.config.to_dict(), seconds, result.modified, result.stats,
                            rel_error(outs, prev), rel_error(outs, original), max_abs_error(outs, original),
                            count_params(graph.module), count_bytes(graph.module))
        return graph, outs, record

    @staticmethod
    def _half_precision_allowance(graph: Any, tol: float, outs) -> tuple[float, float]:
        """A bf16/fp16 model rounds at every op, so even an exact rewrite moves its outputs: the
        allowed error is also ``FLOOR_FACTOR`` times what rounding every module's output once
        more in the model's dtype does (measured, only when the plain tolerance is exceeded)."""
        dtype = float_dtype(graph.module)
        if dtype in (torch.float32, torch.float64):
            return tol, 0.0
        floor = noise_floor(graph.called_modules().values(), lambda: rel_error(graph.run(), outs),
                            rounding_noise(dtype))
        return allowed_error(tol, floor), floor

    def _check(self, p: Pass, outs, prev, before: list[Pass], graph: Any) -> None:
        bad = non_finite(outs)
        if bad:
            raise PassError(f"pass {p.name!r} produced NaN/Inf in output(s) {bad} "
                            f"(passes before it: {_names(before)})",
                            hint="the pass options may be too aggressive for this model")
        tol = p.tolerance
        err = rel_error(outs, prev)
        floor = 0.0
        if self.verify and err > tol:
            tol, floor = self._half_precision_allowance(graph, tol, outs)
        if self.verify and err > tol:
            why = f"; {FLOOR_FACTOR:g}x the model's rounding floor {floor:.3g} in its dtype" if floor else ""
            raise PassError(f"pass {p.name!r} changed the outputs by relative error {err:.3g}, above its "
                            f"tolerance {tol:.3g}{why} (passes before it: {_names(before)})",
                            hint=f"use gentler options or skip sensitive modules; {p.name}(tolerance=...) "
                                 "raises the bound, verify=False skips the check")
