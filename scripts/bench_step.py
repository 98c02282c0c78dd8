"""Seconds per training step of the real model on CoNLL04 batches, by the choices that set it:
precision (fp32, or bf16 autocast), batches drawn at random or length-bucketed
(``data.bucket_batches``), and the decoders of the encoder-only backbone (prefix or cross).

Each variant runs the same optimizer steps (forward, the three cross-entropies, backward, AdamW) on
the same batches; variants alternate in rounds and the best round of each is kept, so a busy
machine penalises none of them more than the others. One thread by default.

    OMP_NUM_THREADS=1 python scripts/bench_step.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import random
import shlex
import sys
import time

import torch

from anchoralign.datasets import get_meta, load_split
from anchoralign.losses import CE_TERMS, loss_terms
from anchoralign.model import AnchorAlignModel
from anchoralign.optim import autocast
from anchoralign.schedule import epoch_order


def batches(train, collate, n: int, size: int, bucketed: bool) -> list[dict]:
    """``n`` batches of ``size``: consecutive slices of the first epoch's order, bucketed or not."""
    lengths = [len(s.tokens) for s in train]
    bucket = 8 * size if bucketed else 0
    order = epoch_order(0, 0, len(train), lengths, bucket, size)
    return [collate([train[i] for i in order[k * size : (k + 1) * size]]) for k in range(n)]


def seconds_per_step(model, data: list[dict], precision: str) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    weights = dict.fromkeys(CE_TERMS, 1.0)
    start = time.perf_counter()
    for batch in data:
        with autocast(precision, torch.device("cpu")):
            outputs = model(batch)
        loss_terms(outputs, batch, weights)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    return (time.perf_counter() - start) / len(data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per variant and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    random.seed(0)
    meta = get_meta("conll04", args.data_dir)
    train = load_split("conll04", "train", args.data_dir)
    variants = [
        ("prefix", "fp32", False),
        ("prefix", "bf16", False),
        ("prefix", "bf16", True),
        ("cross", "bf16", True),
    ]
    models = {
        att: AnchorAlignModel.from_backbone("minilm", meta, decoder_attention=att)
        for att in ("prefix", "cross")
    }
    collate = models["prefix"].collator(256)
    data = {b: batches(train, collate, args.steps, args.batch_size, b) for b in (False, True)}
    best: dict[tuple, float] = {}
    for _ in range(args.rounds):
        for att, precision, bucketed in variants:
            s = seconds_per_step(models[att], data[bucketed], precision)
            best[(att, precision, bucketed)] = min(s, best.get((att, precision, bucketed), s))
    print(f"`{shlex.join(['python', *sys.argv])}` — {dt.date.today()}, {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s), torch {torch.__version__}, batch {args.batch_size}, best of {args.rounds} rounds "
          f"of {args.steps} steps\n")  # fmt: skip
    print("| decoders | precision | batches | s/step | samples/s |")
    print("|---|---|---|---|---|")
    for (att, precision, bucketed), s in best.items():
        kind = "length-bucketed" if bucketed else "random"
        print(f"| {att} | {precision} | {kind} | {s:.2f} | {args.batch_size / s:.1f} |")


if __name__ == "__main__":
    main()
