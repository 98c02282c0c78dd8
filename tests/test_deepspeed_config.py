"""The DeepSpeed config built from a stage config, and a user's JSON merged and checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anchoralign.config import PretrainConfig, load_config
from anchoralign.deepspeed_config import build, deepspeed_config, effective_zero_stage, merge
from anchoralign.errors import UserError


def _cfg(*overrides: str) -> PretrainConfig:
    base = ["--dataset=conll04", "--output_dir=o", "--phases.epochs=[1,1,1]", "--optim.lr=1e-4"]
    return load_config(PretrainConfig, None, [*base, *overrides])


def test_built_deepspeed_config() -> None:
    cfg = _cfg(
        "--optim.micro_batch_size=4",
        "--optim.grad_accum=3",
        "--trainer.zero_stage=3",
        "--trainer.precision=bf16",
        "--optim.clip=0.5",
    )
    ds = build(cfg, world_size=2)
    assert ds["train_batch_size"] == 24  # 4 x 3 x 2
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 3}
    # bf16 is autocast in the trainer: DeepSpeed keeps float32 weights.
    assert ds["bf16"] == {"enabled": False}
    assert "optimizer" not in ds and "scheduler" not in ds
    with pytest.raises(ValueError):
        build(cfg, world_size=0)


def test_zero_is_off_on_a_single_rank_unless_a_json_asks_for_it(tmp_path: Path) -> None:
    cfg = _cfg("--trainer.zero_stage=3")
    assert effective_zero_stage(cfg, world_size=1) == 0
    assert build(cfg, world_size=1)["zero_optimization"] == {"stage": 0}
    assert effective_zero_stage(cfg, world_size=2) == 3
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}', encoding="utf-8")
    with_json = _cfg("--trainer.zero_stage=2", f"--trainer.deepspeed_config={ds}")
    assert effective_zero_stage(with_json, world_size=1) == 2
    assert deepspeed_config(with_json, world_size=1)["zero_optimization"]["stage"] == 2


def test_user_deepspeed_config_keeps_its_sections_and_fills_auto() -> None:
    cfg = _cfg("--optim.micro_batch_size=2", "--optim.grad_accum=2")
    user = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": 2,
        "train_batch_size": "auto",
        "zero_optimization": {"stage": "auto", "offload_optimizer": {"device": "cpu"}},
        "activation_checkpointing": {"partition_activations": True},
    }
    ds = merge(cfg, user, world_size=4, where="u.json")
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["train_batch_size"] == 16
    assert ds["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    assert ds["activation_checkpointing"] == {"partition_activations": True}


@pytest.mark.parametrize(
    ("user", "fragment"),
    [
        ({"optimizer": {"type": "Adam"}}, "remove the 'optimizer' section"),
        ({"scheduler": {"type": "WarmupLR"}}, "remove the 'scheduler' section"),
        ({"train_micro_batch_size_per_gpu": 8}, "optim.micro_batch_size=2"),
        ({"gradient_accumulation_steps": 4}, "optim.grad_accum=1"),
        ({"train_batch_size": 5}, "train_batch_size 5 != micro batch 2 x accumulation 1 x world size 2"),
        ({"bf16": {"enabled": True}}, "remove 'bf16.enabled'"),
        ({"zero_optimization": {"stage": 3}}, "trainer.zero_stage=2"),
    ],
)
def test_user_deepspeed_config_must_agree(user: dict, fragment: str) -> None:
    with pytest.raises(UserError, match="^u.json: ") as err:
        merge(_cfg("--optim.micro_batch_size=2"), user, world_size=2, where="u.json")
    assert fragment in str(err.value)


def test_deepspeed_config_file(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True}}), encoding="utf-8")
    ds = deepspeed_config(_cfg(f"--trainer.deepspeed_config={path}"), world_size=1)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert ds["train_batch_size"] == 8
    with pytest.raises(UserError, match="file not found"):
        deepspeed_config(_cfg(f"--trainer.deepspeed_config={tmp_path / 'none.json'}"), world_size=1)
    path.write_text('{\n  "a": 1,\n}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"ds.json:3: not valid JSON"):
        deepspeed_config(_cfg(f"--trainer.deepspeed_config={path}"), world_size=1)
