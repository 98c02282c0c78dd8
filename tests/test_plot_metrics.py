"""scripts/plot_metrics.py on the metrics a run writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from script_loader import load_script
from trainer_fixtures import Loss, ScriptedEvaluator, StandIn, cfg_of, collate, phases_of, sets_of

from anchoralign.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent


def _plot_module():
    return load_script("plot_metrics")


def test_plot_series_by_hand() -> None:
    plot = _plot_module()
    rows = [
        {"kind": "train", "step": 1, "loss": 3.0},
        {"kind": "eval_loss", "step": 2, "split": "dev", "loss": 2.5},
        {"kind": "train", "step": 2, "loss": 2.0, "phase": "x"},
        {"kind": "eval_loss", "step": 2, "split": "test", "loss": 2.7},
        {"kind": "switch", "step": 2, "from": "a", "to": "b", "reason": "r"},
        {"kind": "train", "step": 3},
    ]
    assert plot.series(rows, "train", "loss") == ([1, 2], [3.0, 2.0])
    assert plot.series(rows, "eval_loss", "loss", "test") == ([2], [2.7])
    assert plot.splits_of(rows, "eval_loss") == ["dev", "test"]
    assert plot.phase_starts(rows) == [(2, "b")]


def test_plot_metrics_draws_a_run(tmp_path: Path, gloo: None) -> None:
    cfg = cfg_of(tmp_path, "--trainer.log_every=1")
    Trainer(
        cfg, StandIn(), phases_of(), sets_of(), collate, Loss(), ScriptedEvaluator([0.5], [1.0, 2.0, 3.0])
    ).fit()
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "plot_metrics.py"), cfg.output_dir],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    names = {"loss_terms.png", "alignment.png", "scores.png", "schedule.png"}
    assert {Path(line).name for line in done.stdout.split()} == names
    for name in names:
        assert (Path(cfg.output_dir) / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "plot_metrics.py"), str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "metrics file not found" in missing.stderr
