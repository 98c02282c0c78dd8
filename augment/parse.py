"""Parsing LLM answers into variants, with strict index-consistency validation.

Pure functions: no network, no files. Every variant line of an answer ends up either accepted
(``MentionVariant`` / ``ContextVariant``) or rejected with a stable reason code from ``REASONS``
(``augment rejects --reason CODE`` filters on these codes, so they never change meaning).

Splitting an answer into variant lines (``split_variants``) tolerates formatting noise that is not
content: code fences, blank lines, markers ``1.``, ``1)``, ``(1)``, ``[1]``, ``1:``, bullets
``-``/``*``/``•`` (optionally in ``**bold**``), one pair of quotes around a whole line, and chatter:
when some lines carry a marker, lines without one are dropped; otherwise only lines ending with
``:`` ("Here are three versions:") are. A marker needs one to three digits and no digit right after
its punctuation, so a sentence starting with ``1.5 million`` or ``1984:`` is left alone.

Mention variants (entities inline as ``{"<type>": "<mention>"}``). Items are found with straight,
curly or single quotes, optional spaces, JSON escapes, or an unquoted mention. The k-th item of a
line is the k-th entity of the source *by position*, so ``MentionVariant.mentions`` is index-aligned
with ``source.entities`` whatever their order. A line is accepted only if it has as many items as
the source has entities (else ``count_mismatch``), the same type at every position (type labels
compared ignoring case; else ``order_changed`` when the types are the same multiset, ``type_changed``
otherwise), no empty mention, no markup inside a mention, the text outside the items essentially
unchanged (see ``context_edits_allowed``), at least one mention changed, and it differs from the
variants accepted before it.

Context variants (entity ``i`` as ``<mask{i}>``; ``<MASK0>``, ``<mask 0>`` and ``<mask_0>`` are read
as ``<mask0>``, other bracketings such as ``[mask0]`` are not placeholders). A line is accepted only
if it holds every placeholder of the source exactly once and no other, has no entity markup, and
differs from the source beyond case, spacing and punctuation. Placeholders may be reordered.

An answer longer than ``k`` variant lines has its first ``k`` parsed and the rest rejected as
``extra_variant``, so a run never keeps more than it asked for.
"""

from __future__ import annotations

import difflib
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

from anchoralign.schema import Sample, mask_token
from anchoralign.tokenize import detokenize, tokenize
from augment.prompts import MASK_PATTERN, markup_context, position_order

Kind = Literal["mention", "context"]
Reason = Literal[
    "empty_answer",
    "unparsable",
    "extra_variant",
    "duplicate_variant",
    "count_mismatch",
    "type_changed",
    "order_changed",
    "empty_mention",
    "markup_in_mention",
    "context_changed",
    "mention_unchanged",
    "missing_placeholder",
    "duplicate_placeholder",
    "unknown_placeholder",
    "markup_in_context",
    "unchanged",
]

REASONS: dict[str, str] = {
    "empty_answer": "the answer is empty or only whitespace",
    "unparsable": "no variant lines: nothing numbered and no line carries the expected markup",
    "extra_variant": "a variant line beyond the k that were asked for",
    "duplicate_variant": "the same as a variant accepted earlier in the same answer",
    "count_mismatch": "mention variant: a different number of entity items than the source",
    "type_changed": "mention variant: an entity's type label differs from the source's at that position",
    "order_changed": "mention variant: the same entity types, but in a different order",
    "empty_mention": "mention variant: an entity item with an empty mention",
    "markup_in_mention": "mention variant: a mention contains markup ('{', '}' or a <mask> placeholder)",
    "context_changed": "mention variant: the text outside the entity items changed beyond the tolerance",
    "mention_unchanged": "mention variant: every mention is the same as in the source",
    "missing_placeholder": "context variant: a placeholder of the source is missing",
    "duplicate_placeholder": "context variant: a placeholder appears more than once",
    "unknown_placeholder": "context variant: a placeholder the source does not have (or <mask> without a number)",
    "markup_in_context": 'context variant: contains entity markup {"<type>": "<mention>"}',
    "unchanged": "context variant: the same as the source apart from case, spacing and punctuation",
}


@dataclass(frozen=True)
class MentionVariant:
    mentions: list[str]  # index-aligned with source.entities
    text: str  # the variant line as the LLM wrote it (marker stripped)


@dataclass(frozen=True)
class ContextVariant:
    template: str  # the line with every placeholder spelled <mask{i}>
    text: str  # the variant line as the LLM wrote it (marker stripped)


@dataclass(frozen=True)
class Rejection:
    kind: Kind
    reason: Reason
    detail: str  # one sentence naming what differs
    text: str  # the variant line verbatim (the whole answer for empty_answer / unparsable)
    # 1-based position of the line among the answer's variant lines; None for the whole answer.
    index: int | None = None


V = TypeVar("V", MentionVariant, ContextVariant)


@dataclass
class ParseResult(Generic[V]):
    accepted: list[V] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Splitting an answer into variant lines

_FENCE = re.compile(r"^\s*(```|~~~)")
_MARKER = re.compile(r"^\s*(?:\*\*)?(?:\(\d{1,3}\)|\[\d{1,3}\]|\d{1,3}[.):](?!\d)|[-*•](?=\s))(?:\*\*)?\s*")
_QUOTE_PAIRS = {'"': '"', "“": "”", "«": "»"}


def _unquote(line: str) -> str:
    # Only a pair around the whole line with no other quote of that kind inside, so a sentence
    # that merely starts and ends with quoted speech is not cut.
    if len(line) >= 2 and _QUOTE_PAIRS.get(line[0]) == line[-1]:
        inner = line[1:-1]
        if line[0] not in inner and line[-1] not in inner:
            return inner.strip()
    return line


def _variant_lines(raw_text: str) -> tuple[list[str], bool]:
    """(variant lines, whether the answer was numbered or bulleted)."""
    lines = [ln for ln in raw_text.splitlines() if ln.strip() and not _FENCE.match(ln)]
    marked = [_MARKER.match(ln) for ln in lines]
    if any(marked):
        kept = [ln[m.end() :] for ln, m in zip(lines, marked, strict=True) if m]
        return [_unquote(ln.strip()) for ln in kept if ln.strip()], True
    return [_unquote(ln.strip()) for ln in lines if not ln.rstrip().endswith(":")], False


def split_variants(raw_text: str) -> list[str]:
    """The variant lines of an answer, markers and formatting noise removed (rules in the module doc)."""
    return _variant_lines(raw_text)[0]


# ---------------------------------------------------------------------------------------------
# Normalisation shared by the checks

_ARTICLES: dict[str, frozenset[str]] = {"en": frozenset({"a", "an", "the"})}
CONTEXT_TOLERANCE = 0.1


def _is_punct(token: str) -> bool:
    return all(unicodedata.category(ch)[0] in "PS" for ch in token)


def normalise_tokens(text: str, language: str, drop_articles: bool = False) -> list[str]:
    """Tokens compared by the checks: NFKC, case-folded, punctuation dropped (and articles, if asked)."""
    skip = _ARTICLES.get(language, frozenset()) if drop_articles else frozenset()
    out = []
    for tok in tokenize(unicodedata.normalize("NFKC", text), language):
        t = tok.casefold()
        if not _is_punct(t) and t not in skip:
            out.append(t)
    return out


def mention_key(text: str) -> str:
    """A mention compared ignoring case, spacing and Unicode compatibility forms."""
    return "".join(unicodedata.normalize("NFKC", text).casefold().split())


def edit_distance(a: list[str], b: list[str]) -> int:
    """Levenshtein distance between two token lists (insert, delete, substitute cost 1)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        cur = [i]
        for j, y in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def context_edits_allowed(n_tokens: int) -> int:
    """Token edits tolerated outside the mentions of a mention variant with ``n_tokens`` context tokens.

    Compared after normalise_tokens with articles dropped (so "a"/"the" and punctuation never count):
    one edit, or 10% of the context for long sentences, leaves room for agreement changes a new
    mention forces ("is" -> "are") but not for a rewritten sentence.
    """
    return max(1, int(n_tokens * CONTEXT_TOLERANCE))


_SLOT = "\x00"  # stands for an entity in the outside-text sequences; never produced by tokenize


def _diff_summary(a: list[str], b: list[str]) -> str:
    parts = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op in ("delete", "replace"):
            parts.append("-" + " ".join(t for t in a[i1:i2] if t != _SLOT))
        if op in ("insert", "replace"):
            parts.append("+" + " ".join(t for t in b[j1:j2] if t != _SLOT))
    return " ".join(p for p in parts if len(p) > 1)


def _outside_sequence(pieces: list[str], language: str) -> list[str]:
    seq: list[str] = []
    for k, piece in enumerate(pieces):
        if k:
            seq.append(_SLOT)
        seq.extend(normalise_tokens(piece, language, drop_articles=True))
    return seq


# ---------------------------------------------------------------------------------------------
# Mention variants

_Q = "\"'“”‘’"
_ITEM = re.compile(
    rf"""\{{\s*
    (?:[{_Q}](?P<qtype>[^{{}}{_Q}\n]*)[{_Q}] | (?P<btype>[^{{}}:{_Q}\n]+?))
    \s*:\s*
    (?:(?P<quote>[{_Q}])(?P<qmention>.*?)[{_Q}] | (?P<bmention>[^{{}}{_Q}\n]*?))
    \s*\}}""",
    re.VERBOSE,
)


def _unescape(text: str, quote: str | None) -> str:
    # The prompt JSON-escapes mentions; an LLM that copies the escapes (\" or \u00e9) means the
    # decoded text. Anything that is not valid JSON is taken literally.
    if quote == '"' and "\\" in text:
        try:
            return json.loads(f'"{text}"')
        except json.JSONDecodeError:
            return text
    return text


@dataclass(frozen=True)
class _Item:
    type: str
    mention: str


def find_items(line: str) -> tuple[list[_Item], list[str]]:
    """The inline entity items of a line and the text pieces around them (len(pieces) == len(items) + 1)."""
    items, pieces, pos = [], [], 0
    for m in _ITEM.finditer(line):
        quote = m.group("quote")
        etype = m.group("qtype") if m.group("qtype") is not None else m.group("btype")
        mention = m.group("qmention") if quote is not None else m.group("bmention")
        items.append(_Item(type=_unescape(etype.strip(), '"'), mention=_unescape(mention, quote)))
        pieces.append(line[pos : m.start()])
        pos = m.end()
    pieces.append(line[pos:])
    return items, pieces


def _has_markup(text: str) -> bool:
    return "{" in text or "}" in text or MASK_PATTERN.search(text) is not None


def _check_mention_line(
    line: str, source: Sample, order: list[int], language: str
) -> tuple[Reason, str] | MentionVariant:
    items, pieces = find_items(line)
    want = [source.entities[i].type for i in order]
    got = [it.type for it in items]
    if len(items) != len(want):
        return "count_mismatch", f"found {len(items)} entity items, expected {len(want)} ({', '.join(want)})"
    if [t.casefold() for t in got] != [t.casefold() for t in want]:
        if Counter(t.casefold() for t in got) == Counter(t.casefold() for t in want):
            return "order_changed", f"types read {', '.join(got)} instead of {', '.join(want)}"
        pos = next(p for p, (g, w) in enumerate(zip(got, want, strict=True)) if g.casefold() != w.casefold())
        return "type_changed", f"entity {order[pos]}: type {want[pos]!r} became {got[pos]!r}"
    for pos, it in enumerate(items):
        if not tokenize(it.mention, language):
            return "empty_mention", f"entity {order[pos]} ({want[pos]}): the mention is empty"
        if _has_markup(it.mention):
            return (
                "markup_in_mention",
                f"entity {order[pos]} ({want[pos]}): the mention {it.mention!r} contains markup",
            )

    source_pieces = _source_pieces(source, order, language)
    before, after = _outside_sequence(source_pieces, language), _outside_sequence(pieces, language)
    n_context = sum(t != _SLOT for t in before)
    edits, allowed = edit_distance(before, after), context_edits_allowed(n_context)
    if edits > allowed:
        return (
            "context_changed",
            f"the text outside the entities changed by {edits} token edits ({allowed} allowed): "
            f"{_diff_summary(before, after)}",
        )

    mentions = [""] * len(order)
    for pos, it in enumerate(items):
        mentions[order[pos]] = it.mention.strip()
    originals = [detokenize(source.tokens[e.start : e.end], language) for e in source.entities]
    if all(mention_key(m) == mention_key(o) for m, o in zip(mentions, originals, strict=True)):
        return "mention_unchanged", "every mention is the same as in the source"
    return MentionVariant(mentions=mentions, text=line)


def _source_pieces(source: Sample, order: list[int], language: str) -> list[str]:
    pieces, pos = [], 0
    for i in order:
        e = source.entities[i]
        pieces.append(detokenize(source.tokens[pos : e.start], language))
        pos = e.end
    pieces.append(detokenize(source.tokens[pos:], language))
    return pieces


def parse_mention_answer(
    raw_text: str, source: Sample, language: str = "en", k: int | None = None
) -> ParseResult[MentionVariant]:
    """Accepted mention variants of ``source`` and the rejected lines, each with its reason."""
    order = position_order(source)
    return _parse_answer(
        raw_text,
        "mention",
        k,
        has_markup=lambda ln: bool(_ITEM.search(ln)),
        check_line=lambda line: _check_mention_line(line, source, order, language),
        identity=lambda v: tuple(mention_key(m) for m in v.mentions),
        same_as="the same mentions as variant",
    )


def _parse_answer(
    raw_text: str,
    kind: Kind,
    k: int | None,
    has_markup: Callable[[str], bool],
    check_line: Callable[[str], V | tuple[str, str]],
    identity: Callable[[V], tuple[str, ...]],
    same_as: str,
) -> ParseResult[V]:
    """The loop both kinds share: split the answer into variant lines, check each, and reject
    lines beyond the ``k`` asked for and repeats of an earlier accepted variant."""
    result: ParseResult[V] = ParseResult()
    lines = _answer_lines(raw_text, kind, has_markup, result)
    seen: dict[tuple[str, ...], int] = {}
    for index, line in enumerate(lines, start=1):
        if k is not None and index > k:
            detail = f"variant {index} of an answer asked for {k}"
            result.rejected.append(Rejection(kind, "extra_variant", detail, line, index))
            continue
        outcome = check_line(line)
        if not isinstance(outcome, tuple):
            key = identity(outcome)
            if key in seen:
                outcome = ("duplicate_variant", f"{same_as} {seen[key]}")
            else:
                seen[key] = index
                result.accepted.append(outcome)
                continue
        reason, detail = outcome
        result.rejected.append(Rejection(kind, reason, detail, line, index))
    return result


def _answer_lines(
    raw_text: str, kind: Kind, has_markup: Callable[[str], bool], result: ParseResult
) -> list[str]:
    # Whole-answer failures are recorded in result and leave no lines to check.
    if not raw_text.strip():
        result.rejected.append(Rejection(kind, "empty_answer", "the answer is empty", raw_text))
        return []
    lines, numbered = _variant_lines(raw_text)
    if not lines or (not numbered and not any(has_markup(ln) for ln in lines)):
        result.rejected.append(
            Rejection(kind, "unparsable", "no numbered lines and no line with the expected markup", raw_text)
        )
        return []
    return lines


# ---------------------------------------------------------------------------------------------
# Context variants


def split_template(template: str) -> list[str | int]:
    """Text pieces and entity indices of a context line, in reading order (empty pieces dropped).

    Placeholders are read with MASK_PATTERN's tolerance; a bare ``<mask>`` is returned as -1.
    """
    parts: list[str | int] = []
    pos = 0
    for m in MASK_PATTERN.finditer(template):
        if m.start() > pos:
            parts.append(template[pos : m.start()])
        parts.append(int(m.group(1)) if m.group(1) else -1)
        pos = m.end()
    if pos < len(template):
        parts.append(template[pos:])
    return parts


def canonical_template(template: str) -> str:
    """The line with every placeholder spelled ``<mask{i}>``."""
    return MASK_PATTERN.sub(lambda m: mask_token(int(m.group(1))) if m.group(1) else "<mask>", template)


def _context_sequence(parts: list[str | int], language: str) -> list[str]:
    seq: list[str] = []
    for p in parts:
        seq.extend([mask_token(p)] if isinstance(p, int) else normalise_tokens(p, language))
    return seq


def _check_context_line(line: str, source: Sample, language: str) -> tuple[Reason, str] | ContextVariant:
    parts = split_template(line)
    found = Counter(p for p in parts if isinstance(p, int))
    n = len(source.entities)
    unknown = sorted(i for i in found if not 0 <= i < n)
    repeated = sorted(i for i, c in found.items() if c > 1 and 0 <= i < n)
    missing = [i for i in range(n) if i not in found]
    problems = []
    if unknown:
        problems.append("unknown " + ", ".join("<mask>" if i < 0 else mask_token(i) for i in unknown))
    if repeated:
        problems.append("repeated " + ", ".join(f"{mask_token(i)} ({found[i]}x)" for i in repeated))
    if missing:
        problems.append("missing " + ", ".join(mask_token(i) for i in missing))
    if problems:
        reason: Reason = (
            "unknown_placeholder"
            if unknown
            else "duplicate_placeholder"
            if repeated
            else "missing_placeholder"
        )
        return reason, "; ".join(problems) + f" (the source has {', '.join(mask_token(i) for i in range(n))})"
    if _ITEM.search(line):
        return "markup_in_context", "the line contains entity markup instead of placeholders"
    if _context_sequence(parts, language) == _context_sequence(
        split_template(markup_context(source, language)), language
    ):
        return "unchanged", "the same as the source apart from case, spacing and punctuation"
    return ContextVariant(template=canonical_template(line), text=line)


def parse_context_answer(
    raw_text: str, source: Sample, language: str = "en", k: int | None = None
) -> ParseResult[ContextVariant]:
    """Accepted context variants of ``source`` and the rejected lines, each with its reason."""
    position_order(source)  # the same precondition as the markup: no overlapping entities
    return _parse_answer(
        raw_text,
        "context",
        k,
        has_markup=lambda ln: bool(MASK_PATTERN.search(ln)),
        check_line=lambda line: _check_context_line(line, source, language),
        identity=lambda v: tuple(_context_sequence(split_template(v.template), language)),
        same_as="the same sentence as variant",
    )
