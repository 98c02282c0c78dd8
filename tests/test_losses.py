import math

import pytest
import torch

from anchoralign.config import LossConfig
from anchoralign.losses import (
    LOSS_KEYS,
    SUPPRESS_EPS,
    cross_entropy,
    fwd_rev_alignment,
    loss_terms,
    negative_suppression,
    ner_re_alignment,
    ramp_factor,
    term_weights,
)

ln = math.log


def logits_of(*rows, masked_value=0.0):
    """[1, T, V] logits log(w) from unnormalised weights; None marks an id given `masked_value`."""
    return torch.tensor([[[masked_value if w is None else ln(w) for w in row] for row in rows]])


def no_pairs():
    return torch.zeros((0, 3), dtype=torch.long)


def weights(align=True, ramp=1.0, **loss):
    """The term weights of an alignment phase under ``LossConfig(**loss)``."""
    return term_weights(LossConfig(**{"alpha": 1.0, "beta": 1.0, "gamma": 1.0, **loss}), align, ramp)


ALIGN_ONLY = {"kl_ner_re": 1.0, "kl_fwd_rev": 1.0, "suppress": 1.0}


# ---------------------------------------------------------------- cross-entropy


def test_cross_entropy_hand_computed():
    # Full vocabulary, weights (1, 2, 3): p = (1/6, 2/6, 3/6); label 2 -> -ln(1/2) = ln 2.
    # The second position is padding (-100) and must not count.
    logits = logits_of([1, 2, 3], [50, 1, 1])
    labels = torch.tensor([[2, -100]])
    full = torch.tensor([[True, True, True]])
    assert cross_entropy(logits, labels, full).item() == pytest.approx(ln(2))
    # Id 2 masked out: p = (1/3, 2/3, 0). Labels 0 and 1 -> mean(ln 3, ln 3/2).
    masked = torch.tensor([[True, True, False]])
    logits = logits_of([1, 2, 3], [1, 2, 3])
    got = cross_entropy(logits, torch.tensor([[0, 1]]), masked)
    assert got.item() == pytest.approx((ln(3) + ln(3 / 2)) / 2)


def test_cross_entropy_label_smoothing_hand_computed():
    # p = (1/6, 2/6, 3/6), label 2, e = 0.1: 0.9 * ln 2 plus 0.1 * the mean of -ln p over the 3 ids.
    logits = logits_of([1, 2, 3], [50, 1, 1])
    labels = torch.tensor([[2, -100]])
    full = torch.tensor([[True, True, True]])
    want = 0.9 * ln(2) + 0.1 * (ln(6) + ln(3) + ln(2)) / 3
    assert cross_entropy(logits, labels, full, smoothing=0.1).item() == pytest.approx(want)
    # Id 2 masked out: p = (1/3, 2/3); the smoothed mass goes to the 2 valid ids only (no -inf).
    masked = torch.tensor([[True, True, False]])
    got = cross_entropy(logits_of([1, 2, 3]), torch.tensor([[0]]), masked, smoothing=0.1)
    assert got.item() == pytest.approx(0.9 * ln(3) + 0.1 * (ln(3) + ln(3 / 2)) / 2)
    # 0 is plain cross-entropy, and padding stays out of the mean.
    assert cross_entropy(logits, labels, full, smoothing=0.0).item() == pytest.approx(ln(2))


def test_cross_entropy_without_labels_is_zero():
    got = cross_entropy(logits_of([1, 2, 3]), torch.tensor([[-100]]), torch.tensor([[True] * 3]))
    assert got.item() == 0.0 and not torch.isnan(got)


# ---------------------------------------------------------------- NER-RE alignment

MASK3 = torch.tensor([[True, True, False]])  # id 2 does not exist in this sentence


def test_ner_re_alignment_hand_computed():
    # NER at t=0: weights (1, 1, -) -> p = (1/2, 1/2); RE at t=1: (1, 3, -) -> q = (1/4, 3/4).
    # KL(p||q) = 1/2 ln(0.5/0.25) + 1/2 ln(0.5/0.75) = 1/2 ln(4/3).
    ner = logits_of([1, 1, None], [5, 1, None])
    re = logits_of([7, 1, None], [1, 3, None])
    pairs = torch.tensor([[0, 0, 1]])
    assert ner_re_alignment(ner, re, pairs, MASK3).item() == pytest.approx(0.5 * ln(4 / 3))
    # A second pair with identical distributions (KL 0) halves the mean.
    ner2 = logits_of([1, 1, None], [2, 1, None])
    re2 = logits_of([7, 1, None], [1, 3, None], [2, 1, None])
    pairs2 = torch.tensor([[0, 0, 1], [0, 1, 2]])
    assert ner_re_alignment(ner2, re2, pairs2, MASK3).item() == pytest.approx(0.25 * ln(4 / 3))


def test_ner_re_alignment_teaches_re_only():
    ner = logits_of([1, 1, None]).requires_grad_()
    re = logits_of([1, 3, None]).requires_grad_()
    ner_re_alignment(ner, re, torch.tensor([[0, 0, 0]]), MASK3).backward()
    assert ner.grad is None  # the teacher is detached
    assert re.grad is not None and re.grad.abs().sum() > 0


def test_identical_distributions_give_zero_kl():
    x = logits_of([1, 2, None], [3, 1, None])
    pairs = torch.tensor([[0, 0, 0], [0, 1, 1]])
    assert ner_re_alignment(x, x.clone(), pairs, MASK3).item() == pytest.approx(0.0, abs=1e-7)
    assert fwd_rev_alignment(x, x.clone(), pairs, MASK3).item() == pytest.approx(0.0, abs=1e-7)


# ---------------------------------------------------------------- forward-reverse alignment


def test_fwd_rev_alignment_hand_computed_and_symmetric():
    # p = (1/2, 1/2), q = (1/4, 3/4):
    # KL(p||q) = 1/2 ln(4/3); KL(q||p) = 1/4 ln(1/2) + 3/4 ln(3/2); result = their mean.
    fwd = logits_of([1, 1, None])
    rev = logits_of([9, 9, None], [1, 3, None])
    pairs = torch.tensor([[0, 0, 1]])
    expected = 0.5 * (0.5 * ln(4 / 3) + 0.25 * ln(1 / 2) + 0.75 * ln(3 / 2))
    assert fwd_rev_alignment(fwd, rev, pairs, MASK3).item() == pytest.approx(expected)
    swapped = fwd_rev_alignment(rev, fwd, torch.tensor([[0, 1, 0]]), MASK3)
    assert swapped.item() == pytest.approx(expected)


def test_fwd_rev_alignment_trains_both_decoders():
    fwd = logits_of([1, 1, None]).requires_grad_()
    rev = logits_of([1, 3, None]).requires_grad_()
    fwd_rev_alignment(fwd, rev, torch.tensor([[0, 0, 0]]), MASK3).backward()
    assert fwd.grad.abs().sum() > 0 and rev.grad.abs().sum() > 0


def test_no_pairs_give_zero_without_nan():
    x = logits_of([1, 2, None]).requires_grad_()
    for fn in (ner_re_alignment, fwd_rev_alignment):
        got = fn(x, x, no_pairs(), MASK3)
        assert got.item() == 0.0 and not torch.isnan(got)


# ---------------------------------------------------------------- negative suppression


def test_negative_suppression_hand_computed():
    # Vocabulary of 4 ids, id 3 invalid; negatives are ids 1 and 2 (id 3 is listed but invalid
    # and must be ignored). Step 0: p = (1/4, 1/2, 1/4) -> (-ln(1/2) - ln(3/4)) / 2.
    # Step 1: p = (1/2, 1/4, 1/4) -> (-ln(3/4) - ln(3/4)) / 2 = ln(4/3). Step 2 is padding.
    logits = logits_of([1, 2, 1, None], [2, 1, 1, None], [1, 1e6, 1e6, None], masked_value=50.0)
    labels = torch.tensor([[0, 1, -100]])
    vocab = torch.tensor([[True, True, True, False]])
    neg = torch.tensor([[False, True, True, True]])
    step0 = (ln(2) + ln(4 / 3)) / 2
    step1 = ln(4 / 3)
    got = negative_suppression(logits, labels, neg, vocab)
    assert got.item() == pytest.approx((step0 + step1) / 2)


def test_negative_suppression_sentence_without_negatives_contributes_zero_steps():
    # Sentence 0: one step with p = (1/4, 1/2, 1/4), negative id 1 -> ln 2.
    # Sentence 1: one step, no negative ids -> 0. Mean over the two steps: ln 2 / 2.
    logits = torch.cat([logits_of([1, 2, 1]), logits_of([1, 2, 1])])
    labels = torch.tensor([[0], [0]])
    vocab = torch.ones(2, 3, dtype=torch.bool)
    neg = torch.tensor([[False, True, False], [False, False, False]])
    assert negative_suppression(logits, labels, neg, vocab).item() == pytest.approx(ln(2) / 2)


def test_negative_suppression_is_finite_when_a_negative_takes_all_mass():
    logits = torch.tensor([[[0.0, 200.0, 0.0]]], requires_grad=True)
    got = negative_suppression(
        logits, torch.tensor([[0]]), torch.tensor([[False, True, False]]), torch.ones(1, 3, dtype=torch.bool)
    )
    assert got.item() == pytest.approx(-ln(SUPPRESS_EPS))
    got.backward()
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------- restricted vocabulary, dtypes


def test_masked_ids_get_no_probability_mass():
    # Changing the logit of an invalid id changes no term.
    labels = torch.tensor([[0, 1]])
    neg = torch.tensor([[False, True, True]])
    pairs = torch.tensor([[0, 0, 1], [0, 1, 0]])
    values = []
    for masked_value in (0.0, 30.0, -30.0):
        a2 = logits_of([1, 2, None], [2, 1, None], masked_value=masked_value)
        b2 = logits_of([1, 3, None], [1, 1, None], masked_value=masked_value)
        values.append(
            [
                cross_entropy(a2, labels, MASK3).item(),
                ner_re_alignment(a2, b2, pairs, MASK3).item(),
                fwd_rev_alignment(a2, b2, pairs, MASK3).item(),
                negative_suppression(a2, labels, neg, MASK3).item(),
            ]
        )
    assert values[0][1] > 0 and values[0][3] > 0
    for other in values[1:]:
        assert other == pytest.approx(values[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_give_finite_float32_results(dtype):
    batch, outputs = random_batch(seed=1)
    # The model fills invalid ids with its dtype's most negative value; keep that here too.
    half = {
        k: v.masked_fill(~batch["vocab_mask"][:, None, :], torch.finfo(dtype).min).to(dtype)
        for k, v in outputs.items()
    }
    terms = loss_terms(half, batch, weights())
    ref = loss_terms(outputs, batch, weights())
    for key in LOSS_KEYS:
        assert terms[key].dtype == torch.float32
        assert torch.isfinite(terms[key]), key
        assert terms[key].item() == pytest.approx(ref[key].item(), rel=0.05, abs=0.02), key


# ---------------------------------------------------------------- loss_terms


def random_batch(seed=0, b=2, t=5, v=7):
    """A batch shaped like the collator's, with random logits and a few aligned positions."""
    g = torch.Generator().manual_seed(seed)
    vocab_mask = torch.ones(b, v, dtype=torch.bool)
    vocab_mask[:, 0] = False  # <bos> is never an output
    vocab_mask[1, -1] = False  # the second sentence is one word shorter
    labels = {}
    for name in ("ner", "fwd", "rev"):
        lab = torch.randint(1, v - 1, (b, t), generator=g)
        lab[1, -1] = -100
        labels[f"{name}_labels"] = lab
    neg_mask = vocab_mask.clone()
    for lab in labels.values():
        for i in range(b):
            neg_mask[i, lab[i][lab[i] != -100]] = False
    batch = {
        "vocab_mask": vocab_mask,
        "neg_mask": neg_mask,
        **labels,
        "ner_fwd_pairs": torch.tensor([[0, 0, 1], [1, 2, 0]]),
        "ner_rev_pairs": torch.tensor([[0, 1, 3]]),
        "fwd_rev_pairs": torch.tensor([[0, 1, 2], [1, 0, 0], [1, 3, 1]]),
    }
    outputs = {k: torch.randn(b, t, v, generator=g) for k in ("ner_logits", "fwd_logits", "rev_logits")}
    return batch, outputs


def test_loss_terms_smooth_the_cross_entropies_only():
    batch, outputs = random_batch()
    plain = loss_terms(outputs, batch, weights(gamma=0.1))
    smooth = loss_terms(outputs, batch, weights(gamma=0.1), label_smoothing=0.2)
    mask = batch["vocab_mask"]
    for n in ("ner", "fwd", "rev"):
        want = cross_entropy(outputs[f"{n}_logits"], batch[f"{n}_labels"], mask, smoothing=0.2)
        assert smooth[f"ce_{n}"].item() == pytest.approx(want.item())
        assert smooth[f"ce_{n}"].item() != pytest.approx(plain[f"ce_{n}"].item())
    for key in ("kl_ner_re", "kl_fwd_rev", "suppress"):
        assert smooth[key].item() == pytest.approx(plain[key].item())


def test_loss_terms_total_is_the_weighted_sum():
    batch, outputs = random_batch()
    terms = loss_terms(outputs, batch, weights(alpha=0.5, beta=2.0, gamma=0.25))
    assert set(terms) == set(LOSS_KEYS)
    mask = batch["vocab_mask"]
    ce = {n: cross_entropy(outputs[f"{n}_logits"], batch[f"{n}_labels"], mask) for n in ("ner", "fwd", "rev")}
    kl_ner_re = 0.5 * (
        ner_re_alignment(outputs["ner_logits"], outputs["fwd_logits"], batch["ner_fwd_pairs"], mask)
        + ner_re_alignment(outputs["ner_logits"], outputs["rev_logits"], batch["ner_rev_pairs"], mask)
    )
    kl_fwd_rev = fwd_rev_alignment(outputs["fwd_logits"], outputs["rev_logits"], batch["fwd_rev_pairs"], mask)
    suppress = 0.5 * (
        negative_suppression(outputs["fwd_logits"], batch["fwd_labels"], batch["neg_mask"], mask)
        + negative_suppression(outputs["rev_logits"], batch["rev_labels"], batch["neg_mask"], mask)
    )
    for key, value in [
        ("ce_ner", ce["ner"]),
        ("kl_ner_re", kl_ner_re),
        ("kl_fwd_rev", kl_fwd_rev),
        ("suppress", suppress),
    ]:
        assert terms[key].item() == pytest.approx(value.item()) and value.item() > 0, key
    expected = (
        sum(c.item() for c in ce.values())
        + 0.5 * kl_ner_re.item()
        + 2.0 * kl_fwd_rev.item()
        + 0.25 * suppress.item()
    )
    assert terms["loss"].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    ("loss", "off"),
    [
        ({"ner_re": False}, "kl_ner_re"),
        ({"alpha": 0.0}, "kl_ner_re"),
        ({"fwd_rev": False}, "kl_fwd_rev"),
        ({"beta": 0.0}, "kl_fwd_rev"),
        ({"suppress": False}, "suppress"),
        ({"gamma": 0.0}, "suppress"),
    ],
)
def test_switched_off_or_zero_weight_terms_are_zero(loss, off):
    batch, outputs = random_batch()
    w = weights(**loss)
    assert off not in w
    terms = loss_terms(outputs, batch, w)
    full = loss_terms(outputs, batch, weights())
    assert terms[off].item() == 0.0 and full[off].item() > 0
    assert terms["loss"].item() == pytest.approx(full["loss"].item() - full[off].item(), rel=1e-6)


def test_term_weights_decide_once_which_terms_are_on():
    ce = {"ce_ner": 1.0, "ce_fwd": 1.0, "ce_rev": 1.0}
    cfg = LossConfig(alpha=0.5, beta=2.0, gamma=0.1)
    assert term_weights(cfg, align=False) == ce  # a cross-entropy phase
    assert term_weights(cfg, align=True) == {**ce, "kl_ner_re": 0.5, "kl_fwd_rev": 2.0, "suppress": 0.1}
    assert term_weights(cfg.model_copy(update={"alignment": False}), align=True) == ce
    # Ramped: every alignment weight scaled, cross-entropy untouched.
    assert term_weights(cfg, align=True, ramp=0.5) == {
        **ce,
        "kl_ner_re": 0.25,
        "kl_fwd_rev": 1.0,
        "suppress": 0.05,
    }


def test_ramp_factor_hand_computed():
    assert [ramp_factor(n, 4) for n in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert ramp_factor(0, 0) == ramp_factor(7, 0) == 1.0  # no ramp
    assert ramp_factor(-3, 4) == 0.25  # never below the first step's share


def test_terms_outside_the_weights_are_not_computed():
    batch, outputs = random_batch()
    terms = loss_terms(outputs, batch, ALIGN_ONLY)
    assert terms["ce_ner"].item() == terms["ce_fwd"].item() == terms["ce_rev"].item() == 0.0


def test_teacher_logits_replace_the_ner_decoders_own():
    batch, outputs = random_batch()
    own = loss_terms(outputs, batch, ALIGN_ONLY)["kl_ner_re"]
    # Another teacher (a pass without dropout, in training) changes the NER-RE term; the
    # decoder's own logits passed explicitly give the default back.
    teacher = torch.randn_like(outputs["ner_logits"])
    other = loss_terms(outputs, batch, ALIGN_ONLY, teacher_logits=teacher)["kl_ner_re"]
    assert other.item() != pytest.approx(own.item())
    again = loss_terms(outputs, batch, ALIGN_ONLY, teacher_logits=outputs["ner_logits"])["kl_ner_re"]
    assert again.item() == pytest.approx(own.item())


def test_teacher_gate_keeps_only_pairs_the_teacher_gets_right():
    # NER position 0: the teacher's top id is 1. Position 1: its top id is 0.
    ner = logits_of([1, 5, None], [5, 1, None])
    re = logits_of([1, 1, None], [1, 3, None])
    pairs = torch.tensor([[0, 0, 1], [0, 1, 0]])
    gold = torch.tensor([[1, 1]])  # right at position 0, wrong at position 1
    gated = ner_re_alignment(ner, re, pairs, MASK3, ner_labels=gold)
    only_first = ner_re_alignment(ner, re, pairs[:1], MASK3)
    assert gated.item() == pytest.approx(only_first.item())
    nothing_right = ner_re_alignment(ner, re, pairs, MASK3, ner_labels=torch.tensor([[0, 1]]))
    assert nothing_right.item() == 0.0


def test_alignment_temperature_hand_computed():
    # T = 2: the teacher's weights (1, 9) soften to (1, 3), p = (1/4, 3/4); the student's (1, 1)
    # stay q = (1/2, 1/2). Both terms are scaled by T^2 = 4.
    teacher, student = logits_of([1, 9, None]), logits_of([1, 1, None])
    pairs = torch.tensor([[0, 0, 0]])
    kl_pq = 0.25 * ln(0.5) + 0.75 * ln(1.5)
    kl_qp = 0.5 * ln(2) + 0.5 * ln(2 / 3)
    got = ner_re_alignment(teacher, student, pairs, MASK3, temperature=2.0)
    assert got.item() == pytest.approx(4 * kl_pq)
    sym = fwd_rev_alignment(teacher, student, pairs, MASK3, temperature=2.0)
    assert sym.item() == pytest.approx(4 * 0.5 * (kl_pq + kl_qp))
    # T = 1 is the plain term.
    assert ner_re_alignment(teacher, student, pairs, MASK3, temperature=1.0).item() == pytest.approx(
        ner_re_alignment(teacher, student, pairs, MASK3).item()
    )


def test_a_one_hot_teacher_teaches_its_ranking_only_when_softened():
    # A converged teacher: gold id 0, id 1 second, id 2 last, and all but one-hot at T = 1.
    teacher = torch.tensor([[[20.0, 10.0, 0.0]]])
    # Two students with the same probability of the gold id (0.98) that rank the others apart.
    agrees = logits_of([98, 1.5, 0.5])
    disagrees = logits_of([98, 0.5, 1.5])
    pairs = torch.tensor([[0, 0, 0]])
    mask = torch.ones(1, 3, dtype=torch.bool)

    def kl(student, t):
        return ner_re_alignment(teacher, student, pairs, mask, temperature=t).item()

    # At T = 1 the term is the student's cross-entropy on the gold id, whatever its ranking.
    assert kl(agrees, 1.0) == pytest.approx(-ln(0.98), abs=1e-3)
    assert kl(agrees, 1.0) == pytest.approx(kl(disagrees, 1.0), abs=1e-3)
    # Softened, it prefers the student that ranks the other ids as the teacher does.
    assert kl(disagrees, 4.0) > kl(agrees, 4.0) + 0.1


def test_the_stage_loss_carries_the_alignment_temperature():
    from types import SimpleNamespace

    from anchoralign.stages import stage_loss

    batch, outputs = random_batch()
    w = weights()
    # stage_loss reads the config's loss section only.
    plain = stage_loss(SimpleNamespace(loss=LossConfig()))(outputs, batch, w)
    soft = stage_loss(SimpleNamespace(loss=LossConfig(align_temperature=3.0)))(outputs, batch, w)
    direct = loss_terms(outputs, batch, w, align_temperature=3.0)
    for key in ("kl_ner_re", "kl_fwd_rev"):
        assert soft[key].item() == pytest.approx(direct[key].item())
        assert soft[key].item() != pytest.approx(plain[key].item())
    assert soft["ce_ner"].item() == pytest.approx(plain["ce_ner"].item())


@pytest.mark.parametrize(
    ("changed", "affected"),
    [
        ("ner_logits", {"ce_ner", "kl_ner_re"}),
        ("fwd_logits", {"ce_fwd", "kl_ner_re", "kl_fwd_rev", "suppress"}),
        ("rev_logits", {"ce_rev", "kl_ner_re", "kl_fwd_rev", "suppress"}),
    ],
)
def test_every_term_responds_to_its_inputs_only(changed, affected):
    batch, outputs = random_batch()
    w = weights()
    before = loss_terms(outputs, batch, w)
    # Perturb only the positions that some term reads: every valid id at every position.
    after = loss_terms({**outputs, changed: outputs[changed] + torch.randn_like(outputs[changed])}, batch, w)
    for key in LOSS_KEYS[:-1]:
        moved = not math.isclose(before[key].item(), after[key].item(), rel_tol=1e-6)
        assert moved == (key in affected), key
    assert before["loss"].item() != after["loss"].item()


def test_every_term_responds_to_its_batch_fields():
    batch, outputs = random_batch()
    w = weights()
    before = loss_terms(outputs, batch, w)
    changes = {
        "ner_labels": ("ce_ner", torch.roll(batch["ner_labels"], 1, dims=1)),
        "fwd_labels": ("ce_fwd", torch.roll(batch["fwd_labels"], 1, dims=1)),
        "ner_fwd_pairs": ("kl_ner_re", torch.tensor([[1, 3, 2]])),
        "fwd_rev_pairs": ("kl_fwd_rev", torch.tensor([[0, 4, 4]])),
        "neg_mask": ("suppress", batch["vocab_mask"]),
    }
    for field, (key, value) in changes.items():
        after = loss_terms(outputs, {**batch, field: value}, w)
        assert after[key].item() != pytest.approx(before[key].item()), field


def test_gradients_reach_the_right_decoders():
    batch, outputs = random_batch()
    outputs = {k: v.requires_grad_() for k, v in outputs.items()}
    # Alignment and suppression only: the NER decoder is a teacher and gets no gradient.
    loss_terms(outputs, batch, ALIGN_ONLY)["loss"].backward()
    assert outputs["ner_logits"].grad is None
    assert outputs["fwd_logits"].grad.abs().sum() > 0 and outputs["rev_logits"].grad.abs().sum() > 0
    # Invalid ids never receive gradient.
    invalid = ~batch["vocab_mask"][:, None, :].expand_as(outputs["fwd_logits"])
    assert outputs["fwd_logits"].grad[invalid].abs().sum() == 0


def test_batch_without_pairs_is_finite():
    batch, outputs = random_batch()
    batch = {**batch, "ner_fwd_pairs": no_pairs(), "ner_rev_pairs": no_pairs(), "fwd_rev_pairs": no_pairs()}
    outputs = {k: v.requires_grad_() for k, v in outputs.items()}
    terms = loss_terms(outputs, batch, weights())
    assert terms["kl_ner_re"].item() == 0.0 and terms["kl_fwd_rev"].item() == 0.0
    terms["loss"].backward()
    assert all(torch.isfinite(v.grad).all() for v in outputs.values())


def test_negative_weights_are_rejected():
    with pytest.raises(ValueError, match="gamma"):
        LossConfig(gamma=-0.1)


def test_a_stage_trains_and_logs_with_its_configs_smoothing(tmp_path):
    from anchoralign.config import SFTConfig, load_config
    from anchoralign.stages import stage_loss

    path = tmp_path / "sft.yaml"
    path.write_text(
        "dataset: conll04\noutput_dir: runs/x\nphases:\n  epochs: [1, 1, 1]\noptim:\n  lr: 3e-5\n"
    )
    batch, outputs = random_batch()
    for flags, smoothing in (([], 0.0), (["--loss.label-smoothing=0.3"], 0.3)):
        loss = stage_loss(load_config(SFTConfig, path, flags))
        want = loss_terms(outputs, batch, weights(), label_smoothing=smoothing)
        assert loss(outputs, batch, weights())["ce_ner"].item() == pytest.approx(want["ce_ner"].item())
