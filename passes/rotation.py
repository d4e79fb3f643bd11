"""Orthogonal matrices for ``rotate_residual``: randomized Hadamard where one exists, else random.

A Hadamard matrix spreads any one channel evenly over all channels (every entry is
``+-1/sqrt(n)``), which is what flattens activation outliers; random signs on top keep it
from lining up with structure in the weights (QuaRot, Ashkboos et al. 2024). Orders built
here: ``2^k``, ``12 * 2^k``, ``20 * 2^k`` and their products (576 = 12 * 12 * 4, 1536 = 12 *
128), from Sylvester's doubling and Paley's construction for primes 11 and 19.
"""
from __future__ import annotations

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
    h = torch.ones(1, 1, dtype=torch.float64)
    rest = n
    for q in _PALEY_PRIMES:
        while rest % (q + 1) == 0:
            h, rest = torch.kron(h, paley(q)), rest // (q + 1)
    while rest % 2 == 0:
        h, rest = torch.kron(h, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)), rest // 2
    return h if rest == 1 else None


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
            out.append(hadamard(size))
            size = 1
    return out if rest == 1 and out else None


def kron_apply(x: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """``x @ kron(*factors)`` along the last axis, one small matmul per factor (n * sum(sizes)
    multiply-adds per row instead of n^2)."""
    shape = x.shape
    x = x.reshape(*shape[:-1], *(f.shape[0] for f in factors))
    axes = len(factors)
    for i, f in enumerate(factors):
        x = (x.movedim(i - axes, -1) @ f).movedim(-1, i - axes)
    return x.reshape(shape)


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
