"""Activation range observers for static quantization: ``minmax``, ``percentile``, ``mse``.

Every observer tracks the exact minimum and maximum; ``percentile`` and ``mse`` also keep a
fixed-size random sample of each batch, from which they choose a narrower range.
"""
from __future__ import annotations

import torch

from presso.runtime.quant import quantize_activation_params

SAMPLE_PER_BATCH = 1 << 16
MSE_CANDIDATES = torch.linspace(0.05, 1.0, 39)


class RangeObserver:
    def __init__(self, kind: str = "minmax", percentile: float = 99.99, symmetric: bool = False, seed: int = 0):
        self.kind, self.percentile, self.symmetric = kind, percentile, symmetric
        self.lo, self.hi = float("inf"), float("-inf")
        self.samples: list[torch.Tensor] = []
        self._gen = torch.Generator().manual_seed(seed)

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().float().reshape(-1)
        self.lo, self.hi = min(self.lo, float(flat.min())), max(self.hi, float(flat.max()))
        if self.kind != "minmax":
            if flat.numel() > SAMPLE_PER_BATCH:
                flat = flat[torch.randint(flat.numel(), (SAMPLE_PER_BATCH,), generator=self._gen)]
            self.samples.append(flat.clone())

    def range(self) -> tuple[float, float]:
        if self.lo > self.hi:
            raise RuntimeError("observer saw no data: the module was not called on the calibration inputs")
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

    def params(self) -> tuple[float, int]:
        return quantize_activation_params(*self.range(), self.symmetric)
