"""scripts/teacher_confidence.py: what the NER-RE term's teacher knows at the pairs it is aligned on."""

from __future__ import annotations

import math

import pytest
import torch
from model_fixtures import TOY_META, one_cpu_thread, tiny_model, toy_samples, write_user_dataset  # noqa: F401
from script_loader import load_script


def _script():
    return load_script("teacher_confidence")


class FixedTeacher(torch.nn.Module):
    """The tiny model's collator and device, with NER logits made from the batch: one-hot on the
    gold id (``one_hot``) or all equal."""

    def __init__(self, one_hot: bool):
        super().__init__()
        self.inner, self.one_hot = tiny_model(), one_hot

    def collator(self):
        return self.inner.collator()

    @property
    def device(self):
        return self.inner.device

    def forward(self, batch, decoders, spans):
        labels = batch["ner_labels"]
        logits = torch.zeros(*labels.shape, batch["vocab_mask"].shape[-1])
        if self.one_hot:
            logits.scatter_(-1, labels.clamp(min=0)[..., None], 50.0)
        return {"ner_logits": logits}


def _pairs(samples) -> tuple[int, list[int]]:
    """The number of NER-RE pairs of ``samples`` and each pair's count of valid ids."""
    batch = tiny_model().collator()(samples)
    valid = []
    for key in ("ner_fwd_pairs", "ner_rev_pairs"):
        valid += batch["vocab_mask"][batch[key][:, 0]].sum(-1).tolist()
    return len(valid), valid


def test_a_one_hot_teacher_is_right_and_sure_at_every_pair():
    got = _script().teacher_confidence(FixedTeacher(one_hot=True), toy_samples(), batch_size=2)
    pairs, _ = _pairs(toy_samples())
    assert got.pairs == pairs > 0
    assert got.right == pairs
    assert all(p == pytest.approx(1.0) for p in got.top_probs)
    assert all(h == pytest.approx(0.0, abs=1e-6) for h in got.entropies)


def test_an_undecided_teacher_has_the_entropy_of_its_valid_ids():
    got = _script().teacher_confidence(FixedTeacher(one_hot=False), toy_samples(), batch_size=2)
    _, valid = _pairs(toy_samples())
    # Sorted by length into batches of 2, the pairs come in another order: compare as multisets.
    assert sorted(got.entropies) == pytest.approx(sorted(math.log(n) for n in valid))
    assert sorted(got.top_probs) == pytest.approx(sorted(1 / n for n in valid))


def test_the_script_prints_one_row_per_checkpoint(tmp_path):
    from test_train_e2e import run_cli

    checkpoint = tiny_model().save_pretrained(tmp_path / "ck")
    data = write_user_dataset(tmp_path / "toy", TOY_META, {"train": toy_samples()})
    done = run_cli("scripts/teacher_confidence.py", "--dataset", str(data), str(checkpoint), str(checkpoint))
    assert done.returncode == 0, done.stderr
    rows = done.stdout.splitlines()[2:]
    pairs, _ = _pairs(toy_samples())
    assert len(rows) == 2 and all(f" of {pairs} (" in row for row in rows)
