"""Activation range observers for static quantization: ``minmax``, ``percentile``, ``mse``, ``output``.

Every observer tracks the exact minimum and maximum; ``percentile`` and ``mse`` also keep a
fixed-size random sample of each batch, from which they choose a narrower range. ``output``
keeps whole rows instead and picks the range whose quantized input moves the layer's
*output* least through its int8 weight: an input channel that meets large weights counts
for more than one that meets small ones, which an input-space error cannot see.
"""
from __future__ import annotations

import torch

from presso.runtime.int8 import quantize_per_channel_int8
from presso.runtime.quant import quantize_activation_params

SAMPLE_PER_BATCH = 1 << 16
MSE_CANDIDATES = torch.linspace(0.05, 1.0, 39)
OUTPUT_ROWS = 512  # rows kept in all for the output-error search
OUTPUT_CANDIDATES = torch.linspace(0.3, 1.0, 29)


class RangeObserver:
    def __init__(self, kind: str = "minmax", percentile: float = 99.99, symmetric: bool = False, seed: int = 0,
                 rows_per_batch: int = OUTPUT_ROWS):
        self.kind, self.percentile, self.symmetric = kind, percentile, symmetric
        self.rows_per_batch = rows_per_batch
        self.lo, self.hi = float("inf"), float("-inf")
        self.samples: list[torch.Tensor] = []
        self._gen = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().float().reshape(-1)
        self.lo, self.hi = min(self.lo, float(flat.min())), max(self.hi, float(flat.max()))
        if self.kind == "output":
            rows = x.detach().float().reshape(-1, x.shape[-1])
            pick = torch.randperm(rows.shape[0], generator=self._gen)[: self.rows_per_batch]
            self.samples.append(rows[pick].clone())
        elif self.kind != "minmax":
            if flat.numel() > SAMPLE_PER_BATCH:
                flat = flat[torch.randint(flat.numel(), (SAMPLE_PER_BATCH,), generator=self._gen)]
            self.samples.append(flat.clone())

    def range(self, weight: torch.Tensor | None = None) -> tuple[float, float]:
        """The chosen ``(lo, hi)``; ``weight`` (out x in, as the layer computes) for ``output``."""
        if self.lo > self.hi:
            raise RuntimeError("observer saw no data: the module was not called on the calibration inputs")
        if self.kind == "output":
            if weight is None:
                raise ValueError("the output observer needs the layer's weight")
            return self._output_range(torch.cat(self.samples), weight)
        if self.kind == "minmax":
            return self.lo, self.hi
        sample = torch.cat(self.samples)
        if self.kind == "percentile":
            q = torch.tensor([1 - self.percentile / 100, self.percentile / 100])
            lo, hi = torch.quantile(sample[: 1 << 24], q).tolist()
            return lo, hi
        return self._mse_range(sample)

    def _mse_range(self, sample: torch.Tensor) -> tuple[float, float]:
        best = (float("inf"), self.lo, self.hi)
        for c in MSE_CANDIDATES.tolist():
            lo, hi = self.lo * c, self.hi * c
            scale, zp = quantize_activation_params(lo, hi, self.symmetric)
            qmin, qmax = (-128, 127) if self.symmetric else (0, 255)
            deq = (torch.clamp(torch.round(sample / scale) + zp, qmin, qmax) - zp) * scale
            err = float((deq - sample).pow(2).mean())
            if err < best[0]:
                best = (err, lo, hi)
        return best[1], best[2]

    @torch.no_grad()
    def _output_range(self, rows: torch.Tensor, weight: torch.Tensor) -> tuple[float, float]:
        """Shrink ``hi`` and ``lo`` in turn, keeping whichever lowers ``|Q(x) Wq^T - x W^T|``."""
        q, w_scale = quantize_per_channel_int8(weight.float())
        wq_t = (q.float() * w_scale[:, None]).t()
        ref = rows @ weight.float().t()

        def error(lo: float, hi: float) -> float:
            scale, zp = quantize_activation_params(lo, hi, self.symmetric)
            qmin, qmax = (-128, 127) if self.symmetric else (0, 255)
            xq = (torch.clamp(torch.round(rows / scale) + zp, qmin, qmax) - zp) * scale
            return float((xq @ wq_t - ref).pow(2).sum())

        lo, hi = self.lo, self.hi
        best = error(lo, hi)
        for side in ("hi", "lo", "hi"):  # coordinate descent: the two ends clip different tails
            for c in OUTPUT_CANDIDATES.tolist():
                if self.symmetric:  # one scale for both ends
                    cand = (self.lo * c, self.hi * c)
                else:
                    cand = (lo, self.hi * c) if side == "hi" else (self.lo * c, hi)
                err = error(*cand)
                if err < best:
                    best, (lo, hi) = err, cand
        return lo, hi

    def params(self, weight: torch.Tensor | None = None) -> tuple[float, int]:
        return quantize_activation_params(*self.range(weight), self.symmetric)
