"""scripts/quality_protocol.py's read-only commands on hand-made results: --summary and --compare."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from script_loader import load_script

REPO = Path(__file__).resolve().parent.parent
COMMITTED = REPO / "benchmarks" / "quality"


def _write(folder: Path, records: list[dict], metrics: dict | None) -> None:
    folder.mkdir(parents=True)
    lines = [json.dumps(r) for r in records]
    (folder / "predictions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")


def _load_protocol():
    """The script as a module, for its functions."""
    return load_script("quality_protocol")


def _gold_records(shared_data: Path, split: str) -> list[dict]:
    """The gold split as prediction records (ids as ``anchoralign evaluate`` writes them)."""
    gold = json.loads((shared_data / "conll04" / f"conll04_{split}.json").read_text(encoding="utf-8"))
    return [
        {"id": f"conll04-{split}-{s['orig_id']}", **{k: s[k] for k in ("tokens", "entities", "relations")}}
        for s in gold
    ]


def _protocol(shared_data: Path, out: Path, *argv: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "scripts/quality_protocol.py", "--data-dir", str(shared_data), "--out", str(out)]
    return subprocess.run([*cmd, *argv], cwd=REPO, capture_output=True, text=True, check=False)


def test_compare_and_summary_rescore_hand_made_predictions(shared_data, tmp_path):
    def perfect_and_half(split: str) -> tuple[list[dict], list[dict]]:
        perfect = _gold_records(shared_data, split)
        # Entities right, relations only in the first half of the sentences: recall ~1/2, precision 1.
        half = [
            {**r, "relations": r["relations"] if i < len(perfect) // 2 else []} for i, r in enumerate(perfect)
        ]
        return perfect, half

    def n_relations(records: list[dict]) -> int:  # as scored: distinct (mention, type) triples
        def m(r: dict, e: int) -> tuple[str, str]:
            return " ".join(r["tokens"][r["entities"][e]["start"] : r["entities"][e]["end"]]), r["entities"][
                e
            ]["type"]

        return sum(
            len({(m(r, x["head"]), m(r, x["tail"]), x["type"]) for x in r["relations"]}) for r in records
        )

    def half_f1_of(perfect: list[dict], half: list[dict]) -> float:
        n_gold, n_half = n_relations(perfect), n_relations(half)
        return 100 * 2 * n_half / (n_half + n_gold)

    perfect, half = perfect_and_half("test")
    half_f1 = half_f1_of(perfect, half)
    full_metrics = {"ner_f1": 100.0, "rel_strict_f1": 100.0, "rel_boundary_f1": 100.0}
    for seed in (1, 2):
        _write(tmp_path / "full" / f"seed{seed}", perfect, full_metrics)
        _write(tmp_path / "half" / f"seed{seed}", half, {**full_metrics, "rel_strict_f1": half_f1})
    _write(tmp_path / "full" / "seed3", perfect, full_metrics)
    _write(tmp_path / "half" / "seed3", half, None)  # an evaluation still running: no metrics.json

    def interval(line: str, split: str) -> tuple[float, float]:
        bounds = line.split(f"interval over {split} sentences ")[1].split(";")[0]
        low, high = (float(x) for x in bounds.split(" to "))
        return low, high

    compared = _protocol(shared_data, tmp_path, "--compare", "full,half")
    assert compared.returncode == 0, compared.stderr
    line, no_dev = compared.stdout.strip().splitlines()
    assert line.startswith(f"full - half: relation strict F1 {100 - half_f1:+.2f} (mean of 2 seeds paired)")
    assert line.endswith(f"; over the seeds {100 - half_f1:+.2f} to {100 - half_f1:+.2f}")
    low, high = interval(line, "test")
    assert low < 100 - half_f1 < high and high - low < 20  # the resampled halves vary, the sign does not
    assert no_dev == "full - half: no seed has dev results under both"

    # Dev results beside the test ones (seed<k>/dev/): compared on their own sentences.
    dev_perfect, dev_half = perfect_and_half("dev")
    dev_half_f1 = half_f1_of(dev_perfect, dev_half)
    assert abs(dev_half_f1 - half_f1) > 0.1  # tells the splits apart below
    for seed in (1, 2):
        _write(tmp_path / "full" / f"seed{seed}" / "dev", dev_perfect, full_metrics)
        _write(
            tmp_path / "half" / f"seed{seed}" / "dev",
            dev_half,
            {**full_metrics, "rel_strict_f1": dev_half_f1},
        )
    compared = _protocol(shared_data, tmp_path, "--compare", "full,half")
    assert compared.returncode == 0, compared.stderr
    test_line, dev_line = compared.stdout.strip().splitlines()
    assert test_line == line
    assert dev_line.startswith(f"full - half: relation strict F1 {100 - dev_half_f1:+.2f} (mean of 2 seeds")
    low, high = interval(dev_line, "dev")
    assert low < 100 - dev_half_f1 < high
    # The entities of both are all right: no NER difference on either split.
    ner = _protocol(shared_data, tmp_path, "--compare", "full,half", "--metric", "ner")
    assert [line.split(" (")[0] for line in ner.stdout.strip().splitlines()] == [
        "full - half: NER F1 +0.00"
    ] * 2

    table = _protocol(shared_data, tmp_path, "--summary")
    assert table.returncode == 0, table.stderr
    rows = {r.split(" | ")[0].strip("| "): r for r in table.stdout.splitlines() if r.startswith("| ")}
    assert rows["half"].startswith(f"| half | 2 | 100.00 ± 0.00 | {half_f1:.2f} ± 0.00")
    # Two equal seeds: an interval of the mean with no width.
    assert f"| 100.00 to 100.00; {half_f1:.2f} to {half_f1:.2f} |" in rows["half"]
    assert f"{half_f1 - 100:.2f} ± 0.00 (2)" in rows["half"]
    assert rows["half"].endswith(f"| {dev_half_f1:.2f} ± 0.00 (2) |")
    assert "half/seed3: no metrics.json" in table.stderr

    # A metrics.json that the predictions do not reproduce stops the summary, on either split.
    (tmp_path / "half" / "seed1" / "dev" / "metrics.json").write_text(
        json.dumps(full_metrics), encoding="utf-8"
    )
    wrong = _protocol(shared_data, tmp_path, "--summary")
    assert wrong.returncode != 0 and "half/seed1/dev: re-scored" in wrong.stderr
    (tmp_path / "half" / "seed1" / "metrics.json").write_text(json.dumps(full_metrics), encoding="utf-8")
    wrong = _protocol(shared_data, tmp_path, "--summary")
    assert wrong.returncode != 0 and "half/seed1: re-scored" in wrong.stderr

    missing = _protocol(shared_data, tmp_path, "--compare", "full,nothing")
    assert (
        missing.returncode != 0
        and "no seed has finished results under both full and nothing" in missing.stderr
    )


def test_a_model_variant_shares_the_pretraining_and_names_its_own_runs(shared_data, tmp_path):
    runs, corpus = tmp_path / "runs", tmp_path / "corpus"
    flags = ["--seeds", "1", "--settings", "full,ner_decoder", "--steps", "pretrain,ce,align,eval"]
    flags += ["--dry-run", "--pretrain", f"x={corpus}", "--model", "span_head", "--runs", str(runs)]
    done = _protocol(shared_data, tmp_path / "out", *flags)
    assert done.returncode == 0, done.stderr
    pretrain, pretrained_test, pretrained_dev, ce, full, *evals = done.stdout.strip().splitlines()
    assert f"--output-dir={runs}/pretrain_x/pretrain/seed1" in pretrain and "span-head" not in pretrain
    # The pretrained model itself, shared by the variants, under the pretraining's name.
    assert all(
        f"--checkpoint {runs}/pretrain_x/pretrain/seed1/final" in e for e in (pretrained_test, pretrained_dev)
    )
    assert pretrained_dev.endswith("/out/pretrain_x_pretrained/seed1/dev/predictions.jsonl")
    assert f"--init-from={runs}/pretrain_x/pretrain/seed1/final" in ce
    assert f"--output-dir={runs}/pretrain_x_with_span_head/ce/seed1" in ce
    assert f"--init-from={runs}/pretrain_x_with_span_head/ce/seed1/best" in full
    assert all("--model.span-head-width=8" in cmd for cmd in (ce, full))
    outputs = [e.split("--output ")[1] for e in evals]
    assert outputs[:2] == [
        f"{tmp_path}/out/pretrain_x_with_span_head/seed1/predictions.jsonl",
        f"{tmp_path}/out/pretrain_x_with_span_head/seed1/dev/predictions.jsonl",
    ]
    # The decoding row of the variant: the same checkpoint, the NER decoder's entities.
    decoder = [e for e in evals if "_ner_decoder/seed1/predictions.jsonl" in e]
    assert len(decoder) == 1 and "--ner-source decoder" in decoder[0]
    assert f"--checkpoint {runs}/pretrain_x_with_span_head/full/seed1/best" in decoder[0]


def test_the_joint_variants_select_on_the_mean_in_both_stages(shared_data, tmp_path):
    for model, head in (("joint", False), ("span_head_joint", True)):
        flags = ["--seeds", "1", "--settings", "full", "--steps", "ce,align", "--dry-run", "--model", model]
        done = _protocol(shared_data, tmp_path / "out", *flags, "--runs", str(tmp_path / "runs"))
        assert done.returncode == 0, done.stderr
        ce, full = done.stdout.strip().splitlines()
        assert all("--eval.best-metric=ner_f1+rel_strict_f1" in cmd for cmd in (ce, full))
        assert all(("--model.span-head-width=8" in cmd) == head for cmd in (ce, full))
        assert f"--output-dir={tmp_path}/runs/with_{model}/ce/seed1" in ce


def test_the_head_step_fits_a_relation_head_on_each_setting_and_evaluates_it(shared_data, tmp_path):
    runs, corpus = tmp_path / "runs", tmp_path / "corpus"
    flags = ["--seeds", "2", "--settings", "full,no_alignment", "--steps", "head", "--dry-run"]
    done = _protocol(shared_data, tmp_path / "out", *flags, "--pretrain", f"x={corpus}", "--runs", str(runs))
    assert done.returncode == 0, done.stderr
    fit, test, dev, fit_other, *_ = done.stdout.strip().splitlines()
    assert "anchoralign.cli fit-relation-head" in fit and "--seed=2" in fit
    assert f"--checkpoint {runs}/pretrain_x/full/seed2/best" in fit
    assert f"--output {runs}/pretrain_x/relation_head/seed2/best" in fit
    assert f"--checkpoint {runs}/pretrain_x/relation_head/seed2/best" in test
    assert test.endswith(f"--output {tmp_path}/out/pretrain_x_relation_head/seed2/predictions.jsonl")
    assert dev.endswith(f"--output {tmp_path}/out/pretrain_x_relation_head/seed2/dev/predictions.jsonl")
    assert f"--output {runs}/pretrain_x/no_alignment_relation_head/seed2/best" in fit_other
    done = _protocol(
        shared_data, tmp_path / "out", "--seeds", "1", "--steps", "head", "--dry-run", "--heads", "5"
    )
    fit, test, *_ = done.stdout.strip().splitlines()
    assert "--heads=5" in fit and "/relation_head5/seed1/best " in fit
    assert test.endswith(f"{tmp_path}/out/relation_head5/seed1/predictions.jsonl")
    # A setting trained with its head (pair_loss) only has its thresholds chosen.
    done = _protocol(
        shared_data,
        tmp_path / "out",
        "--seeds",
        "1",
        "--steps",
        "head",
        "--dry-run",
        "--settings",
        "pair_loss",
    )
    fit = done.stdout.strip().splitlines()[0]
    assert (
        fit.endswith("--thresholds-only")
        and "/pair_loss_relation_head/seed1/best" in fit
        and "--heads" not in fit
    )


def test_the_span_step_fits_a_span_head_and_the_head_step_fits_on_its_checkpoint(shared_data, tmp_path):
    runs = tmp_path / "runs"
    flags = ["--seeds", "3", "--settings", "full,pair_loss", "--steps", "span,head", "--dry-run"]
    done = _protocol(shared_data, tmp_path / "out", *flags, "--model", "joint", "--runs", str(runs))
    assert done.returncode == 0, done.stderr
    span, test, dev, head, head_test, head_dev, span_pair, _, _, head_pair, *_ = (
        done.stdout.strip().splitlines()
    )
    assert "anchoralign.cli fit-span-head" in span and "--seed=3" in span
    assert f"--checkpoint {runs}/with_joint/full/seed3/best" in span
    assert f"--output {runs}/with_joint/span_fit_top2/seed3/best" in span
    assert span.endswith("--layers=2")  # always given: the command's default may change
    assert f"--checkpoint {runs}/with_joint/span_fit_top2/seed3/best" in test
    assert test.endswith(f"{tmp_path}/out/with_joint_span_fit_top2/seed3/predictions.jsonl")
    assert dev.endswith(f"{tmp_path}/out/with_joint_span_fit_top2/seed3/dev/predictions.jsonl")
    # The relation head over the span head's entities: fitted on the span step's checkpoint.
    assert "anchoralign.cli fit-relation-head" in head and "--heads=1" in head
    assert f"--checkpoint {runs}/with_joint/span_fit_top2/seed3/best" in head
    assert f"--output {runs}/with_joint/span_fit_top2_relation_head/seed3/best" in head
    assert head_test.endswith(
        f"{tmp_path}/out/with_joint_span_fit_top2_relation_head/seed3/predictions.jsonl"
    )
    assert head_dev.endswith("/with_joint_span_fit_top2_relation_head/seed3/dev/predictions.jsonl")
    # A setting trained with its relation head keeps it: thresholds only, on the span fit's checkpoint.
    assert f"--output {runs}/with_joint/pair_loss_span_fit_top2/seed3/best" in span_pair
    assert f"--checkpoint {runs}/with_joint/pair_loss_span_fit_top2/seed3/best" in head_pair
    assert head_pair.endswith("--thresholds-only")


def test_ce_stop_after_replays_stage_1_up_to_a_chosen_epoch(shared_data, tmp_path):
    def ce_command(*flags: str) -> subprocess.CompletedProcess:
        argv = ["--seeds", "1", "--settings", "full", "--steps", "ce", "--dry-run", *flags]
        return _protocol(shared_data, tmp_path / "out", *argv, "--runs", str(tmp_path / "runs"))

    default, replay = ce_command(), ce_command("--ce-stop-after", "14")
    assert default.returncode == replay.returncode == 0, default.stderr + replay.stderr
    [(_, stops)], [(_, replays)] = _launched_configs(default.stdout), _launched_configs(replay.stdout)
    assert stops.trainer.stop_after_epoch == 24 and replays.trainer.stop_after_epoch == 14
    # The same schedule either way: only where the run stops differs.
    assert replays.model_copy(update={"trainer": stops.trainer}) == stops
    assert list(replays.phases.epochs) == [2, 28, 0]
    # Given its own length, stage 1 is not stopped.
    short = ce_command("--ce-epochs", "12")
    assert _launched_configs(short.stdout)[0][1].trainer.stop_after_epoch is None
    for bad in (
        ["--ce-stop-after", "0"],
        ["--ce-stop-after", "31"],
        ["--ce-epochs", "12", "--ce-stop-after", "10"],
    ):
        refused = ce_command(*bad)
        assert refused.returncode == 2 and "--ce-stop-after" in refused.stderr


def test_dev_curves_are_committed_and_compared_over_the_later_epochs(shared_data, tmp_path):
    protocol = _load_protocol()

    def training_log(run: Path, rel: list[float]) -> Path:  # one dev evaluation per epoch, among other rows
        run.mkdir(parents=True)
        rows = []
        for epoch, f1 in enumerate(rel, start=1):
            rows.append({"kind": "train", "step": 10 * epoch, "loss": 1.0})
            rows.append(
                {"kind": "eval", "split": "dev", "step": 10 * epoch, "epoch": epoch, "phase": "full-ce"}
                | {"ner_f1": 80.0 + epoch, "rel_strict_f1": f1, "ner_p": 1.0}
            )
        text = "".join(json.dumps(r) + "\n" for r in rows)
        (run / "metrics.jsonl").write_text(text, encoding="utf-8")
        return run / "metrics.jsonl"

    a = [50.0, 70.0, 52.0, 54.0, 56.0, 58.0]  # a spike at epoch 2, then a steady climb
    b = [50.0, 51.0, 52.0, 53.0, 55.0, 60.0]
    for name, rel in (("a", a), ("b", b)):
        for seed in (1, 2):
            protocol.write_curve(
                training_log(tmp_path / "runs" / name / str(seed), rel), tmp_path / name / f"seed{seed}"
            )
    curve = (tmp_path / "a" / "seed1" / "dev" / "curve.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in curve][1] == {
        "step": 20,
        "epoch": 2,
        "phase": "full-ce",
        "ner_f1": 82.0,
        "rel_strict_f1": 70.0,
    }
    assert len(curve) == 6  # the evaluations only, with the curve's keys only

    # Epochs 4-6 by default (the second half): a's mean 56 (sd sqrt(8/3)), b's 56, its max 60.
    assert protocol.curve_level(dict(enumerate(a, start=1)), 4) == (56.0, (8 / 3) ** 0.5, 58.0)
    shown = _protocol(shared_data, tmp_path, "--curves", "a,b")
    assert shown.returncode == 0, shown.stderr
    rows = [r for r in shown.stdout.splitlines() if r.startswith("| ")]
    assert rows[1] == "| 1 | 4-6 | 56.00 ± 1.63 (58.00) | 56.00 ± 2.94 (60.00) | +0.00 |"
    assert rows[-1] == "| mean of 2 | | 56.00 | 56.00 | +0.00 |"
    # From epoch 2 the spike counts: a 58 ± sqrt(40), b 54.2 ± sqrt(10.16).
    shown = _protocol(shared_data, tmp_path, "--curves", "a,b", "--from-epoch", "2")
    assert "| 1 | 2-6 | 58.00 ± 6.32 (70.00) | 54.20 ± 3.19 (60.00) | +3.80 |" in shown.stdout
    ner = _protocol(shared_data, tmp_path, "--curves", "a", "--metric", "ner")
    assert ner.returncode == 0 and "| 2 | 4-6 | 85.00 ± 0.82 (86.00) |" in ner.stdout

    missing = _protocol(shared_data, tmp_path, "--curves", "a,nothing")
    assert missing.returncode != 0 and "no seed has a committed dev/curve.jsonl" in missing.stderr


def test_errors_sort_each_gold_relation_by_why_it_was_missed(shared_data, tmp_path):
    protocol = _load_protocol()
    ann, ibm, nyc, bob = ("Ann", "Peop"), ("IBM", "Org"), ("NYC", "Loc"), ("Bob", "Peop")
    paris = ("Paris", "Loc")
    gold_ents = {ann, ibm, nyc, bob, paris}
    gold_rels = {
        (*ann, *ibm, "Work_For"),  # found
        (*ibm, *nyc, "OrgBased_In"),  # both entities found, written with another type
        (*bob, *nyc, "Live_In"),  # Bob found as an Org
        (*ann, *paris, "Live_In"),  # Paris written with other boundaries
    }
    pred_ents = {ann, ibm, nyc, ("Bob", "Org"), ("in Paris", "Loc")}
    pred_rels = {
        (*ann, *ibm, "Work_For"),
        (*ibm, *nyc, "Located_In"),  # false, between gold entities
        (*ann, "in Paris", "Loc", "Live_In"),  # false, with an entity gold lacks
    }
    counts = protocol.relation_errors([(pred_ents, pred_rels)], [(gold_ents, gold_rels)])
    assert counts == {
        "found": 1,
        "both entities found": 1,
        "a type wrong": 1,
        "a mention missed": 1,
        "false, gold entities": 1,
        "false, other entity": 1,
    }

    # On a committed result: the gold itself as predictions finds every relation, and nothing false.
    _write(tmp_path / "perfect" / "seed1", _gold_records(shared_data, "test"), {})
    shown = _protocol(shared_data, tmp_path, "--errors", "perfect")
    assert shown.returncode == 0, shown.stderr
    n_gold = sum(len(keys[1]) for keys in protocol.gold_split(shared_data, "test").values())
    assert f"| test | 1 | {n_gold} | 0 | 0 | 0 | 0 | 0 |" in shown.stdout
    missing = _protocol(shared_data, tmp_path, "--errors", "nothing")
    assert missing.returncode != 0 and "no finished results" in missing.stderr


def _launched_configs(stdout: str) -> list[tuple[str, object]]:
    """Each training command a dry run printed ("+ PYTHON SCRIPT FLAGS... [# comment]"): its
    script and the config the script parses from its flags."""
    from anchoralign.config import PretrainConfig, SFTConfig
    from anchoralign.stages import parse_args

    configs = {"pretrain/run.py": PretrainConfig, "sft/run.py": SFTConfig}
    launched = []
    for line in stdout.strip().splitlines():
        _, _, script, *argv = line.split(" #")[0].split()
        if script not in configs:  # an evaluation or a fit
            continue
        argv[argv.index("--config") + 1] = str(REPO / argv[argv.index("--config") + 1])
        launched.append((script, parse_args(configs[script], argv, prog=script)))
    return launched


def test_every_training_command_parses_against_its_stage_config(shared_data, tmp_path):
    """The dry-run commands of a whole seed are valid configs of the scripts they launch (a flag
    one stage does not have, such as SFT's ``fit`` section given to pretraining, fails here)."""
    flags = ["--seeds", "1", "--settings", "full,no_alignment", "--steps", "pretrain,ce,align"]
    flags += ["--dry-run", "--pretrain", f"x={tmp_path / 'corpus'}", "--model", "joint"]
    done = _protocol(shared_data, tmp_path / "out", *flags, "--runs", str(tmp_path / "runs"))
    assert done.returncode == 0, done.stderr
    launched = [(script, cfg.seed) for script, cfg in _launched_configs(done.stdout)]
    assert launched == [("pretrain/run.py", 1)] + [("sft/run.py", 1)] * 3


def test_every_stage_2_setting_parses_and_the_gate_reaches_the_loss(shared_data, tmp_path):
    """Each setting --settings may train is a valid SFT config; ``teacher_gate`` is ``full`` with
    the NER-RE alignment gated on the teacher and nothing else changed."""
    protocol = _load_protocol()
    flags = ["--seeds", "1", "--settings", ",".join(protocol.TRAINED), "--steps", "align", "--dry-run"]
    flags += ["--pretrain", f"x={tmp_path / 'corpus'}"]  # `mix` trains on the corpus too
    done = _protocol(shared_data, tmp_path / "out", *flags, "--runs", str(tmp_path / "runs"))
    assert done.returncode == 0, done.stderr
    configs = {Path(cfg.output_dir).parent.name: cfg for _, cfg in _launched_configs(done.stdout)}
    assert set(configs) == set(protocol.TRAINED)
    full, gated = configs["full"], configs["teacher_gate"]
    assert gated.loss.teacher_gate and not full.loss.teacher_gate
    assert gated.model_copy(update={"loss": full.loss, "output_dir": full.output_dir}) == full


def test_a_pretrain_setting_changes_only_the_alignment_phase_and_names_what_follows(shared_data, tmp_path):
    runs = tmp_path / "runs"
    configs, commands = {}, {}
    for setting in ("", "noalign", "gate"):
        flags = ["--seeds", "3", "--settings", "", "--steps", "pretrain,ce", "--dry-run", "--model", "joint"]
        flags += ["--pretrain", f"x={tmp_path / 'corpus'}", "--runs", str(runs)]
        done = _protocol(
            shared_data, tmp_path / "out", *flags, *(["--pretrain-setting", setting] if setting else [])
        )
        assert done.returncode == 0, done.stderr
        configs[setting] = _launched_configs(done.stdout)[0][1]
        commands[setting] = done.stdout.strip().splitlines()
    plain = configs[""]
    assert plain.loss.alignment and not plain.loss.teacher_gate
    assert not configs["noalign"].loss.alignment and configs["gate"].loss.teacher_gate
    for setting in ("noalign", "gate"):
        name = f"pretrain_x_{setting}"
        cfg = configs[setting]
        assert cfg.model_copy(update={"loss": plain.loss, "output_dir": plain.output_dir}) == plain
        assert cfg.output_dir == str(runs / name / "pretrain" / "seed3")
        _, test, dev, ce = commands[setting]
        assert f"--checkpoint {runs}/{name}/pretrain/seed3/final" in test
        assert test.endswith(f"/out/{name}_pretrained/seed3/predictions.jsonl")
        assert dev.endswith(f"/out/{name}_pretrained/seed3/dev/predictions.jsonl")
        # Stage 1 starts from that model, and its runs carry the name.
        assert f"--init-from={runs}/{name}/pretrain/seed3/final" in ce
        assert f"--output-dir={runs}/{name}_with_joint/ce/seed3" in ce


def test_a_pretrain_setting_needs_a_corpus(shared_data, tmp_path):
    done = _protocol(shared_data, tmp_path / "out", "--pretrain-setting", "noalign", "--dry-run")
    assert done.returncode == 2 and "--pretrain-setting: with --pretrain NAME=DIR" in done.stderr


def test_the_recipes_decoding_ablations_evaluate_its_checkpoints_with_their_flags(shared_data, tmp_path):
    runs = tmp_path / "runs"
    flags = ["--seeds", "5", "--settings", "recipe_no_constraint,recipe_no_aggregation,recipe_no_both"]
    flags += ["--steps", "eval", "--dry-run", "--model", "joint", "--runs", str(runs)]
    done = _protocol(shared_data, tmp_path / "out", *flags)
    assert done.returncode == 0, done.stderr
    tests = {
        line.split("--output ")[1].split("/")[-3]: line
        for line in done.stdout.strip().splitlines()
        if line.endswith("/seed5/predictions.jsonl")
    }
    expected = {
        "recipe_no_constraint": "--anchor off --output",
        "recipe_no_aggregation": "--aggregate false --output",
        "recipe_no_both": "--anchor off --aggregate false --output",
    }
    for name, decoding in expected.items():
        line = tests[f"with_joint_{name}"]
        assert f"--checkpoint {runs}/with_joint/span_fit_top2_relation_head/seed5/best" in line
        assert decoding in line


def test_the_ce_heads_step_fits_both_heads_on_stage_1(shared_data, tmp_path):
    runs = tmp_path / "runs"
    flags = ["--seeds", "8", "--steps", "ce_heads", "--dry-run", "--model", "joint", "--runs", str(runs)]
    # --span-layers 0: the span head over the frozen encoder's output, as the committed seeds were fitted.
    done = _protocol(shared_data, tmp_path / "out", *flags, "--span-layers", "0")
    assert done.returncode == 0, done.stderr
    span, head, test, dev = done.stdout.strip().splitlines()
    assert "fit-span-head" in span and f"--checkpoint {runs}/with_joint/ce/seed8/best" in span
    assert f"--output {runs}/with_joint/ce_only_span_fit/seed8/best" in span
    assert (
        "fit-relation-head" in head and f"--checkpoint {runs}/with_joint/ce_only_span_fit/seed8/best" in head
    )
    assert f"--output {runs}/with_joint/ce_only_span_fit_relation_head/seed8/best" in head
    assert f"--checkpoint {runs}/with_joint/ce_only_span_fit_relation_head/seed8/best" in test
    assert test.endswith("/with_joint_ce_only_span_fit_relation_head/seed8/predictions.jsonl")
    assert dev.endswith("/with_joint_ce_only_span_fit_relation_head/seed8/dev/predictions.jsonl")


def test_span_layers_give_the_span_fit_its_own_top_layers_and_its_own_name(shared_data, tmp_path):
    runs = tmp_path / "runs"
    flags = ["--seeds", "4", "--settings", "full", "--steps", "ce_heads,span,head", "--dry-run"]
    # 0: the head over the frozen encoder's output, the committed span_fit results.
    done = _protocol(shared_data, tmp_path / "out", *flags, "--span-layers", "0", "--runs", str(runs))
    assert done.returncode == 0, done.stderr
    ce_span, ce_head, _, _, span, test, _, head, head_test, _ = done.stdout.strip().splitlines()
    assert ce_span.endswith("--layers=0") and f"--output {runs}/ce_only_span_fit/seed4/best" in ce_span
    assert f"--checkpoint {runs}/ce_only_span_fit/seed4/best" in ce_head
    assert span.endswith("--layers=0") and f"--output {runs}/span_fit/seed4/best" in span
    assert test.endswith(f"{tmp_path}/out/span_fit/seed4/predictions.jsonl")
    assert f"--checkpoint {runs}/span_fit/seed4/best" in head
    assert head_test.endswith(f"{tmp_path}/out/span_fit_relation_head/seed4/predictions.jsonl")
    done = _protocol(shared_data, tmp_path / "out", *flags, "--span-layers", "1", "--runs", str(runs))
    span = done.stdout.strip().splitlines()[4]
    assert span.endswith("--layers=1") and f"--output {runs}/span_fit_top1/seed4/best" in span
    refused = _protocol(shared_data, tmp_path / "out", *flags, "--span-layers", "-1")
    assert refused.returncode == 2 and "--span-layers" in refused.stderr


def test_relation_layers_give_the_head_its_own_top_layers_and_its_own_name(shared_data, tmp_path):
    runs = tmp_path / "runs"
    flags = ["--seeds", "4", "--settings", "full", "--steps", "span,head", "--dry-run", "--runs", str(runs)]
    done = _protocol(shared_data, tmp_path / "out", *flags)
    head = done.stdout.strip().splitlines()[3]
    assert (
        head.endswith("--heads=1 --layers=0")
        and f"--output {runs}/span_fit_top2_relation_head/seed4/best" in head
    )
    done = _protocol(shared_data, tmp_path / "out", *flags, "--relation-layers", "2")
    assert done.returncode == 0, done.stderr
    _, _, _, head, test, dev = done.stdout.strip().splitlines()
    assert head.endswith("--layers=2") and f"--checkpoint {runs}/span_fit_top2/seed4/best" in head
    assert f"--output {runs}/span_fit_top2_relation_head_top2/seed4/best" in head
    assert test.endswith(f"{tmp_path}/out/span_fit_top2_relation_head_top2/seed4/predictions.jsonl")
    assert dev.endswith(f"{tmp_path}/out/span_fit_top2_relation_head_top2/seed4/dev/predictions.jsonl")
    refused = _protocol(shared_data, tmp_path / "out", *flags, "--relation-layers", "-1")
    assert refused.returncode == 2 and "--relation-layers" in refused.stderr


def test_an_unknown_step_is_refused_before_anything_runs(shared_data, tmp_path):
    done = _protocol(shared_data, tmp_path / "out", "--steps", "ce,heads", "--dry-run")
    assert done.returncode == 2 and "--steps: unknown heads" in done.stderr
    assert done.stdout == ""


def test_seed_interval_is_the_t_interval_of_the_mean():
    protocol = _load_protocol()
    # mean 2, sd 1, 2 degrees of freedom: 2 -/+ 4.303 / sqrt(3)
    low, high = protocol.seed_interval([1.0, 2.0, 3.0])
    assert abs(low - (2 - 4.303 / 3**0.5)) < 1e-9 and abs(high - (2 + 4.303 / 3**0.5)) < 1e-9
    # The recipe's first 7 seeds of relation F1 (64.72 ± 0.58): the interval computed by hand before
    low, high = protocol.seed_interval([63.99, 64.53, 64.66, 65.23, 65.45, 65.17, 64.04])
    assert (round(low, 2), round(high, 2)) == (64.19, 65.26)
    # Past the table's 30 degrees of freedom the last quantile holds; one seed has no interval.
    low, high = protocol.seed_interval([0.0, 1.0] * 20)
    assert abs((high - low) / 2 - 2.042 * statistics.stdev([0.0, 1.0] * 20) / 40**0.5) < 1e-9
    assert protocol.seed_interval([5.0]) is None


def test_every_committed_result_rescores_to_its_metrics(shared_data):
    """The issue's check on the committed files: each predictions.jsonl, re-scored against the gold
    split read directly, gives its metrics.json (--summary stops where one does not), and the
    issue's names of the main pair in conll04/ hold at least 3 seeds each."""
    folders = sorted(p for p in COMMITTED.iterdir() if p.is_dir() and any(p.glob("*/seed*/metrics.json")))
    assert {"conll04", "conll04-rerun", "conll04-2026-11-30"} <= {p.name for p in folders}
    for folder in folders:
        done = _protocol(shared_data, folder, "--summary")
        assert done.returncode == 0, done.stderr
    for setting in ("full", "no_alignment"):
        assert len(list((COMMITTED / "conll04" / setting).glob("seed*/metrics.json"))) >= 3
    links = [p for p in COMMITTED.rglob("*") if p.is_symlink()]
    assert links and all(p.resolve().is_dir() for p in links), [p for p in links if not p.resolve().is_dir()]


def test_summary_by_offsets_checks_and_shows_the_offsets_figures(shared_data, tmp_path):
    """A prediction that names each repeated mention at its first occurrence is right by text and
    wrong by offsets: --summary checks metrics.json both ways and --keys offsets shows the second."""
    from anchoralign.commands.score import rounded
    from anchoralign.datasets import get_meta, load_split
    from anchoralign.metrics import score
    from anchoralign.schema import Sample

    gold = _gold_records(shared_data, "test")

    def first_occurrence(r: dict) -> dict:
        """Each entity at the first occurrence of its words; the repeats it makes are one entity."""
        entities: list[dict] = []
        at: list[int] = []  # gold entity index -> index in ``entities``
        for e in r["entities"]:
            words, n = r["tokens"][e["start"] : e["end"]], e["end"] - e["start"]
            start = next(i for i in range(len(r["tokens"])) if r["tokens"][i : i + n] == words)
            entity = {**e, "start": start, "end": start + n}
            if entity not in entities:
                entities.append(entity)
            at.append(entities.index(entity))
        relations = []
        for x in r["relations"]:
            relation = {**x, "head": at[x["head"]], "tail": at[x["tail"]]}
            if relation not in relations:
                relations.append(relation)
        return {**r, "entities": entities, "relations": relations}

    first = [first_occurrence(r) for r in gold]
    assert first != gold  # CoNLL04 test repeats some mentions
    meta = get_meta("conll04", str(shared_data))
    # metrics.json as `anchoralign evaluate --json` writes it: the product's scorer, rounded.
    scored = score(
        load_split("conll04", "test", str(shared_data)),
        [Sample(**r) for r in first],
        meta.symmetric_relations,
    )
    metrics = rounded(scored)
    assert metrics["ner_f1"] == metrics["rel_strict_f1"] == 100.0
    assert metrics["ner_offsets_f1"] < 100.0 and metrics["rel_strict_offsets_f1"] < 100.0
    for seed in (1, 2):
        _write(tmp_path / "first" / f"seed{seed}", first, metrics)

    def row(*flags: str) -> str:
        done = _protocol(shared_data, tmp_path, "--summary", *flags)
        assert done.returncode == 0, done.stderr
        return next(r for r in done.stdout.splitlines() if r.startswith("| first "))

    assert row().startswith("| first | 2 | 100.00 ± 0.00 | 100.00 ± 0.00 | 100.00 ± 0.00 |")
    ner, rel, boundary = (metrics[f"{f}_offsets_f1"] for f in ("ner", "rel_strict", "rel_boundary"))
    assert row("--keys", "offsets").startswith(
        f"| first | 2 | {ner:.2f} ± 0.00 | {rel:.2f} ± 0.00 | {boundary:.2f} ± 0.00 |"
    )
    # An offsets figure the predictions do not give stops it, by either keying.
    wrong = {**metrics, "rel_strict_offsets_f1": 100.0}
    (tmp_path / "first" / "seed2" / "metrics.json").write_text(json.dumps(wrong), encoding="utf-8")
    for flags in ((), ("--keys", "offsets")):
        done = _protocol(shared_data, tmp_path, "--summary", *flags)
        assert (
            done.returncode != 0 and "first/seed2: re-scored" in done.stderr and "by offsets" in done.stderr
        )
    # A metrics.json from before the offsets figures: checked by text, refused by offsets.
    text_only = {k: v for k, v in metrics.items() if "_offsets_" not in k}
    (tmp_path / "first" / "seed2" / "metrics.json").write_text(json.dumps(text_only), encoding="utf-8")
    assert row().startswith("| first | 2 | 100.00 ± 0.00 |")
    done = _protocol(shared_data, tmp_path, "--summary", "--keys", "offsets")
    assert done.returncode != 0 and "no figures by offsets" in done.stderr


RECIPE = REPO / "recipes" / "conll04-minilm"


def test_the_recipe_files_are_the_protocols_recipe(tmp_path):
    """recipes/conll04-minilm/ is what the protocol runs for the recipe (--pretrain rules=...
    --pretrain-epochs 1,1,2 --model joint --settings full, then its span and head steps): every
    key equal but the run folders, the bar, and the heads the protocol fits as steps of their own
    (with the fit section's settings)."""
    from anchoralign.config import PretrainConfig, SFTConfig, load_config

    runs, corpus, data = tmp_path / "runs", tmp_path / "corpus", tmp_path / "data"
    flags = ["--seeds", "4", "--settings", "full", "--steps", "pretrain,ce,align,span,head", "--dry-run"]
    flags += ["--pretrain", f"rules={corpus}", "--pretrain-epochs", "1,1,2", "--model", "joint"]
    done = _protocol(data, tmp_path / "out", *flags, "--runs", str(runs))
    assert done.returncode == 0, done.stderr
    launched = _launched_configs(done.stdout)
    assert [script for script, _ in launched] == ["pretrain/run.py", "sft/run.py", "sft/run.py"]
    files = {"pretrain": PretrainConfig, "ce": SFTConfig, "align": SFTConfig}
    recipe = {stage: load_config(cls, RECIPE / f"{stage}.yaml") for stage, cls in files.items()}
    paths = {"output_dir", "init_from", "data_dir"}
    for (_, protocol), (stage, ours) in zip(launched, recipe.items(), strict=True):
        assert protocol.seed == ours.seed == 4
        update = {key: getattr(protocol, key) for key in paths}
        update["trainer"] = ours.trainer.model_copy(update={"progress": protocol.trainer.progress})
        update["data"] = ours.data.model_copy(
            update={"corpus_dir": protocol.data.corpus_dir} if stage == "pretrain" else {}
        )
        if stage != "pretrain":
            update["fit"] = protocol.fit
        assert ours.model_copy(update=update) == protocol, stage
    # The heads: the protocol's span and head steps fit what align.yaml's fit section fits.
    fits = [line for line in done.stdout.splitlines() if " fit-" in line]
    assert len(fits) == 2 and "fit-span-head" in fits[0] and "fit-relation-head" in fits[1]
    fit = recipe["align"].fit
    assert fit.span_head and fit.relation_head and fit.source == "best"
    assert f"--layers={fit.span_layers}" in fits[0] and fit.span_layers == 2
    assert f"--heads={fit.relation_heads}" in fits[1] and f"--layers={fit.relation_layers}" in fits[1]
    assert not recipe["ce"].fit.span_head and not recipe["ce"].fit.relation_head
    # Each step starts where the one before it ends.
    assert recipe["ce"].init_from == f"{recipe['pretrain'].output_dir}/final"
    assert recipe["align"].init_from == f"{recipe['ce'].output_dir}/best"
    assert recipe["pretrain"].data.corpus_dir == "corpus/conll04-rules"
