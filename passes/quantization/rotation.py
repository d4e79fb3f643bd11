"""Orthogonal matrices for ``rotate_residual``: randomized Hadamard where one exists, else random.

A Hadamard matrix spreads any one channel evenly over all channels (every entry is
``+-1/sqrt(n)``), which is what flattens activation outliers; random signs on top keep it
from lining up with structure in the weights (QuaRot, Ashkboos et al. 2024). Orders built
here: ``2^k``, ``12 * 2^k``, ``20 * 2^k`` and their products (576 = 12 * 12 * 4, 1536 = 12 *
128), from Sylvester's doubling and Paley's construction for primes 11 and 19.
"""
from __future__ import annotations

import math

import torch

_PALEY_PRIMES = (11, 19)  # q = 3 mod 4 gives a Hadamard matrix of order q + 1


def paley(q: int) -> torch.Tensor:
    """Paley construction I: a Hadamard matrix of order ``q + 1`` for a prime ``q = 3 mod 4``."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if d in squares else -1 for d in range(1, q)], dtype=torch.float64)
    jacobsthal = torch.stack([chi.roll(i) for i in range(q)])  # entry (i, j) = chi(j - i)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jacobsthal
    return s + torch.eye(q + 1, dtype=torch.float64)


def hadamard(n: int) -> torch.Tensor | None:
    """An unnormalized Hadamard matrix of order ``n`` (float64), or None if not built here."""
    factors = [torch.ones(1, 1, dtype=torch.float64)] if n == 1 else hadamard_factors(n)
    return None if factors is None else _kron(factors)


def _sylvester(size: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def hadamard_factors(n: int) -> list[torch.Tensor] | None:
    """Small Hadamard matrices whose Kronecker product has order ``n`` (each at most 32), or None."""
    out, rest = [], n
    for q in _PALEY_PRIMES:
        while rest % (q + 1) == 0:
            out.append(paley(q))
            rest //= q + 1
    size = 1
    while rest % 2 == 0:
        size, rest = size * 2, rest // 2
        if size == 32 or rest % 2:
            out.append(_sylvester(size))
            size = 1
    return out if rest == 1 and out else None


def kron_split(factors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors as two Kronecker products ``(left, right)`` of sizes as close as possible."""
    best = None
    for mask in range(1 << len(factors)):
        left = [f for i, f in enumerate(factors) if mask >> i & 1]
        right = [f for i, f in enumerate(factors) if not mask >> i & 1]
        a = math.prod(f.shape[0] for f in left)
        b = math.prod(f.shape[0] for f in right)
        if best is None or a + b < best[0]:
            best = (a + b, left, right)
    return _kron(best[1]), _kron(best[2])


def _kron(factors: list[torch.Tensor]) -> torch.Tensor:
    out = torch.ones(1, 1, dtype=torch.float64)
    for f in factors:
        out = torch.kron(out, f)
    return out


def kron_apply(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``x @ kron(left, right)`` along the last axis as ``left^T X right`` on ``X = x`` viewed
    ``(a, b)``: two small matmuls, ``a + b`` multiply-adds per element instead of ``a * b``."""
    shape = x.shape
    x = x.reshape(*shape[:-1], left.shape[0], right.shape[0])
    return (left.t() @ x @ right).reshape(shape)


def random_orthogonal(n: int, seed: int, kind: str = "hadamard") -> torch.Tensor:
    """An ``n x n`` orthogonal matrix (float64): randomized Hadamard if ``kind`` asks and one
    exists, else the Q factor of a Gaussian matrix."""
    gen = torch.Generator().manual_seed(seed)
    h = hadamard(n) if kind == "hadamard" else None
    if h is not None:
        signs = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
        return signs[:, None] * h / n ** 0.5
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]
