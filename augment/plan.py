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
    PromptTemplate,
    eligibility,
    position_order,
)
from augment.synthesize import sentence_key
from augment.verify import (
    ANSWER_TOKENS,
    DEFAULT_VERIFY_PROMPT,
    Labels,
    VariantCheck,
    questions,
    verify_messages,
)
from augment.verify import LAST_LINE as VERIFY_LAST_LINE

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


def answer_budget(sentence: str, k: int) -> int:
    """``max_tokens`` for an answer of ``k`` variants of ``sentence`` (the prompt's last line).

    A variant is about as long as the sentence it rewrites. Tokens per character of the marked-up
    CoNLL04 and SciERC lines measured 0.31 (mention) and 0.33 (context) on average and at most
    0.56 with the Qwen2.5 tokenizer, so half a token a character plus a line number and some
    slack lets a faithful answer through whole, while an answer that runs on (repeating itself,
    adding notes) is cut near where a good one would have ended rather than at a fixed length
    that is too short for long sentences and far too long for short ones."""
    return k * (len(sentence) // 2 + 12) + 16


@dataclass(frozen=True)
class RequestSpec:
    key: str
    source_id: str
    kind: str
    messages: list[dict[str, str]]
    max_tokens: int | None = None  # None: the client's setting
    temperature: float | None = None  # None: the client's setting


@dataclass
class Plan:
    cfg: AugmentConfig  # resolved
    meta: Any  # anchoralign.datasets.DatasetMeta
    sources: list[Sample]  # file order, entities in position order when eligible
    skipped: dict[int, str]  # source index -> skip reason
    order: list[int]  # eligible source indices, in the seeded order
    forbidden: set[str]  # sentence keys of the other splits
    prompts: PromptSet
    verify_template: PromptTemplate | None = None  # set when cfg.verify

    @property
    def labels(self) -> Labels | None:
        """What the processing child needs to verify, or None when the run does not verify."""
        return Labels.of(self.meta) if self.verify_template is not None else None

    @property
    def language(self) -> str:
        return str(self.meta.language)

    def max_tokens(self, messages: list[dict[str, str]]) -> int:
        if self.cfg.max_tokens != "auto":
            return int(self.cfg.max_tokens)
        last_line = messages[-1]["content"].rstrip().rsplit("\n", 1)[-1]
        return answer_budget(last_line, self.cfg.variants)

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
            max_tokens = self.max_tokens(messages)
            # The sampling parameters are part of the request key (they shape the answer).
            sampling = {"temperature": self.cfg.temperature, "max_tokens": max_tokens}
            key = request_key(model, messages, sampling, version)
            specs.append(RequestSpec(key, src.id, kind, messages, max_tokens))
        return specs[0], specs[1]

    def verify_requests(self, checks: list[VariantCheck]) -> list[tuple[tuple[str, int, int], RequestSpec]]:
        """The verification requests of the accepted variants: one per question, keyed by
        (kind, index, question number)."""
        assert self.verify_template is not None
        out = []
        for c in checks:
            for q, question in enumerate(questions(c.sample, self.meta, self.language)):
                messages = verify_messages(self.verify_template, c.sample, question, self.language)
                # Greedy: a check should give the same verdict every time it is asked.
                sampling = {"temperature": 0.0, "max_tokens": ANSWER_TOKENS}
                key = request_key(self.cfg.model or "", messages, sampling, self.verify_template.name)
                source_id = c.sample.source_id or c.sample.id  # the source itself has no source_id
                spec = RequestSpec(key, source_id, "verify", messages, ANSWER_TOKENS, 0.0)
                out.append(((c.kind, c.index, q), spec))
        return out

    def process(
        self, index: int, outcomes: dict[str, Outcome], journal: dict[str, Any] | None = None
    ) -> SourceResult:
        """:func:`process_source` for source ``index`` with this plan's settings (in-process).
        With --verify, the verdicts are looked up in ``journal`` (by request key); a check not
        journalled leaves the source awaiting verification."""
        src = self.sources[index]
        args = (src, outcomes, self.cfg.variants, self.language, self.forbidden, self.labels)
        result = process_source(*args)
        if not result.awaiting_verification or journal is None:
            return result
        specs = self.verify_requests(result.checks or [])
        if not all(spec.key in journal for _, spec in specs):
            return result
        return process_source(*args, {tag: journal[spec.key] for tag, spec in specs})

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
    verify = (
        PromptTemplate.load(cfg.verify_prompt or DEFAULT_VERIFY_PROMPT, last_line=VERIFY_LAST_LINE)
        if cfg.verify
        else None
    )
    return Plan(cfg, meta, sources, skipped, order, forbidden, prompts, verify)
