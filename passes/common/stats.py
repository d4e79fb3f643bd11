"""Calibration statistics of module inputs, accumulated one batch at a time.

Precision: each batch's products are float32 (fast on every device), the running sums are
float64 on the input's device: a float32 sum over 1e5+ calibration rows loses the small
eigenvalues that whitening, GPTQ and least-squares refits depend on.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from presso import distributed
from presso.passes.common.capture import inputs_of, rows


class InputStats:
    """One module's inputs: per-channel sum of squares and of ``|x|``, the row count, and
    ``X^T X`` when ``gram`` is set."""

    def __init__(self, gram: bool = True):
        self.want_gram = gram
        self.xtx: torch.Tensor | None = None
        self.sq_sum: torch.Tensor | None = None
        self.abs_sum: torch.Tensor | None = None
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        """Add a (rows, channels) float matrix."""
        if self.sq_sum is None:
            k, kw = x.shape[-1], {"dtype": torch.float64, "device": x.device}
            self.sq_sum, self.abs_sum = torch.zeros(k, **kw), torch.zeros(k, **kw)
            self.xtx = torch.zeros(k, k, **kw) if self.want_gram else None
        self.sq_sum += x.pow(2).sum(0)
        self.abs_sum += x.abs().sum(0)
        if self.xtx is not None:
            self.xtx += x.t() @ x
        self.rows += x.shape[0]

    @property
    def gram(self) -> torch.Tensor | None:
        """``X^T X`` summed over rows, float32 (None when not gathered)."""
        return None if self.xtx is None else self.xtx.float()

    @property
    def sq(self) -> torch.Tensor:
        """Per-channel ``sum x_j^2``, float32."""
        return self.sq_sum.float()

    @property
    def hessian(self) -> torch.Tensor:
        """Mean ``x x^T`` over calibration rows (GPTQ's H up to a factor 2), float32."""
        return (self.xtx / max(self.rows, 1)).float()

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.rows, 1)).float()

    def rescale(self, s: torch.Tensor) -> None:
        """Inputs divided by ``s`` per channel (scales folded into the producer)."""
        s = s.to(self.abs_sum)
        if self.xtx is not None:
            self.xtx /= s[:, None] * s[None, :]
        self.abs_sum /= s
        self.sq_sum /= s * s


def all_reduce_stats(stats: Iterable[InputStats]) -> None:
    """Each rank's sums replaced by the sums over every rank's calibration share (a no-op in
    one process). Every rank passes its statistics of the same modules in the same order."""
    if not distributed.active():
        return
    for s in {id(s): s for s in stats}.values():
        distributed.all_reduce_sum([t for t in (s.sq_sum, s.abs_sum, s.xtx) if t is not None])
        s.rows = distributed.reduce_count(s.rows)


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd)


@torch.no_grad()
def record_inputs(modules: Mapping[str, nn.Module], run_batches: Callable[[], None],
                  grams: Iterable[str] = ()) -> dict[str, InputStats]:
    """Input statistics of each module over ``run_batches()`` (a loop over calibration data);
    ``X^T X`` only for the paths in ``grams``. A convolution's channels are its dim 1."""
    grams = set(grams)
    stats = {p: InputStats(gram=p in grams) for p in modules}
    conv = {p for p, m in modules.items() if _is_conv(m)}
    with inputs_of(modules, lambda p, x: stats[p].add(rows(x, p in conv))):
        run_batches()
    return {p: s for p, s in stats.items() if s.rows}


@dataclass
class SharedInputStats:
    """:class:`InputStats` for linears, gathered in a ``with`` block; linears fed the same tensor
    in one batch share one object (gate and up, q/k/v). Call ``new_batch()`` before each batch."""

    linears: dict[str, nn.Module]
    stats: dict[str, InputStats] = field(default_factory=dict)
    _owner: dict[str, str] = field(default_factory=dict)
    _seen: dict[tuple, str] = field(default_factory=dict)

    def __enter__(self) -> SharedInputStats:
        self._hooks = inputs_of(self.linears, self._record)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def new_batch(self) -> None:
        self._seen.clear()

    def _record(self, path: str, x: torch.Tensor) -> None:
        key = (x.data_ptr(), tuple(x.shape))
        if path not in self.stats:
            first = self._seen.get(key, (None, None))[0]
            self.stats[path] = self.stats[first] if first else InputStats()
            self._owner[path] = first or path
        if self._owner[path] == path:
            self.stats[path].add(rows(x))
            # the tensor is held until the next batch: a freed input's address, reused by a later
            # tensor of the same shape (gate/up's input after q/k/v's), must not look shared
            self._seen[key] = (path, x)


@dataclass
class PairedStats:
    """Inputs ``H'`` of a module in a rewritten model against ``H`` of the same module in the
    original, on the same batches: ``H'^T H'`` and ``H^T H'`` (float64) and the row count."""

    gram: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    rows: int = 0

    def add(self, h: torch.Tensor, h_new: torch.Tensor) -> None:
        g, c = (h_new.t() @ h_new).double(), (h.t() @ h_new).double()
        self.gram = g if self.gram is None else self.gram + g
        self.cross = c if self.cross is None else self.cross + c
        self.rows += h_new.shape[0]


@torch.no_grad()
def paired_inputs(original: Mapping[str, nn.Module], rewritten: Mapping[str, nn.Module],
                  batches: Iterable, run_original: Callable, run_rewritten: Callable) -> dict[str, PairedStats]:
    """Per path: :class:`PairedStats` of ``rewritten[path]``'s inputs against ``original[path]``'s,
    each batch run through the original and then the rewritten model."""
    seen: dict[tuple[str, str], torch.Tensor] = {}
    stats = {p: PairedStats() for p in rewritten}
    with inputs_of(original, lambda p, x: seen.__setitem__(("orig", p), rows(x))), \
            inputs_of(rewritten, lambda p, x: seen.__setitem__(("new", p), rows(x))):
        for batch in batches:
            seen.clear()
            run_original(batch)
            run_rewritten(batch)
            for p in rewritten:
                stats[p].add(seen[("orig", p)], seen[("new", p)])
    return stats


def calibration_input_stats(graph, ctx, modules: Mapping[str, nn.Module], grams: Iterable[str] = (),
                            desc: str = "input statistics") -> dict[str, InputStats]:
    """:func:`record_inputs` over the calibration batches of ``ctx``, run through ``graph``;
    across processes, each runs its share and the sums are added."""
    def run():
        for inputs in distributed.share(list(ctx.calibration_batches(desc=desc))):
            graph.run(inputs)

    with distributed.guard(desc):
        stats = record_inputs(modules, run, grams)
    all_reduce_stats(stats.values())
    return stats
