"""Rule-based rewrites, no LLM: what ``augment run --llm rules`` answers.

A mention prompt gets every entity replaced by an invented one, deterministic in the type, the
original mention and the variant number, in one of two styles (``--rules-names``):

- ``invented``: one or two capitalised made-up words, whatever the original looked like;
- ``shaped``: the original's shape kept, its names and numbers replaced. Every capitalised word
  becomes a made-up word of about its length and the same case, every digit another digit;
  lower-case words (``of``, ``reservation``, ``mph``), month and weekday names and punctuation
  stay. "Department of Inland Fisheries and Wildlife" keeps its six words and its ``of`` and
  ``and``, "April 4 , 1968" stays a date and "$3.6 billion" an amount, so the corpus shows where
  such mentions begin and end (under ``invented`` a date of CoNLL04's ``Other`` type becomes a
  capitalised word). Measured on CoNLL04, pretraining on it raised ``Other`` F1 but scored 3.2
  relation F1 below ``invented`` on test (1.2 above on dev), so ``invented`` stays the default
  (BENCHMARKS.md, "Mentions that keep their shape").

A context prompt keeps its sentence, ``<maskN>`` placeholders included, behind an opener phrase. Every answer is
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
from typing import Any, Literal

from anchoralign.tokenize import ABBREVIATIONS

NameStyle = Literal["invented", "shaped"]
DEFAULT_NAME_STYLE: NameStyle = "invented"


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


# Closed-class capitalised words that a date keeps, with or without a period: replacing them
# would make no date at all.
_MONTHS = "January February March April May June July August September October November December"
_MONTH_ABBREVIATIONS = "Jan Feb Mar Apr Jun Jul Aug Sep Sept Oct Nov Dec"
_WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday"
_KEPT_WORDS = frozenset(f"{_MONTHS} {_MONTH_ABBREVIATIONS} {_WEEKDAYS}".split())
_ABBREVIATED = frozenset(a.lower() for a in ABBREVIATIONS)
_LETTERS = "BCDFGHJKLMNPRSTVZ"
# Runs of letters (a word, or one part of "U.S." or "Shoshone-Bannock"), of digits, and the rest.
_RUN = re.compile(r"[^\W\d_]+|\d+|[\W_]+")
# All-capital runs up to this length are read as acronyms ("DOE", "AP") and get random capitals;
# longer ones ("PERUGIA") are words in capitals and get a made-up word in capitals.
_ACRONYM_MAX = 4


def _shaped_run(run: str, h: int, before_period: bool) -> str:
    """One run of an original mention, its name-like content replaced (see the module doc)."""
    if before_period and run.lower() in _ABBREVIATED:
        # "Md." or "Sen.": a made-up "Dol." would tokenise as two words where the original is one.
        return run
    if run.isdigit():
        digits = [str((int(c) + 1 + (h >> (3 * i)) % 9) % 10) for i, c in enumerate(run)]
        if digits[0] == "0" and run[0] != "0":  # no "April 0", no leading zero the original lacked
            digits[0] = str(1 + h % 9)
        return "".join(digits)
    if not run[0].isalpha() or not run[0].isupper() or run in _KEPT_WORDS:
        return run
    if run.isupper() and len(run) <= _ACRONYM_MAX:
        return "".join(_LETTERS[(h >> (5 * i)) % len(_LETTERS)] for i in range(len(run)))
    n_syllables = min(4, max(1, round(len(run) / 3)))
    word = "".join(_SYLLABLES[(h >> (4 * s)) % len(_SYLLABLES)] for s in range(n_syllables))
    return word.upper() if run.isupper() else word.capitalize()


def shaped_mention(entity_type: str, original: str, variant: int) -> str:
    """The original mention with its names and numbers replaced, its shape kept (deterministic)."""
    h = _digest(entity_type, original, variant)
    return "".join(
        _shaped_run(m.group(), _digest(h, i), original.startswith(".", m.end()))
        for i, m in enumerate(_RUN.finditer(original))
    )


def new_mention(style: NameStyle, entity_type: str, original: str, variant: int) -> str:
    """The rewritten mention of ``style``."""
    if style == "shaped":
        return shaped_mention(entity_type, original, variant)
    return fake_mention(entity_type, original, variant)


def is_context_prompt(line: str) -> bool:
    return MASK.search(line) is not None


def mention_variant(line: str, variant: int, style: NameStyle = DEFAULT_NAME_STYLE) -> tuple[str, list[str]]:
    """Rewrite every inline entity of ``line``; returns the variant text and the new mentions."""
    mentions: list[str] = []

    def swap(m: re.Match[str]) -> str:
        etype, original = json.loads(f'"{m.group(1)}"'), json.loads(f'"{m.group(2)}"')
        new = new_mention(style, etype, original, variant)
        mentions.append(new)
        return json.dumps({etype: new}, ensure_ascii=False)

    return MENTION_MARKUP.sub(swap, line), mentions


def context_variant(line: str, variant: int) -> str:
    """Keep every ``<maskN>`` and change the words around them (an opener phrase)."""
    return f"{OPENERS[variant % len(OPENERS)]} {line}"


def rewrite_answer(body: dict[str, Any], k: int = 3, style: NameStyle = DEFAULT_NAME_STYLE) -> str:
    """``k`` numbered variants of the prompt's sentence, as an LLM is asked to write them."""
    line = prompt_line(body)
    if is_context_prompt(line):
        variants = [context_variant(line, i) for i in range(k)]
    else:
        variants = [mention_variant(line, i, style)[0] for i in range(k)]
    return "\n".join(f"{i + 1}. {v}" for i, v in enumerate(variants))
