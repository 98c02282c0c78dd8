"""The optional verification pass (``augment run --verify``): ask the LLM whether an accepted
variant still means what its labels say.

Index consistency (augment/parse.py) guarantees that every entity kept its index and type label
and every placeholder survived, not that the sentence still makes sense of them: a context
rewrite can put a place where a date belongs (``arrested on <mask1>`` with ``<mask1>`` a
location), or drop the clause that stated a relation. With ``--verify`` each accepted variant is
written out as a plain sentence (a mention variant in the source's context, a context variant
with the source's mentions: the ``mention`` and ``context`` records synthesis builds from it) and
the LLM answers yes or no, one question a request: first whether the sentence makes sense with
every name used as what it is, then, for each relation of the source, whether the sentence
clearly states it. The source sentence is asked the same questions, and a variant is rejected as
``failed_verification`` when it gets a "no" to a question its source got a "yes" to: CoNLL04
annotates relations a sentence only implies ("Venezuela 's negotiator X" is Live_In), and a
strict reader denies those for the source and every rewrite of it alike, which says nothing about
the rewrite. An answer that is neither yes nor no rejects nothing (the pass removes what the LLM
clearly denies). Records crossing two verified variants are not asked about: each half was
checked in a real sentence.

Pure functions here; the runner sends the requests and journals the answers like any other.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from anchoralign.schema import Sample
from anchoralign.tokenize import detokenize
from augment.prompts import LabelMeta, PromptTemplate

DEFAULT_VERIFY_PROMPT = "verify_question.v1"
LAST_LINE = "Question: {{question}}"  # the question comes after the sentence (see the template)
REASON = "failed_verification"
REASON_TEXT = (
    "--verify: the LLM answered that the variant no longer makes sense of its names or no longer "
    "states a relation (that its source was said to state)"
)
SENSE_QUESTION = (
    "Does this sentence make sense as written, with every name used as the kind of thing it is "
    "(a place as a place, a person as a person, a date as a date)?"
)
ANSWER_TOKENS = 4  # "yes" or "no", and room for a full stop

_ANSWER = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)


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


def relation_phrase(label: str, descriptions: Mapping[str, str]) -> str:
    """The relation as words between two names: the head of its description ("works for, a person
    is employed by an organization" -> "works for"), with "is" before a phrase that does not
    start with a verb ("located in" -> "is located in"; "killed" stays). Without a description,
    the label with its underscores as spaces."""
    head = descriptions.get(label, "").split(",")[0].strip() or label.replace("_", " ")
    words = head.split()
    first = words[0].lower() if words else ""
    verb = (first.endswith("s") and not first.endswith("ss")) or (len(words) == 1 and first.endswith("ed"))
    return head if verb else f"is {head}"


def questions(sample: Sample, meta: LabelMeta, language: str) -> list[str]:
    """The sense question, then one question per relation, in index order."""

    def mention(i: int) -> str:
        e = sample.entities[i]
        return '"' + detokenize(sample.tokens[e.start : e.end], language) + '"'

    return [SENSE_QUESTION] + [
        f"Does the sentence clearly state that {mention(r.head)} "
        f"{relation_phrase(r.type, meta.relation_types)} {mention(r.tail)}?"
        for r in sample.relations
    ]


def verify_messages(
    template: PromptTemplate, sample: Sample, question: str, language: str
) -> list[dict[str, str]]:
    values = {"question": question, "sentence": detokenize(sample.tokens, language)}
    return template.render(values, language)


def parse_verdict(text: str | None) -> bool | None:
    """Yes (True), no (False), or no clear answer (None): the answer's first word decides."""
    m = _ANSWER.match(text or "")
    return None if m is None else m.group(1).lower() == "yes"


def denied(verdicts: list[bool | None], qs: list[str]) -> str | None:
    """The rejection detail when any question was answered no, else None."""
    noes = [q for v, q in zip(verdicts, qs, strict=True) if v is False]
    if not noes:
        return None
    return "answered no to: " + " | ".join(noes)
