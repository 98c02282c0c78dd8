"""How much of a relation head's dev gain is the threshold pick: dev split into its even and odd
sentences, the vote's thresholds chosen on one half (``relation_head.choose_thresholds``, as
``fit-relation-head`` does on the whole split) and scored on the other, both ways, against the
decoders alone (the vote at (0, 1)).

    python scripts/threshold_halves.py --data-dir ../shared/data --dataset conll04 RUN/relation_head/seed1/best ...
"""

from __future__ import annotations

import argparse

from anchoralign.datasets import get_meta, load_split
from anchoralign.decode import voted
from anchoralign.model import AnchorAlignModel
from anchoralign.relation_fit import headline, scored_predictions
from anchoralign.relation_head import choose_thresholds
from anchoralign.schema import Sample


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="checkpoint directories with a relation head")
    p.add_argument("--dataset", default="conll04")
    p.add_argument("--data-dir")
    p.add_argument("--split", default="dev")
    args = p.parse_args()
    meta = get_meta(args.dataset, args.data_dir)
    gold = load_split(args.dataset, args.split, args.data_dir)
    halves = [[i for i in range(len(gold)) if i % 2 == h] for h in (0, 1)]
    print("| checkpoint | chosen on | thresholds (keep, add) | gain on that half | gain on the other half |")
    print("|---|---|---|---|---|")
    for checkpoint in args.checkpoints:
        for row in split_halves(checkpoint, gold, meta, halves):
            print(f"| {checkpoint} | " + " | ".join(row) + " |", flush=True)


def split_halves(checkpoint: str, gold: list[Sample], meta, halves: list[list[int]]) -> list[list[str]]:
    """For each half: where the thresholds were chosen, them, the gain there and on the other half."""
    model = AnchorAlignModel.from_pretrained(checkpoint)
    if model.relation_head is None:
        raise SystemExit(f"{checkpoint}: no relation head")
    pred, scored, _ = scored_predictions(model, gold)

    def f1(half: list[int], keep: float, add: float) -> float:
        voted_half = [voted(pred[i], scored[i], keep, add) for i in half]
        return headline([gold[i] for i in half], voted_half, meta)[1]

    rows = []
    for a, b in ((0, 1), (1, 0)):
        keep, add, best = choose_thresholds(lambda k, ad, half=halves[a]: f1(half, k, ad))
        inside = best - f1(halves[a], 0.0, 1.0)
        outside = f1(halves[b], keep, add) - f1(halves[b], 0.0, 1.0)
        rows.append([("even", "odd")[a], f"({keep}, {add})", f"{inside:+.2f}", f"{outside:+.2f}"])
    return rows


if __name__ == "__main__":
    main()
