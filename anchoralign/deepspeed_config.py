"""The DeepSpeed config of a stage config: built by one pure function, or a user's JSON merged with
it and checked against it.

No optimizer or scheduler section: the trainer builds a torch AdamW and its own schedule from
``optim``, so that the stage config is the single source of truth (and DeepSpeed never JIT-compiles
its fused Adam). Mixed precision is torch autocast in the trainer, so DeepSpeed keeps float32
weights on every device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from anchoralign.config import TrainConfig
from anchoralign.errors import UserError
from anchoralign.files import read_json_object

_REFUSED_KEYS = ("optimizer", "scheduler")
_BATCH_KEYS = {
    "train_micro_batch_size_per_gpu": "optim.micro_batch_size",
    "gradient_accumulation_steps": "optim.grad_accum",
    "gradient_clipping": "optim.clip",
}


def effective_zero_stage(cfg: TrainConfig, world_size: int) -> int:
    """The ZeRO stage to run: the configured one, except 0 on a single rank without a user JSON.

    ZeRO partitions optimizer state, gradients and parameters across data-parallel ranks; with
    one rank there is nothing to partition and its per-parameter hooks and buffer copies only cost
    time (a quarter of the step of the tiny model on CPU). A user's DeepSpeed JSON keeps the stage,
    because its offload options need ZeRO even on one GPU.
    """
    if world_size == 1 and cfg.trainer.deepspeed_config is None:
        return 0
    return cfg.trainer.zero_stage


def describe_zero(cfg: TrainConfig, world_size: int, running: int) -> str:
    """``ZeRO 2``, or why the stage running differs from the configured one (for the log)."""
    if running == cfg.trainer.zero_stage or effective_zero_stage(cfg, world_size) != 0:
        return f"ZeRO {running}"
    return f"ZeRO {running} (zero_stage={cfg.trainer.zero_stage} has nothing to partition on one rank)"


def build(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of a stage config on ``world_size`` ranks (pure)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    optim = cfg.optim
    ds = {
        "train_batch_size": optim.micro_batch_size * optim.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": optim.micro_batch_size,
        "gradient_accumulation_steps": optim.grad_accum,
        "gradient_clipping": optim.clip,
        "zero_optimization": {"stage": effective_zero_stage(cfg, world_size)},
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


def merge(cfg: TrainConfig, user: dict[str, Any], world_size: int, where: str) -> dict[str, Any]:
    """A user's DeepSpeed config, checked against the stage config (pure).

    The user's sections win (ZeRO offload, buckets, activation checkpointing...), but the values the
    trainer also reads must agree with the stage config: micro batch, accumulation, clipping,
    batch size and ZeRO stage. ``"auto"`` takes the stage config's value.
    """
    for key in _REFUSED_KEYS:
        if key in user:
            raise UserError(
                f"{where}: remove the '{key}' section; the trainer builds the optimizer and the "
                "learning-rate schedule from the stage config (optim.lr, optim.weight_decay, optim.schedule, ...)"
            )
    built = build(cfg, world_size)
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
    if merged.get("bf16", {}).get("enabled", False) not in ("auto", False):
        raise UserError(
            f"{where}: remove 'bf16.enabled'; mixed precision is set by the stage config "
            "(trainer.precision=bf16: autocast with float32 weights)"
        )
    merged["bf16"] = {**merged.get("bf16", {}), "enabled": False}
    zero = merged.get("zero_optimization", {})
    if zero.get("stage", cfg.trainer.zero_stage) not in ("auto", cfg.trainer.zero_stage):
        raise UserError(
            f"{where}: 'zero_optimization.stage' is {zero['stage']!r} but the stage config has "
            f"trainer.zero_stage={cfg.trainer.zero_stage}"
        )
    merged["zero_optimization"] = {**zero, "stage": cfg.trainer.zero_stage}
    return merged


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The built config, or the user's JSON file merged with it (``trainer.deepspeed_config``)."""
    if cfg.trainer.deepspeed_config is None:
        return build(cfg, world_size)
    path = Path(cfg.trainer.deepspeed_config)
    if not path.is_file():
        raise UserError(f"trainer.deepspeed_config: file not found: {path}")
    return merge(cfg, read_json_object(path), world_size, str(path))
