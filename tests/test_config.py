"""Stage configs: the nested tree, overrides, the stage command line, the shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from anchoralign import config_tree
from anchoralign.config import (
    CONFIG_FILE,
    OptimConfig,
    PretrainConfig,
    SFTConfig,
    config_differences,
    load_config,
    save_config,
)
from anchoralign.errors import UserError
from anchoralign.stages import parse_args

REPO = Path(__file__).resolve().parent.parent

BASE = """\
dataset: conll04
output_dir: runs/x
phases:
  epochs: [2, 1, 3]
optim:
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
        PretrainConfig,
        yaml_file,
        ["--phases.epochs=[1,1,1]", "--model.backbone=tiny", "--loss.alignment=false", "--loss.alpha=0.3"],
    )
    assert cfg.phases.epochs == (1, 1, 1)
    assert cfg.model.backbone == "tiny"
    assert cfg.loss.alignment is False and cfg.loss.alpha == 0.3
    # PyYAML reads "3e-5" (no dot) as a string; it must still become the float 3e-5.
    assert cfg.optim.lr == pytest.approx(3e-5)
    assert cfg.optim.micro_batch_size == 4
    assert cfg.stage == "pretrain"


def test_numbers_given_for_text_fields_stay_text(yaml_file: Path) -> None:
    cfg = load_config(PretrainConfig, yaml_file, ["--output_dir=2024", "--data.corpus_dir=7"])
    assert cfg.output_dir == "2024" and cfg.data.corpus_dir == "7"


def test_unknown_override_suggests_the_close_key(yaml_file: Path) -> None:
    with pytest.raises(UserError) as err:
        load_config(PretrainConfig, yaml_file, ["--optim.micro_bach_size=2"])
    msg = str(err.value)
    assert "command line '--optim.micro_bach_size=2'" in msg
    assert "did you mean 'optim.micro_batch_size'" in msg


def test_sft_key_refused_by_pretraining(yaml_file: Path) -> None:
    with pytest.raises(UserError, match="unknown config key 'data.curriculum_max_relations'"):
        load_config(PretrainConfig, yaml_file, ["--data.curriculum_max_relations=2"])


@pytest.mark.parametrize(
    ("override", "field", "fragment"),
    [
        ("--optim.lr=fast", "optim.lr", "valid number"),
        ("--optim.lr=[1e-5,0,1e-5]", "optim.lr", "learning rates must be > 0"),
        ("--phases.epochs=[1,2]", "phases.epochs", "expected three epoch counts"),
        ("--phases.epochs=[1,-1,2]", "phases.epochs", ">= 0"),
        ("--phases.epochs=[0,0,0]", "phases.epochs", "at least one phase"),
        ("--trainer.zero_stage=4", "trainer.zero_stage", "Input should be"),
        ("--trainer.precision=fp16", "trainer.precision", "'fp32' or 'bf16'"),
        ("--optim.micro_batch_size=0", "optim.micro_batch_size", "greater than or equal to 1"),
        ("--checkpoint.resume=perhaps", "checkpoint.resume", "valid boolean"),
        ("--decode.anchor=loose", "decode.anchor", "'typed', 'reported', 'span' or 'off'"),
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
    assert str(err.value).startswith(f"{path}: field 'optim.micro_batch_size'")
    assert "'four'" in str(err.value)


def test_missing_required_field(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("dataset: conll04\nphases: {epochs: [1, 1, 1]}\noptim: {lr: 1e-4}\n", encoding="utf-8")
    with pytest.raises(UserError, match="field 'output_dir': Field required"):
        load_config(PretrainConfig, path)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="config file not found"):
        load_config(PretrainConfig, tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("phases: [1, 2\n", encoding="utf-8")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(PretrainConfig, bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(UserError, match="expected a mapping"):
        load_config(PretrainConfig, listed)


def test_learning_rate_per_phase() -> None:
    assert OptimConfig(lr=3e-5).phase_lr(2) == 3e-5
    per_phase = OptimConfig(lr=[1e-4, 5e-5, 2e-5])
    assert [per_phase.phase_lr(i) for i in range(3)] == [1e-4, 5e-5, 2e-5]


def test_anchor_accepts_the_old_booleans(yaml_file: Path) -> None:
    assert load_config(SFTConfig, yaml_file, ["--decode.anchor=false"]).decode.anchor == "off"
    assert load_config(SFTConfig, yaml_file, ["--decode.anchor=true"]).decode.anchor == "typed"


def test_parse_args_flags_and_launcher_local_rank(yaml_file: Path) -> None:
    argv = [
        "--local_rank=1",
        "--config",
        str(yaml_file),
        "--local-rank",
        "0",
        "--seed=7",
        "--loss.alpha",
        "0.3",
    ]
    cfg = parse_args(SFTConfig, argv, prog="sft/run.py")
    assert cfg.seed == 7 and cfg.loss.alpha == 0.3 and cfg.stage == "sft"
    assert parse_args(SFTConfig, [f"--config={yaml_file}"], prog="sft/run.py").seed == 42
    with pytest.raises(UserError, match="command line --lrr: unknown config key 'lrr'"):
        parse_args(PretrainConfig, ["--config", str(yaml_file), "--loss.alpha=0.3", "--lrr=1"], prog="p")


def test_no_config_file_is_named_as_such() -> None:
    with pytest.raises(UserError, match="no --config file was given"):
        parse_args(PretrainConfig, ["--loss.alpha=0.3"], prog="pretrain/run.py")


def test_help_lists_every_key(capsys: pytest.CaptureFixture[str]) -> None:
    from anchoralign.config_tree import flag_name, leaves

    with pytest.raises(SystemExit) as stop:
        parse_args(SFTConfig, ["--help"], prog="sft/run.py")
    assert stop.value.code == 0
    out = capsys.readouterr().out
    for path, _ in leaves(SFTConfig):
        assert flag_name(path) in out, path


def test_saved_config_loads_back_identical_and_reruns(yaml_file: Path, tmp_path: Path) -> None:
    cfg = load_config(
        SFTConfig, yaml_file, ["--init_from=null", "--eval.loss_splits=[dev]", "--optim.lr=[1e-4,1e-4,5e-5]"]
    )
    path = tmp_path / "ck" / CONFIG_FILE
    save_config(cfg, path)
    assert path.read_text(encoding="utf-8").startswith("# stage: sft\n")
    assert load_config(SFTConfig, path) == cfg
    assert parse_args(SFTConfig, ["--config", str(path)], prog="sft/run.py") == cfg


def test_config_differences_ignore_what_a_resume_may_change(yaml_file: Path) -> None:
    a = load_config(PretrainConfig, yaml_file)
    b = load_config(
        PretrainConfig,
        yaml_file,
        [
            "--trainer.log_every=1",
            "--checkpoint.resume=false",
            "--trainer.progress=false",
            "--decode.batch_size=8",
        ],
    )
    assert config_differences(a, b) == []
    c = load_config(PretrainConfig, yaml_file, ["--optim.lr=1e-3", "--phases.epochs=[1,1,1]"])
    assert config_differences(a, c) == ["optim.lr: 3e-05 -> 0.001", "phases.epochs: [2, 1, 3] -> [1, 1, 1]"]


def test_heads_can_be_asked_of_a_finished_run() -> None:
    """The fit section acts after training: a run trained without it (its saved config has no fit
    section at all) resumes, finds itself finished and fits, with any fit settings."""
    cfg = load_config(SFTConfig, REPO / "sft/configs/conll04.yaml")
    saved = config_tree.dump(cfg)
    del saved["fit"]  # a config saved before the section existed
    old = SFTConfig.model_validate(saved)
    assert not old.fit.span_head and cfg.fit.span_head and cfg.fit.relation_head
    new = load_config(
        SFTConfig, REPO / "sft/configs/conll04.yaml", ["--fit.source=final", "--fit.span_width=5"]
    )
    assert config_differences(old, new) == []
    assert config_differences(
        old, load_config(SFTConfig, REPO / "sft/configs/conll04.yaml", ["--seed=1"])
    ) == ["seed: 42 -> 1"]


# --- shipped configs --------------------------------------------------------------------------

SHIPPED = sorted((REPO / "pretrain" / "configs").glob("*.yaml")) + sorted(
    (REPO / "sft" / "configs").glob("*.yaml")
)

# The paper's Table 8: pretraining epochs, SFT epochs, pretraining lr, SFT lrs, batch sizes.
TABLE_8 = {
    "ace05": ([4, 6, 10], [10, 35, 55], 3e-5, [2e-5, 2e-5, 2e-5], 25, 25),
    "scierc": ([2, 3, 10], [30, 70, 100], 3e-5, [3e-5, 3e-5, 3e-5], 25, 25),
    "ade": ([2, 3, 5], [10, 35, 55], 2e-5, [2e-5, 2e-5, 2e-5], 30, 30),
    "nyt": ([2, 3, 15], [10, 35, 55], 3e-5, [3e-5, 3e-5, 2e-5], 25, 25),
}


def test_every_dataset_has_both_configs() -> None:
    pre = {p.stem for p in (REPO / "pretrain" / "configs").glob("*.yaml")}
    sft = {p.stem for p in (REPO / "sft" / "configs").glob("*.yaml")}
    assert pre == sft == {"conll04", "scierc", "ade", "nyt", "webnlg", "ace05"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_shipped_config_is_valid_and_follows_table_8(path: Path) -> None:
    from anchoralign.datasets import known_datasets

    pretraining = path.parent.parent.name == "pretrain"
    cfg = load_config(PretrainConfig if pretraining else SFTConfig, path)
    assert cfg.dataset == path.stem and cfg.dataset in known_datasets()
    text = path.read_text(encoding="utf-8")
    assert "NOT VERIFIED" not in text
    row = TABLE_8.get(cfg.dataset, TABLE_8["nyt" if cfg.dataset == "webnlg" else "ace05"])
    pre_epochs, sft_epochs, pre_lr, sft_lrs, pre_batch, sft_batch = row
    if pretraining:
        assert list(cfg.phases.epochs) == pre_epochs and cfg.optim.lr == pytest.approx(pre_lr)
        assert cfg.optim.micro_batch_size == pre_batch and cfg.optim.schedule == "constant"
    else:
        assert list(cfg.phases.epochs) == sft_epochs and list(cfg.optim.lr) == pytest.approx(sft_lrs)
        assert cfg.optim.micro_batch_size == sft_batch
        assert cfg.init_from == f"runs/{cfg.dataset}/pretrain/final"
    if cfg.dataset not in TABLE_8:
        assert "not in the paper's Table 8" in text
