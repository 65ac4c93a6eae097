"""Reuse plans: parsing, validation, and the slabs a plan needs."""

from __future__ import annotations

import pytest

from cachesvc.wire.keys import Kind
from cachesvc_connectors.reuse.plan import Plan


def test_parse_forms_and_describe_round_trip():
    assert Plan.parse("[20,26)", 30).groups == ((20, 26),)
    assert Plan.parse("2-4, 10-12", 30).groups == ((2, 4), (10, 12))
    assert Plan.parse("none", 30) == Plan.full_reuse(30)
    plan = Plan(30, ((0, 2), (20, 26)))
    assert Plan.parse(plan.describe(), 30) == plan
    with pytest.raises(ValueError, match="not a plan"):
        Plan.parse("the upper layers", 30)


@pytest.mark.parametrize("groups", [((5, 3),), ((0, 4), (3, 6)), ((28, 31),), ((4, 6), (0, 2))])
def test_groups_must_be_sorted_disjoint_and_inside(groups):
    with pytest.raises(ValueError, match="sorted, disjoint and inside"):
        Plan(30, groups)


def test_needs_kv_outside_groups_and_e_at_group_starts():
    plan = Plan(6, ((1, 3), (4, 5)))
    assert plan.reused_ranges() == [(0, 1), (3, 4), (5, 6)]
    assert plan.needs() == {Kind.K: (0, 3, 5), Kind.V: (0, 3, 5), Kind.E: (1, 4)}
    assert plan.recomputed_layers == 3 and plan.group_at(2) == (1, 3) and plan.group_at(3) is None
    assert Plan.recompute_all(6).needs() == {Kind.K: (), Kind.V: (), Kind.E: (0,)}
    assert Plan.full_reuse(6).needs()[Kind.E] == ()
