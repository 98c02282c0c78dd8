"""Source order and sample selection (augment/plan.py)."""

from __future__ import annotations

from anchoralign.schema import Entity, Relation, Sample
from augment.plan import by_position, prefix_for_cap, select_round_robin


def _sample(i: str, n: int = 1) -> Sample:
    return Sample(id=i, tokens=[f"w{i}"] * n)


def test_prefix_for_cap():
    assert prefix_for_cap([3, 0, 4, 5], 7) == 3
    assert prefix_for_cap([3, 0, 4, 5], 3) == 1
    assert prefix_for_cap([3, 0, 4, 5], 100) == 4
    assert prefix_for_cap([], 5) == 0


def test_round_robin_takes_one_per_source_per_round():
    groups = [
        ("a", [_sample("a1"), _sample("a2"), _sample("a3")]),
        ("b", [_sample("b1")]),
        ("c", [_sample("c1"), _sample("c2")]),
    ]
    picked = select_round_robin(groups, 4, seed=0)
    assert [s.id[0] for s in picked] == ["a", "b", "c", "a"]
    assert len(select_round_robin(groups, 100, seed=0)) == 6
    # A source's own choice depends on the seed and its id only, not on the other sources.
    alone = select_round_robin([groups[0]], 3, seed=0)
    assert [s.id for s in picked if s.id[0] == "a"] == [s.id for s in alone[:2]]
    orders = {tuple(s.id for s in select_round_robin([groups[0]], 3, seed=k)) for k in range(10)}
    assert len(orders) > 1


def test_by_position_sorts_entities_and_repoints_relations():
    s = Sample(
        id="x",
        tokens=["Bob", "works", "for", "Acme", "in", "Rome"],
        entities=[
            Entity(start=5, end=6, type="Loc"),
            Entity(start=0, end=1, type="Peop"),
            Entity(start=3, end=4, type="Org"),
        ],
        relations=[Relation(head=1, tail=2, type="Work_For"), Relation(head=2, tail=0, type="OrgBased_In")],
    )
    got = by_position(s)
    assert [e.type for e in got.entities] == ["Peop", "Org", "Loc"]
    assert [(r.head, r.tail, r.type) for r in got.relations] == [(0, 1, "Work_For"), (1, 2, "OrgBased_In")]
