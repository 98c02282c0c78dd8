"""Rule-based rewrites, no LLM: what ``augment run --llm rules`` answers.

A mention prompt gets every entity replaced by an invented name (one or two capitalised made-up
words, deterministic in the type, the original mention and the variant number); a context prompt
keeps its sentence, ``<maskN>`` placeholders included, behind an opener phrase. Every answer is
well formed, so every variant passes validation, and the labels stay right by construction: the
names are new, the sentence around them is the source's. Pretraining on such a corpus is the
largest quality gain measured so far (BENCHMARKS.md, "Pretraining"). The answers go out through
the same OpenAI-compatible endpoint as an LLM's (:mod:`augment.scripted_server`), so journal,
validation and selection are the ones every run uses.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any


def prompt_line(body: dict[str, Any]) -> str:
    """The sentence to rewrite: the last line of the last user message (DESIGN.md markup)."""
    users = [m for m in body.get("messages", []) if m.get("role") == "user"]
    if not users:
        return ""
    content = users[-1].get("content") or ""
    lines = [ln for ln in str(content).splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


# One inline entity of a mention-rewriting prompt: {"<type>": "<mention>"} with JSON escapes.
MENTION_MARKUP = re.compile(r'\{\s*"((?:[^"\\]|\\.)*)"\s*:\s*"((?:[^"\\]|\\.)*)"\s*\}')
MASK = re.compile(r"<mask(\d+)>")

# Made-up words, so that a rewritten mention never collides with the rest of a sentence and an
# independent check can recognise what the server put in.
_SYLLABLES = ["zor", "vel", "qua", "mir", "tes", "dol", "kan", "bri", "ulo", "fen", "gar", "pim"]
OPENERS = ["Reportedly ,", "According to the report ,", "As noted earlier ,", "In this account ,"]


def _digest(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "big")


def fake_mention(entity_type: str, original: str, variant: int) -> str:
    """A deterministic made-up mention of one to two capitalised words (one token each)."""
    h = _digest(entity_type, original, variant)
    n_words = 1 + h % 2
    words = []
    for w in range(n_words):
        hw = _digest(h, w)
        word = "".join(_SYLLABLES[(hw >> (4 * s)) % len(_SYLLABLES)] for s in range(3))
        words.append(word.capitalize())
    return " ".join(words)


def is_context_prompt(line: str) -> bool:
    return MASK.search(line) is not None


def mention_variant(line: str, variant: int) -> tuple[str, list[str]]:
    """Rewrite every inline entity of ``line``; returns the variant text and the new mentions."""
    mentions: list[str] = []

    def swap(m: re.Match[str]) -> str:
        etype, original = json.loads(f'"{m.group(1)}"'), json.loads(f'"{m.group(2)}"')
        new = fake_mention(etype, original, variant)
        mentions.append(new)
        return json.dumps({etype: new}, ensure_ascii=False)

    return MENTION_MARKUP.sub(swap, line), mentions


def context_variant(line: str, variant: int) -> str:
    """Keep every ``<maskN>`` and change the words around them (an opener phrase)."""
    return f"{OPENERS[variant % len(OPENERS)]} {line}"


def rewrite_answer(body: dict[str, Any], k: int = 3) -> str:
    """``k`` numbered variants of the prompt's sentence, as an LLM is asked to write them."""
    line = prompt_line(body)
    if is_context_prompt(line):
        variants = [context_variant(line, i) for i in range(k)]
    else:
        variants = [mention_variant(line, i)[0] for i in range(k)]
    return "\n".join(f"{i + 1}. {v}" for i, v in enumerate(variants))
