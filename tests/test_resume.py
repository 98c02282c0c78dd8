"""A training run killed (SIGKILL) after a checkpoint and started again with the same command
ends with exactly the weights of a run that was never interrupted.

The fast, in-process variant (a crash at a chosen step, stand-in model) is in test_engine.py;
this one uses the real entry point, the tiny AnchorAlign model and a real kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # One thread: on a shared CI machine two busy-waiting OpenMP threads per process are many
    # times slower than one.
    env["OMP_NUM_THREADS"] = "1"
    return env


def _command(shared_data: Path, output_dir: Path) -> list[str]:
    return [
        sys.executable, "sft/run.py", "--config", "sft/configs/conll04.yaml",
        f"--data_dir={shared_data}", f"--output_dir={output_dir}",
        "--model.backbone=tiny", "--init_from=null", "--trainer.precision=fp32", "--phases.epochs=[1,1,1]",
        "--optim.micro_batch_size=4", "--data.limit_train=24", "--data.limit_eval=2", "--eval.loss_splits=[dev]",
        "--decode.max_len=16", "--optim.lr=1e-3", "--checkpoint.save_every=2", "--phases.switch=epochs", "--trainer.progress=false",
    ]  # fmt: skip


def _latest_tag(output_dir: Path) -> str | None:
    latest = output_dir / "checkpoints" / "latest"
    return latest.read_text(encoding="utf-8").strip() if latest.is_file() else None


def test_killed_run_resumes_to_the_same_weights(tmp_path: Path, shared_data: Path) -> None:
    reference = tmp_path / "uninterrupted"
    done = subprocess.run(
        _command(shared_data, reference), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]

    killed = tmp_path / "killed"
    with (tmp_path / "first.log").open("w") as log:
        proc = subprocess.Popen(_command(shared_data, killed), cwd=REPO, env=_env(), stdout=log, stderr=log)
        deadline = time.monotonic() + 300
        while _latest_tag(killed) is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    tag = _latest_tag(killed)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-4000:]
    assert tag is not None and not tag.endswith("-done"), tag  # killed mid-run, after a checkpoint

    done = subprocess.run(
        _command(shared_data, killed), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "resuming from" in (killed / "train.log").read_text(encoding="utf-8")

    want = load_file(str(reference / "final" / "model.safetensors"))
    got = load_file(str(killed / "final" / "model.safetensors"))
    assert want.keys() == got.keys()
    different = [k for k in want if not want[k].equal(got[k])]
    assert different == []
