"""Test scripts for ``augment.scripted_server.ScriptedServer``: faults and malformed rewrites.

A script maps (request body, attempt number of this prompt) to a ``Reply``. Every choice here is
a function of the prompt text, so two runs of the same script get the same answers and their
corpora can be compared byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from typing import Any

from augment.rules import (
    MASK,
    MENTION_MARKUP,
    context_variant,
    is_context_prompt,
    mention_variant,
    prompt_line,
)
from augment.scripted_server import Reply, good_answer


def stable_fraction(body: dict[str, Any], salt: str = "") -> float:
    """A number in [0, 1) fixed by the prompt: which prompts get a fault is reproducible."""
    digest = hashlib.sha256((salt + json.dumps(body.get("messages"), sort_keys=True)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def fault_script(rate: float = 0.3, slow_s: float = 1.0, k: int = 3):
    """About ``rate`` of the prompts fail their first attempt(s) with a transport fault, then
    are answered well: 429 (Retry-After 0 or 1), 500, 503, too slow, dropped, garbage body."""
    faults = [
        Reply(status=429, headers={"Retry-After": "0"}, message="rate limited"),
        Reply(status=429, headers={"Retry-After": "1"}, message="rate limited"),
        Reply(status=500, message="internal error"),
        Reply(status=503, headers={"Retry-After": "0"}, message="overloaded"),
        Reply(text="too late", delay=slow_s),
        Reply(drop=True),
        Reply(body=b"<html>502 Bad Gateway</html>"),
        Reply(body=b'{"choices": []}'),
    ]

    faulty_seen: dict[str, int] = {}
    lock = threading.Lock()

    def script(body: dict[str, Any], attempt: int) -> Reply:
        x = stable_fraction(body, "fault")
        if x < rate:
            # The first attempt always fails; a third of the faulty prompts fail the second too.
            # Faults are dealt in turn (not by hash) so that even a short run meets every kind.
            n_failing = 2 if x < rate / 3 else 1
            if attempt <= n_failing:
                with lock:
                    n = faulty_seen.setdefault(f"{prompt_line(body)}#{attempt}", len(faulty_seen))
                return faults[n % len(faults)]
        return Reply(text=good_answer(body, k))

    return script


# -- malformed rewrites, one builder per reason code ------------------------------------------


def _items(line: str) -> list[re.Match[str]]:
    return list(MENTION_MARKUP.finditer(line))


def _replace_item(line: str, m: re.Match[str], new: str) -> str:
    return line[: m.start()] + new + line[m.end() :]


def bad_mention_line(line: str, reason: str) -> str | None:
    """A mention-variant line that the parser must reject with ``reason`` (None if this source
    cannot produce that fault, e.g. order_changed needs two entity types)."""
    good, _ = mention_variant(line, 7)
    items = _items(good)
    first = items[0]
    etype = json.loads(f'"{first.group(1)}"')
    if reason == "count_mismatch":
        return _replace_item(good, first, json.loads(f'"{first.group(2)}"'))
    if reason == "type_changed":
        return _replace_item(good, first, json.dumps({"NotAType": "Zorvel"}))
    if reason == "order_changed":
        types = [json.loads(f'"{m.group(1)}"') for m in items]
        for j in range(1, len(items)):
            if types[j] != types[0]:
                swapped = _replace_item(good, items[j], json.dumps({types[0]: "Kanbri"}))
                return _replace_item(swapped, first, json.dumps({types[j]: "Dolfen"}))
        return None
    if reason == "empty_mention":
        return _replace_item(good, first, json.dumps({etype: ""}))
    if reason == "markup_in_mention":
        return _replace_item(good, first, json.dumps({etype: "Vel <mask3>"}))
    if reason == "context_changed":
        return good + " and then a great many unrelated words were added to this sentence today"
    if reason == "mention_unchanged":
        return line
    raise ValueError(reason)


def bad_context_line(line: str, reason: str) -> str | None:
    good = context_variant(line, 5)
    if reason == "missing_placeholder":
        return MASK.sub("someone", good, count=1)
    if reason == "duplicate_placeholder":
        return good + " " + MASK.search(good).group(0)  # type: ignore[union-attr]
    if reason == "unknown_placeholder":
        return good + " <mask99>"
    if reason == "markup_in_context":
        return good + ' {"Peop": "Zorvel"}'
    if reason == "unchanged":
        return line
    raise ValueError(reason)


MENTION_LINE_REASONS = [
    "count_mismatch",
    "type_changed",
    "order_changed",
    "empty_mention",
    "markup_in_mention",
    "context_changed",
    "mention_unchanged",
]
CONTEXT_LINE_REASONS = [
    "missing_placeholder",
    "duplicate_placeholder",
    "unknown_placeholder",
    "markup_in_context",
    "unchanged",
]
# Whole-answer and request-level faults, for either kind.
ANSWER_REASONS = [
    "empty_answer",
    "unparsable",
    "extra_variant",
    "duplicate_variant",
    "truncated",
    "request_rejected",
]


def malformed_script(k: int = 3):
    """Every answer mixes good variants with one malformed line or one whole-answer fault,
    chosen by the prompt, so a run over a few dozen sources meets every reason code."""

    def script(body: dict[str, Any], attempt: int) -> Reply:
        line = prompt_line(body)
        context = is_context_prompt(line)
        line_reasons = CONTEXT_LINE_REASONS if context else MENTION_LINE_REASONS
        choices = line_reasons + ANSWER_REASONS
        reason = choices[int(stable_fraction(body, "reason") * len(choices))]
        goods = [context_variant(line, i) if context else mention_variant(line, i)[0] for i in range(k)]
        if reason == "empty_answer":
            return Reply(text="   ")
        if reason == "unparsable":
            return Reply(text="I am sorry, but I cannot rewrite this sentence.")
        if reason == "request_rejected":
            return Reply(status=400, message="This model's maximum context length is 8 tokens")
        if reason == "extra_variant":
            lines = [*goods, goods[0] + " again"]
        elif reason == "duplicate_variant":
            lines = [goods[0], goods[0], *goods[1:-1]]
        elif reason == "truncated":
            lines = [*goods[:-1], goods[-1][: len(goods[-1]) // 2]]
            return Reply(text=_numbered(lines), finish_reason="length")
        else:
            bad = (bad_context_line if context else bad_mention_line)(line, reason)
            lines = [goods[0], bad if bad is not None else goods[1], *goods[2:]]
        return Reply(text=_numbered(lines))

    return script


def _numbered(lines: list[str]) -> str:
    return "\n".join(f"{i + 1}. {v}" for i, v in enumerate(lines))
