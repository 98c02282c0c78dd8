"""Stage configs of the trainers, their loading from YAML plus ``--key=value`` overrides, and the
DeepSpeed config built from them.

One pydantic model per trainer (:class:`PretrainConfig`, :class:`SFTConfig`) on a shared
:class:`TrainConfig`. Every key is validated when loaded: an unknown or ill-typed key is refused
with its name and where it came from (the file or the command line). The resolved config is saved
as ``train_config.yaml`` next to every checkpoint and compared on resume.

An ablation is an override: ``--use_alignment=false`` (no alignment objectives at all),
``--use_ner_re=false``, ``--use_fwd_rev=false``, ``--use_suppress=false``, ``--init_from=null``
(SFT without pretraining), ``--aggregate=false``, ``--anchor=false``, ``--paradigm=1``.
"""

from __future__ import annotations

import difflib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from anchoralign.errors import UserError

CONFIG_FILE = "train_config.yaml"

# Fields that may change between a run and its resumption: they do not change what is computed.
RESUMABLE_FIELDS = frozenset({"resume", "log_every", "eval_batch_size", "progress"})

# A user DeepSpeed JSON may not bring its own optimizer or schedule: the trainer builds both from
# the stage config (a torch AdamW and the warm-up/decay schedule), so that the config is the
# single source of truth and DeepSpeed never JIT-compiles its fused Adam.
_REFUSED_DS_KEYS = ("optimizer", "scheduler")


class TrainConfig(BaseModel):
    """Everything both trainers share. Field descriptions are printed by ``--help``."""

    stage: ClassVar[str] = "train"

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, validate_assignment=True)

    # What to train, on what.
    dataset: str = Field(min_length=1, description="dataset name (see `anchoralign data-stats`) or path")
    data_dir: str | None = Field(
        None, description="benchmark data folder (default $ANCHORALIGN_DATA or ./data)"
    )
    fold: int | None = Field(None, ge=0, description="cross-validation fold (datasets with folds, e.g. ADE)")
    backbone: str = Field("facebook/bart-large", description="'tiny', 'minilm', a hub id or a directory")
    paradigm: int = Field(3, ge=1, le=4, description="output paradigm 1-4 (3 = grouped, all entities)")
    decoder_attention: Literal["prefix", "cross"] = Field(
        "prefix",
        description="encoder-only backbones: decoders read the encoder through their own pretrained "
        "self-attention (prefix) or through new, random cross-attention (cross)",
    )
    label_init: Literal["name", "description"] = Field(
        "name",
        description="label tokens start as the mean embedding of the label's name (the description's "
        "text before its first comma) or of its whole description",
    )
    init_from: str | None = Field(None, description="checkpoint directory to start from (null: the backbone)")
    output_dir: str = Field(
        min_length=1, description="run folder: checkpoints/, best/, final/, metrics.jsonl"
    )

    # Optimisation.
    epochs: tuple[int, int, int] = Field(description="epochs of the three phases (see the stage)")
    lr: float = Field(gt=0, description="peak learning rate")
    new_lr_mult: float = Field(
        1.0, gt=0, description="learning-rate multiplier of parameters the backbone did not provide"
    )
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="share of the stage's steps spent warming up")
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="decay ends at lr * min_lr_ratio")
    clip: float = Field(1.0, ge=0, description="gradient-norm clipping (0: off)")
    micro_batch_size: int = Field(8, ge=1, description="samples per rank per forward pass")
    grad_accum: int = Field(1, ge=1, description="micro-batches accumulated per optimizer step")
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="bf16: mixed precision (the forward pass autocast to bfloat16; weights, optimizer "
        "and losses in float32)",
    )
    bucket_batches: int = Field(
        0,
        ge=0,
        description="length bucketing: sort each window of N global batches of the epoch's shuffled "
        "order by length, then shuffle the batches (0: off)",
    )
    deepspeed_config: str | None = Field(None, description="a DeepSpeed JSON to use instead of the built one")
    max_length: int = Field(256, ge=8, description="longest encoder input in sub-words")
    seed: int = 42

    # Losses and progressive objective activation.
    alpha: float = Field(1.0, ge=0, description="weight of the NER-RE alignment (KL) term")
    beta: float = Field(1.0, ge=0, description="weight of the forward-reverse symmetric KL term")
    gamma: float = Field(1.0, ge=0, description="weight of the negative-suppression term")
    use_alignment: bool = Field(True, description="false: the alignment phase keeps cross-entropy only")
    use_ner_re: bool = True
    use_fwd_rev: bool = True
    use_suppress: bool = True
    switch_on: Literal["epochs", "valid_rate"] = Field(
        "epochs",
        description="when alignment starts: after the configured epochs, or as soon as the share of "
        "dev outputs that parse into valid structures reaches valid_rate_threshold",
    )
    valid_rate_threshold: float = Field(0.9, gt=0, le=1)

    # Evaluation, decoding and checkpoints.
    eval_split: str = Field("dev", description="split scored during training (best checkpoint, switch)")
    loss_splits: list[str] = Field(
        default_factory=lambda: ["dev", "test"], description="splits whose loss terms are logged at eval"
    )
    best_metric: str | None = Field(
        None, description="score that picks best/ (default: relation strict F1, boundary F1 if scored so)"
    )
    eval_every: int = Field(0, ge=0, description="also evaluate every N optimizer steps (0: per epoch only)")
    save_every: int = Field(
        0, ge=0, description="also checkpoint every N optimizer steps (0: per epoch only)"
    )
    log_every: int = Field(10, ge=1, description="optimizer steps between metrics.jsonl rows")
    eval_batch_size: int = Field(32, ge=1)
    beam_size: int = Field(1, ge=1)
    decode_max_len: int | None = Field(
        None, ge=1, description="longest output per decoder at evaluation (default 3 x words + 16)"
    )
    aggregate: bool = Field(True, description="unite forward and reverse relations")
    anchor: bool = Field(True, description="keep only relations whose mentions the NER decoder found")
    constrained: bool = Field(True, description="decode within the restricted vocabulary")
    resume: bool = Field(True, description="continue from output_dir/checkpoints when one is there")
    progress: bool = Field(True, description="show a progress bar")

    # Smoke runs.
    max_steps: int | None = Field(None, ge=1, description="stop the stage after N optimizer steps")
    limit_train: int | None = Field(
        None, ge=1, description="use only the first N samples of each training set"
    )
    limit_eval: int | None = Field(None, ge=1, description="use only the first N samples of each eval split")

    @field_validator("epochs", mode="before")
    @classmethod
    def _three_epochs(cls, v: Any) -> Any:
        if isinstance(v, list | tuple) and len(v) != 3:
            raise ValueError(f"expected three epoch counts, one per phase, got {len(v)}: {list(v)}")
        return v

    @field_validator("epochs")
    @classmethod
    def _epochs_valid(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(e < 0 for e in v):
            raise ValueError(f"epochs must be >= 0, got {list(v)}")
        if sum(v) == 0:
            raise ValueError("at least one phase needs epochs > 0")
        return v


class PretrainConfig(TrainConfig):
    """Stage 1. ``epochs`` = [Entity Type Understanding on the masked corpus, Progressive Objective
    Activation without alignment, with alignment] (both on the unmasked corpus)."""

    corpus_dir: str | None = Field(
        None, description="folder with masked.jsonl and unmasked.jsonl (default corpus/<dataset>)"
    )

    stage: ClassVar[str] = "pretrain"

    @property
    def corpus_path(self) -> Path:
        return Path(self.corpus_dir) if self.corpus_dir else Path("corpus") / Path(self.dataset).stem


class SFTConfig(TrainConfig):
    """Stage 2. ``epochs`` = [curriculum warm-up on samples with at most
    ``curriculum_max_relations`` relations, full training set without alignment, with alignment]."""

    train_split: str = "train"
    curriculum_max_relations: int = Field(1, ge=0, description="K: warm-up samples have at most K relations")

    stage: ClassVar[str] = "sft"


C = TypeVar("C", bound=TrainConfig)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config keys to values, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def parse_override(item: str) -> tuple[str, Any]:
    """``--key=value`` -> (key, value), the value read as YAML (``[1,1,1]``, ``true``, ``null``)."""
    if not item.startswith("--") or "=" not in item:
        raise UserError(f"override {item!r}: expected --key=value (e.g. --epochs=[1,1,1])")
    key, raw = item[2:].split("=", 1)
    key = key.replace("-", "_")
    if not key:
        raise UserError(f"override {item!r}: the key is empty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw  # not YAML: keep the text and let validation judge it
    return key, value


def _unknown_key_error(cls: type[TrainConfig], key: str, source: str) -> UserError:
    close = difflib.get_close_matches(key, list(cls.model_fields), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UserError(f"{source}: unknown config key '{key}'{hint}")


def load_config(cls: type[C], path: str | Path | None, overrides: Sequence[str] = ()) -> C:
    """The file's values, then the ``--key=value`` overrides, validated as ``cls``."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        for key, value in _read_yaml(Path(path)).items():
            values[key], sources[key] = value, str(path)
    for item in overrides:
        key, value = parse_override(item)
        values[key], sources[key] = value, f"command line {item!r}"
    for key in values:
        if key not in cls.model_fields:
            raise _unknown_key_error(cls, key, sources[key])
    try:
        return cls.model_validate(values)
    except ValidationError as err:
        first = err.errors()[0]
        key = str(first["loc"][0]) if first["loc"] else "config"
        where = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")
        source = sources.get(key, str(path) if path is not None else "config")
        given = f" (got {first['input']!r})" if key in values and first["type"] != "missing" else ""
        raise UserError(f"{source}: field '{where}': {msg}{given}") from None


def _type_name(annotation: Any) -> str:
    """A readable type for ``--help``: ``int or null``, ``one of fp32|bf16``, ``[int, int, int]``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + "|".join(str(a) for a in args)
    if origin is tuple:
        return "[" + ", ".join(_type_name(a) for a in args) + "]"
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if args and type(None) in args:
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " or null"
    return getattr(annotation, "__name__", str(annotation))


def config_help(cls: type[TrainConfig]) -> str:
    """One line per key: name, type, default, description (the ``--help`` text)."""
    lines = []
    for name, field in cls.model_fields.items():
        default = (
            "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)!r}"
        )
        ann = _type_name(field.annotation)
        desc = f"  {field.description}" if field.description else ""
        lines.append(f"  --{name}=  ({ann}; {default}){desc}")
    return "\n".join(lines)


def parse_args(cls: type[C], argv: Sequence[str] | None, prog: str) -> C:
    """``--config FILE`` plus ``--key=value`` overrides -> a validated config.

    ``--local_rank`` (added by the ``deepspeed`` launcher; the rank is read from the environment)
    is accepted and ignored; ``-h``/``--help`` prints every key and exits.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    path: str | None = None
    overrides: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-h", "--help"):
            print(f"usage: {prog} --config FILE [--key=value ...]\n\nkeys:\n{config_help(cls)}")
            raise SystemExit(0)
        if arg == "--config":
            if i + 1 >= len(args):
                raise UserError("--config needs a file")
            path, i = args[i + 1], i + 2
            continue
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg.startswith("--local_rank") or arg.startswith("--local-rank"):
            i += 1 if "=" in arg else 2
            continue
        else:
            overrides.append(arg)
        i += 1
    return load_config(cls, path, overrides)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically), with the stage it belongs to on top."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    body = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    tmp.write_text(f"# stage: {cfg.stage}\n{body}", encoding="utf-8")
    tmp.replace(path)


def config_differences(
    old: TrainConfig, new: TrainConfig, ignore: frozenset[str] = RESUMABLE_FIELDS
) -> list[str]:
    """``key: old -> new`` for every field that differs, ignoring the ones a resume may change."""
    a, b = old.model_dump(mode="json"), new.model_dump(mode="json")
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if k not in ignore and a[k] != b.get(k)]


# ---------------------------------------------------------------------------------------------
# DeepSpeed config
# ---------------------------------------------------------------------------------------------


def effective_zero_stage(cfg: TrainConfig, world_size: int) -> int:
    """The ZeRO stage to run: the configured one, except 0 on a single rank without a user JSON.

    ZeRO partitions optimizer state, gradients and parameters across data-parallel ranks; with
    one rank there is nothing to partition and its per-parameter hooks and buffer copies only cost
    time (a quarter of the step of the tiny model on CPU). A user's DeepSpeed JSON keeps the stage,
    because its offload options need ZeRO even on one GPU.
    """
    if world_size == 1 and cfg.deepspeed_config is None:
        return 0
    return cfg.zero_stage


def build_deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of a stage config on ``world_size`` ranks (pure).

    No optimizer or scheduler section: the trainer passes a torch AdamW and its own schedule.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ds = {
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.clip,
        "zero_optimization": {"stage": effective_zero_stage(cfg, world_size)},
        # Mixed precision is torch autocast around the forward pass (the trainer), so DeepSpeed
        # keeps float32 weights on every device.
        "bf16": {"enabled": False},
        # The trainer logs by itself (metrics.jsonl and the progress bar).
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    _check_batch_sizes(ds, world_size, "the built DeepSpeed config")
    return ds


def _check_batch_sizes(ds: dict[str, Any], world_size: int, where: str) -> None:
    total, micro, accum = (
        ds["train_batch_size"],
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
    )
    if total != micro * accum * world_size:
        raise UserError(
            f"{where}: train_batch_size {total} != micro batch {micro} x accumulation {accum} "
            f"x world size {world_size}"
        )


_BATCH_KEYS = {
    "train_micro_batch_size_per_gpu": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "gradient_clipping": "clip",
}


def merge_deepspeed_config(
    cfg: TrainConfig, user: dict[str, Any], world_size: int, where: str
) -> dict[str, Any]:
    """A user's DeepSpeed config, checked against the stage config (pure).

    The user's sections win (ZeRO offload, buckets, activation checkpointing...), but the values the
    trainer also reads must agree with the stage config: micro batch, accumulation, clipping,
    batch size and precision. ``"auto"`` takes the stage config's value.
    """
    for key in _REFUSED_DS_KEYS:
        if key in user:
            raise UserError(
                f"{where}: remove the '{key}' section; the trainer builds the optimizer and the "
                "learning-rate schedule from the stage config (lr, weight_decay, schedule, warmup_ratio)"
            )
    built = build_deepspeed_config(cfg, world_size)
    merged = {**built, **user}
    for ds_key, cfg_key in _BATCH_KEYS.items():
        if merged[ds_key] == "auto":
            merged[ds_key] = built[ds_key]
        elif merged[ds_key] != built[ds_key]:
            raise UserError(
                f"{where}: '{ds_key}' is {merged[ds_key]!r} but the stage config has "
                f'{cfg_key}={built[ds_key]!r}; make them equal or write "auto"'
            )
    if merged["train_batch_size"] == "auto":
        merged["train_batch_size"] = built["train_batch_size"]
    _check_batch_sizes(merged, world_size, where)
    bf16 = merged.get("bf16", {}).get("enabled", False)
    if bf16 not in ("auto", False):
        raise UserError(
            f"{where}: remove 'bf16.enabled'; mixed precision is set by the stage config "
            f"(precision=bf16, autocast with float32 weights)"
        )
    merged["bf16"] = {**merged.get("bf16", {}), "enabled": False}
    zero = merged.get("zero_optimization", {})
    if zero.get("stage", cfg.zero_stage) not in ("auto", cfg.zero_stage):
        raise UserError(
            f"{where}: 'zero_optimization.stage' is {zero['stage']!r} but the stage config has "
            f"zero_stage={cfg.zero_stage}"
        )
    merged["zero_optimization"] = {**zero, "stage": cfg.zero_stage}
    return merged


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The built config, or the user's JSON file merged with it (``cfg.deepspeed_config``)."""
    if cfg.deepspeed_config is None:
        return build_deepspeed_config(cfg, world_size)
    path = Path(cfg.deepspeed_config)
    if not path.is_file():
        raise UserError(f"deepspeed_config: file not found: {path}")
    try:
        user = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(user, dict):
        raise UserError(f"{path}: expected a JSON object")
    return merge_deepspeed_config(cfg, user, world_size, str(path))
