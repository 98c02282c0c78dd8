"""Tokenisation of raw text, the same for augmented sentences and for `predict` input.

English (and any space-separated language): words and punctuation, with the PTB-like rules the
benchmark datasets were tokenised with: a run of letters/digits, possibly joined by internal
hyphens, is one token, as are abbreviations (U.S., Sen., Inc.), initials, numbers (3,000.50) and
the PTB quotes and dashes; clitics like ``'s`` are split off; every other non-space character is
its own token. Chinese (``language="zh"``): every non-space character is a token.

``tokenize_with_offsets`` gives the same tokens with their character spans in the text (the Python
API maps predicted entities back to the caller's string with them); ``tokenize`` is defined
through it, so the two can never disagree on the word list.
"""

from __future__ import annotations

import re

# Abbreviations that keep their period, as in the PTB-tokenised benchmarks (Sen. Smith, Acme Inc.).
ABBREVIATIONS = (  # noqa: SIM905 (a word list reads better as one string)
    "Mr Mrs Ms Dr Prof Sen Rep Gov Gen Lt Col Capt Sgt Rev St Jr Sr Inc Corp Co Ltd Bros No vs etc al "
    "Jan Feb Mar Apr Jun Jul Aug Sep Sept Oct Nov Dec "
    "Ala Ariz Ark Calif Colo Conn Del Fla Ga Ill Ind Kan Ky La Md Mass Mich Minn Miss Mo Mont Neb Nev "
    "Okla Ore Pa Tenn Tex Va Vt Wash Wis Wyo"
).split()

_WORD = re.compile(
    r"""
    (?:[^\W_]\.){2,}            # abbreviations like U.S. or e.g.
  | (?i:"""
    + "|".join(ABBREVIATIONS)
    + r""")\.(?!\w)             # known abbreviations keep their period
  | [A-Z]\.(?=\s)              # initials: John F. Kennedy
  | ``|''|--|\.\.\.|and/or       # PTB quotes, dashes and ellipses stay one token
  | \d+(?:[.,:/]\d+)+           # numbers 3,000 2.5 10:30 1/2
  | [^\W_]+(?:-[^\W_]+)*        # words, internal hyphens (well-known)
  | ['’][^\W_]+                 # clitics split off as in PTB: Steel 's, they 're
  | \S                          # any other single character (punctuation, symbols)
    """,
    re.VERBOSE | re.UNICODE,
)


def tokenize(text: str, language: str = "en") -> list[str]:
    return tokenize_with_offsets(text, language)[0]


def tokenize_with_offsets(text: str, language: str = "en") -> tuple[list[str], list[tuple[int, int]]]:
    """Tokens and their ``(start, end)`` character spans: ``text[start:end] == token`` for each."""
    if language == "zh":
        spans = [(i, i + 1) for i, ch in enumerate(text) if not ch.isspace()]
    else:
        spans = [m.span() for m in _WORD.finditer(text)]
    return [text[a:b] for a, b in spans], spans


def detokenize(tokens: list[str], language: str = "en") -> str:
    """Readable text from tokens (used only for prompts and display, never for offsets)."""
    if language == "zh":
        return "".join(tokens)
    return " ".join(tokens)
