"""The AnchorAlign extractor: a shared encoder, three decoders and pointer-style outputs.

Restricted vocabulary (ids of docs/CONTRACTS.md): every decoder scores only ``<bos>``,
``<eos>``, ``<sep>``, the label tokens and the words of its own input. With ``h_t`` the decoder
state, ``E`` the shared token-embedding table and ``x`` the encoder output,

- a fixed id (structure symbol or label) ``k`` scores ``h_t . E[token(k)]``;
- word ``i`` scores ``h_t . r_i`` with ``r_i = (x[s_i] + E[input_ids[s_i]]) / 2`` at the word's
  first sub-word ``s_i`` (the encoder's contextual view averaged with the word's own embedding,
  as pointer decoders for generative NER do),

giving one ``[B, T, V]`` tensor in which ids outside ``vocab_mask`` (``<bos>``, the padding of
shorter sentences) hold a large finite negative number, so a softmax gives them zero mass and
``0 * log 0`` terms stay finite. The model cannot produce a word that is not in its input.

Label tokens: every entity and relation label is one new token (``<ent:Org>``,
``<rel:Work_For>``) whose embedding starts as the mean embedding of the sub-words of its name (the
metadata description up to its first comma) or of its whole description (``label_init``);
``<sep>`` starts from the word "separator"; the mask
placeholders ``<mask0>`` .. ``<mask63>`` of the masked corpus (single tokens in the input) start
from the tokenizer's mask token followed by their number.

Decoder inputs: a fixed id is read back as its token; a word either as the token of its first
sub-word (``decoder_input: token``) or as the representation the pointer scored it by
(``pointer``: the decoder then knows which occurrence of a word it wrote). ``auto`` (the default of
``from_backbone``) chooses pointer for prefix decoders and token for the others.

The model directory that ``save_pretrained`` writes and ``from_pretrained`` reads (no DeepSpeed
needed) is described once, in the README ("Model directory"); ``config.json`` holds the format
version, the backbone's name, family and config, the paradigm, the decoder input, the width of
the span head (0: none; ``anchoralign.span_head``), whether it pools and how many of the encoder's
top layers it has its own copy of, the relation heads' count and two thresholds (null: none;
``anchoralign.relation_head``) and the backbone token of every fixed id; ``labels.json`` the
dataset metadata.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoTokenizer

from anchoralign.backbones import (
    DECODERS,
    Backbone,
    backbone_config_dict,
    backbone_from_config_dict,
    load_backbone,
)
from anchoralign.batching import Collator, special_ids
from anchoralign.errors import UserError
from anchoralign.files import read_json_object
from anchoralign.linearize import LabelSet, Paradigm, as_paradigm
from anchoralign.relation_head import RelationHeads
from anchoralign.schema import N_MASK_TOKENS, DatasetMeta, mask_token
from anchoralign.span_head import SpanHead, word_maxima

FORMAT_VERSION = 1
DECODER_INPUTS = ("token", "pointer")
SEP_TOKEN = "<sep>"
CONFIG_FILE, LABELS_FILE, WEIGHTS_FILE = "config.json", "labels.json", "model.safetensors"
TOKENIZER_DIR, TRAIN_CONFIG_FILE = "tokenizer", "train_config.yaml"
# The models a training run exports, the one a user most likely wants first: best/ with the heads
# fitted after training (SFT's fit section, anchoralign.fitted_heads), best/, final/.
EXPORTED_DIRS = ("fitted", "best", "final")


def entity_token(label: str) -> str:
    return f"<ent:{label}>"


def relation_token(label: str) -> str:
    return f"<rel:{label}>"


def masked_fill_value(dtype: torch.dtype) -> float:
    """Large, finite and safe to subtract from in ``dtype`` (half of its most negative value)."""
    return torch.finfo(dtype).min / 2


@dataclasses.dataclass
class EncoderState:
    """What the decoders need from one encoding (rows can be repeated for beams)."""

    memory: torch.Tensor  # [B,M,S,H] what the decoders read (Backbone.encode); [:, -1] is the output
    mask: torch.Tensor  # [B,S]
    input_ids: torch.Tensor  # [B,S]
    word_starts: torch.Tensor  # [B,W]
    word_reps: torch.Tensor  # [B,W,H] pointer targets
    vocab_mask: torch.Tensor  # [B,V]
    # [B,S,H] by encoder layer: the input of the layers a head has its own copy of, from that
    # layer up (AnchorAlignModel.head_input_layers); empty when no head has one.
    layer_inputs: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)

    @property
    def hidden(self) -> torch.Tensor:
        """[B,S,H] the encoder's output."""
        return self.memory[:, -1]

    def repeat(self, k: int) -> EncoderState:
        """Each row ``k`` times in a row (row ``b * k + j`` is beam ``j`` of sample ``b``), for the
        decoders' beams; ``layer_inputs``, which no decoder reads, are left out rather than copied."""
        if k == 1:
            return self
        return EncoderState(
            *(
                getattr(self, f.name).repeat_interleave(k, dim=0)
                for f in dataclasses.fields(self)
                if f.name != "layer_inputs"
            )
        )


class AnchorAlignModel(nn.Module):
    """Shared encoder + NER / forward RE / reverse RE decoders over a restricted vocabulary."""

    def __init__(
        self,
        backbone: Backbone,
        tokenizer: Any,
        meta: DatasetMeta,
        paradigm: int | Paradigm,
        name: str,
        decoder_input: str = "token",
        span_width: int = 0,
        span_pooled: bool = False,
        span_layers: int = 0,
    ):
        super().__init__()
        if decoder_input not in DECODER_INPUTS:
            raise UserError(
                f"decoder_input must be one of {', '.join(DECODER_INPUTS)}; got {decoder_input!r}"
            )
        self.decoder_input = decoder_input
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.meta = meta
        self.labels = LabelSet.from_meta(meta)
        self.paradigm = as_paradigm(paradigm)
        self.backbone_name = name
        self.register_buffer("fixed_token_ids", self._fixed_token_ids(), persistent=False)
        self.span_head: SpanHead | None = None
        # The span head's own copy of the encoder's top layers (span_fit: fine-tuned for the spans
        # while the shared encoder stays as the decoders know it); None: it reads the encoder's output.
        self.span_layers: nn.ModuleList | None = None
        if span_width:
            self.add_span_head(span_width, span_pooled, span_layers)
        self.relation_head: RelationHeads | None = None
        # The relation head's own copy of the encoder's top layers (relation_fit), as the span head's.
        self.relation_layers: nn.ModuleList | None = None
        # (keep, add) of relation_head.vote, chosen on dev when the head is fitted.
        self.relation_thresholds: tuple[float, float] = (0.0, 1.0)

    def add_span_head(self, width: int, pooled: bool = False, layers: int = 0) -> None:
        """A new span head (random weights) scoring spans of up to ``width`` words (``pooled``: with
        the maximum over their sub-words too), over its own copy of the encoder's top ``layers``
        layers (0: over the encoder's output), which starts as the encoder's."""
        own = self._top_layers(layers, "the span head")
        hidden = self.backbone.embed_tokens.embedding_dim
        self.span_head = SpanHead(hidden, len(self.labels.entity_types), width, pooled=pooled).to(
            self.fixed_token_ids.device
        )
        self.span_layers = own

    def add_relation_head(self, k: int = 1, layers: int = 0) -> None:
        """New relation heads, ``k`` of them averaged (random weights; ``anchoralign.relation_head``),
        over their own copy of the encoder's top ``layers`` layers (0: over the encoder's output),
        which starts as the encoder's; the ``k`` heads share it."""
        own = self._top_layers(layers, "the relation head")
        hidden = self.backbone.embed_tokens.embedding_dim
        self.relation_head = RelationHeads(
            hidden, len(self.labels.entity_types), len(self.labels.relation_types), k
        ).to(self.fixed_token_ids.device)
        self.relation_layers = own

    def _top_layers(self, k: int, whose: str) -> nn.ModuleList | None:
        """A trainable copy of the shared encoder's top ``k`` layers (None for 0)."""
        encoder_layers = self.backbone.encoder_layers
        if not 0 <= k <= len(encoder_layers):
            raise UserError(
                f"{whose}'s own layers must be between 0 and the encoder's {len(encoder_layers)}; got {k}"
            )
        own = [
            copy.deepcopy(layer).requires_grad_(True) for layer in encoder_layers[len(encoder_layers) - k :]
        ]
        return nn.ModuleList(own) if own else None

    @property
    def span_width(self) -> int:
        """Longest span the span head scores; 0 without one."""
        return 0 if self.span_head is None else self.span_head.width

    @property
    def n_span_layers(self) -> int:
        """How many of the encoder's top layers the span head has its own copy of."""
        return 0 if self.span_layers is None else len(self.span_layers)

    @property
    def n_relation_layers(self) -> int:
        """How many of the encoder's top layers the relation head has its own copy of."""
        return 0 if self.relation_layers is None else len(self.relation_layers)

    def input_layer(self, own: nn.ModuleList | None) -> int | None:
        """The encoder layer whose input a head's own top layers ``own`` read (None without them)."""
        return None if own is None else len(self.backbone.encoder_layers) - len(own)

    @property
    def head_input_layers(self) -> tuple[int, ...]:
        """The encoder layers whose input ``encode`` keeps for the heads' own layers."""
        wanted = {self.input_layer(self.span_layers), self.input_layer(self.relation_layers)}
        return tuple(sorted(layer for layer in wanted if layer is not None))

    @property
    def span_pooled(self) -> bool:
        """Whether the span head reads the maximum over each span's sub-words."""
        return self.span_head is not None and self.span_head.pooled

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_backbone(
        cls,
        backbone: str,
        meta: DatasetMeta,
        paradigm: int | Paradigm = Paradigm.GROUPED_ALL,
        decoder_attention: str = "prefix",
        label_init: str = "name",
        decoder_input: str = "auto",
        span_width: int = 0,
        **tiny_options: Any,
    ) -> AnchorAlignModel:
        """A new model: the backbone's weights, label tokens initialised from their names or
        descriptions (``label_init``); ``decoder_attention`` as in ``backbones.load_backbone``.

        ``span_width`` > 0 adds a span head (``anchoralign.span_head``). ``tiny_options`` override
        fields of ``backbones.TINY_CONFIG`` (``backbone="tiny"`` only).
        """
        net, tokenizer = load_backbone(backbone, decoder_attention, **tiny_options)
        if decoder_input == "auto":
            # Measured (BENCHMARKS.md): pointer inputs add 2-6 dev relation F1 to MiniLM's prefix
            # decoders, but keep the tiny BART from over-fitting 30 sentences (loss 0.69 after 300
            # steps, against 0.03 after 117 with token inputs); BART and cross-attention unmeasured
            # at scale, so they keep the token inputs they were built and pretrained with.
            decoder_input = "pointer" if getattr(net, "decoder_attention", None) == "prefix" else "token"
        added = add_label_tokens(tokenizer, meta)
        old_size = net.embed_tokens.num_embeddings
        net.resize_token_embeddings(max(len(tokenizer), old_size))
        init_label_embeddings(net.embed_tokens, tokenizer, added, meta, label_init)
        return cls(net, tokenizer, meta, paradigm, backbone, decoder_input, span_width)

    def _fixed_token_ids(self) -> torch.Tensor:
        """Backbone token of each fixed restricted id: <bos>, <eos>, <sep>, entity and relation labels."""
        tok = self.tokenizer
        start, end, _, _ = special_ids(tok)
        names = [SEP_TOKEN]
        names += [entity_token(t) for t in self.labels.entity_types]
        names += [relation_token(r) for r in self.labels.relation_types]
        ids = [start, end, *tok.convert_tokens_to_ids(names)]
        if any(i is None or i == tok.unk_token_id for i in ids):
            raise UserError(
                "the tokenizer lacks the label tokens of this label set (a mismatched checkpoint?)"
            )
        return torch.tensor(ids, dtype=torch.long)

    # ------------------------------------------------------------------ forward

    def collator(self, max_length: int | None = None, align_positions: str = "decision") -> Collator:
        """Collator with this model's tokenizer and labels; ``max_length`` defaults to the encoder's limit."""
        limit = self.backbone.max_positions
        return Collator(
            self.tokenizer,
            self.labels,
            self.paradigm,
            max_length or limit,
            max_target_length=limit,
            align_positions=align_positions,
            span_width=self.span_width,
            relation_pairs=self.relation_head is not None,
        )

    def encode(self, batch: Mapping[str, torch.Tensor]) -> EncoderState:
        input_ids, word_starts = batch["input_ids"], batch["word_starts"]
        memory, layer_inputs = self.backbone.encode(
            input_ids, batch["attention_mask"], self.head_input_layers
        )
        hidden = memory[:, -1]
        index = word_starts.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        first_piece = input_ids.gather(1, word_starts)
        word_reps = (hidden.gather(1, index) + self.backbone.embed_tokens.weight[first_piece]) / 2
        return EncoderState(
            memory,
            batch["attention_mask"],
            input_ids,
            word_starts,
            word_reps,
            batch["vocab_mask"],
            layer_inputs,
        )

    def to_token_ids(self, ids: torch.Tensor, state: EncoderState) -> torch.Tensor:
        """Restricted ids [N,T] as backbone token ids (fixed ids by table, words by their first sub-word)."""
        n_fixed = self.labels.n_fixed
        fixed = self.fixed_token_ids[ids.clamp(max=n_fixed - 1)]
        word = (ids - n_fixed).clamp(min=0, max=state.word_starts.shape[1] - 1)
        pieces = state.input_ids.gather(1, state.word_starts.gather(1, word))
        return torch.where(ids < n_fixed, fixed, pieces)

    def pointer_logits(self, hidden: torch.Tensor, state: EncoderState) -> torch.Tensor:
        """[N,T,V] scores of the restricted vocabulary; ids outside ``vocab_mask`` get a large negative."""
        fixed = hidden @ self.backbone.embed_tokens.weight[self.fixed_token_ids].T
        words = torch.einsum("nth,nwh->ntw", hidden, state.word_reps)
        logits = torch.cat([fixed, words], dim=-1)
        return logits.masked_fill(~state.vocab_mask[:, None, :], masked_fill_value(logits.dtype))

    def decoder_inputs(self, ids: torch.Tensor, state: EncoderState) -> torch.Tensor:
        """Input embeddings [N,T,H] of restricted ids: a fixed id's token embedding; a word's token
        embedding too (``decoder_input: token``), or the representation the pointer scores it by
        (``pointer``), which tells the decoder which occurrence in the sentence it wrote."""
        embeds = self.backbone.embed_tokens(self.to_token_ids(ids, state))
        if self.decoder_input == "token":
            return embeds
        n_fixed = self.labels.n_fixed
        word = (ids - n_fixed).clamp(min=0, max=state.word_reps.shape[1] - 1)
        reps = state.word_reps.gather(1, word[..., None].expand(-1, -1, embeds.shape[-1]))
        return torch.where((ids >= n_fixed)[..., None], reps.to(embeds.dtype), embeds)

    def decoder_logits(self, name: str, ids: torch.Tensor, state: EncoderState, cache=None) -> torch.Tensor:
        """Logits of decoder ``name`` for inputs ``ids`` [N,T] (with ``cache``: only the new steps)."""
        hidden = self.backbone.decode(name, self.decoder_inputs(ids, state), state.memory, state.mask, cache)
        return self.pointer_logits(hidden, state)

    def span_logits(self, state: EncoderState) -> torch.Tensor:
        """[N, W, L, types + 1] the span head's scores of every span (``anchoralign.span_head``),
        from the encoder's output at each word's first sub-word."""
        if self.span_head is None:
            raise UserError("this model has no span head (train one with --model.span_head_width=N)")
        return self.span_head(*self.span_inputs(state))

    def span_inputs(self, state: EncoderState) -> tuple[torch.Tensor, ...]:
        """What the span head reads: the word states, and the word maxima for a pooled head."""
        if self.span_layers is None:
            return self.span_features(state.hidden, state.mask, state.word_starts)
        hidden = state.layer_inputs[self.input_layer(self.span_layers)]
        return self.span_features(hidden, state.mask, state.word_starts)

    def span_features(
        self, hidden: torch.Tensor, mask: torch.Tensor, word_starts: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """``span_inputs`` from ``hidden`` [N,S,H]: the encoder's output, or with the span head's own
        layers their input (``EncoderState.layer_inputs``), which they then run on."""
        if self.span_layers is not None:
            hidden = self.backbone.run_layers(self.span_layers, hidden, mask)
        words = gather_words(hidden, word_starts)
        if not self.span_pooled:
            return (words,)
        return words, word_maxima(hidden, words, word_starts, mask)

    def word_states(self, state: EncoderState) -> torch.Tensor:
        """[N, W, H] the encoder's output at each word's first sub-word (what the heads read)."""
        return gather_words(state.hidden, state.word_starts)

    def relation_inputs(self, state: EncoderState) -> tuple[torch.Tensor, torch.Tensor]:
        """What the relation head reads: the word states [N, W, H] and the start state [N, H]."""
        if self.relation_layers is None:
            return self.word_states(state), state.hidden[:, 0]
        hidden = state.layer_inputs[self.input_layer(self.relation_layers)]
        return self.relation_features(hidden, state.mask, state.word_starts)

    def relation_features(
        self, hidden: torch.Tensor, mask: torch.Tensor, word_starts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``relation_inputs`` from ``hidden`` [N,S,H]: the encoder's output, or with the relation
        head's own layers their input, which they then run on."""
        if self.relation_layers is not None:
            hidden = self.backbone.run_layers(self.relation_layers, hidden, mask)
        return gather_words(hidden, word_starts), hidden[:, 0]

    def forward(
        self, batch: Mapping[str, torch.Tensor], decoders: Sequence[str] = DECODERS, spans: bool = True
    ) -> dict[str, torch.Tensor]:
        """Teacher-forced logits of ``decoders`` (all three by default; the NER teacher of the
        alignment term asks for ``("ner",)`` only), and with ``spans`` the heads' logits: ``span_logits``
        with a span head, ``relation_logits`` [heads, P, relations] of the batch's gold entity pairs
        with relation heads. Through ``forward`` so that ZeRO-3 gathers."""
        state = self.encode(batch)
        out = {
            f"{name}_logits": self.decoder_logits(name, batch[f"{name}_input"], state) for name in decoders
        }
        if spans and self.span_head is not None:
            out["span_logits"] = self.span_logits(state)
        if spans and self.relation_head is not None and "pair_index" in batch:
            words, starts = self.relation_inputs(state)
            out["relation_logits"] = self.relation_head.logits(
                words, starts, batch["pair_entities"], batch["pair_index"]
            )
        return out

    # ------------------------------------------------------------------ bookkeeping

    def parameter_counts(self) -> dict[str, int]:
        """Total, shared embedding table, encoder, each decoder (embedding table counted once) and
        the span head, if any."""
        counts = self.backbone.parameter_counts()
        if self.span_head is not None:
            counts["span_head"] = sum(p.numel() for p in self.span_head.parameters())
            counts["total"] += counts["span_head"]
        if self.span_layers is not None:
            counts["span_layers"] = sum(p.numel() for p in self.span_layers.parameters())
            counts["total"] += counts["span_layers"]
        if self.relation_head is not None:
            counts["relation_head"] = sum(p.numel() for p in self.relation_head.parameters())
            counts["total"] += counts["relation_head"]
        if self.relation_layers is not None:
            counts["relation_layers"] = sum(p.numel() for p in self.relation_layers.parameters())
            counts["total"] += counts["relation_layers"]
        return counts

    def new_parameter_names(self) -> list[str]:
        """Parameters that the backbone checkpoint did not provide: the backbone's own (such as
        random cross-attention) and the span head."""
        names = [f"backbone.{n}" for n in self.backbone.new_parameter_names()]
        if self.span_head is not None:
            names += [f"span_head.{n}" for n, _ in self.span_head.named_parameters()]
        if self.relation_head is not None:
            names += [f"relation_head.{n}" for n, _ in self.relation_head.named_parameters()]
        return names

    def num_parameters(self) -> int:
        return self.parameter_counts()["total"]

    @property
    def device(self) -> torch.device:
        return self.fixed_token_ids.device

    # ------------------------------------------------------------------ checkpoints

    def save_pretrained(self, directory: str | Path, train_config: Any = None) -> Path:
        """Write the model directory (layout: the README, "Model directory")."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        config = {
            "format_version": FORMAT_VERSION,
            "backbone": self.backbone_name,
            "paradigm": int(self.paradigm),
            "decoder_input": self.decoder_input,
            "span_width": self.span_width,
            "span_pooled": self.span_pooled,
            "span_layers": self.n_span_layers,
            "relation_head": None
            if self.relation_head is None
            else {
                **dict(zip(("keep", "add"), self.relation_thresholds, strict=True)),
                "heads": len(self.relation_head.heads),
                "layers": self.n_relation_layers,
            },
            "fixed_tokens": self.tokenizer.convert_ids_to_tokens(self.fixed_token_ids.tolist()),
            "parameters": self.parameter_counts(),
            **{f"backbone_{k}": v for k, v in backbone_config_dict(self.backbone).items()},
        }
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (out / LABELS_FILE).write_text(
            json.dumps(meta_to_json(self.meta, self.paradigm), indent=2, ensure_ascii=False) + "\n",
            encoding="utf-8",
        )
        self.tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
        save_model(self, str(out / WEIGHTS_FILE))
        if train_config is not None:
            (out / TRAIN_CONFIG_FILE).write_text(_yaml_of(train_config), encoding="utf-8")
        return out

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, map_location: str | torch.device = "cpu"
    ) -> AnchorAlignModel:
        """Load a checkpoint directory written by ``save_pretrained`` (no hub access, no DeepSpeed)."""
        root = Path(directory)
        if not root.is_dir():
            raise UserError(f"checkpoint directory not found: {root}")
        for needed in (CONFIG_FILE, LABELS_FILE, WEIGHTS_FILE, TOKENIZER_DIR):
            if not (root / needed).exists():
                raise UserError(
                    f"{root}: not a checkpoint directory (missing {needed}); {_checkpoint_hint(root)}"
                )
        config = read_json_object(root / CONFIG_FILE)
        labels = read_json_object(root / LABELS_FILE)
        if config.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"{root / CONFIG_FILE}: checkpoint format {config.get('format_version')!r}, "
                f"this version reads {FORMAT_VERSION}"
            )
        try:
            backbone = backbone_from_config_dict(
                {
                    "family": config["backbone_family"],
                    "config": config["backbone_config"],
                    "decoder_attention": config.get("backbone_decoder_attention", "cross"),
                }
            )
            meta = meta_from_json(labels)
            paradigm = config["paradigm"]
        except KeyError as err:
            raise UserError(f"{root}: checkpoint config lacks field {err}") from None
        tokenizer = AutoTokenizer.from_pretrained(str(root / TOKENIZER_DIR))
        # Checkpoints written before decoder_input existed fed token embeddings.
        model = cls(
            backbone,
            tokenizer,
            meta,
            paradigm,
            config["backbone"],
            config.get("decoder_input", "token"),
            config.get("span_width", 0),  # none before the span head existed
            config.get("span_pooled", False),  # none before pooling existed
            config.get("span_layers", 0),  # none before the span head had its own layers
        )
        head = config.get("relation_head")
        if head:
            try:
                # none before the relation head could have its own layers
                model.add_relation_head(head["heads"], head.get("layers", 0))
                model.relation_thresholds = (head["keep"], head["add"])
            except (KeyError, TypeError):
                raise UserError(
                    f"{root / CONFIG_FILE}: relation_head must hold keep, add and heads; got {head!r}"
                ) from None
        missing, unexpected = load_model(
            model, str(root / WEIGHTS_FILE), strict=False, device=str(map_location)
        )
        if missing or unexpected:
            raise UserError(
                f"{root / WEIGHTS_FILE}: weights do not match the config "
                f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
            )
        return model.to(map_location).eval()


def _checkpoint_hint(root: Path) -> str:
    """What to give instead: a training run folder holds its exported models in fitted/, best/ and final/."""
    exported = [root / name for name in EXPORTED_DIRS if (root / name / CONFIG_FILE).is_file()]
    if exported:
        return "this is a training run folder: give its " + " or ".join(str(p) for p in exported)
    return "give a folder written by save_pretrained, such as a training run's best/ or final/"


def gather_words(hidden: torch.Tensor, word_starts: torch.Tensor) -> torch.Tensor:
    """[N, W, H] the states ``hidden`` [N, S, H] at each word's first sub-word ``word_starts`` [N, W]."""
    return hidden.gather(1, word_starts[..., None].expand(-1, -1, hidden.shape[-1]))


# ---------------------------------------------------------------------- label tokens


def add_label_tokens(tokenizer: Any, meta: DatasetMeta) -> list[str]:
    """Add the label, ``<sep>`` and mask tokens (as special, never-split tokens); return the new ones."""
    wanted = [entity_token(t) for t in meta.entity_types]
    wanted += [relation_token(r) for r in meta.relation_types]
    wanted += [SEP_TOKEN] + [mask_token(i) for i in range(N_MASK_TOKENS)]
    vocab = tokenizer.get_vocab()
    new = [t for t in wanted if t not in vocab]
    tokenizer.add_tokens(new, special_tokens=True)
    return new


LABEL_INITS = ("name", "description")


def label_name(description: str) -> str:
    """A label's readable name: its description up to the first comma ("location, a place ..."
    -> "location"). Averaging over a whole description mixes in function words that every label
    shares, so the label rows would start out alike."""
    return re.split(r"[,，]", description, maxsplit=1)[0].strip() or description


def token_descriptions(tokenizer: Any, meta: DatasetMeta, label_init: str = "name") -> dict[str, str]:
    """The text whose sub-word embeddings initialise each added token."""
    if label_init not in LABEL_INITS:
        raise UserError(f"label_init must be one of {', '.join(LABEL_INITS)}; got {label_init!r}")
    text = label_name if label_init == "name" else str
    texts = {entity_token(t): text(d) for t, d in meta.entity_types.items()}
    texts.update({relation_token(r): text(d) for r, d in meta.relation_types.items()})
    texts[SEP_TOKEN] = "separator"
    mask = tokenizer.mask_token or "entity"
    texts.update({mask_token(i): f"{mask} {i}" for i in range(N_MASK_TOKENS)})
    return texts


@torch.no_grad()
def init_label_embeddings(
    embedding: nn.Embedding, tokenizer: Any, tokens: list[str], meta: DatasetMeta, label_init: str = "name"
) -> None:
    """Each token in ``tokens`` starts as the mean embedding of its text's sub-words (``token_descriptions``)."""
    texts = token_descriptions(tokenizer, meta, label_init)
    weight = embedding.weight
    n_old = min(tokenizer.convert_tokens_to_ids(tokens), default=weight.shape[0])
    fallback = weight[:n_old].mean(0)
    for token in tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        pieces = tokenizer(texts.get(token, token), add_special_tokens=False)["input_ids"]
        pieces = [p for p in pieces if p < n_old]  # only embeddings that already mean something
        weight[token_id] = weight[pieces].mean(0) if pieces else fallback


# ---------------------------------------------------------------------- files


def meta_to_json(meta: DatasetMeta, paradigm: Paradigm) -> dict[str, Any]:
    data = dataclasses.asdict(meta) if dataclasses.is_dataclass(meta) else dict(vars(meta))
    data["symmetric_relations"] = sorted(data.get("symmetric_relations", ()))
    data["splits"] = list(data.get("splits", ()))
    data["paradigm"] = int(paradigm)
    return data


def meta_from_json(data: dict[str, Any]) -> DatasetMeta:
    fields = {f.name for f in dataclasses.fields(DatasetMeta)}
    kwargs = {k: v for k, v in data.items() if k in fields}
    kwargs["symmetric_relations"] = frozenset(kwargs.get("symmetric_relations", ()))
    kwargs["splits"] = tuple(kwargs.get("splits", ()))
    return DatasetMeta(**kwargs)


def _yaml_of(config: Any) -> str:
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    elif dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
