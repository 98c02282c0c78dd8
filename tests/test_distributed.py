"""Two processes on gloo with ZeRO stage 2, started by the ``deepspeed`` launcher exactly as the
README does (``DS_ACCELERATOR=cpu deepspeed --log_level=error --num_gpus 2 sft/run.py ...``, on
CPU): both ranks train on their own share of every batch and end with the same weights, which are
also the exported ones, and the console holds the run's own lines, once.

About 25 s on two CPU cores (the DeepSpeed launcher and two interpreters)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from anchoralign.distributed import free_port, single_process_env

REPO = Path(__file__).resolve().parent.parent
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")

# Runs the real entry point and, after training, saves what each rank holds.
WRAPPER = """\
import sys
from pathlib import Path

import torch

from anchoralign import distributed, trainer
from sft.run import main

fit = trainer.Trainer.fit


def fit_and_dump(self):
    final = fit(self)
    weights = {k: v.detach().clone() for k, v in self.engine.module.state_dict().items()}
    torch.save(weights, Path(self.cfg.output_dir) / f"weights-rank{distributed.rank()}.pt")
    return final


trainer.Trainer.fit = fit_and_dump
sys.exit(main())
"""


def test_single_process_env_is_filled_only_without_a_launcher() -> None:
    assert single_process_env({}, 1234) == {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "1234",
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
    }
    assert single_process_env({"MASTER_PORT": "99"}, 1234)["MASTER_ADDR"] == "127.0.0.1"
    assert "MASTER_PORT" not in single_process_env({"MASTER_PORT": "99"}, 1234)
    assert single_process_env({"RANK": "1", "WORLD_SIZE": "2"}, 1234) == {}
    assert single_process_env({"OMPI_COMM_WORLD_RANK": "0"}, 1234) == {}


@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not on PATH")
def test_two_ranks_zero2_end_with_the_same_weights(tmp_path: Path, shared_data: Path) -> None:
    wrapper = tmp_path / "sft_with_dump.py"
    wrapper.write_text(WRAPPER, encoding="utf-8")
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"  # else the launcher warns (twice) that it found no GPU
    command = [
        "deepspeed", "--log_level=error", "--num_gpus", "2", "--master_port", str(free_port()), str(wrapper),
        "--config", "sft/configs/conll04.yaml", f"--data_dir={shared_data}", f"--output_dir={out}",
        "--model.backbone=tiny", "--init_from=null", "--trainer.precision=fp32", "--trainer.zero_stage=2", "--phases.epochs=[1,1,1]",
        "--optim.micro_batch_size=2", "--optim.grad_accum=2", "--data.limit_train=16", "--data.limit_eval=2",
        "--eval.loss_splits=[dev]", "--decode.max_len=16", "--optim.lr=1e-3", "--phases.switch=epochs", "--trainer.progress=false",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

    log = (out / "train.log").read_text(encoding="utf-8")
    assert "sft: 2 rank(s), global batch 8 (micro 2 x accumulation 2 x 2), ZeRO 2" in log
    assert "phase full-ce -> full-align" in log
    console = done.stdout + done.stderr
    for noise in (
        "[INFO]",
        "[WARNING]",
        "CUDA_VISIBLE_DEVICES",
        "built successfully",
        "Warning",
        "LOAD REPORT",
    ):
        assert noise not in console, console[-4000:]
    assert console.count("sft: 2 rank(s)") == 1  # rank 0 speaks for the run

    rank0 = torch.load(out / "weights-rank0.pt")
    rank1 = torch.load(out / "weights-rank1.pt")
    assert rank0.keys() == rank1.keys()
    assert [k for k in rank0 if not rank0[k].equal(rank1[k])] == []
    exported = load_file(str(out / "final" / "model.safetensors"))
    shared = [k for k in exported if k in rank0]
    assert len(shared) > 10
    assert [k for k in shared if not exported[k].equal(rank0[k])] == []
