"""The hand-made CoNLL04-like sentence the augment tests share (import it; not a conftest fixture,
so each test module states what it uses)."""

from __future__ import annotations

from pathlib import Path

from anchoralign.schema import Entity, Relation, Sample
from augment.config import AugmentConfig


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


def run_config(data: Path, url: str, out: Path, **kw) -> AugmentConfig:
    """A run against the loopback server at ``url``: small, fast retries."""
    base = dict(
        dataset="conll04",
        data_dir=str(data),
        base_url=url,
        out=str(out),
        cap=100,
        concurrency=4,
        timeout=5.0,
        max_retries=4,
        backoff=0.01,
        backoff_max=0.05,
    )
    return AugmentConfig(**{**base, **kw})
