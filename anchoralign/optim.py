"""What the optimizer and the forward pass are given: the parameter groups (weight decay and the
learning-rate multiplier of new parameters) and the mixed precision of a stage config."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from anchoralign.config import TrainConfig


def autocast(precision: str, device: torch.device) -> AbstractContextManager[Any]:
    """Mixed precision of the forward pass: bfloat16 autocast for ``bf16``, nothing for ``fp32``."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def parameter_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices only (shrinking biases and norm scales only hurts),
    and the multiplier ``optim.new_lr_mult`` (kept in the group as ``lr_mult``) for the parameters
    the backbone checkpoint did not provide, such as random cross-attention, which have everything
    to learn while the pretrained rest needs gentle steps."""
    new = set(model.new_parameter_names()) if hasattr(model, "new_parameter_names") else set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((p.ndim >= 2, name in new), []).append(p)
    o = cfg.optim
    return [
        {
            "params": params,
            "weight_decay": o.weight_decay if decay else 0.0,
            "lr_mult": o.new_lr_mult if is_new else 1.0,
        }
        for (decay, is_new), params in sorted(groups.items())
    ]
