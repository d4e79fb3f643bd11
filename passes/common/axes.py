"""Channel axes: which tensor dimensions of a traced graph must be cut together.

Every concrete dimension (size > 1) of every tensor in the graph gets an :class:`Atom`.
Ops couple atoms: a linear ties its input's last dimension to its weight's columns, an add
ties its operands' dimensions, a ``view`` that splits 576 into 9 x 64 *defines* the 576
atom as the product ``Prod(9, 64)``, a ``cat`` defines the output's atom as ``Cat(a, b)``.
Union-find with definitions keeps the result small: after the whole graph is read, each
parameter dimension is a layout (an atom, a product or a concatenation of atoms), and
removing index ``i`` of an atom means removing the matching slices in every layout that
holds it. That is all structured pruning needs: attention heads appear as the major factor
of ``Prod(heads, head_dim)``, GQA as ``Prod(kv_heads, q_per_kv, head_dim)`` (the factor
created by ``repeat_kv``'s expand), rotary's half rotation as ``Cat(x, x)``.

Atoms that meet something this module cannot follow are *frozen* with a reason and left
alone, never cut wrongly.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(eq=False)
class Atom:
    size: int
    id: int

    def __repr__(self) -> str:
        return f"a{self.id}[{self.size}]"


@dataclass(frozen=True)
class Prod:
    """Row-major product: index = ((i0 * s1) + i1) * s2 + i2 ..."""

    parts: tuple

    @property
    def size(self) -> int:
        n = 1
        for p in self.parts:
            n *= p.size
        return n


@dataclass(frozen=True)
class Cat:
    parts: tuple

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts)


Layout = Atom | Prod | Cat | None  # None: a free dimension (batch, sequence, size 1)


def prod(parts) -> Layout:
    parts = tuple(p for p in parts if p is not None)
    return None if not parts else parts[0] if len(parts) == 1 else Prod(parts)


def cat(parts) -> Layout:
    parts = tuple(parts)
    return parts[0] if len(parts) == 1 else Cat(parts)


class Axes:
    """Union-find over atoms, with definitions (an atom equal to a product or concatenation)."""

    def __init__(self) -> None:
        self._parent: dict[int, Atom] = {}
        self._definition: dict[int, Layout] = {}
        self.frozen: dict[int, str] = {}
        self._count = 0

    def new(self, size) -> Atom | None:
        if not isinstance(size, int) or size <= 1:
            return None
        self._count += 1
        atom = Atom(size, self._count)
        self._parent[atom.id] = atom
        return atom

    def unit(self, reason: str) -> Atom:
        """A one-position atom, frozen: a size-1 part of a concatenation, to keep its place."""
        self._count += 1
        atom = Atom(1, self._count)
        self._parent[atom.id] = atom
        self.frozen[atom.id] = reason
        return atom

    def find(self, a: Atom) -> Atom:
        root = a
        while self._parent[root.id] is not root:
            root = self._parent[root.id]
        while self._parent[a.id] is not root:  # path compression
            a, self._parent[a.id] = self._parent[a.id], root
        return root

    def expand(self, layout: Layout) -> Layout:
        """The layout in terms of undefined root atoms, products flattened."""
        if layout is None:
            return None
        if isinstance(layout, Atom):
            root = self.find(layout)
            d = self._definition.get(root.id)
            return root if d is None else self.expand(d)
        parts = [self.expand(p) for p in layout.parts]
        if isinstance(layout, Prod):
            flat: list = []
            for p in parts:
                flat += list(p.parts) if isinstance(p, Prod) else [p]
            return prod(flat)
        return cat(parts)

    def atoms(self, layout: Layout) -> Iterator[Atom]:
        layout = self.expand(layout)
        if isinstance(layout, Atom):
            yield layout
        elif layout is not None:
            for p in layout.parts:
                yield from self.atoms(p)

    def freeze(self, layout: Layout, reason: str) -> None:
        for a in self.atoms(layout):
            self.frozen.setdefault(a.id, reason)

    def frozen_reason(self, atom: Atom) -> str | None:
        return self.frozen.get(self.find(atom).id)

    # --- coupling ---------------------------------------------------------
    def unify(self, x: Layout, y: Layout, why: str = "") -> None:
        if x is None or y is None:
            return
        x, y = self.expand(x), self.expand(y)
        if x.size != y.size:
            self.freeze(x, f"size mismatch at {why}")
            self.freeze(y, f"size mismatch at {why}")
        elif isinstance(x, Atom) and isinstance(y, Atom):
            self._union(x, y)
        elif isinstance(x, Atom) or isinstance(y, Atom):
            atom, other = (x, y) if isinstance(x, Atom) else (y, x)
            if any(a is atom for a in self.atoms(other)):
                self.freeze(other, f"self-referencing layout at {why}")
            else:
                self._definition[atom.id] = other
                if atom.id in self.frozen:  # the parts inherit the whole's reason
                    self.freeze(other, self.frozen[atom.id])
        elif isinstance(x, Prod) and isinstance(y, Prod):
            self._align(list(x.parts), list(y.parts), why)
        elif isinstance(x, Cat) and isinstance(y, Cat):
            self._align_cat(_flat_parts(x), _flat_parts(y), why)
        else:
            self.freeze(x, f"incompatible split and concatenation at {why}")
            self.freeze(y, f"incompatible split and concatenation at {why}")

    def _union(self, a: Atom, b: Atom) -> None:
        if a is b:
            return
        reason = self.frozen.get(a.id) or self.frozen.get(b.id)
        self._parent[b.id] = a
        if reason:
            self.frozen[a.id] = reason

    def _align(self, xs: list, ys: list, why: str) -> None:
        """Unify two products factor by factor, splitting an atom where one side is finer."""
        while xs and ys:
            a, b = xs[0], ys[0]
            if a.size == b.size:
                self.unify(a, b, why)
                xs.pop(0), ys.pop(0)
            elif isinstance(a, Atom) and a.size % b.size == 0:
                xs[0:1] = self._split(a, b.size)
            elif isinstance(b, Atom) and b.size % a.size == 0:
                ys[0:1] = self._split(b, a.size)
            else:
                self.freeze(prod(xs), f"unaligned reshape at {why}")
                self.freeze(prod(ys), f"unaligned reshape at {why}")
                return

    def _align_cat(self, xs: list, ys: list, why: str) -> None:
        """Unify two concatenations part by part, cutting an atom where the other side has a
        boundary inside it (q | k | v sliced off a fused projection one piece at a time)."""
        while xs and ys:
            a, b = xs[0], ys[0]
            if a.size == b.size:
                self.unify(a, b, why)
                xs.pop(0), ys.pop(0)
            elif isinstance(a, Atom) and a.size > b.size and self._cut(a, b.size):
                xs[0:1] = list(self.expand(a).parts)
            elif isinstance(b, Atom) and b.size > a.size and self._cut(b, a.size):
                ys[0:1] = list(self.expand(b).parts)
            else:
                self.freeze(cat(xs), f"incompatible split and concatenation at {why}")
                self.freeze(cat(ys), f"incompatible split and concatenation at {why}")
                return

    def _cut(self, atom: Atom, first: int) -> bool:
        """Define ``atom`` as the concatenation of two new atoms, the first ``first`` long."""
        parts = [self.new(first), self.new(atom.size - first)]
        if None in parts:  # a part of one position has no atom to stand for it
            return False
        self._definition[atom.id] = Cat(tuple(parts))
        if atom.id in self.frozen:
            self.freeze(Cat(tuple(parts)), self.frozen[atom.id])
        return True

    def _split(self, atom: Atom, major: int) -> list[Atom]:
        parts = [self.new(major), self.new(atom.size // major)]
        self._definition[atom.id] = prod(parts)
        if atom.id in self.frozen:
            self.freeze(prod(parts), self.frozen[atom.id])
        return [p for p in parts if p is not None]


def _flat_parts(layout: Cat) -> list:
    out = []
    for p in layout.parts:
        out += _flat_parts(p) if isinstance(p, Cat) else [p]
    return out


def concrete(d) -> int | None:
    """The size as an int, or None where it is symbolic (dynamic batch or sequence)."""
    if isinstance(d, int):
        return d
    expr = getattr(getattr(d, "node", None), "expr", None)
    return int(expr) if expr is not None and expr.is_number else None


def shape_of(node) -> tuple | None:
    val = node.meta.get("val") if hasattr(node, "meta") else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None
