"""The pass protocol: a config dataclass, a Pass class, what it returns, what it sees.

A pass declares the named facts it ``requires`` (e.g. ``calibration``), ``provides``
and ``invalidates``; the manager orders passes by them and checks them before running.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from presso.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class PassConfig:
    """Base of every pass config: frozen, keyword-only, validated, JSON round-trip.

    Subclasses add fields and may override :meth:`validate` to check values, and
    :attr:`expected_drift` to state what their options cost.
    """

    # the most the outputs may move in this pass (relative L2 against the outputs before it);
    # None: the pass's ``expected_drift`` for these options
    tolerance: float | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(type(self), f.name, getattr(self, f.name), _hints(type(self))[f.name])
        if self.tolerance is not None and not self.tolerance > 0:
            raise ConfigError(f"tolerance={self.tolerance} must be > 0",
                              hint="a relative error, e.g. tolerance=0.2; verify=False skips the check")
        self.validate()

    @property
    def expected_drift(self) -> float | None:
        """Relative L2 error of the model outputs this pass may cause with these options, on the
        example inputs; None: none beyond float rounding (``EXACT``)."""
        return None

    def validate(self) -> None:
        """Raise :class:`ConfigError` for a bad value. Called after type checks."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, options: dict[str, Any], *, pass_name: str = "") -> PassConfig:
        valid = option_names(cls)
        unknown = sorted(set(options) - set(valid))
        where = f"pass {pass_name!r}" if pass_name else cls.__name__
        if unknown:
            raise ConfigError(
                f"unknown option(s) {', '.join(map(repr, unknown))} for {where}",
                hint=f"valid options: {describe_options(cls) or '(none)'}",
            )
        hints = _hints(cls)
        coerced = {k: _coerce(v, hints[k]) for k, v in options.items()}
        return cls(**coerced)


def option_names(config_cls: type[PassConfig]) -> list[str]:
    return [f.name for f in dataclasses.fields(config_cls)]


def describe_options(config_cls: type[PassConfig]) -> str:
    """``name: type = default`` for every option, comma separated."""
    hints = _hints(config_cls)
    parts = []
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        parts.append(f"{f.name}: {_type_name(hints[f.name])} = {default!r}")
    return ", ".join(parts)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _coerce(value: Any, tp: Any) -> Any:
    """Make JSON/CLI values fit the annotation: lists to tuples, ``"1"`` to 1 and so on."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType) and isinstance(value, str):  # "0.2" for float | None
        for arg in typing.get_args(tp):
            coerced = _coerce(value, arg)
            if coerced is not value:
                return coerced
        return value
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if origin is tuple and isinstance(value, str):
        return tuple(v for v in value.split(",") if v)
    if isinstance(value, str) and tp in (int, float):
        try:
            return tp(value)
        except ValueError:
            return value  # the type check names it
    if isinstance(value, str) and tp is bool and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    return value


def _check_type(cls: type, name: str, value: Any, tp: Any) -> None:
    if not _fits(value, tp):
        raise ConfigError(
            f"option {name!r} of {cls.__name__} must be {_type_name(tp)}, got {value!r}",
            hint=f"valid options: {describe_options(cls)}",
        )


def _fits(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        return isinstance(value, tuple) and all(_fits(v, args[0]) for v in value)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


@dataclass
class PassResult:
    """What a pass returns: the (possibly new) graph, whether it changed, and its stats."""

    graph: Any
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """What a pass may read besides the graph: example and calibration inputs, facts."""

    example_inputs: Any
    calibration: list[Any] | None = None
    facts: set[str] = field(default_factory=set)

    def calibration_batches(self, desc: str = "calibration") -> Iterator[Any]:
        """Yield calibration inputs with a progress bar (a pass must require ``calibration``)."""
        from tqdm.auto import tqdm

        if self.calibration is None:
            raise ConfigError("this pass needs calibration data", hint="pass calibration=[...] to presso.compile")
        yield from tqdm(self.calibration, desc=desc, leave=False, disable=len(self.calibration) < 8)


class Pass:
    """Base of every pass. Subclasses set ``name``, ``Config``, ``summary`` and implement ``run``.

    The manager checks that the relative L2 error of the model outputs after this pass,
    against the outputs before it, stays within :attr:`tolerance`: the config's
    ``tolerance`` option if given, else its ``expected_drift`` (exact up to float rounding
    when that is None). Ordering rules are data: ``requires`` (facts that must hold),
    ``conflicts`` (facts that must not, each with the way out), ``provides``, ``invalidates``.
    """

    name: ClassVar[str]
    Config: ClassVar[type[PassConfig]] = PassConfig
    summary: ClassVar[str] = ""
    provides: ClassVar[frozenset[str]] = frozenset()
    invalidates: ClassVar[frozenset[str]] = frozenset()
    conflicts: ClassVar[dict[str, str]] = {}  # fact -> why this pass cannot follow it, and the way out
    # True: the pass reads weights only through ``graph.materialize(module)`` or the block runner, so
    # a model larger than memory passes through one block at a time; False: every weight is
    # loaded before it runs
    streams: ClassVar[bool] = False

    @property
    def tolerance(self) -> float:
        """The drift the manager accepts from this pass (relative L2 error of the outputs)."""
        from presso.manager import EXACT

        if self.config.tolerance is not None:
            return self.config.tolerance
        drift = self.config.expected_drift
        return EXACT if drift is None else drift

    def __init__(self, config: PassConfig | None = None, **options: Any):
        if config is not None and options:
            raise ConfigError(f"pass {self.name!r}: give either a config or options, not both")
        if config is None:
            config = self.Config.from_dict(options, pass_name=self.name)
        elif not isinstance(config, self.Config):
            raise ConfigError(f"pass {self.name!r} takes a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config

    @property
    def requires(self) -> frozenset[str]:
        """Facts needed first: ``calibration`` when the config ``needs_calibration`` (a class may
        instead set ``requires = frozenset({...})``)."""
        return frozenset({"calibration"}) if getattr(self.config, "needs_calibration", False) else frozenset()

    def run(self, graph: Any, ctx: Context) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.config.to_dict().items())
        return f"{self.name}({opts})"
