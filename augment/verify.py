"""The optional verification pass (``augment run --verify``): ask the LLM whether an accepted
variant still means what its labels say.

Index consistency (augment/parse.py) guarantees that every entity kept its index and type label
and every placeholder survived, not that the sentence still makes sense of them: a context
rewrite can put a place where a person belongs (``<mask2> is the great-grandson of ...`` with
``<mask2>`` a location), or drop the clause that stated a relation. With ``--verify`` each
accepted variant is written out as a plain sentence (a mention variant in the source's context, a
context variant with the source's mentions: exactly the ``mention`` and ``context`` records
synthesis builds from it) and the LLM answers yes or no to one question per entity ("is X a
<type> here?") and one per relation ("does the sentence say that X <relation> Y?"), all in one
request. A variant with any "no" is rejected as ``failed_verification``; a question left without a
clear answer does not reject it (the pass removes what the LLM clearly denies). Records crossing
two verified variants are not asked about: each half was checked in a real sentence.

Pure functions here; the runner sends the requests and journals the answers like any other.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from anchoralign.schema import Sample
from anchoralign.tokenize import detokenize
from augment.prompts import LabelMeta, PromptTemplate

DEFAULT_VERIFY_PROMPT = "verify_variant.v1"
REASON = "failed_verification"
REASON_TEXT = "--verify: the LLM answered that an entity no longer plays its type's part or a relation is no longer stated"

_ANSWER = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)
_NUMBERED = re.compile(r"^\s*(\d{1,3})\s*[.):]\s*(.*)$")


@dataclass(frozen=True)
class Labels:
    """The label descriptions the questions use (a picklable stand-in for the dataset meta)."""

    language: str
    entity_types: dict[str, str]
    relation_types: dict[str, str]

    @classmethod
    def of(cls, meta: LabelMeta) -> Labels:
        return cls(str(meta.language), dict(meta.entity_types), dict(meta.relation_types))


@dataclass(frozen=True)
class VariantCheck:
    """One accepted variant to verify: ``kind`` and its 0-based position among the accepted
    variants of that kind, and the sentence it makes with the source's other half."""

    kind: str
    index: int
    sample: Sample
    text: str  # the variant line as the LLM wrote it


def _article(label: str) -> str:
    return "an" if label[:1].lower() in "aeiou" else "a"


def _described(label: str, descriptions: Mapping[str, str]) -> str:
    desc = descriptions.get(label, "")
    return f"{label} ({desc})" if desc and desc != label else label


def questions(sample: Sample, meta: LabelMeta, language: str) -> list[str]:
    """One question per entity (its type), then one per relation, in index order."""

    def mention(i: int) -> str:
        e = sample.entities[i]
        return '"' + detokenize(sample.tokens[e.start : e.end], language) + '"'

    out = [
        f"In this sentence, is {mention(i)} {_article(e.type)} {_described(e.type, meta.entity_types)}?"
        for i, e in enumerate(sample.entities)
    ]
    out += [
        f"Does the sentence say that {mention(r.head)} {_described(r.type, meta.relation_types)} {mention(r.tail)}?"
        for r in sample.relations
    ]
    return out


def verify_messages(
    template: PromptTemplate, sample: Sample, meta: LabelMeta, language: str
) -> list[dict[str, str]]:
    qs = questions(sample, meta, language)
    values = {
        "questions": "\n".join(f"{n}. {q}" for n, q in enumerate(qs, start=1)),
        "count": str(len(qs)),
        "sentence": detokenize(sample.tokens, language),
    }
    return template.render(values, language)


def answer_budget(n_questions: int) -> int:
    """``max_tokens`` for the answer: "12. yes" is about four tokens; some slack for chatter."""
    return 6 * n_questions + 16


def parse_verdicts(text: str | None, n_questions: int) -> list[bool | None]:
    """Yes (True), no (False) or no clear answer (None) for questions 1..n.

    Numbered lines are matched by their number; if no line is numbered, the yes/no lines are
    taken in order. Anything after the yes/no on a line (an explanation) is ignored."""
    verdicts: list[bool | None] = [None] * n_questions
    if not text:
        return verdicts
    lines = [ln for ln in text.splitlines() if ln.strip()]
    numbered = [(int(m.group(1)), m.group(2)) for ln in lines if (m := _NUMBERED.match(ln))]
    pairs = numbered if numbered else list(enumerate(lines, start=1))
    for number, rest in pairs:
        m = _ANSWER.match(rest)
        if m and 1 <= number <= n_questions and verdicts[number - 1] is None:
            verdicts[number - 1] = m.group(1).lower() == "yes"
    return verdicts


def denied(verdicts: list[bool | None], qs: list[str]) -> str | None:
    """The rejection detail when any question was answered no, else None."""
    noes = [f"{n}. {q}" for n, (v, q) in enumerate(zip(verdicts, qs, strict=True), start=1) if v is False]
    if not noes:
        return None
    return "answered no to: " + " | ".join(noes)
