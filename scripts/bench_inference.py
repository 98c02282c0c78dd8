"""Inference speed of joint decoding, against three plain ``generate`` calls of a same-sized model.

For each model (random weights: speed does not depend on what the weights learned):

- **joint**: ``anchoralign.decode.predict`` end to end (collate, one encoding, the NER, forward
  and reverse decoders stepped together with key/value caches and the output grammar, parsing),
  batch by batch as ``predict`` batches (sorted by length, ``--batch-size`` sentences);
- **3 x generate**: a plain single-decoder encoder-decoder of the same size (BART, or a BERT2BERT
  ``EncoderDecoderModel`` for the encoder-only backbone) called with ``generate`` three times per
  batch on the same input ids, greedy, with the key/value cache, each call writing exactly as many
  tokens as the matching joint decoder ran for that batch.

Output lengths: an untrained model rarely stops by itself, so each batch is capped at the longest
gold target (of the three decoders) of its sentences: the number of steps a trained model that
writes the gold outputs would need. Both sides then run the same number of decoder steps.

Models: ``tiny`` (the test configuration), ``minilm`` (the packaged MiniLM encoder with three
decoders copied from it) and ``bart-large`` (BART-large-sized random configuration: 12+12 layers,
d_model 1024; meant for ``--device cuda --dtype bfloat16``). Prints a markdown table with the
command, the machine and the date.

    python scripts/bench_inference.py --models tiny,minilm
    python scripts/bench_inference.py --models bart-large --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import shlex
import sys
import time
from dataclasses import dataclass

import torch

from anchoralign.backbones import BART_LARGE_SHAPE
from anchoralign.datasets import get_meta, load_split
from anchoralign.decode import DecodeConfig, predict
from anchoralign.linearize import DECODERS, linearize
from anchoralign.model import AnchorAlignModel
from anchoralign.schema import Sample


@dataclass
class Plan:
    """One batch: its samples and the output length cap (the longest gold target among them)."""

    samples: list[Sample]
    max_len: int


def batches(samples: list[Sample], meta, model: AnchorAlignModel, size: int) -> list[Plan]:
    ordered = sorted(samples, key=lambda s: len(s.tokens), reverse=True)  # as predict orders them
    plans = []
    for i in range(0, len(ordered), size):
        chunk = ordered[i : i + size]
        targets = [linearize(s, model.labels, model.paradigm) for s in chunk]
        longest = max(len(getattr(t, d)) for t in targets for d in ("ner", "fwd", "rev"))
        plans.append(Plan([Sample(id=s.id, tokens=s.tokens) for s in chunk], longest))
    return plans


def build(name: str, meta) -> AnchorAlignModel:
    if name == "tiny":
        return AnchorAlignModel.from_backbone("tiny", meta)
    if name == "minilm":
        return AnchorAlignModel.from_backbone("minilm", meta)
    if name == "bart-large":
        return AnchorAlignModel.from_backbone("tiny", meta, **BART_LARGE_SHAPE, dropout=0.1)
    raise SystemExit(f"unknown model {name!r}; choose from tiny, minilm, bart-large")


def single_decoder_baseline(model: AnchorAlignModel):
    """A plain encoder-decoder with one decoder and a full-vocabulary head, sized like ``model``."""
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        BertConfig,
        BertLMHeadModel,
        BertModel,
        EncoderDecoderModel,
    )

    tok = model.tokenizer
    config = model.backbone.config
    if model.backbone.family == "bart":
        cfg = BartConfig(**{**config.to_dict(), "vocab_size": len(tok)})
        base = BartForConditionalGeneration(cfg)
    else:
        enc_cfg = BertConfig(**{**config.to_dict(), "vocab_size": len(tok)})
        dec_cfg = BertConfig(**{**enc_cfg.to_dict(), "is_decoder": True, "add_cross_attention": True})
        base = EncoderDecoderModel(
            encoder=BertModel(enc_cfg, add_pooling_layer=False), decoder=BertLMHeadModel(dec_cfg)
        )
        base.config.decoder_start_token_id = tok.cls_token_id
        base.config.pad_token_id = tok.pad_token_id
    base.generation_config.decoder_start_token_id = tok.cls_token_id
    base.generation_config.pad_token_id = tok.pad_token_id
    base.generation_config.eos_token_id = None  # write exactly the asked number of tokens
    base.generation_config.forced_eos_token_id = None
    base.generation_config.forced_bos_token_id = None
    return base


def clock(device: torch.device) -> float:
    """Seconds now, after the device has finished what was queued on it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def run_joint(model, plan: Plan, batch_size: int) -> dict[str, int]:
    """Decode one batch with predict; the number of steps each decoder ran."""
    preds = predict(model, plan.samples, DecodeConfig(max_len=plan.max_len, batch_size=batch_size))
    return {d: max(len(p.outputs[d]) for p in preds) for d in DECODERS}


@torch.no_grad()
def run_baseline(base, model, plan: Plan, steps: dict[str, int], device) -> None:
    """Three plain generate calls on the batch, each as long as the matching joint decoder ran."""
    inputs = model.collator().inputs(plan.samples)
    ids, mask = inputs["input_ids"].to(device), inputs["attention_mask"].to(device)
    for decoder in DECODERS:
        base.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=steps[decoder],
            min_new_tokens=steps[decoder],
            num_beams=1,
            do_sample=False,
            use_cache=True,
        )


def measure(model, base, plans: list[Plan], args, device) -> tuple[float, float | None]:
    """Total seconds of the joint decoding and of the baseline, batch by batch.

    The two alternate on every batch and each batch keeps its fastest of ``--repeats`` runs, so a
    busy machine slows both sides alike instead of whichever happened to run at the wrong moment.
    """
    joint_total, base_total = 0.0, 0.0
    for plan in plans:
        joint_runs, base_runs = [], []
        for _ in range(args.repeats):
            start = clock(device)
            steps = run_joint(model, plan, args.batch_size)
            joint_runs.append(clock(device) - start)
            if base is not None:
                start = clock(device)
                run_baseline(base, model, plan, steps, device)
                base_runs.append(clock(device) - start)
        joint_total += min(joint_runs)
        base_total += min(base_runs, default=0.0)
    return joint_total, (base_total if base is not None else None)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,minilm", help="comma-separated: tiny, minilm, bart-large")
    p.add_argument("--dataset", default="scierc")
    p.add_argument("--split", default="test")
    p.add_argument("--data-dir", help="data directory (default: $ANCHORALIGN_DATA, else ./data)")
    p.add_argument("--batch-size", type=int, default=40)
    p.add_argument("--limit", type=int, help="only the first N sentences of the split")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--no-baseline", action="store_true", help="skip the 3 x generate comparison")
    p.add_argument("--repeats", type=int, default=1, help="runs per batch; the fastest counts (default 1)")
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's choice). On a CPU shared with other jobs use 1: "
        "with more, every small operation waits for descheduled threads and timings swing tenfold",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    meta = get_meta(args.dataset, args.data_dir)
    samples = load_split(args.dataset, args.split, args.data_dir)[: args.limit]
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = build(name, meta).to(device=device, dtype=dtype).eval()
        plans = batches(samples, meta, model, args.batch_size)
        base = (
            None if args.no_baseline else single_decoder_baseline(model).to(device=device, dtype=dtype).eval()
        )
        measure(model, base, plans[-1:], args, device)  # warm-up (kernels, allocator)
        seconds, base_seconds = measure(model, base, plans, args, device)
        params = model.num_parameters()
        row = [
            name,
            f"{params / 1e6:.1f}M",
            f"{len(samples) / seconds:.1f}",
            f"{1000 * seconds / len(samples):.1f}",
        ]
        if base_seconds is None:
            row += ["-", "-", "-"]
        else:
            row += [
                f"{len(samples) / base_seconds:.1f}",
                f"{1000 * base_seconds / len(samples):.1f}",
                f"{base_seconds / seconds:.2f}x",
            ]
        del base
        rows.append(row)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(
        f"Command: `{shlex.join(['python', 'scripts/bench_inference.py', *(argv if argv is not None else sys.argv[1:])])}`"
    )
    print(f"Machine: {machine(device)}; torch {torch.__version__}; dtype {args.dtype}")
    print(f"Date: {dt.datetime.now().astimezone().isoformat(timespec='minutes')}")
    print(
        f"Data: {meta.name} {args.split}, {len(samples)} sentences, batch {args.batch_size}, greedy; "
        f"output length capped per batch at its longest gold target; fastest of {args.repeats} run(s) per batch\n"
    )
    header = [
        "model",
        "params",
        "joint samples/s",
        "joint ms/sample",
        "3 x generate samples/s",
        "3 x generate ms/sample",
        "joint speed-up",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
