"""The hand-made CoNLL04-like sentence the augment tests share (import it; not a conftest fixture,
so each test module states what it uses)."""

from __future__ import annotations

from anchoralign.schema import Entity, Relation, Sample


def words(text: str) -> list[str]:
    return text.split()


def conll_like() -> Sample:
    """Four entities (Peop, Org, Loc, Peop) and two relations, tokens split on spaces."""
    return Sample(
        id="s1",
        tokens=words("Sen. John Smith , who works for Acme Corp. in Boston , met Mary Jones ."),
        entities=[
            Entity(start=1, end=3, type="Peop"),
            Entity(start=7, end=9, type="Org"),
            Entity(start=10, end=11, type="Loc"),
            Entity(start=13, end=15, type="Peop"),
        ],
        relations=[Relation(head=0, tail=1, type="Work_For"), Relation(head=1, tail=2, type="OrgBased_In")],
    )
