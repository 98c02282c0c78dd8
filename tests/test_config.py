"""Stage configs: YAML + overrides, refusals naming the key, the DeepSpeed config builder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from anchoralign.config import (
    CONFIG_FILE,
    PretrainConfig,
    SFTConfig,
    build_deepspeed_config,
    config_differences,
    config_help,
    deepspeed_config,
    effective_zero_stage,
    load_config,
    merge_deepspeed_config,
    parse_args,
    parse_override,
    save_config,
)
from anchoralign.errors import UserError

REPO = Path(__file__).resolve().parent.parent

BASE = """\
dataset: conll04
output_dir: runs/x
epochs: [2, 1, 3]
lr: 3e-5
micro_batch_size: 4
"""


@pytest.fixture()
def yaml_file(tmp_path: Path) -> Path:
    path = tmp_path / "pre.yaml"
    path.write_text(BASE, encoding="utf-8")
    return path


def test_file_values_then_overrides(yaml_file: Path) -> None:
    cfg = load_config(
        PretrainConfig, yaml_file, ["--epochs=[1,1,1]", "--backbone=tiny", "--use-alignment=false"]
    )
    assert cfg.epochs == (1, 1, 1)
    assert cfg.backbone == "tiny"
    assert cfg.use_alignment is False
    # PyYAML reads "3e-5" (no dot) as a string; it must still become the float 3e-5.
    assert cfg.lr == pytest.approx(3e-5)
    assert cfg.micro_batch_size == 4
    assert cfg.stage == "pretrain"


def test_override_values_are_read_as_yaml() -> None:
    assert parse_override("--epochs=[1, 2, 3]") == ("epochs", [1, 2, 3])
    assert parse_override("--init_from=null") == ("init_from", None)
    assert parse_override("--resume=false") == ("resume", False)
    assert parse_override("--output_dir=runs/a=b") == ("output_dir", "runs/a=b")
    with pytest.raises(UserError, match="expected --key=value"):
        parse_override("--epochs")
    with pytest.raises(UserError, match="expected --key=value"):
        parse_override("epochs=1")


def test_numbers_given_for_text_fields_stay_text(yaml_file: Path) -> None:
    cfg = load_config(PretrainConfig, yaml_file, ["--output_dir=2024", "--corpus_dir=7"])
    assert cfg.output_dir == "2024" and cfg.corpus_dir == "7"


def test_unknown_key_in_file_names_file_key_and_suggestion(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BASE + "learning_rat: 0.1\n", encoding="utf-8")
    with pytest.raises(UserError) as err:
        load_config(PretrainConfig, path)
    assert str(path) in str(err.value)
    assert "unknown config key 'learning_rat'" in str(err.value)


def test_unknown_override_suggests_the_close_key(yaml_file: Path) -> None:
    with pytest.raises(UserError) as err:
        load_config(PretrainConfig, yaml_file, ["--micro_bach_size=2"])
    msg = str(err.value)
    assert "command line '--micro_bach_size=2'" in msg
    assert "did you mean 'micro_batch_size'" in msg


def test_sft_key_refused_by_pretraining(yaml_file: Path) -> None:
    with pytest.raises(UserError, match="unknown config key 'curriculum_max_relations'"):
        load_config(PretrainConfig, yaml_file, ["--curriculum_max_relations=2"])


@pytest.mark.parametrize(
    ("override", "field", "fragment"),
    [
        ("--lr=fast", "lr", "valid number"),
        ("--epochs=[1,2]", "epochs", "expected three epoch counts"),
        ("--epochs=[1,-1,2]", "epochs", ">= 0"),
        ("--epochs=[0,0,0]", "epochs", "at least one phase"),
        ("--zero_stage=4", "zero_stage", "Input should be"),
        ("--precision=fp16", "precision", "'fp32' or 'bf16'"),
        ("--micro_batch_size=0", "micro_batch_size", "greater than or equal to 1"),
        ("--resume=perhaps", "resume", "valid boolean"),
    ],
)
def test_ill_typed_values_name_the_field(yaml_file: Path, override: str, field: str, fragment: str) -> None:
    with pytest.raises(UserError) as err:
        load_config(PretrainConfig, yaml_file, [override])
    msg = str(err.value)
    assert f"field '{field}" in msg
    assert fragment in msg
    assert override in msg  # where the bad value came from


def test_ill_typed_value_in_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BASE.replace("micro_batch_size: 4", "micro_batch_size: four"), encoding="utf-8")
    with pytest.raises(UserError) as err:
        load_config(PretrainConfig, path)
    assert str(err.value).startswith(f"{path}: field 'micro_batch_size'")
    assert "'four'" in str(err.value)


def test_missing_required_field(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("dataset: conll04\nepochs: [1, 1, 1]\nlr: 1e-4\n", encoding="utf-8")
    with pytest.raises(UserError, match="field 'output_dir': Field required"):
        load_config(PretrainConfig, path)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="config file not found"):
        load_config(PretrainConfig, tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\n", encoding="utf-8")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(PretrainConfig, bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(UserError, match="expected a mapping"):
        load_config(PretrainConfig, listed)


def test_parse_args_accepts_launcher_local_rank(yaml_file: Path) -> None:
    argv = ["--local_rank=1", "--config", str(yaml_file), "--local_rank", "0", "--seed=7"]
    cfg = parse_args(SFTConfig, argv, prog="sft/run.py")
    assert cfg.seed == 7 and cfg.stage == "sft"
    cfg2 = parse_args(SFTConfig, [f"--config={yaml_file}"], prog="sft/run.py")
    assert cfg2.seed == 42


def test_help_lists_every_key(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        parse_args(SFTConfig, ["--help"], prog="sft/run.py")
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for key in SFTConfig.model_fields:
        assert f"--{key}=" in out
    assert config_help(SFTConfig).count("\n") == len(SFTConfig.model_fields) - 1


def test_saved_config_loads_back_identical(yaml_file: Path, tmp_path: Path) -> None:
    cfg = load_config(SFTConfig, yaml_file, ["--init_from=null", "--loss_splits=[dev]"])
    path = tmp_path / "ck" / CONFIG_FILE
    save_config(cfg, path)
    assert path.read_text(encoding="utf-8").startswith("# stage: sft\n")
    assert load_config(SFTConfig, path) == cfg


def test_config_differences_ignore_what_a_resume_may_change(yaml_file: Path) -> None:
    a = load_config(PretrainConfig, yaml_file)
    b = load_config(PretrainConfig, yaml_file, ["--log_every=1", "--resume=false", "--progress=false"])
    assert config_differences(a, b) == []
    c = load_config(PretrainConfig, yaml_file, ["--lr=1e-3", "--epochs=[1,1,1]"])
    assert config_differences(a, c) == ["epochs: [2, 1, 3] -> [1, 1, 1]", "lr: 3e-05 -> 0.001"]


# --- DeepSpeed config -------------------------------------------------------------------------


def _cfg(*overrides: str) -> PretrainConfig:
    base = ["--dataset=conll04", "--output_dir=o", "--epochs=[1,1,1]", "--lr=1e-4"]
    return load_config(PretrainConfig, None, [*base, *overrides])


def test_built_deepspeed_config() -> None:
    cfg = _cfg("--micro_batch_size=4", "--grad_accum=3", "--zero_stage=3", "--precision=bf16", "--clip=0.5")
    ds = build_deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 24  # 4 x 3 x 2
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 3}
    # bf16 is autocast in the trainer: DeepSpeed keeps float32 weights.
    assert ds["bf16"] == {"enabled": False}
    assert "optimizer" not in ds and "scheduler" not in ds
    with pytest.raises(ValueError):
        build_deepspeed_config(cfg, world_size=0)


def test_zero_is_off_on_a_single_rank_unless_a_json_asks_for_it(tmp_path: Path) -> None:
    cfg = _cfg("--zero_stage=3")
    assert effective_zero_stage(cfg, world_size=1) == 0
    assert build_deepspeed_config(cfg, world_size=1)["zero_optimization"] == {"stage": 0}
    assert effective_zero_stage(cfg, world_size=2) == 3
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}', encoding="utf-8")
    with_json = _cfg("--zero_stage=2", f"--deepspeed_config={ds}")
    assert effective_zero_stage(with_json, world_size=1) == 2
    assert deepspeed_config(with_json, world_size=1)["zero_optimization"]["stage"] == 2


def test_user_deepspeed_config_keeps_its_sections_and_fills_auto() -> None:
    cfg = _cfg("--micro_batch_size=2", "--grad_accum=2")
    user = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": 2,
        "train_batch_size": "auto",
        "zero_optimization": {"stage": "auto", "offload_optimizer": {"device": "cpu"}},
        "activation_checkpointing": {"partition_activations": True},
    }
    ds = merge_deepspeed_config(cfg, user, world_size=4, where="u.json")
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["train_batch_size"] == 16
    assert ds["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    assert ds["activation_checkpointing"] == {"partition_activations": True}


@pytest.mark.parametrize(
    ("user", "fragment"),
    [
        ({"optimizer": {"type": "Adam"}}, "remove the 'optimizer' section"),
        ({"scheduler": {"type": "WarmupLR"}}, "remove the 'scheduler' section"),
        ({"train_micro_batch_size_per_gpu": 8}, "micro_batch_size=2"),
        ({"gradient_accumulation_steps": 4}, "grad_accum=1"),
        ({"train_batch_size": 5}, "train_batch_size 5 != micro batch 2 x accumulation 1 x world size 2"),
        ({"bf16": {"enabled": True}}, "remove 'bf16.enabled'"),
        ({"zero_optimization": {"stage": 3}}, "zero_stage=2"),
    ],
)
def test_user_deepspeed_config_must_agree(user: dict, fragment: str) -> None:
    with pytest.raises(UserError, match="^u.json: ") as err:
        merge_deepspeed_config(_cfg("--micro_batch_size=2"), user, world_size=2, where="u.json")
    assert fragment in str(err.value)


def test_deepspeed_config_file(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True}}), encoding="utf-8")
    ds = deepspeed_config(_cfg(f"--deepspeed_config={path}"), world_size=1)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert ds["train_batch_size"] == 8
    with pytest.raises(UserError, match="file not found"):
        deepspeed_config(_cfg(f"--deepspeed_config={tmp_path / 'none.json'}"), world_size=1)
    path.write_text('{\n  "a": 1,\n}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"ds.json:3: not valid JSON"):
        deepspeed_config(_cfg(f"--deepspeed_config={path}"), world_size=1)


# --- shipped configs --------------------------------------------------------------------------

SHIPPED = sorted((REPO / "pretrain" / "configs").glob("*.yaml")) + sorted(
    (REPO / "sft" / "configs").glob("*.yaml")
)


def test_every_dataset_has_both_configs() -> None:
    pre = {p.stem for p in (REPO / "pretrain" / "configs").glob("*.yaml")}
    sft = {p.stem for p in (REPO / "sft" / "configs").glob("*.yaml")}
    assert pre == sft == {"conll04", "scierc", "ade", "nyt", "webnlg", "ace05"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_shipped_config_is_valid(path: Path) -> None:
    from anchoralign.datasets import known_datasets

    cls = PretrainConfig if path.parent.parent.name == "pretrain" else SFTConfig
    cfg = load_config(cls, path)
    assert cfg.dataset == path.stem
    assert cfg.dataset in known_datasets()
    assert "NOT VERIFIED against the paper's Table 8" in path.read_text(encoding="utf-8")
    if isinstance(cfg, SFTConfig):
        assert cfg.init_from == f"runs/{cfg.dataset}/pretrain/final"
