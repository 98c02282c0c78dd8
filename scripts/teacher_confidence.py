"""What the NER-RE alignment term can teach on a split: at the positions the collator pairs (the
NER decoder's side of ``ner_fwd_pairs`` and ``ner_rev_pairs``), how often the NER teacher's top
output is the gold one (the pairs ``loss.teacher_gate`` keeps), how sure it is, and its entropy.
A teacher that is one-hot where it is aligned teaches only the gold token, which the RE decoders'
own cross-entropy already does (BENCHMARKS.md, "Why the alignment terms do nothing").

    python scripts/teacher_confidence.py --data-dir ../shared/data --dataset conll04 RUN/ce/seed4/best ...
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from anchoralign.datasets import load_split
from anchoralign.losses import masked_log_probs, teacher_right
from anchoralign.model import AnchorAlignModel
from anchoralign.schema import Sample


@dataclass(frozen=True)
class Confidence:
    right: int  # pairs where the teacher's top output is the gold one
    top_probs: list[float]  # the teacher's probability of its top output, one per pair
    entropies: list[float]  # nats, one per pair

    @property
    def pairs(self) -> int:
        return len(self.top_probs)

    def row(self, name: str) -> str:
        top = sorted(self.top_probs)
        return (
            f"| {name} | {self.right} of {self.pairs} ({100 * self.right / self.pairs:.2f}%) "
            f"| {statistics.mean(top):.4f} | {top[len(top) // 10]:.4f} | {statistics.mean(self.entropies):.4f} |"
        )


def teacher_confidence(
    model: AnchorAlignModel, samples: Sequence[Sample], batch_size: int = 16
) -> Confidence:
    """The NER decoder (eval mode, no dropout, as the trainer's teacher) at every NER-RE pair of
    ``samples``, collated as training collates them (the model's ``align_positions`` default)."""
    collate = model.collator()
    ordered = sorted(samples, key=lambda s: len(s.tokens))  # less padding
    right, top_probs, entropies = 0, [], []
    model.eval()
    for begin in range(0, len(ordered), batch_size):
        batch = {k: v.to(model.device) for k, v in collate(ordered[begin : begin + batch_size]).items()}
        with torch.no_grad():
            ner = model(batch, decoders=("ner",), spans=False)["ner_logits"]
        for key in ("ner_fwd_pairs", "ner_rev_pairs"):
            pairs = batch[key]
            if not pairs.numel():
                continue
            right += int(teacher_right(ner, pairs, batch["vocab_mask"], batch["ner_labels"]).sum())
            b, t, _ = pairs.long().unbind(-1)
            log_p = masked_log_probs(ner[b, t], batch["vocab_mask"][b])
            p = log_p.exp()
            top_probs += p.max(-1).values.tolist()
            entropies += (-(p * log_p.clamp_min(-1e4)).sum(-1)).tolist()
    if not top_probs:
        raise SystemExit("no NER-RE pairs in these samples: nothing to measure")
    return Confidence(right, top_probs, entropies)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="checkpoint directories")
    p.add_argument("--dataset", default="conll04")
    p.add_argument("--data-dir")
    p.add_argument("--split", default="train")
    args = p.parse_args()
    samples = load_split(args.dataset, args.split, args.data_dir)
    print(
        "| checkpoint | pairs the teacher gets right | top probability, mean | 10th percentile | entropy (nats) |"
    )
    print("|---|---|---|---|---|")
    for checkpoint in args.checkpoints:
        model = AnchorAlignModel.from_pretrained(checkpoint)
        print(teacher_confidence(model, samples).row(checkpoint), flush=True)


if __name__ == "__main__":
    main()
