"""The two trainers end to end on CPU, started the way a user starts them (``python
pretrain/run.py ...``): a tiny backbone, a masked and an unmasked corpus made here from CoNLL04
training sentences, both pretraining phases with the switch, both SFT phases from the pretrained
model, and an evaluation of the exported model without DeepSpeed. Plus the errors a user can
cause, which must come at once as one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anchoralign.decode import DecodeConfig
from anchoralign.errors import UserError
from anchoralign.schema import Sample, write_jsonl

REPO = Path(__file__).resolve().parent.parent
N_TRAIN = 24
N_EVAL = 4
# The CPU smoke overrides (docs/training.md shows the same).
SMOKE = [
    "--model.backbone=tiny",
    "--phases.epochs=[1,1,1]",
    "--trainer.precision=fp32",
    "--optim.micro_batch_size=8",
    f"--data.limit_train={N_TRAIN}",
    f"--data.limit_eval={N_EVAL}",
    "--eval.loss_splits=[dev]",
    "--optim.lr=1e-3",
    # An untrained model writes until the length limit: keep that short.
    "--decode.max_len=24",
    "--trainer.progress=false",
]
# Set by launchers (or by an in-process test of this session): a child must start its own group.
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def run_cli(*args: str, timeout: float = 280) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # One thread: on a shared CI machine two busy-waiting OpenMP threads per process are many
    # times slower than one.
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def make_corpus(folder: Path, train: list[Sample]) -> Path:
    from augment.synthesize import mask_sample

    write_jsonl(folder / "unmasked.jsonl", train)
    write_jsonl(folder / "masked.jsonl", [mask_sample(s) for s in train])
    return folder


def sft_with_a_head(out: Path, shared_data: Path, head_flag: str) -> subprocess.CompletedProcess[str]:
    """A 6-epoch full-set smoke SFT from the bare tiny backbone with one head's flag, logging every
    3 steps (the span and relation head tests: does the head's loss fall?)."""
    return run_cli(
        "sft/run.py", "--config", "sft/configs/conll04.yaml", *SMOKE, f"--data_dir={shared_data}",
        "--init_from=null", f"--output_dir={out}", "--phases.epochs=[0,6,0]", "--trainer.log_every=3",
        head_flag,
    )  # fmt: skip


def rows(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_pretrain_then_sft_then_evaluate(tmp_path: Path, shared_data: Path) -> None:
    from anchoralign.datasets import load_split
    from anchoralign.decode import DecodeConfig, predict
    from anchoralign.metrics import score
    from anchoralign.model import AnchorAlignModel

    train = load_split("conll04", "train", str(shared_data))[:N_TRAIN]
    corpus = make_corpus(tmp_path / "corpus", train)
    data = f"--data_dir={shared_data}"

    pre = tmp_path / "pre"
    done = run_cli(
        "pretrain/run.py", "--config", "pretrain/configs/conll04.yaml", *SMOKE, data,
        f"--data.corpus_dir={corpus}", f"--output_dir={pre}", "--phases.switch=valid_rate",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert "built successfully" not in done.stdout + done.stderr  # DeepSpeed's start-up notice
    log = (pre / "train.log").read_text(encoding="utf-8")
    assert "masked.jsonl: 24 samples tokenised in" in log  # the corpus cache, built here
    for text in (
        "phase 1 etu: 1 epoch(s) on masked (24 samples",
        "phase 2 poa-ce: 1 epoch(s) on unmasked (24 samples",
        "phase etu -> poa-ce at step 3",
        "phase poa-ce -> poa-align at step 6",
    ):
        assert text in log
    (switch,) = [s for s in rows(pre, "switch") if s["to"] == "poa-align"]
    # An almost untrained model: whichever way the free-running validity went, the log says why.
    assert (
        "free-running outputs" in switch["reason"] or "valid_rate condition did not fire" in switch["reason"]
    )
    train_rows = rows(pre, "train")
    assert [r["step"] for r in train_rows] == [9]  # log_every 10: the closing row only
    assert train_rows[0]["kl_ner_re"] > 0 and train_rows[0]["ce_ner"] > 0
    assert [r["split"] for r in rows(pre, "eval_loss")] == ["dev"] * 3
    AnchorAlignModel.from_pretrained(pre / "final")  # no DeepSpeed needed
    assert (pre / "final" / "train_config.yaml").is_file()

    sft = tmp_path / "sft"
    sft_command = [
        "sft/run.py", "--config", "sft/configs/conll04.yaml", *SMOKE, data,
        f"--init_from={pre / 'final'}", f"--output_dir={sft}", "--phases.switch=epochs",
    ]  # fmt: skip
    done = run_cli(*sft_command)
    assert done.returncode == 0, done.stderr[-4000:]
    log = (sft / "train.log").read_text(encoding="utf-8")
    simple = sum(len(s.relations) <= 1 for s in train)
    assert (
        f"curriculum warm-up set: {simple} of {N_TRAIN} training samples have at most K=1 relation(s)" in log
    )
    assert "phase curriculum -> full-ce" in log
    assert "phase full-ce -> full-align" in log and "after the 1 configured epoch(s) of full-ce" in log

    # Evaluation of the exported model, without DeepSpeed: the same scores as the run's last one.
    model = AnchorAlignModel.from_pretrained(sft / "final")
    dev = load_split("conll04", "dev", str(shared_data))[:N_EVAL]
    preds = predict(model, dev, DecodeConfig(batch_size=32))
    scores = score(dev, [p.sample for p in preds])
    last = rows(sft, "eval")[-1]
    for key in ("ner_f1", "rel_strict_f1", "rel_boundary_f1"):
        assert scores[key] == pytest.approx(last[key])

    # The config's fit section: best/ with a span head and a relation head fitted on its encoder.
    fitted = sft / "fitted"
    assert f"wrote {fitted}: {sft / 'best'} with its fitted heads" in log
    model = AnchorAlignModel.from_pretrained(fitted)
    assert model.span_width == 8 and len(model.relation_head.heads) == 1
    for report in ("span_head.json", "relation_head.json"):
        record = json.loads((fitted / report).read_text(encoding="utf-8"))
        assert record["checkpoint"] == str(sft / "best") and record["train_split"] == "train"
        assert record["n_train"] <= N_TRAIN and record["fit"]["seed"] == 42
    assert (fitted / "train_config.yaml").is_file()
    # Started again, the finished run and its fitted heads are found and not paid for twice.
    again = run_cli(*sft_command)
    assert again.returncode == 0, again.stderr[-4000:]
    log = (sft / "train.log").read_text(encoding="utf-8")
    assert "this run already finished" in log and f"heads already fitted on {sft / 'best'}" in log
    assert log.count("with its fitted heads") == 1


def test_misspelled_key_fails_at_once_with_one_line() -> None:
    done = run_cli(
        "pretrain/run.py", "--config", "pretrain/configs/conll04.yaml", "--learning_rate=1e-4", timeout=120
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    err = done.stderr.strip()
    assert err.count("\n") == 0, err
    assert "unknown config key 'learning_rate'" in err and "command line --learning_rate" in err


def test_wrong_type_names_the_field(capsys: pytest.CaptureFixture[str]) -> None:
    from sft.run import main

    assert main(["--config", str(REPO / "sft/configs/conll04.yaml"), "--phases.epochs=[1,x,1]"]) == 2
    err = capsys.readouterr().err
    assert "command line --phases.epochs: field 'phases.epochs.1'" in err and "valid integer" in err


def test_missing_corpus_names_the_augment_command(
    tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pretrain.run import main

    corpus = tmp_path / "nowhere"
    argv = ["--config", str(REPO / "pretrain/configs/conll04.yaml"), f"--data_dir={shared_data}"]
    argv += [f"--data.corpus_dir={corpus}", f"--output_dir={tmp_path / 'out'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line, however long
    assert f"{corpus / 'masked.jsonl'}: corpus file not found" in err
    assert f"augment run --dataset conll04 --out {corpus}" in err
    assert not (tmp_path / "out").exists()  # a failed run leaves no run folder


def test_corpus_with_foreign_labels_is_refused(tmp_path: Path, shared_data: Path) -> None:
    from transformers import AutoTokenizer

    from anchoralign.backbones import minilm_dir
    from anchoralign.config import PretrainConfig, load_config
    from anchoralign.datasets import get_meta
    from anchoralign.runlog import RunLog
    from pretrain.run import plan

    sample = Sample(id="a", tokens=["x", "y"], entities=[{"start": 0, "end": 1, "type": "Gene"}])
    corpus = make_corpus(tmp_path / "c", [sample])
    cfg = load_config(
        PretrainConfig,
        REPO / "pretrain/configs/conll04.yaml",
        [f"--data.corpus_dir={corpus}", f"--output_dir={tmp_path / 'o'}", f"--data_dir={shared_data}"],
    )
    with pytest.raises(
        UserError, match=r"masked.jsonl:1: field 'entities': entity type 'Gene' is not a conll04 label"
    ):
        tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
        _, load = plan(cfg, get_meta("conll04", str(shared_data)), RunLog(tmp_path / "o"))
        load(tokenizer)
    assert not (tmp_path / "o").exists()  # no run folder for a run that never started


def test_curriculum_subset() -> None:
    from transformers import AutoTokenizer

    from anchoralign.backbones import minilm_dir
    from anchoralign.training_set import in_memory
    from sft.run import curriculum_subset

    rel = {"head": 0, "tail": 1, "type": "Kill"}
    ents = [{"start": 0, "end": 1, "type": "Peop"}, {"start": 1, "end": 2, "type": "Peop"}]
    data = [Sample(id=str(n), tokens=["a", "b"], entities=ents, relations=[rel] * n) for n in (0, 2, 1, 3)]
    train = in_memory(data, AutoTokenizer.from_pretrained(str(minilm_dir())), "train")
    assert [s.sample.id for s in curriculum_subset(train, 1)] == ["0", "1"]
    assert [s.sample.id for s in curriculum_subset(train, 0)] == ["0"]
    assert [s.sample.id for s in curriculum_subset(train[1:], 1)] == ["1"]


def test_extra_train_joins_the_full_data_phases_only(tmp_path: Path, shared_data: Path) -> None:
    from transformers import AutoTokenizer

    from anchoralign.backbones import minilm_dir
    from anchoralign.config import SFTConfig, load_config
    from anchoralign.datasets import get_meta
    from anchoralign.runlog import RunLog
    from sft.run import plan

    rel = {"head": 0, "tail": 1, "type": "Kill"}
    ents = [{"start": 0, "end": 1, "type": "Peop"}, {"start": 1, "end": 2, "type": "Peop"}]
    # Corpus samples with 0 and 1 relations: they would qualify for the warm-up, yet must stay out.
    extra = [Sample(id=f"x{n}", tokens=["Zorb", "Quil"], entities=ents, relations=[rel] * n) for n in (0, 1)]
    write_jsonl(tmp_path / "unmasked.jsonl", extra)
    flags = [f"--output_dir={tmp_path / 'o'}", f"--data_dir={shared_data}", "--data.limit_train=5"]
    cfg = load_config(
        SFTConfig,
        REPO / "sft/configs/conll04.yaml",
        [*flags, f"--data.extra_train=[{tmp_path / 'unmasked.jsonl'}]"],
    )
    meta = get_meta("conll04", str(shared_data))
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    phases, load = plan(cfg, meta, RunLog(tmp_path / "o"))
    sets = load(tokenizer)
    assert [(p.name, p.data) for p in phases] == [
        ("curriculum", "simple"),
        ("full-ce", "train"),
        ("full-align", "train"),
    ]
    assert len(sets["train"]) == 5 + 2
    assert [e.sample.id for e in sets["train"]][5:] == ["x0", "x1"]
    assert sets["train"][5].pieces == [
        tokenizer("Zorb", add_special_tokens=False)["input_ids"],
        tokenizer("Quil", add_special_tokens=False)["input_ids"],
    ]
    assert not any(e.sample.id.startswith("x") for e in sets["simple"])
    assert f"{tmp_path / 'unmasked.jsonl'}" in sets["train"].name

    cfg = load_config(
        SFTConfig,
        REPO / "sft/configs/conll04.yaml",
        [*flags, f"--data.extra_train=[{tmp_path / 'nope.jsonl'}]"],
    )
    with pytest.raises(UserError, match=r"data.extra_train: .*nope.jsonl is neither a jsonl file"):
        plan(cfg, meta, RunLog(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_concat_keeps_order_and_selections() -> None:
    from transformers import AutoTokenizer

    from anchoralign.backbones import minilm_dir
    from anchoralign.training_set import concat, in_memory

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    a = in_memory([Sample(id=f"a{i}", tokens=["w"] * (i + 1)) for i in range(4)], tokenizer, "a")
    b = in_memory([Sample(id=f"b{i}", tokens=["v"] * (i + 1)) for i in range(3)], tokenizer, "b")
    both = concat([a.select([3, 1]), b], "a+b")
    assert [e.sample.id for e in both] == ["a3", "a1", "b0", "b1", "b2"]
    assert both.word_counts.tolist() == [4, 2, 1, 2, 3]
    assert [e.sample.id for e in both.select([4, 0])] == ["b2", "a3"]
    assert concat([a], "a") is a


def test_zero3_trains_like_zero0_and_evaluates(tmp_path: Path, shared_data: Path, gloo: None) -> None:
    """The real model under ZeRO-3 (weights read outside module calls, a tied embedding table)
    takes the same steps as without ZeRO, and is evaluated through the reloaded export."""
    from anchoralign.config import SFTConfig, load_config
    from anchoralign.datasets import get_meta, load_split
    from anchoralign.evaluation import Evaluator
    from anchoralign.losses import loss_terms
    from anchoralign.model import AnchorAlignModel
    from anchoralign.schedule import Phase
    from anchoralign.trainer import Trainer

    meta = get_meta("conll04", str(shared_data))
    train = load_split("conll04", "train", str(shared_data))[:8]
    dev = load_split("conll04", "dev", str(shared_data))[:2]
    weights = {}
    ds_json = tmp_path / "ds.json"  # one's own DeepSpeed JSON keeps ZeRO-3 on a single rank
    ds_json.write_text('{"zero_optimization": {"stage": "auto"}}')
    for stage in (0, 3):
        torch.manual_seed(0)
        model = AnchorAlignModel.from_backbone("tiny", meta, dropout=0.0)  # no dropout: comparable steps
        overrides = [
            "--dataset=conll04",
            f"--output_dir={tmp_path / str(stage)}",
            "--phases.epochs=[0,0,1]",
            "--optim.lr=1e-3",
        ]
        overrides += [
            "--optim.micro_batch_size=4",
            f"--trainer.zero_stage={stage}",
            "--trainer.progress=false",
            "--eval.loss_splits=[dev]",
            f"--trainer.deepspeed_config={ds_json}",
        ]
        cfg = load_config(SFTConfig, None, overrides)
        collate = model.collator(max_length=128)
        evaluator = Evaluator(dev, {"dev": dev}, collate, loss_terms, cfg.loss, DecodeConfig(max_len=8), meta)
        trainer = Trainer(cfg, model, [Phase("full", "train", 1, True)], {"train": train}, collate, loss_terms,
                          evaluator, reload=AnchorAlignModel.from_pretrained)  # fmt: skip
        assert trainer.engine.zero_optimization_stage() == stage
        weights[stage] = load_file(str(trainer.fit() / "model.safetensors"))
        assert [r["step"] for r in rows(tmp_path / str(stage), "eval")] == [2]
    assert weights[0].keys() == weights[3].keys()
    for k in weights[0]:
        torch.testing.assert_close(weights[3][k], weights[0][k], rtol=1e-4, atol=1e-5)


def test_the_recipe_files_run_as_the_readme_says(tmp_path: Path, shared_data: Path) -> None:
    """recipes/conll04-minilm/ through the real scripts, at smoke scale (the tiny backbone, a few
    sentences, short phases): each step starts from the one before it, the cross-entropy stage
    stops after the epoch its file names on the schedule planned for all of them, and the last
    step, a file built on ``ce.yaml``, fits its heads."""
    from anchoralign.config import SFTConfig, load_config
    from anchoralign.datasets import load_split

    train = load_split("conll04", "train", str(shared_data))[:N_TRAIN]
    corpus = make_corpus(tmp_path / "corpus", train)
    smoke = [flag for flag in SMOKE if not flag.startswith("--phases.epochs")]
    recipe = REPO / "recipes" / "conll04-minilm"
    pre, ce, sft = tmp_path / "pretrain", tmp_path / "ce", tmp_path / "sft"
    steps = [
        ("pretrain/run.py", "pretrain", [f"--data.corpus_dir={corpus}", f"--output_dir={pre}", "--phases.epochs=[1,0,1]"]),
        ("sft/run.py", "ce", [f"--init_from={pre / 'final'}", f"--output_dir={ce}", "--phases.epochs=[1,2,0]", "--trainer.stop_after_epoch=2"]),
        ("sft/run.py", "align", [f"--init_from={ce / 'best'}", f"--output_dir={sft}", "--phases.epochs=[0,0,1]", f"--fit.states_dir={tmp_path / 'states'}"]),
    ]  # fmt: skip
    for script, name, flags in steps:
        done = run_cli(
            script, "--config", str(recipe / f"{name}.yaml"), *smoke, f"--data_dir={shared_data}", *flags
        )
        assert done.returncode == 0, f"{name}: {done.stderr[-4000:]}"
    log = (ce / "train.log").read_text(encoding="utf-8")
    assert "stopping at stop_after_epoch=2 (epoch 2 of 3" in log
    assert [r["epoch"] for r in rows(ce, "eval")] == [1, 2]
    # align.yaml's own values over ce.yaml's, resolved into the saved config.
    saved = sft / "final" / "train_config.yaml"
    assert "base" not in saved.read_text(encoding="utf-8")
    config = load_config(SFTConfig, saved)
    assert config.eval.best_metric == "ner_f1+rel_strict_f1" and config.data.bucket_batches == 8  # ce.yaml's
    assert (config.optim.warmup_ratio, config.loss.ramp_steps, config.trainer.stop_after_epoch) == (
        0.1,
        58,
        None,
    )
    assert (sft / "fitted" / "span_head.json").is_file() and (sft / "fitted" / "relation_head.json").is_file()
    # The fits kept their training states in files there (fit.states_dir), unlinked once mapped.
    assert (tmp_path / "states").is_dir() and not any((tmp_path / "states").iterdir())
