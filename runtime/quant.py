"""Quantization arithmetic shared by passes and runtime modules: no modules, no ONNX.

Group-wise weight codes follow ONNX Runtime's ``MatMulNBits`` layout: a weight ``(N, K)``
is cut along K into blocks of ``block_size`` (the last one zero-padded), each block with
its own scale and zero point; codes are unsigned, ``value = (code - zero) * scale``.

* asymmetric: ``scale = (max - min) / (2**bits - 1)``, zero point a code.
* symmetric: zero point ``2**(bits-1)`` and ``scale = w_peak / -2**(bits-1)``, where
  ``w_peak`` is the signed value of largest magnitude: it maps exactly to the lowest code,
  so all ``2**bits`` levels are used (llama.cpp's Q4_0 rule); the scale may be negative.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

STORAGE_BLOCKS = (256, 128, 64, 32, 16)  # powers of two that MatMulNBits accepts


@dataclass(frozen=True)
class WeightFormat:
    """How a weight is stored: bits per code, group size along K (-1: per output channel)."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    scale_bits: int = 32  # 16: float16 scales; 8: int8 scale codes times one float16 scale per row

    def round_scales(self, scale: torch.Tensor) -> torch.Tensor:
        """Scales ``(N, G)`` as stored (rounded when chosen, so every path agrees)."""
        if self.scale_bits == 8:
            codes, row = scale_codes(scale)
            return codes.float() * row.float()
        return scale.half().float() if self.scale_bits == 16 else scale.float()

    @property
    def levels(self) -> int:
        return 2 ** self.bits

    def group(self, in_features: int) -> int:
        """Elements per scale; a group as wide as the row (or wider) is one scale per channel."""
        return self.group_size if 0 < self.group_size < in_features else in_features

    def block_size(self, in_features: int) -> int:
        """Storage block: the group, or for per-channel scales a power of two dividing K."""
        if self.group(in_features) < in_features:
            return self.group_size
        return next((b for b in STORAGE_BLOCKS if in_features % b == 0), 16)

    def bytes_for(self, out_features: int, in_features: int) -> int:
        """Bytes of codes, scales and packed zero points for one weight."""
        block = self.block_size(in_features)
        blocks = -(-in_features // block)
        codes = out_features * blocks * block * self.bits // 8
        zeros = 0 if self.symmetric else out_features * -(-blocks * self.bits // 8)
        rows = out_features * 2 if self.scale_bits == 8 else 0
        return codes + out_features * blocks * self.scale_bits // 8 + rows + zeros


def scale_codes(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group scales ``(N, G)`` as int8 codes times a float16 scale per row ``(N, 1)``.

    Each scale is held to 0.4% of its row's largest; on disk a scale costs 1 byte instead of
    2. The weight error grows little (under 2% in the tests), but on SmolLM2 perplexity rose
    by about 1 point in one of two measurements, so float16 stays the default.
    Rounding twice gives the same codes: the largest scale maps to exactly +-127.
    """
    peak = scale.float().abs().amax(dim=-1, keepdim=True)
    row = torch.where(peak > 0, peak / 127.0, torch.ones_like(peak)).half()
    codes = torch.clamp(torch.round(scale.float() / row.float()), -127, 127)
    codes = torch.where(codes == 0, torch.sign(scale.float()) + (scale == 0).float(), codes)  # never a zero scale
    return codes.to(torch.int8), row


def pad_to_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    """Zero-pad the last dimension to a multiple of ``block``."""
    pad = -w.shape[-1] % block
    return torch.nn.functional.pad(w, (0, pad)) if pad else w


def group_params(w: torch.Tensor, fmt: WeightFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for groups of ``w`` ``(N, G, g)``, each ``(N, G)``."""
    w = w.float()
    if fmt.symmetric:
        idx = w.abs().argmax(dim=-1, keepdim=True)
        peak = torch.gather(w, -1, idx).squeeze(-1)
        scale = peak / -(fmt.levels // 2)
        scale = fmt.round_scales(torch.where(scale == 0, torch.ones_like(scale), scale))
        return scale, torch.full_like(scale, fmt.levels // 2)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = (hi - lo) / (fmt.levels - 1)
    scale = fmt.round_scales(torch.where(scale > 0, scale, torch.ones_like(scale)))
    zero = torch.clamp(torch.round(-lo / scale), 0, fmt.levels - 1)
    return scale, zero


def to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels: int) -> torch.Tensor:
    """Round to the grid; ``w`` broadcasts against ``scale``/``zero``. Float codes."""
    return torch.clamp(torch.round(w / scale) + zero, 0, levels - 1)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels: int) -> torch.Tensor:
    return (to_codes(w, scale, zero, levels) - zero) * scale


@dataclass
class QuantizedWeight:
    """Codes ``(N, blocks * block)`` (uint8, unpacked), scales and zero points ``(N, blocks)``."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    fmt: WeightFormat
    in_features: int

    @property
    def block_size(self) -> int:
        return self.codes.shape[1] // self.scales.shape[1]

    def dequantize(self) -> torch.Tensor:
        n, blocks = self.scales.shape
        codes = self.codes.float().view(n, blocks, -1)
        w = (codes - self.zeros[..., None].float()) * self.scales[..., None]
        return w.reshape(n, -1)[:, : self.in_features]


def quantize_weight(w: torch.Tensor, fmt: WeightFormat, scale: torch.Tensor | None = None,
                    zero: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest quantization of ``w`` ``(N, K)`` (optionally with given group params).

    ``scale``/``zero`` are per group ``(N, K/group)``; for ``group_size=-1`` one per row.
    """
    n, k = w.shape
    group, block = fmt.group(k), fmt.block_size(k)
    padded = pad_to_blocks(w.float(), group).view(n, -1, group)
    if scale is None:
        scale, zero = group_params(padded, fmt)
    scale = fmt.round_scales(scale)  # the codes are rounded against the scales as stored
    codes = to_codes(padded, scale[..., None], zero[..., None], fmt.levels).reshape(n, -1)
    codes = pad_to_blocks(codes[:, :k], block)  # MatMulNBits ignores codes past K
    if group == k:  # per channel: the row's scale repeated over every storage block
        blocks = codes.shape[1] // block
        scale, zero = scale.expand(n, blocks), zero.expand(n, blocks)
    return QuantizedWeight(codes.to(torch.uint8), scale.contiguous(), zero.to(torch.uint8), fmt, k)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``(N, M)`` to bytes: two 4-bit codes per byte, low nibble first."""
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    if codes.shape[1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`, keeping the first ``count`` codes of each row."""
    if bits == 8:
        return packed[..., :count]
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)[..., :count]


def quantize_activation_params(lo: float, hi: float, symmetric: bool) -> tuple[float, int]:
    """Per-tensor int8 activation scale and zero point for the range ``[lo, hi]``.

    Asymmetric: uint8 codes with a zero point; symmetric: int8 codes, zero point 0. The
    range always holds 0, so zero-padding and ReLU outputs stay exact.
    """
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        peak = max(-lo, hi)
        return (peak / 127.0 if peak > 0 else 1.0), 0
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    return scale, int(min(max(round(-lo / scale), 0), 255))
