"""Training-step benchmark: a plain PyTorch loop against our DeepSpeed engine, same run.

CPU (default): the ``tiny`` and ``minilm`` models, fp32. Both loops train a copy of the model
with the same initial weights on the same batches: the plain loop with AdamW, the same schedule,
clipping and ``loss_terms`` with every term on; the engine with ``Trainer.train_step`` (DeepSpeed
on one rank, so without ZeRO, see ``effective_zero_stage``; ``--keep-zero`` runs ``--zero-stage``
anyway). For speed, one worker process holds both copies and alternates timed blocks of steps
between them, so load from other processes hits both alike (medians over the blocks). For
memory, each loop runs alone in its own worker: the peak resident set (RSS high-water mark)
during its steps, model and optimizer included. Reported: samples/s of each, the engine's
overhead ``1 - engine / plain`` samples/s, and the peaks. On a small shared machine, set
``OMP_NUM_THREADS=1``: busy-waiting OpenMP threads make two-thread timings erratic.

GPU (``--gpu``, needs CUDA): a BART-large-sized model (random weights: the tiny configuration
scaled up, so nothing is downloaded) in bf16 with ZeRO stage 2 (kept on one GPU), through the
engine only: samples/s, peak allocated memory and model FLOPs utilisation (useful FLOPs per
second over the device's dense bf16 peak).

    python scripts/bench_train.py --data-dir ../shared/data             # CPU table
    python scripts/bench_train.py --gpu --data-dir ../shared/data       # on a GPU machine
    python scripts/bench_train.py --json bench.json                      # also write the results

Training sentences come from CoNLL04's train split (``--data-dir``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from anchoralign.backbones import BART_LARGE_SHAPE

# Dense bf16 peak (TFLOP/s, no sparsity) by device-name fragment; SXM parts.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0}
DECODERS = ("ner", "fwd", "rev")
Step = Callable[[list[Any]], None]


# --- measurement -------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text(encoding="ascii")
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        # Resets this process's RSS high-water mark to its current RSS (Linux >= 4.0).
        Path("/proc/self/clear_refs").write_text("5", encoding="ascii")


def peak_memory_mib(device: torch.device) -> float:
    """Peak since :func:`reset_peak_memory`: RSS high-water mark, or CUDA's allocated peak."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return _status_kib("VmHWM") / 1024


def model_flops_per_sample(
    counts: dict[str, int], d_model: int, layers: int, src: float, tgt: float
) -> float:
    """Training FLOPs of one sample (forward + backward = 3 x forward) from its token counts.

    Forward: 2 FLOPs per parameter per token through the encoder (``src`` tokens) and each of the
    three decoders (``tgt`` tokens each), plus attention scores and mixing (4 * layers * n * m *
    d_model for n queries over m keys): self-attention in the encoder and the decoders,
    cross-attention in the decoders. Embedding lookups cost nothing.
    """
    enc = 2 * counts["encoder"] * src + 4 * layers * src * src * d_model
    dec = sum(2 * counts[f"decoder_{d}"] * tgt for d in DECODERS)
    dec += len(DECODERS) * (4 * layers * tgt * tgt * d_model + 4 * layers * tgt * src * d_model)
    return 3.0 * (enc + dec)


def peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def _samples_per_s(step: Step, batches: Sequence[list[Any]], device: torch.device) -> float:
    t0 = time.perf_counter()
    for samples in batches:
        step(samples)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return sum(len(b) for b in batches) / (time.perf_counter() - t0)


# --- the two loops -----------------------------------------------------------------------------


def _batches(data_dir: str | None, micro: int, n: int) -> list[list[Any]]:
    from anchoralign.datasets import load_split

    train = load_split("conll04", "train", data_dir)
    return [[train[(i * micro + j) % len(train)] for j in range(micro)] for i in range(n)]


def _build(name: str, meta: Any) -> Any:
    from anchoralign.model import AnchorAlignModel

    torch.manual_seed(0)
    if name == "bart-large-sized":
        # BART-large's shape; the vocabulary is the MiniLM tokenizer's (30k) instead of BART's (50k).
        return AnchorAlignModel.from_backbone("tiny", meta, **BART_LARGE_SHAPE)
    return AnchorAlignModel.from_backbone(name, meta)


def plain_loop(model: Any, lr: float, total: int, clip: float) -> Step:
    """One optimizer step of a hand-written loop, doing what the engine does."""
    from anchoralign.losses import ALIGN_TERMS, CE_TERMS, loss_terms
    from anchoralign.schedule import lr_at, warmup_steps_for

    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}], lr=lr
    )
    warm = warmup_steps_for(total, 0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_at(k, total, warm, 1.0))
    collate = model.collator(max_length=256)
    weights = dict.fromkeys((*CE_TERMS, *ALIGN_TERMS), 1.0)

    def step(samples: list[Any]) -> None:
        model.train()
        batch = collate(samples)
        terms = loss_terms(model(batch), batch, weights)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    return step


def engine_trainer(model: Any, args: argparse.Namespace, batches: Sequence[list[Any]], out: Path) -> Any:
    """A Trainer whose single phase is one epoch of exactly these batches (same schedule length)."""
    from anchoralign.config import PretrainConfig, load_config
    from anchoralign.losses import loss_terms
    from anchoralign.schedule import Phase
    from anchoralign.trainer import Trainer

    overrides = [
        "--dataset=conll04",
        f"--output_dir={out}",
        "--phases.epochs=[0,0,1]",
        "--optim.lr=1e-4",
        "--optim.warmup_ratio=0.1",
        f"--optim.micro_batch_size={args.micro_batch}",
        f"--trainer.zero_stage={args.zero_stage}",
        f"--trainer.precision={args.precision}",
        "--trainer.progress=false",
    ]
    if args.keep_zero:
        # A DeepSpeed JSON of one's own keeps the ZeRO stage on a single rank (effective_zero_stage).
        ds_json = out / "ds.json"
        ds_json.write_text('{"zero_optimization": {"stage": "auto"}}', encoding="utf-8")
        overrides.append(f"--trainer.deepspeed_config={ds_json}")
    cfg = load_config(PretrainConfig, None, overrides)
    train = [s for batch in batches for s in batch]
    phases = [Phase("bench", "train", 1, align=True)]
    return Trainer(cfg, model, phases, {"train": train}, model.collator(max_length=256), loss_terms)


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Build the requested loops and time them in alternating blocks; alone, a loop also reports
    its peak memory."""
    from anchoralign import distributed
    from anchoralign.datasets import get_meta

    distributed.setup()
    meta = get_meta("conll04", args.data_dir)
    total = args.warmup + args.blocks * args.block_steps
    batches = _batches(args.data_dir, args.micro_batch, total)
    wanted = args.loops.split(",")
    result: dict[str, Any] = {
        "model": args.worker,
        "micro_batch": args.micro_batch,
        "zero_stage": args.zero_stage,
    }
    loops: dict[str, Step] = {}
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        if "plain" in wanted:
            model = _build(args.worker, meta)
            result["parameters"] = model.num_parameters()
            loops["plain"] = plain_loop(model, lr=1e-4, total=total, clip=1.0)
        if "engine" in wanted:
            engine_model = _build(args.worker, meta)
            result["parameters"] = engine_model.num_parameters()
            trainer = engine_trainer(engine_model, args, batches, Path(tmp))
            device = trainer.device
            loops["engine"] = lambda samples: trainer.train_step([samples])
        reset_peak_memory(device)
        for step in loops.values():
            for samples in batches[: args.warmup]:
                step(samples)
        speed: dict[str, list[float]] = {name: [] for name in loops}
        for b in range(args.blocks):
            block = batches[args.warmup + b * args.block_steps : args.warmup + (b + 1) * args.block_steps]
            for name, step in loops.items():
                speed[name].append(_samples_per_s(step, block, device))
        for name in loops:
            result[f"{name}_samples_per_s"] = statistics.median(speed[name])
        if len(loops) == 1:
            result[f"{wanted[0]}_peak_mib"] = peak_memory_mib(device)
        if device.type == "cuda":
            result.update(_mfu(engine_model, batches, result["engine_samples_per_s"]))
        result["device"] = (
            torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
        )
    return result


def _mfu(model: Any, batches: Sequence[list[Any]], samples_per_s: float) -> dict[str, Any]:
    collate = model.collator(max_length=256)
    src = tgt = n = 0.0
    for samples in batches[:20]:
        batch = collate(samples)
        src += float(batch["attention_mask"].sum())
        tgt += sum(float((batch[f"{d}_labels"] != -100).sum()) for d in DECODERS) / len(DECODERS)
        n += len(samples)
    cfg = model.backbone.config
    flops = model_flops_per_sample(
        model.parameter_counts(), cfg.d_model, cfg.encoder_layers, src / n, tgt / n
    )
    peak = peak_tflops(torch.cuda.get_device_name())
    achieved = flops * samples_per_s / 1e12
    return {"tflops_per_s": achieved, "mfu": achieved / peak if peak else None, "peak_tflops": peak}


# --- driver ------------------------------------------------------------------------------------


def _run_worker(model: str, loops: str, extra: Sequence[str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", model, "--loops", loops, *extra]
    # A worker starts its own one-process group.
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"worker for {model} ({loops}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_cpu(model: str, extra: Sequence[str]) -> dict[str, Any]:
    """Speed of both loops side by side, then each loop's memory alone."""
    result = _run_worker(model, "plain,engine", extra)
    result["engine_overhead"] = 1.0 - result["engine_samples_per_s"] / result["plain_samples_per_s"]
    for loop in ("plain", "engine"):
        result[f"{loop}_peak_mib"] = _run_worker(model, loop, extra)[f"{loop}_peak_mib"]
    return result


def _fmt(r: dict[str, Any], key: str, fmt: str = "{:.2f}") -> str:
    return "-" if r.get(key) is None else fmt.format(r[key])


def print_table(results: Sequence[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="training step: plain PyTorch loop vs DeepSpeed engine")
    columns = ["model", "params", "device", "plain samples/s", "engine samples/s", "overhead"]
    columns += ["plain peak MiB", "engine peak MiB", "MFU"]
    for col in columns:
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(
            r["model"],
            f"{r['parameters'] / 1e6:.1f}M",
            r["device"],
            _fmt(r, "plain_samples_per_s"),
            _fmt(r, "engine_samples_per_s"),
            _fmt(r, "engine_overhead", "{:+.1%}"),
            _fmt(r, "plain_peak_mib", "{:.0f}"),
            _fmt(r, "engine_peak_mib", "{:.0f}"),
            _fmt(r, "mfu", "{:.1%}"),
        )
    Console(width=160).print(table)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--models", nargs="+", default=["tiny", "minilm"], help="CPU models (default: tiny minilm)"
    )
    p.add_argument("--gpu", action="store_true", help="the BART-large-sized bf16 ZeRO-2 run (needs CUDA)")
    p.add_argument("--data-dir", default=os.environ.get("ANCHORALIGN_DATA"), help="folder holding conll04/")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each loop first")
    p.add_argument("--blocks", type=int, default=5, help="timed blocks of each loop, alternating")
    p.add_argument("--block-steps", type=int, default=4, help="steps per block")
    p.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    p.add_argument("--json", help="also write the results to this file")
    # Worker-only options (the driver passes them).
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--loops", default="plain,engine", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help=argparse.SUPPRESS)
    p.add_argument(
        "--keep-zero", action="store_true", help="CPU: run --zero-stage although there is one rank"
    )
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    common = ["--micro-batch", str(args.micro_batch), "--warmup", str(args.warmup)]
    common += ["--blocks", str(args.blocks), "--block-steps", str(args.block_steps)]
    if args.data_dir:
        common += ["--data-dir", args.data_dir]
    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("--gpu: no CUDA device here")
        results = [
            _run_worker(
                "bart-large-sized",
                "engine",
                [*common, "--precision", "bf16", "--zero-stage", "2", "--keep-zero"],
            )
        ]
    else:
        # fp32 on CPU: the plain loop has no mixed precision to hold a bf16 engine against.
        extra = [*common, "--precision", "fp32", "--zero-stage", str(args.zero_stage)]
        extra += ["--keep-zero"] if args.keep_zero else []
        results = [measure_cpu(model, extra) for model in args.models]
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
