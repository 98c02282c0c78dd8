"""Tokenisation of raw text, the same for augmented sentences and for `predict` input.

English (and any space-separated language): words and punctuation, with the PTB-like rules the
benchmark datasets were tokenised with (a run of letters/digits, possibly joined by internal
hyphens, is one token, as are abbreviations and numbers; clitics like ``'s`` are split off; every other non-space character is its
own token). Chinese (``language="zh"``): every non-space character is a token.
"""

from __future__ import annotations

import re

# Words with internal hyphens/apostrophes/periods (U.S., well-known, O'Neil), numbers with , or .
# (3,000 / 2.5), otherwise single punctuation characters.
_WORD = re.compile(
    r"""
    (?:[^\W_]\.){2,}            # abbreviations like U.S. or e.g.
  | \d+(?:[.,:/]\d+)+           # numbers 3,000 2.5 10:30 1/2
  | [^\W_]+(?:-[^\W_]+)*        # words, internal hyphens (well-known)
  | ['’][^\W_]+                 # clitics split off as in PTB: Steel 's, they 're
  | \S                          # any other single character (punctuation, symbols)
    """,
    re.VERBOSE | re.UNICODE,
)


def tokenize(text: str, language: str = "en") -> list[str]:
    if language == "zh":
        return [ch for ch in text if not ch.isspace()]
    return _WORD.findall(text)


def detokenize(tokens: list[str], language: str = "en") -> str:
    """Readable text from tokens (used only for prompts and display, never for offsets)."""
    if language == "zh":
        return "".join(tokens)
    return " ".join(tokens)
