"""The plan of a run: the sources in their seeded order, each source's two requests, and the
pure pieces of selection (the prefix that reaches the cap, round-robin over its sources).

Nothing here touches the network; ``augment run --dry-run`` shows a plan without sending.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, TypeVar

from anchoralign.datasets import get_meta, load_split
from anchoralign.errors import UserError
from anchoralign.schema import Relation, Sample
from augment.config import AugmentConfig
from augment.journal import request_key
from augment.processing import Outcome, SourceResult, process_source
from augment.prompts import (
    DEFAULT_CONTEXT_PROMPT,
    DEFAULT_MENTION_PROMPT,
    PromptSet,
    eligibility,
    position_order,
)
from augment.synthesize import sentence_key

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Pure pieces: entity order, prefix, selection


def by_position(sample: Sample) -> Sample:
    """The sample with its entities in position order and relations re-pointed accordingly."""
    order = position_order(sample)
    if order == list(range(len(order))):
        return sample
    new_index = {old: new for new, old in enumerate(order)}
    return Sample(
        id=sample.id,
        tokens=sample.tokens,
        entities=[sample.entities[i] for i in order],
        relations=[
            Relation(head=new_index[r.head], tail=new_index[r.tail], type=r.type) for r in sample.relations
        ],
        source_id=sample.source_id,
        origin=sample.origin,
    )


def prefix_for_cap(yields: list[int], cap: int) -> int:
    """Length of the shortest prefix of ``yields`` summing to at least ``cap`` (all if none)."""
    total = 0
    for n, y in enumerate(yields, start=1):
        total += y
        if total >= cap:
            return n
    return len(yields)


def select_round_robin(groups: list[tuple[str, list[T]]], cap: int, seed: int) -> list[T]:
    """Up to ``cap`` samples, one per group per round in group order; within a group in an order
    seeded by (seed, group id), so a group's choice does not depend on the other groups."""
    queues = []
    for gid, samples in groups:
        shuffled = list(samples)
        random.Random(f"{seed}:{gid}").shuffle(shuffled)
        queues.append(shuffled)
    chosen: list[T] = []
    depth = 0
    while len(chosen) < cap:
        took = False
        for q in queues:
            if depth < len(q):
                chosen.append(q[depth])
                took = True
                if len(chosen) == cap:
                    break
        if not took:
            break
        depth += 1
    return chosen


# --------------------------------------------------------------------------------------------
# Plan


@dataclass(frozen=True)
class RequestSpec:
    key: str
    source_id: str
    kind: str
    messages: list[dict[str, str]]


@dataclass
class Plan:
    cfg: AugmentConfig  # resolved
    meta: Any  # anchoralign.datasets.DatasetMeta
    sources: list[Sample]  # file order, entities in position order when eligible
    skipped: dict[int, str]  # source index -> skip reason
    order: list[int]  # eligible source indices, in the seeded order
    forbidden: set[str]  # sentence keys of the other splits
    prompts: PromptSet

    @property
    def language(self) -> str:
        return str(self.meta.language)

    @property
    def sampling(self) -> dict[str, Any]:
        return {"temperature": self.cfg.temperature, "max_tokens": self.cfg.max_tokens}

    def requests(self, index: int) -> tuple[RequestSpec, RequestSpec]:
        src = self.sources[index]
        k = self.cfg.variants
        model = self.cfg.model or ""
        specs = []
        for kind, build, version in (
            ("mention", self.prompts.mention_messages, self.prompts.mention_version),
            ("context", self.prompts.context_messages, self.prompts.context_version),
        ):
            messages = build(src, self.meta, k, self.language)
            specs.append(
                RequestSpec(request_key(model, messages, self.sampling, version), src.id, kind, messages)
            )
        return specs[0], specs[1]

    def process(self, index: int, outcomes: dict[str, Outcome]) -> SourceResult:
        """:func:`process_source` for source ``index`` with this plan's settings (in-process)."""
        return process_source(self.sources[index], outcomes, self.cfg.variants, self.language, self.forbidden)

    @property
    def max_requests(self) -> int:
        n = len(self.order) if self.cfg.max_sources is None else min(len(self.order), self.cfg.max_sources)
        return 2 * n


def make_plan(cfg: AugmentConfig) -> Plan:
    """Load the data and fix the order of work (no network). ``cfg`` must be resolved."""
    meta = get_meta(cfg.dataset, cfg.data_dir)
    if cfg.split not in meta.splits:
        raise UserError(
            f"dataset {meta.name!r} has no split {cfg.split!r} (splits: {', '.join(meta.splits)})"
        )
    if meta.folds and cfg.fold is None:
        raise UserError(
            f"dataset {meta.name!r} is cross-validated: choose a fold with --fold 0..{meta.folds - 1}"
        )
    fold = cfg.fold if meta.folds else None
    raw = load_split(cfg.dataset, cfg.split, cfg.data_dir, fold=fold)
    if not raw:
        raise UserError(f"dataset {meta.name!r} split {cfg.split!r} has no sentences")
    seen: dict[str, int] = {}
    for i, s in enumerate(raw):
        if s.id in seen:
            raise UserError(
                f"dataset {meta.name!r} split {cfg.split!r}: sentences {seen[s.id]} and {i} share the id {s.id!r}"
            )
        seen[s.id] = i
    sources, skipped = [], {}
    for i, s in enumerate(raw):
        reason = eligibility(s)
        if reason is None:
            sources.append(by_position(s))
        else:
            skipped[i] = reason
            sources.append(s)
    order = [i for i in range(len(sources)) if i not in skipped]
    random.Random(cfg.seed).shuffle(order)
    forbidden: set[str] = set()
    for split in meta.splits:
        if split != cfg.split:
            forbidden.update(
                sentence_key(s.tokens) for s in load_split(cfg.dataset, split, cfg.data_dir, fold=fold)
            )
    prompts = PromptSet(
        cfg.mention_prompt or DEFAULT_MENTION_PROMPT, cfg.context_prompt or DEFAULT_CONTEXT_PROMPT
    )
    return Plan(cfg, meta, sources, skipped, order, forbidden, prompts)
