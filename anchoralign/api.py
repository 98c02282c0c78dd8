"""The Python API: raw text in, entities with character offsets and the relations between them out.

    from anchoralign import Extractor
    extractor = Extractor.from_pretrained("runs/conll04/sft/fitted")
    result = extractor.extract("Steve Jobs founded Apple in Cupertino.")

Each text is tokenised with ``anchoralign.tokenize`` in the checkpoint's language (the word list
the models are trained on: PTB-style, so "Apple," is ``Apple`` and ``,``), keeping every token's
character span, decoded by ``decode.predict_long`` (a text longer than the encoder takes is split
into word windows, never truncated) and mapped back to the caller's string: an entity's
``start``/``end`` are character offsets into its text with ``text[start:end] == entity.text``, an
entity of several words covering whatever lies between them. A text is decoded as one sequence;
the models are trained on sentences, so a document is best given sentence by sentence.

``Extraction.record`` keeps the token-level record (``schema.Sample``, token offsets) that
``anchoralign predict`` writes and ``anchoralign score`` reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, overload

from anchoralign.decode import DecodeConfig
from anchoralign.errors import UserError
from anchoralign.schema import Sample

__all__ = ["Entity", "Extraction", "Extractor", "Relation", "resolve_device", "to_extraction"]


@dataclass(frozen=True)
class Entity:
    text: str  # == the input text[start:end]
    type: str
    start: int  # character offsets into the input text, end exclusive
    end: int


@dataclass(frozen=True)
class Relation:
    head: Entity  # the very objects of Extraction.entities
    tail: Entity
    type: str


@dataclass
class Extraction:
    """Entities (in order of their start) and relations found in one text."""

    text: str
    entities: list[Entity] = field(default_factory=list)
    relations: list[Relation] = field(default_factory=list)
    valid: bool = True  # every decoder ended its output cleanly (False: cut at the length bound)
    split: bool = False  # decoded in word windows (too long for the encoder): no relation across two
    record: Sample | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: entities with their offsets; relations by entity index, with the mentions' text."""
        index = {id(e): i for i, e in enumerate(self.entities)}
        return {
            "text": self.text,
            "entities": [dataclasses.asdict(e) for e in self.entities],
            "relations": [
                {
                    "head": index[id(r.head)],
                    "tail": index[id(r.tail)],
                    "type": r.type,
                    "head_text": r.head.text,
                    "tail_text": r.tail.text,
                }
                for r in self.relations
            ],
            "valid": self.valid,
            "split": self.split,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Extraction:
        """The inverse of ``to_dict`` (without ``record``)."""
        entities = [Entity(e["text"], e["type"], e["start"], e["end"]) for e in data["entities"]]
        relations = [Relation(entities[r["head"]], entities[r["tail"]], r["type"]) for r in data["relations"]]
        return cls(data["text"], entities, relations, data.get("valid", True), data.get("split", False))


def to_extraction(
    text: str, spans: Sequence[tuple[int, int]], sample: Sample, valid: bool = True, split: bool = False
) -> Extraction:
    """The Extraction of a predicted record whose ``tokens`` sit at the character ``spans`` of ``text``."""
    if len(spans) != len(sample.tokens):
        raise ValueError(f"{len(spans)} character spans for {len(sample.tokens)} tokens")
    made = [
        Entity(text[spans[e.start][0] : spans[e.end - 1][1]], e.type, spans[e.start][0], spans[e.end - 1][1])
        for e in sample.entities
    ]
    relations = [Relation(made[r.head], made[r.tail], r.type) for r in sample.relations]
    entities = sorted(made, key=lambda e: (e.start, e.end, e.type))
    return Extraction(text, entities, relations, valid, split, record=sample)


def resolve_device(device: Any = None, name: str = "device") -> Any:
    """A torch device: None or "auto" is cuda when available, else cpu. ``name`` is the option's name."""
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"{name}: not a torch device: {device!r}") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{name}: CUDA was asked for but is not available")
    return target


class Extractor:
    """A trained checkpoint ready to extract entities and relations from raw text."""

    def __init__(self, model: Any, decode: DecodeConfig | None = None):
        self.model = model
        self.decode = decode or DecodeConfig()

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: Any = None, decode: DecodeConfig | None = None
    ) -> Extractor:
        """Load a checkpoint directory (``save_pretrained``; a training run's ``fitted/``, ``best/``
        or ``final/``).

        ``device``: a torch device or its name; None takes cuda when available, else cpu.
        """
        from anchoralign.model import AnchorAlignModel

        return cls(AnchorAlignModel.from_pretrained(path, map_location=resolve_device(device)), decode)

    @property
    def language(self) -> str:
        return self.model.meta.language

    @property
    def entity_types(self) -> list[str]:
        return list(self.model.labels.entity_types)

    @property
    def relation_types(self) -> list[str]:
        return list(self.model.labels.relation_types)

    @overload
    def extract(self, text: str, decode: DecodeConfig | None = None, **options: Any) -> Extraction: ...

    @overload
    def extract(
        self, text: Sequence[str], decode: DecodeConfig | None = None, **options: Any
    ) -> list[Extraction]: ...

    def extract(self, text, decode=None, **options):
        """Entities and relations of one text (an Extraction) or of a list of texts (a list of them).

        ``decode`` replaces the extractor's DecodeConfig for this call; ``options`` override single
        fields of it: ``batch_size`` (texts per batch), ``beam``, ``max_len``, ``aggregate``,
        ``anchor``, ``constrained``.
        """
        texts = [text] if isinstance(text, str) else list(text)
        results, _ = self.predict(texts, decode=self.config(decode, **options))
        return results[0] if isinstance(text, str) else results

    def config(self, decode: DecodeConfig | None = None, **options: Any) -> DecodeConfig:
        """``decode`` (default: the extractor's) with the named fields replaced."""
        known = set(DecodeConfig.model_fields)
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown decoding option(s) {unknown}; known: {sorted(known)}")
        return DecodeConfig.model_validate({**(decode or self.decode).model_dump(), **options})

    def predict(
        self,
        texts: Sequence[str],
        ids: Sequence[str] | None = None,
        decode: DecodeConfig | None = None,
        long: str = "split",
        places: Sequence[str] | None = None,
        progress: Callable[[int | Fraction], None] | None = None,
    ) -> tuple[list[Extraction], list[int]]:
        """``extract`` for the command line: one Extraction per text and the indices of the texts split.

        ``ids`` name the records (default: the texts' indices), ``long="refuse"`` stops at the
        first text longer than the encoder with a UserError naming its ``places`` entry (e.g.
        ``file:line``; default ``text <index>``), and ``progress(n)`` is called as texts finish
        (see ``decode.predict_long``).
        """
        from anchoralign.decode import predict_long
        from anchoralign.tokenize import tokenize_with_offsets

        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is a {type(t).__name__}, not a str")
        names = [str(i) for i in range(len(texts))] if ids is None else list(ids)
        if len(names) != len(texts) or len(set(names)) != len(names):
            raise ValueError("ids must name every text once")
        tokenized = [tokenize_with_offsets(t, self.language) for t in texts]
        results = [Extraction(t) for t in texts]  # a text without any token has nothing to find
        todo = [i for i, (tokens, _) in enumerate(tokenized) if tokens]
        if progress is not None and len(todo) < len(texts):
            progress(len(texts) - len(todo))
        if not todo:
            return results, []
        samples = [Sample(id=names[i], tokens=tokenized[i][0]) for i in todo]
        position = {names[i]: i for i in todo}
        where = (lambda s: f"text {position[s.id]}") if places is None else (lambda s: places[position[s.id]])
        preds, split_ids = predict_long(self.model, samples, decode or self.decode, long, where, progress)
        split = sorted(position[s] for s in split_ids)
        was_split = set(split)
        for i, p in zip(todo, preds, strict=True):
            results[i] = to_extraction(texts[i], tokenized[i][1], p.sample, p.valid, i in was_split)
        return results, split
