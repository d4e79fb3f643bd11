"""Channel axes: products, concatenations, freezing, and the unit labels groups are cut by."""
import torch

from presso.passes.common.axes import Atom, Axes, Cat, Prod
from presso.passes.common.dep_groups import unit_labels


def test_an_atom_split_by_a_view_becomes_a_product_and_stays_consistent():
    axes = Axes()
    hidden, heads, head_dim = axes.new(12), axes.new(3), axes.new(4)
    axes.unify(hidden, Prod((heads, head_dim)))
    assert axes.expand(hidden) == Prod((heads, head_dim))
    other = axes.new(12)
    axes.unify(other, hidden)  # another tensor with the same dimension shares the split
    assert axes.expand(other) == Prod((heads, head_dim))


def test_products_of_different_factorings_are_refined_to_common_factors():
    axes = Axes()
    q_heads, head_dim = axes.new(6), axes.new(4)  # 6 query heads
    kv, rep, kv_dim = axes.new(2), axes.new(3), axes.new(4)  # 2 kv heads, 3 queries each
    axes.unify(Prod((q_heads, head_dim)), Prod((Prod((kv, rep)), kv_dim)))
    assert axes.expand(Prod((q_heads, head_dim))) == axes.expand(Prod((kv, rep, kv_dim)))
    assert [p.size for p in axes.expand(q_heads).parts] == [2, 3]


def test_concatenations_unify_part_by_part_and_rotary_halves_share_one_atom():
    axes = Axes()
    d, x1, x2 = axes.new(8), axes.new(4), axes.new(4)
    axes.unify(d, Cat((x1, x2)))
    axes.unify(d, Cat((x2, x1)))  # rotate_half: cat(-x2, x1) added to x
    assert axes.find(x1) is axes.find(x2)


def test_mismatched_sizes_and_unaligned_splits_freeze_instead_of_guessing():
    axes = Axes()
    a, b = axes.new(6), axes.new(8)
    axes.unify(a, b, "op")
    assert axes.frozen_reason(a) and axes.frozen_reason(b)
    c, d, e, f = axes.new(6), axes.new(4), axes.new(4), axes.new(6)
    axes.unify(Prod((c, d)), Prod((e, f)), "reshape")
    assert all(axes.frozen_reason(x) for x in (c, d, e, f))
    g, h, i = axes.new(8), axes.new(4), axes.new(4)
    axes.unify(Prod((axes.new(2), g)), Cat((h, i, axes.new(8))), "mixed")
    assert axes.frozen_reason(g)


def test_a_frozen_atom_stays_frozen_after_a_split_or_union():
    axes = Axes()
    a = axes.new(12)
    axes.freeze(a, "model output")
    p, q = axes.new(3), axes.new(4)
    axes.unify(a, Prod((p, q)))
    axes.unify(Prod((axes.new(6), axes.new(2))), a)
    assert all(axes.frozen_reason(x) for x in axes.atoms(a))


def test_sizes_of_one_and_symbolic_sizes_are_free_dimensions():
    axes = Axes()
    assert axes.new(1) is None and axes.new(None) is None
    axes.unify(None, axes.new(5))  # nothing to couple


def test_unit_labels_of_gqa_query_heads_and_kv_heads():
    kv, rep, hd = Atom(2, 1), Atom(3, 2), Atom(4, 3)
    q_rows = Prod((kv, rep, hd))
    labels, n = unit_labels(q_rows, (1, 2))  # query heads: (kv head, index in its group)
    assert n == 6 and labels.tolist() == [h for h in range(6) for _ in range(4)]
    labels, n = unit_labels(q_rows, (1,))  # kv heads take their whole group of query heads
    assert n == 2 and labels.tolist() == [0] * 12 + [1] * 12
    labels, n = unit_labels(Prod((kv, hd)), (1, 2))  # k_proj has no query-head factor
    assert n == 0 and (labels < 0).all()


def test_unit_labels_of_a_concatenation():
    x, y = Atom(3, 1), Atom(2, 2)
    labels, n = unit_labels(Cat((x, y, x)), (1,))
    assert n == 3 and labels.tolist() == [0, 1, 2, -1, -1, 0, 1, 2]
    assert torch.equal(unit_labels(y, (2,))[0], torch.arange(2))
