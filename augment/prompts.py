"""Prompt templates and the inline markup the LLM reads.

Markup contract (DESIGN.md, "Prompt markup"):

* mention rewriting shows every entity inline as ``{"<type>": "<mention>"}``: the type is the
  dataset's label exactly as written in the records (the parser compares it), and both the label
  and the mention are JSON strings (``json.dumps``), so quotes or braces inside a mention cannot
  break the markup;
* context rewriting shows entity ``i`` as the placeholder ``<mask{i}>`` (``i`` is the entity's
  index in ``sample.entities``);
* in the chat messages, the sentence to rewrite is the last line of the last user message;
* the LLM answers one variant a line, numbered ``1.``, ``2.``, ...

Entities are rendered in order of position, whatever their order in ``sample.entities``; the runner
sorts entities by position first so that the placeholders read ``<mask0>``, ``<mask1>``, ... from
left to right (the parser does not depend on it). Samples whose entities overlap cannot be marked
up inline; ``eligibility`` says so before anything is sent.

Template files live in ``prompts/<name>.txt`` (the name, e.g. ``mention_rewrite.v1``, is the prompt
version used in cache keys: edit a prompt by adding a new file, never by changing an old one).
Format:

* everything before the first section header is a free description and is not sent;
* a section starts with a header line ``=== system ===``, ``=== user ===`` or
  ``=== assistant ===``; a language tag (``=== user [zh] ===``) keeps the section for samples of
  that language only, so few-shot examples can be given per language;
* after filtering by language the sections must read: system, then (user, assistant) example
  pairs, then the final user section, whose last line is ``{{sentence}}``;
* ``{{name}}`` is replaced by a value: ``k`` (number of variants), ``sentence`` (the marked-up
  sentence), ``entity_types`` (the dataset's labels with their descriptions), ``relations`` (the
  sample's relations, written with the sentence's mentions or placeholders), ``count`` (the number
  of entities), and for context prompts ``placeholders`` (each placeholder with its type) and
  ``placeholder_list`` (the placeholders in a phrase: ``<mask0>, <mask1> and <mask2>``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Protocol

from anchoralign.errors import UserError
from anchoralign.schema import N_MASK_TOKENS, Sample, mask_token
from anchoralign.tokenize import detokenize


def _prompts_dir() -> Path:
    """``prompts/`` of the repository in a clone (editable install), else the copy a wheel
    installs inside this package (pyproject.toml maps one to the other)."""
    clone = Path(__file__).resolve().parent.parent / "prompts"
    return clone if clone.is_dir() else Path(__file__).resolve().parent / "prompt_templates"


PROMPTS_DIR = _prompts_dir()
DEFAULT_MENTION_PROMPT = "mention_rewrite.v2"
DEFAULT_CONTEXT_PROMPT = "context_rewrite.v2"

# The parser accepts the spelling variants LLMs produce (<MASK0>, <mask 0>, <mask_0>); a bare
# <mask> (no number) matches with an empty group so it can be reported as unknown.
MASK_PATTERN = re.compile(r"<\s*mask[\s_]*(\d*)\s*>", re.IGNORECASE)

SKIP_REASONS: dict[str, str] = {
    "no_entities": "the sentence has no entity, so there is nothing to rewrite around",
    "nested_entities": "two entity spans overlap (nested or crossing) and cannot be marked up inline",
    "markup_in_source": "the sentence already contains markup characters ('{', '}' or a <mask> placeholder)",
    "too_many_entities": f"more than {N_MASK_TOKENS} entities: the model has one mask token for each of at most that many",
}


class LabelMeta(Protocol):
    """What the prompts need from ``anchoralign.datasets.DatasetMeta``."""

    language: str
    entity_types: Mapping[str, str]
    relation_types: Mapping[str, str]


def position_order(sample: Sample) -> list[int]:
    """Entity indices sorted by position; ValueError when two spans overlap."""
    order = sorted(
        range(len(sample.entities)), key=lambda i: (sample.entities[i].start, sample.entities[i].end)
    )
    for a, b in pairwise(order):
        if sample.entities[b].start < sample.entities[a].end:
            raise ValueError(
                f"sample {sample.id!r}: entities {a} and {b} overlap; only samples with eligibility() None can be marked up"
            )
    return order


def eligibility(sample: Sample) -> str | None:
    """None when the sample can be sent to the LLM, else a skip reason (a key of SKIP_REASONS)."""
    if not sample.entities:
        return "no_entities"
    if len(sample.entities) > N_MASK_TOKENS:
        return "too_many_entities"
    try:
        position_order(sample)
    except ValueError:
        return "nested_entities"
    if any("{" in t or "}" in t for t in sample.tokens) or MASK_PATTERN.search(" ".join(sample.tokens)):
        return "markup_in_source"
    return None


def _mention_text(sample: Sample, i: int, language: str) -> str:
    e = sample.entities[i]
    return detokenize(sample.tokens[e.start : e.end], language)


def mention_item(entity_type: str, mention: str) -> str:
    """One inline entity of a mention-rewriting prompt: ``{"<type>": "<mention>"}``."""
    return (
        "{"
        + json.dumps(entity_type, ensure_ascii=False)
        + ": "
        + json.dumps(mention, ensure_ascii=False)
        + "}"
    )


def _render_inline(sample: Sample, language: str, entity_text: Callable[[int], str]) -> str:
    pieces: list[str] = []
    pos = 0
    for i in position_order(sample):
        e = sample.entities[i]
        pieces.extend(sample.tokens[pos : e.start])
        pieces.append(entity_text(i))
        pos = e.end
    pieces.extend(sample.tokens[pos:])
    return detokenize(pieces, language)


def markup_mentions(sample: Sample, language: str = "en") -> str:
    """The sentence with every entity written inline as ``{"<type>": "<mention>"}``."""
    return _render_inline(
        sample, language, lambda i: mention_item(sample.entities[i].type, _mention_text(sample, i, language))
    )


def markup_context(sample: Sample, language: str = "en") -> str:
    """The sentence with entity ``i`` replaced by ``<mask{i}>``."""
    return _render_inline(sample, language, mask_token)


def _described(label: str, descriptions: Mapping[str, str]) -> str:
    desc = descriptions.get(label, "")
    return f"{label} ({desc})" if desc and desc != label else label


def _phrase(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _bullets(lines: list[str]) -> str:
    return "\n".join(f"- {line}" for line in lines) if lines else "- none"


def _entity_types_block(meta: LabelMeta) -> str:
    return _bullets([_described(label, meta.entity_types) for label in meta.entity_types])


def _relations_block(sample: Sample, meta: LabelMeta, name: Callable[[int], str]) -> str:
    lines = []
    for r in sample.relations:
        desc = meta.relation_types.get(r.type, "")
        gloss = f" ({desc})" if desc and desc != r.type else ""
        lines.append(f"{name(r.head)} {r.type} {name(r.tail)}{gloss}")
    return _bullets(lines)


_SECTION_HEADER = re.compile(r"^===\s*(system|user|assistant)(?:\s+\[([A-Za-z_-]+)\])?\s*===\s*$")
_VARIABLE = re.compile(r"\{\{\s*(\w+)\s*\}\}")
VARIABLES = frozenset(
    {"k", "sentence", "entity_types", "relations", "placeholders", "count", "placeholder_list", "question"}
)


@dataclass(frozen=True)
class Section:
    role: str  # "system", "user" or "assistant"
    language: str | None  # None: every language
    text: str
    line: int  # 1-based line of the header, for error messages


@dataclass(frozen=True)
class PromptTemplate:
    """One template file; ``name`` (the file stem) is its version string."""

    name: str
    path: Path
    sections: tuple[Section, ...]
    sha256: str
    # What the final user section must end with: the text to work on, by the markup contract.
    # Verification prompts end with their question instead (see prompts/verify_question.v1.txt).
    last_line: str = "{{sentence}}"

    @classmethod
    def load(
        cls, name: str, prompts_dir: str | Path | None = None, last_line: str = "{{sentence}}"
    ) -> PromptTemplate:
        folder = Path(prompts_dir) if prompts_dir is not None else PROMPTS_DIR
        path = folder / f"{name}.txt"
        if not path.is_file():
            known = sorted(p.stem for p in folder.glob("*.txt")) if folder.is_dir() else []
            raise UserError(
                f"prompt template {name!r} not found in {folder} (available: {', '.join(known) or 'none'})"
            )
        raw = path.read_text(encoding="utf-8")
        template = cls(
            name=name,
            path=path,
            sections=_parse_sections(raw, path),
            sha256=hashlib.sha256(raw.encode()).hexdigest(),
            last_line=last_line,
        )
        languages = {s.language for s in template.sections}
        for language in languages:
            template.sections_for(language)  # validates the layout each language will see
        return template

    def sections_for(self, language: str | None) -> list[Section]:
        """The sections sent for ``language``, checked to form system, example pairs, final user."""
        chosen = [s for s in self.sections if s.language in (None, language)]
        roles = [s.role for s in chosen]
        middle = roles[1:-1]
        pairs_ok = len(middle) % 2 == 0 and all(
            r == ("user", "assistant")[i % 2] for i, r in enumerate(middle)
        )
        if len(roles) < 2 or roles[0] != "system" or roles[-1] != "user" or not pairs_ok:
            shown = f" for language {language!r}" if language else " without a language tag"
            raise UserError(
                f"{self.path}: sections{shown} read {', '.join(roles) or 'nothing'}; expected system, "
                "then user/assistant example pairs, then a final user section"
            )
        last = chosen[-1]
        if last.text.splitlines()[-1].strip() != self.last_line:
            raise UserError(
                f"{self.path}:{last.line}: the last line of the final user section must be {self.last_line}"
            )
        return chosen

    def render(self, values: Mapping[str, str], language: str) -> list[dict[str, str]]:
        """OpenAI chat messages with every ``{{name}}`` replaced by ``values[name]``."""

        def fill(section: Section) -> str:
            def value(m: re.Match[str]) -> str:
                if m.group(1) not in values:
                    raise UserError(
                        f"{self.path}:{section.line}: {{{{{m.group(1)}}}}} is not available in this prompt "
                        f"(available: {', '.join(sorted(values))})"
                    )
                return values[m.group(1)]

            # One pass, so a value that happens to contain {{...}} is never substituted again.
            return _VARIABLE.sub(value, section.text)

        return [{"role": s.role, "content": fill(s)} for s in self.sections_for(language)]


def _parse_sections(raw: str, path: Path) -> tuple[Section, ...]:
    sections: list[Section] = []
    header: tuple[str, str | None, int] | None = None
    body: list[str] = []

    def close() -> None:
        if header is None:
            return
        text = "\n".join(body).strip("\n")
        if not text.strip():
            raise UserError(f"{path}:{header[2]}: empty {header[0]} section")
        sections.append(Section(role=header[0], language=header[1], text=text, line=header[2]))

    for lineno, line in enumerate(raw.splitlines(), start=1):
        m = _SECTION_HEADER.match(line)
        if m:
            close()
            header, body = (m.group(1), m.group(2), lineno), []
        elif header is not None:
            body.append(line)
            for name in _VARIABLE.findall(line):
                if name not in VARIABLES:
                    raise UserError(
                        f"{path}:{lineno}: unknown variable {{{{{name}}}}} (known: {', '.join(sorted(VARIABLES))})"
                    )
    close()
    if not sections:
        raise UserError(f"{path}: no section headers (expected lines like '=== system ===')")
    return tuple(sections)


def _shared_values(sample: Sample, meta: LabelMeta, k: int) -> dict[str, str]:
    """Template values of both rewrite prompts: variants asked for, entity count, the type list."""
    return {"k": str(k), "count": str(len(sample.entities)), "entity_types": _entity_types_block(meta)}


class PromptSet:
    """The two templates of one augmentation run and the messages built from them."""

    def __init__(
        self,
        mention: str = DEFAULT_MENTION_PROMPT,
        context: str = DEFAULT_CONTEXT_PROMPT,
        prompts_dir: str | Path | None = None,
    ) -> None:
        self.mention = PromptTemplate.load(mention, prompts_dir)
        self.context = PromptTemplate.load(context, prompts_dir)

    @property
    def mention_version(self) -> str:
        return self.mention.name

    @property
    def context_version(self) -> str:
        return self.context.name

    def mention_messages(
        self, sample: Sample, meta: LabelMeta, k: int, language: str | None = None
    ) -> list[dict[str, str]]:
        """Chat messages asking for ``k`` mention variants of ``sample`` (eligible samples only)."""
        language = language or meta.language
        values = {
            **_shared_values(sample, meta, k),
            "sentence": markup_mentions(sample, language),
            "relations": _relations_block(
                sample, meta, lambda i: json.dumps(_mention_text(sample, i, language), ensure_ascii=False)
            ),
        }
        return self.mention.render(values, language)

    def context_messages(
        self, sample: Sample, meta: LabelMeta, k: int, language: str | None = None
    ) -> list[dict[str, str]]:
        """Chat messages asking for ``k`` context variants of ``sample`` (eligible samples only)."""
        language = language or meta.language
        values = {
            **_shared_values(sample, meta, k),
            "placeholder_list": _phrase([mask_token(i) for i in range(len(sample.entities))]),
            "sentence": markup_context(sample, language),
            "relations": _relations_block(sample, meta, mask_token),
            "placeholders": _bullets(
                [
                    f"{mask_token(i)}: {_described(e.type, meta.entity_types)}"
                    for i, e in enumerate(sample.entities)
                ]
            ),
        }
        return self.context.render(values, language)
