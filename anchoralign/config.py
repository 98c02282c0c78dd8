"""The stage configs of the trainers: one typed, nested tree per stage.

``TrainConfig`` holds what both stages share; :class:`PretrainConfig` and :class:`SFTConfig` add
their own data fields. Sections are read by the code that uses them, as they are: the losses take
:class:`LossConfig`, decoding takes :class:`DecodeConfig`, the optimizer and schedule
:class:`OptimConfig`. YAML files nest the same way, and any key can be overridden from the command
line with its dotted path (``--loss.alpha=0.3``, ``--decode.beam=4``; ``anchoralign.config_tree``).
The resolved config is saved as ``train_config.yaml`` beside every checkpoint and can be run again
as it is (``--config RUN/best/train_config.yaml``).

An ablation is an override: ``--loss.alignment=false`` (no alignment objectives at all),
``--loss.ner-re=false``, ``--loss.fwd-rev=false``, ``--loss.suppress=false``, ``--init-from=null``
(SFT without pretraining), ``--decode.aggregate=false``, ``--decode.anchor=off``,
``--model.paradigm=1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from anchoralign import config_tree
from anchoralign.errors import UserError
from anchoralign.files import atomic_write_text

CONFIG_FILE = "train_config.yaml"


class Section(BaseModel):
    """A config section: unknown keys are refused, assignments validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class ModelConfig(Section):
    backbone: str = Field("facebook/bart-large", description="'tiny', 'minilm', a hub id or a directory")
    paradigm: int = Field(3, ge=1, le=4, description="output paradigm 1-4 (3 = grouped, all entities)")
    decoder_attention: Literal["prefix", "cross"] = Field(
        "prefix",
        description="encoder-only backbones: decoders read the encoder through their own pretrained "
        "self-attention (prefix) or through new, random cross-attention (cross)",
    )
    label_init: Literal["name", "description"] = Field(
        "name",
        description="label tokens start as the mean embedding of the label's name (its description up "
        "to the first comma) or of its whole description",
    )
    decoder_input: Literal["auto", "token", "pointer"] = Field(
        "auto",
        description="what a decoder reads for a word it wrote: the word's token embedding, or the "
        "representation the pointer scored it by (which tells one occurrence from another); auto: "
        "pointer for prefix decoders, token for cross-attention and BART-family decoders",
    )
    max_length: int = Field(256, ge=8, description="longest encoder input in sub-words")
    span_head_width: int = Field(
        0,
        ge=0,
        description="train a span head (anchoralign.span_head) that scores every span of up to this "
        "many words as an entity type or none, beside the NER decoder; 0: none",
    )
    relation_heads: int = Field(
        0,
        ge=0,
        description="train this many relation heads (anchoralign.relation_head) with the model, on the "
        "gold entity pairs of each batch; 0: none (a head can also be fitted afterwards on the frozen "
        "encoder: anchoralign fit-relation-head, which also chooses the vote's thresholds)",
    )


class DataConfig(Section):
    limit_train: int | None = Field(
        None, ge=1, description="use only the first N samples of each training set"
    )
    limit_eval: int | None = Field(None, ge=1, description="use only the first N samples of each eval split")
    bucket_batches: int = Field(
        0,
        ge=0,
        description="length bucketing: each window of N global batches of the epoch's shuffled order "
        "is sorted by length and cut into batches, whose order is then shuffled (0: off)",
    )


class PretrainDataConfig(DataConfig):
    corpus_dir: str | None = Field(
        None, description="folder with masked.jsonl and unmasked.jsonl (default corpus/<dataset>)"
    )


class SFTDataConfig(DataConfig):
    train_split: str = "train"
    curriculum_max_relations: int = Field(1, ge=0, description="K: warm-up samples have at most K relations")
    extra_train: list[str] = Field(
        default_factory=list,
        description="records sources (jsonl files or saved datasets folders, e.g. an augment corpus's "
        "unmasked.jsonl) whose samples join the training split in the full-data phases; the curriculum "
        "warm-up keeps to the training split",
    )


PhaseTriple = tuple[float, float, float]


class PhasesConfig(Section):
    epochs: tuple[int, int, int] = Field(description="epochs of the three phases (see the stage)")
    switch: Literal["epochs", "valid_rate", "plateau"] = Field(
        "epochs",
        description="when alignment starts: after the configured epochs of the cross-entropy phase; "
        "earlier once the share of dev outputs the model writes as valid structures (unconstrained) "
        "reaches valid_rate_threshold; or earlier once the dev score has not improved for "
        "patience evaluations",
    )
    valid_rate_threshold: float = Field(0.9, gt=0, le=1)
    patience: int = Field(3, ge=1, description="evaluations without a better dev score that end the phase")

    @field_validator("epochs", mode="before")
    @classmethod
    def _three(cls, v: Any) -> Any:
        if isinstance(v, list | tuple) and len(v) != 3:
            raise ValueError(f"expected three epoch counts, one per phase, got {len(v)}: {list(v)}")
        return v

    @field_validator("epochs")
    @classmethod
    def _valid(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(e < 0 for e in v):
            raise ValueError(f"epochs must be >= 0, got {list(v)}")
        if sum(v) == 0:
            raise ValueError("at least one phase needs epochs > 0")
        return v


class OptimConfig(Section):
    lr: float | PhaseTriple = Field(
        description="peak learning rate, or one per phase ([a, b, c]); warm-up and decay scale it"
    )
    new_lr_mult: float = Field(
        1.0, gt=0, description="learning-rate multiplier of parameters the backbone did not provide"
    )
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of the stage's steps spent warming up")
    schedule: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="decay over the stage after the warm-up (constant: none)"
    )
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="decay ends at lr * min_lr_ratio")
    clip: float = Field(1.0, ge=0, description="gradient-norm clipping (0: off)")
    ema_decay: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="evaluate, select and export a moving average of the weights kept with this decay "
        "per optimizer step, e.g. 0.99 (0: off; anchoralign.ema)",
    )
    micro_batch_size: int = Field(8, ge=1, description="samples per rank per forward pass")
    grad_accum: int = Field(1, ge=1, description="micro-batches accumulated per optimizer step")

    @field_validator("lr")
    @classmethod
    def _positive(cls, v: float | PhaseTriple) -> float | PhaseTriple:
        if any(x <= 0 for x in (v if isinstance(v, tuple) else (v,))):
            raise ValueError(f"learning rates must be > 0, got {v}")
        return v

    def phase_lr(self, phase: int) -> float:
        """The peak learning rate of phase ``phase`` (0-based)."""
        return self.lr[phase] if isinstance(self.lr, tuple) else self.lr


class LossConfig(Section):
    alpha: float = Field(1.0, ge=0, description="weight of the NER-RE alignment (KL) term")
    beta: float = Field(1.0, ge=0, description="weight of the forward-reverse symmetric KL term")
    gamma: float = Field(1.0, ge=0, description="weight of the negative-suppression term")
    alignment: bool = Field(True, description="false: the alignment phase keeps cross-entropy only")
    ner_re: bool = Field(True, description="the NER-RE term (with alignment)")
    fwd_rev: bool = Field(True, description="the forward-reverse term (with alignment)")
    suppress: bool = Field(True, description="the negative-suppression term (with alignment)")
    span: float = Field(1.0, ge=0, description="weight of the span head's cross-entropy (with a span head)")
    relation: float = Field(
        1.0, ge=0, description="weight of the relation heads' binary cross-entropy (with relation heads)"
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="label smoothing of the decoders' cross-entropies: this share of each target goes "
        "evenly to the sentence's valid output ids (0: off)",
    )
    ramp_steps: int = Field(
        0, ge=0, description="optimizer steps over which the alignment terms grow from 0 to full weight"
    )
    teacher_dropout: bool = Field(
        False,
        description="false: the NER teacher of the NER-RE term is a separate pass without dropout; "
        "true: the training pass itself",
    )
    teacher_gate: bool = Field(
        False, description="align only the positions where the NER teacher's top token is the gold one"
    )
    align_temperature: float = Field(
        1.0,
        gt=0,
        description="both alignment terms compare the decoders' distributions at logits / T, scaled by "
        "T^2 (distillation); above 1 they carry more than the gold token of a one-hot teacher",
    )
    align_positions: Literal["decision", "all"] = Field(
        "decision",
        description="decision: align only positions where both decoders make the same decision "
        "(mention continuations, types, relation labels; forward and reverse paired by triple and "
        "role); all: every shared entity or triple token, paired in order of occurrence",
    )


class DecodeConfig(Section):
    beam: int = Field(1, ge=1, description="beam size (1: greedy)")
    max_len: int | None = Field(None, ge=1, description="longest output per decoder (default 3 x words + 16)")
    batch_size: int = Field(32, ge=1, description="sentences decoded together")
    aggregate: bool = Field(True, description="unite forward and reverse relations")
    anchor: Literal["typed", "reported", "span", "off"] = Field(
        "typed",
        description="keep only relations whose mentions the NER decoder produced: with the same span "
        "and type (typed), the same span (span, the relation keeps its own types), or keep all (off); "
        "reported: with the same span and type as a reported entity (the NER decoder's, and with "
        "entities=union the mentions the union adds)",
    )
    entities: Literal["union", "ner"] = Field(
        "union",
        description="entities reported: the NER decoder's plus each mention an RE decoder wrote whose span "
        "overlaps none of them (union), or the NER decoder's only (ner); relations follow the anchor "
        "setting either way",
    )
    ner_source: Literal["auto", "decoder", "span_head"] = Field(
        "auto",
        description="where the entities reported come from: the NER decoder, or the span head of a model "
        "trained with one; auto: the span head when there is one (the typed anchor stays on the NER "
        "decoder's mentions; anchor=reported checks the reported entities)",
    )
    span_threshold: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="a span head's span is a mention when its probability of being one is above this "
        "(lower: more mentions, recall for precision)",
    )
    relation_head: Literal["auto", "off"] = Field(
        "auto",
        description="with a checkpoint that has a relation head (anchoralign fit-relation-head): its vote "
        "joins the decoders' (auto) or is not asked (off)",
    )
    relation_keep: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="a relation the decoders wrote is kept when the relation head gives it more than this "
        "(default: the threshold chosen on dev when the head was fitted)",
    )
    relation_add: float | None = Field(
        None,
        gt=0,
        le=1,
        description="a relation between two reported entities that the decoders did not write is added when "
        "the relation head gives it more than this (default: the threshold chosen on dev)",
    )
    constrained: bool = Field(True, description="decode within the output grammar")
    eos_penalty: float = Field(
        0.0,
        description="subtracted from the logit of <eos> at every step of every decoder: above 0 the "
        "decoders stop later and write more mentions and relations (recall for precision), below 0 "
        "fewer; choose it on dev",
    )

    @field_validator("anchor", mode="before")
    @classmethod
    def _anchor_bool(cls, v: Any) -> Any:
        # true/false as in earlier versions (`anchor: false`).
        return {True: "typed", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("relation_head", mode="before")
    @classmethod
    def _relation_head_bool(cls, v: Any) -> Any:
        # YAML reads a bare `off` as false (and `on` as true).
        return {True: "auto", False: "off"}.get(v, v) if isinstance(v, bool) else v


class EvalConfig(Section):
    split: str = Field("dev", description="split scored during training (best checkpoint, switch)")
    loss_splits: list[str] = Field(
        default_factory=lambda: ["dev"], description="splits whose loss terms are logged at each evaluation"
    )
    best_metric: str | None = Field(
        None,
        description="score that picks best/ (default: relation strict F1, boundary F1 if scored so); "
        "several joined by '+' select on their mean (ner_f1+rel_strict_f1)",
    )
    also_best: list[str] = Field(
        default_factory=list,
        description="further selection rules, written like best_metric, each exporting its own "
        "best_<rule>/ (best_ner_f1+rel_strict_f1/): one run compares rules, as they do not change the training",
    )
    every: int = Field(0, ge=0, description="also evaluate every N optimizer steps (0: per epoch only)")


class CheckpointConfig(Section):
    save_every: int = Field(
        0, ge=0, description="also checkpoint every N optimizer steps (0: per epoch only)"
    )
    resume: bool = Field(True, description="continue from output_dir/checkpoints when one is there")
    keep_final: bool = Field(
        False,
        description="keep the weights and optimizer state of a finished run's last checkpoint (by "
        "default only its record stays once final/ is written: a finished run is not trained further)",
    )


class TrainerConfig(Section):
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="bf16: mixed precision (the forward pass autocast to bfloat16; weights, optimizer "
        "and losses in float32)",
    )
    zero_stage: Literal[0, 1, 2, 3] = 2
    deepspeed_config: str | None = Field(None, description="a DeepSpeed JSON to merge with the built one")
    max_steps: int | None = Field(
        None, ge=1, description="stop the stage after N optimizer steps (the schedule is planned for N)"
    )
    stop_after_epoch: int | None = Field(
        None,
        ge=1,
        description="stop the stage after its N-th epoch (counted over all its phases), the schedule "
        "still planned for every epoch: an early stop that leaves the learning rate as it was",
    )
    log_every: int = Field(10, ge=1, description="optimizer steps between metrics.jsonl rows")
    grad_norm_every: int = Field(
        0,
        ge=0,
        description="log each active loss term's gradient norm every N steps (0: never; costs a backward pass per term)",
    )
    progress: bool = Field(True, description="show a progress bar")


class HeadsFitConfig(Section):
    """Heads fitted on the trained model's frozen encoder once the stage is over, as the commands
    ``anchoralign fit-span-head`` then ``fit-relation-head`` do (``anchoralign.fitted_heads``):
    minutes, where training takes hours. The result is a new checkpoint, ``output_dir/fitted``."""

    span_head: bool = Field(
        False,
        description="fit a span head for the entities on the training split, measured on eval.split "
        "(keeps every training sentence's encoder states in memory while it fits)",
    )
    relation_head: bool = Field(
        False,
        description="then fit a relation head over those entities, its vote thresholds chosen on eval.split",
    )
    source: Literal["best", "final"] = Field("best", description="the exported model the heads are fitted on")
    span_width: int = Field(8, ge=1, description="longest mention the span head can find, in words")
    span_layers: int = Field(
        2,
        ge=0,
        description="the encoder's top layers the span head gets its own copy of, fine-tuned with it "
        "(0: it reads the frozen encoder's output)",
    )
    relation_heads: int = Field(
        1, ge=1, description="relation heads fitted side by side, their probabilities averaged"
    )
    relation_layers: int = Field(
        0,
        ge=0,
        description="the encoder's top layers the relation heads get their own copy of, fine-tuned "
        "with them (0: they read the frozen encoder's output)",
    )
    states_dir: str | None = Field(
        None,
        description="keep the training sentences' encoder states in files under this folder, read "
        "through memory maps, instead of in memory (null): the same fit, for training sets whose states "
        "do not fit in memory",
    )


class TrainConfig(Section):
    """Everything both trainers share. Field descriptions are printed by ``--help``."""

    stage: ClassVar[str] = "train"

    dataset: str = Field(min_length=1, description="dataset name (see `anchoralign data-stats`) or path")
    data_dir: str | None = Field(
        None, description="benchmark data folder (default $ANCHORALIGN_DATA or ./data)"
    )
    fold: int | None = Field(None, ge=0, description="cross-validation fold (datasets with folds, e.g. ADE)")
    output_dir: str = Field(
        min_length=1, description="run folder: checkpoints/, best/, final/, metrics.jsonl"
    )
    init_from: str | None = Field(None, description="checkpoint directory to start from (null: the backbone)")
    seed: int = 42
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    phases: PhasesConfig
    optim: OptimConfig
    loss: LossConfig = Field(default_factory=LossConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)


class PretrainConfig(TrainConfig):
    """Stage 1. ``phases.epochs`` = [Entity Type Understanding on the masked corpus, Progressive
    Objective Activation without alignment, with alignment] (both on the unmasked corpus)."""

    stage: ClassVar[str] = "pretrain"
    data: PretrainDataConfig = Field(default_factory=PretrainDataConfig)

    @property
    def corpus_path(self) -> Path:
        return (
            Path(self.data.corpus_dir) if self.data.corpus_dir else Path("corpus") / Path(self.dataset).stem
        )


class SFTConfig(TrainConfig):
    """Stage 2. ``phases.epochs`` = [curriculum warm-up on samples with at most
    ``data.curriculum_max_relations`` relations, full training set without alignment, with alignment]."""

    stage: ClassVar[str] = "sft"
    data: SFTDataConfig = Field(default_factory=SFTDataConfig)
    fit: HeadsFitConfig = Field(default_factory=HeadsFitConfig)


C = TypeVar("C", bound=TrainConfig)


def load_config(cls: type[C], path: str | Path | None, overrides: Sequence[str] | dict[str, Any] = ()) -> C:
    """The file's values, then the overrides (``{"loss.alpha": 0.3}`` or ``["--loss.alpha=0.3"]``)."""
    if isinstance(overrides, dict):
        return config_tree.load(cls, path, overrides)
    values, sources = {}, {}
    for item in overrides:
        if not item.startswith("--") or "=" not in item:
            raise UserError(f"override {item!r}: expected --key=value (e.g. --loss.alpha=0.3)")
        key, raw = item[2:].split("=", 1)
        key = key.replace("-", "_")
        values[key], sources[key] = config_tree.parse_value(raw), f"command line {item!r}"
    return config_tree.load(cls, path, values, sources)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically), with the stage it belongs to on top."""
    body = yaml.safe_dump(config_tree.dump(cfg), sort_keys=False, allow_unicode=True)
    atomic_write_text(path, f"# stage: {cfg.stage}\n{body}")


# Keys that may change between a run and its resumption: they do not change what is trained (the
# fit section acts on the exported model after training: a finished run can be given its heads).
RESUMABLE_KEYS = frozenset(
    {
        "checkpoint.resume",
        "checkpoint.keep_final",
        "trainer.log_every",
        "trainer.progress",
        "decode.batch_size",
        *(f"fit.{key}" for key in HeadsFitConfig.model_fields),
    }
)


def config_differences(
    old: TrainConfig, new: TrainConfig, ignore: frozenset[str] = RESUMABLE_KEYS
) -> list[str]:
    """``key: old -> new`` for every key that differs, ignoring the ones a resume may change."""
    return config_tree.differences(old, new, ignore)
