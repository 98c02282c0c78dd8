"""The relation head: its pure parts against hand-computed values, the model and checkpoint that
carry it, decoding with its vote, and `anchoralign fit-relation-head` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from model_fixtures import (
    TOY_META,
    cli,
    init_from_config,
    one_cpu_thread,  # noqa: F401  (autouse)
    tiny_model,
    toy_samples,
    write_user_dataset,
)

from anchoralign.config import DecodeConfig
from anchoralign.decode import Prediction, relation_scores, relation_vote
from anchoralign.errors import UserError
from anchoralign.model import AnchorAlignModel
from anchoralign.relation_fit import FitConfig, fit_relation_head
from anchoralign.relation_head import (
    ADD_GRID,
    KEEP_GRID,
    RelationHead,
    RelationHeads,
    _masked_max,
    choose_thresholds,
    entity_pairs,
    pair_inputs,
    pair_loss,
    pair_targets,
    typed_spans,
    vote,
)
from anchoralign.schema import Sample

ANN, ACME, OSLO = (0, 2, "Peop"), (4, 5, "Org"), (6, 7, "Loc")


def test_pairs_are_ordered_and_never_join_a_span_to_itself() -> None:
    spans = [ANN, ACME, (4, 5, "Loc")]  # one span with two types
    assert entity_pairs(spans) == [(0, 1), (0, 2), (1, 0), (2, 0)]
    assert entity_pairs([ANN]) == []


def test_pair_targets_mark_each_gold_triple_of_each_pair() -> None:
    spans = [ANN, ACME, OSLO]
    pairs = entity_pairs(spans)
    triples = [(ANN, ACME, "Work_For"), (ANN, OSLO, "Live_In")]
    targets = pair_targets(spans, pairs, triples, ["Work_For", "Live_In"])
    assert targets.tolist() == [[1, 0], [0, 1], [0, 0], [0, 0], [0, 0], [0, 0]]


def test_pair_loss_is_the_summed_binary_cross_entropy() -> None:
    logits = torch.tensor([[0.0, math.log(3)]])  # probabilities 0.5 and 0.75
    targets = torch.tensor([[1.0, 0.0]])
    assert pair_loss(logits, targets).item() == pytest.approx(math.log(2) + math.log(4))


def test_masked_max_takes_the_rows_words_and_gives_zeros_for_none() -> None:
    words = torch.tensor([[1.0, -5.0], [3.0, -1.0], [2.0, -2.0]]).expand(2, -1, -1)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    assert _masked_max(words, mask).tolist() == [[2.0, -2.0], [0.0, 0.0]]


def test_types_are_indices_into_the_entity_types() -> None:
    assert typed_spans([ANN, OSLO], ["Peop", "Org", "Loc"]) == [(0, 2, 0), (6, 7, 2)]


def test_pair_inputs_number_the_entities_of_a_batch_in_one_table() -> None:
    entities, pairs = pair_inputs(
        [([(0, 2, 0), (4, 5, 1)], [(0, 1), (1, 0)]), ([(1, 2, 2), (3, 4, 0)], [(1, 0)])]
    )
    assert entities.tolist() == [[0, 0, 2, 0], [0, 4, 5, 1], [1, 1, 2, 2], [1, 3, 4, 0]]
    assert pairs.tolist() == [[0, 1], [1, 0], [3, 2]]


def test_a_pair_reads_its_two_entities_the_words_between_and_the_start_only() -> None:
    torch.manual_seed(0)
    head = RelationHead(hidden=8, n_types=3, n_relations=2).eval()
    words, starts = torch.randn(2, 8, 8), torch.randn(2, 8)
    spans = [(0, 2, 0), (4, 5, 1)]

    def logits_of(words: torch.Tensor, starts: torch.Tensor, batch: list) -> torch.Tensor:
        return head(words, starts, *pair_inputs(batch))

    both = logits_of(words, starts, [(spans, [(0, 1)]), (spans, [(0, 1)])])
    assert both.shape == (2, 2)
    alone = logits_of(words[:1], starts[:1], [(spans, [(0, 1)])])
    assert torch.allclose(alone, both[:1])  # a sentence's pairs do not depend on its batch
    outside = words[:1].clone()
    outside[0, 6:] = torch.randn(2, 8)  # after both entities
    assert torch.equal(logits_of(outside, starts[:1], [(spans, [(0, 1)])]), alone)
    between = words[:1].clone()
    between[0, 3] = 10.0
    assert not torch.allclose(logits_of(between, starts[:1], [(spans, [(0, 1)])]), alone)


def test_an_ensemble_votes_with_its_heads_mean_probability() -> None:
    torch.manual_seed(0)
    heads = RelationHeads(hidden=8, n_types=3, n_relations=2, k=3).eval()
    words, starts = torch.randn(1, 8, 8), torch.randn(1, 8)
    inputs = pair_inputs([([(0, 2, 0), (4, 5, 1)], [(0, 1), (1, 0)])])
    each = [torch.sigmoid(h(words, starts, *inputs)) for h in heads.heads]
    assert torch.allclose(heads(words, starts, *inputs), (each[0] + each[1] + each[2]) / 3)
    assert not torch.allclose(each[0], each[1])  # different initial weights
    with pytest.raises(ValueError):
        RelationHeads(8, 3, 2, k=0)


def test_vote_keeps_the_decoders_relations_the_head_backs_and_adds_the_ones_it_is_sure_of() -> None:
    a, b, c, d, e = ((ANN, ACME, r) for r in "abcde")
    probs = {a: 0.9, b: 0.2, d: 0.8, e: 0.4}  # c, written by the decoders, is not scored
    assert vote([a, b, c], probs, keep=0.5, add=0.5) == [a, c, d]
    assert vote([a, b, c, a], probs, keep=0.0, add=1.0) == [a, b, c]  # the decoders' own output


def test_thresholds_maximise_the_score_and_prefer_the_fewest_changes() -> None:
    assert KEEP_GRID[0] == 0.0 and ADD_GRID[0] == 1.0
    assert choose_thresholds(lambda keep, add: -((keep - 0.3) ** 2) - (add - 0.6) ** 2) == (0.3, 0.6, 0.0)
    assert choose_thresholds(lambda keep, add: 1.0) == (0.0, 1.0, 1.0)


@pytest.fixture(scope="module")
def with_head(tmp_path_factory) -> AnchorAlignModel:
    model = tiny_model()
    torch.manual_seed(1)
    model.add_relation_head(k=2)
    model.relation_thresholds = (0.25, 0.75)
    return model


def test_a_relation_head_and_its_thresholds_are_saved_with_the_checkpoint(with_head, tmp_path: Path) -> None:
    directory = with_head.save_pretrained(tmp_path / "ck")
    config = json.loads((directory / "config.json").read_text())
    assert config["relation_head"] == {"keep": 0.25, "add": 0.75, "heads": 2, "layers": 0}
    loaded = AnchorAlignModel.from_pretrained(directory)
    assert loaded.relation_thresholds == (0.25, 0.75)
    for (name, p), (_, q) in zip(
        with_head.relation_head.state_dict().items(), loaded.relation_head.state_dict().items(), strict=True
    ):
        assert torch.equal(p, q), name
    assert loaded.parameter_counts()["relation_head"] > 0 and len(loaded.relation_head.heads) == 2
    del config["relation_head"]["layers"]  # written before the head could have its own layers
    (directory / "config.json").write_text(json.dumps(config))
    assert AnchorAlignModel.from_pretrained(directory).n_relation_layers == 0
    config["relation_head"] = {"keep": 0.25}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="relation_head must hold keep, add and heads"):
        AnchorAlignModel.from_pretrained(directory)
    plain = tiny_model().save_pretrained(tmp_path / "plain")
    assert json.loads((plain / "config.json").read_text())["relation_head"] is None
    assert AnchorAlignModel.from_pretrained(plain).relation_head is None


def _prediction_of(model: AnchorAlignModel, sample: Sample) -> tuple[Prediction, torch.Tensor, torch.Tensor]:
    batch = model.collator().inputs([sample])
    with torch.no_grad():
        words, starts = model.relation_inputs(model.encode(batch))
        return Prediction(sample=sample, valid=True), words[0], starts[0]


def test_the_vote_rewrites_the_relations_between_the_reported_entities(with_head) -> None:
    sample = toy_samples()[0]  # Work_For(Ann Lee, Acme), Live_In(Ann Lee, Oslo)
    prediction, words, start = _prediction_of(with_head, sample)
    with torch.no_grad():
        scores = relation_scores(with_head, words, start, sample)
    assert len(scores) == 6 * 2  # 6 ordered pairs of 3 entities, 2 relation types
    cfg = DecodeConfig(relation_keep=0.0, relation_add=1.0)
    with torch.no_grad():
        unchanged = relation_vote(with_head, words, start, prediction, cfg).sample
        everything = relation_vote(
            with_head, words, start, prediction, cfg.model_copy(update={"relation_add": 1e-9})
        )
        nothing = relation_vote(with_head, words, start, prediction, DecodeConfig(relation_keep=0.999999))
    assert unchanged.relations == sample.relations
    assert len(everything.sample.relations) == 12 and everything.sample.entities == sample.entities
    assert nothing.sample.relations == []


def test_decode_config_reads_off_as_yaml_writes_it() -> None:
    assert DecodeConfig(relation_head=False).relation_head == "off"
    assert DecodeConfig(relation_head="auto").relation_head == "auto"


def _type_rule_data() -> list[Sample]:
    """Sentences whose relations follow from the entity types (Peop-Org: Work_For, Peop-Loc: Live_In)."""
    samples = [s for s in toy_samples() if s.entities]
    return [s.model_copy(update={"id": f"{s.id}-{k}"}) for k in range(4) for s in samples]


def test_fitting_learns_the_training_relations_and_chooses_thresholds_on_dev() -> None:
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = FitConfig(epochs=40, lr=1e-2, heads=2)
    report = fit_relation_head(model, _type_rule_data(), toy_samples(), TOY_META, cfg)
    assert len(model.relation_head.heads) == 2
    assert report.losses[-1] < report.losses[0] / 4
    assert report.n_train == 8 and report.n_too_long == 0
    assert report.keep in KEEP_GRID and report.add in ADD_GRID
    assert report.dev_after >= report.dev_before  # (0, 1), the decoders' own output, is on the grid
    assert model.relation_thresholds == (report.keep, report.add)
    for name, value in model.state_dict().items():  # the rest of the model is frozen
        if not name.startswith("relation_head."):
            assert torch.equal(value, before[name]), name
    sample = toy_samples()[0]
    _, words, start = _prediction_of(model, sample)
    with torch.no_grad():
        scores = relation_scores(model, words, start, sample)
    gold = {(ANN, ACME, "Work_For"), (ANN, OSLO, "Live_In")}
    assert {t for t, p in scores.items() if p > 0.5} == gold


def test_fitting_with_own_layers_trains_their_copy_and_leaves_the_rest_frozen() -> None:
    model = tiny_model()
    model.add_span_head(3, layers=1)  # a span head's own copy is not the relation head's
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_layers = len(model.backbone.encoder_layers)
    cfg = FitConfig(epochs=40, lr=1e-2, layers=2, layer_lr=1e-3)
    report = fit_relation_head(model, _type_rule_data(), toy_samples(), TOY_META, cfg)
    assert model.n_relation_layers == 2 and model.n_span_layers == 1
    assert model.head_input_layers == (n_layers - 2, n_layers - 1)
    assert report.losses[-1] < report.losses[0] / 4 and report.n_train == 8
    for name, value in model.state_dict().items():
        if not name.startswith(("relation_head.", "relation_layers.")):
            assert torch.equal(value, before[name]), name
    # Each copy started as its encoder layer and was trained away from it.
    for k in range(2):
        top = f"backbone.encoder.layers.{n_layers - 2 + k}."
        own = {n: v for n, v in model.state_dict().items() if n.startswith(f"relation_layers.{k}.")}
        assert any(not torch.equal(v, before[top + n.split(".", 2)[2]]) for n, v in own.items())
    assert not model.relation_layers.training and not model.relation_head.training
    sample = toy_samples()[0]
    _, words, start = _prediction_of(model, sample)
    with torch.no_grad():
        scores = relation_scores(model, words, start, sample)
    assert {t for t, p in scores.items() if p > 0.5} == {(ANN, ACME, "Work_For"), (ANN, OSLO, "Live_In")}


def test_fit_relation_head_command_writes_a_checkpoint_that_evaluate_uses(tmp_path: Path, capsys) -> None:
    checkpoint = tiny_model().save_pretrained(tmp_path / "ck")
    data = write_user_dataset(tmp_path / "toy", TOY_META, {"train": _type_rule_data(), "dev": toy_samples()})
    out = tmp_path / "with_head"
    args = ["--checkpoint", checkpoint, "--dataset", data, "--output", out, "--max-len", "8"]
    code, _, err = cli(["fit-relation-head", *args, "--epochs", "3", "--heads", "2", "--json"], capsys)
    assert code == 0, err
    report = json.loads((out / "relation_head.json").read_text())
    assert (
        report["fit"]["heads"] == 2
        and report["fit"]["epochs"] == 3
        and len(report["losses"]) == 3
        and report["metric"] == "rel_strict_f1"
    )
    loaded = AnchorAlignModel.from_pretrained(out)
    assert loaded.relation_thresholds == (report["keep"], report["add"])
    scored = {}
    for name, ck, flags in (
        ("plain", checkpoint, []),
        ("off", out, ["--relation-head", "off"]),
        ("head", out, []),
    ):
        code, printed, err = cli(
            [
                "evaluate",
                "--checkpoint",
                ck,
                "--dataset",
                data,
                "--split",
                "dev",
                "--max-len",
                "8",
                "--json",
                *flags,
            ],
            capsys,
        )
        assert code == 0, err
        scored[name] = json.loads(printed)
    assert scored["off"]["rel_strict_tp"] == scored["plain"]["rel_strict_tp"]
    assert scored["off"]["ner_tp"] == scored["head"]["ner_tp"]  # the head decides relations only
    code, _, err = cli(["fit-relation-head", *args], capsys)
    assert code != 0 and "not empty" in err
    base = ["--checkpoint", checkpoint, "--dataset", data, "--max-len", "8", "--output"]
    code, _, err = cli(["fit-relation-head", *base, tmp_path / "neg", "--layers", "-1"], capsys)
    assert code != 0 and "--layers must be at least 0" in err and not (tmp_path / "neg").exists()
    options = ["--epochs", "2", "--layers", "1", "--layer-lr", "0.001", "--json"]
    code, _, err = cli(["fit-relation-head", *base, tmp_path / "own", *options], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "own" / "relation_head.json").read_text())
    assert report["fit"]["layers"] == 1 and report["fit"]["layer_lr"] == 0.001
    config = json.loads((tmp_path / "own" / "config.json").read_text())
    assert config["relation_head"]["layers"] == 1 and config["parameters"]["relation_layers"] > 0
    assert AnchorAlignModel.from_pretrained(tmp_path / "own").n_relation_layers == 1
    again = ["--dataset", data, "--max-len", "8", "--thresholds-only", "--eos-penalty", "1", "--json"]
    code, printed, err = cli(
        ["fit-relation-head", "--checkpoint", out, "--output", tmp_path / "again", *again], capsys
    )
    assert code == 0, err
    report = json.loads(printed)
    assert report["fit"] is None and report["losses"] == [] and report["n_train"] == 0
    refitted = AnchorAlignModel.from_pretrained(tmp_path / "again")
    assert refitted.relation_thresholds == (report["keep"], report["add"])
    assert torch.equal(
        refitted.relation_head.heads[1].mlp[1].weight, loaded.relation_head.heads[1].mlp[1].weight
    )
    code, _, err = cli(
        ["fit-relation-head", "--checkpoint", checkpoint, "--output", tmp_path / "none", *again], capsys
    )
    assert code != 0 and "has no relation head" in err


# --------------------------------------------------------------------------- trained with the model


def test_the_collator_lays_out_each_batchs_gold_entity_pairs() -> None:
    model = tiny_model()
    model.add_relation_head()
    batch = model.collator()(toy_samples())
    # s1: Ann Lee, Acme, Oslo (6 ordered pairs); s2: Bob Pusterla, Paris (2); s3: no entity.
    assert batch["pair_entities"].tolist() == [
        [0, 0, 2, 0],
        [0, 4, 5, 1],
        [0, 6, 7, 2],
        [1, 0, 2, 0],
        [1, 4, 5, 2],
    ]
    assert batch["pair_index"].tolist() == [[0, 1], [0, 2], [1, 0], [1, 2], [2, 0], [2, 1], [3, 4], [4, 3]]
    assert batch["pair_targets"].tolist() == [[1, 0], [0, 1], [0, 0], [0, 0], [0, 0], [0, 0], [0, 1], [0, 0]]
    out = model(batch)
    assert out["relation_logits"].shape == (1, 8, 2)
    assert "pair_index" not in tiny_model().collator()(toy_samples())


def test_the_relation_term_is_the_mean_binary_cross_entropy_of_every_head() -> None:
    from anchoralign.config import LossConfig
    from anchoralign.losses import relation_loss, term_weights

    logits = torch.tensor([[[0.0, math.log(3)]], [[0.0, 0.0]]])  # two heads, one pair
    targets = torch.tensor([[1.0, 0.0]])
    expected = (math.log(2) + math.log(4) + 2 * math.log(2)) / 4
    assert relation_loss(logits, targets).item() == pytest.approx(expected)
    assert relation_loss(torch.zeros(1, 0, 2), torch.zeros(0, 2)).item() == 0.0
    assert term_weights(LossConfig(relation=0.5), align=False, relations=True)["relation"] == 0.5
    assert "relation" not in term_weights(LossConfig(), align=False)


def test_init_from_adds_relation_heads_or_refuses_another_count(with_head, tmp_path: Path) -> None:
    from anchoralign.config import SFTConfig
    from anchoralign.stages import load_model

    saved = with_head.save_pretrained(tmp_path / "two")  # 2 heads
    plain = tiny_model().save_pretrained(tmp_path / "plain")

    def cfg(init_from: Path, heads: int) -> SFTConfig:
        return init_from_config(tmp_path / "o", init_from, relation_heads=heads)

    assert len(load_model(cfg(plain, 3), TOY_META).relation_head.heads) == 3
    assert len(load_model(cfg(saved, 2), TOY_META).relation_head.heads) == 2
    with pytest.raises(UserError, match="has 2 relation heads but the config has model.relation_heads=1"):
        load_model(cfg(saved, 1), TOY_META)


def test_training_with_relation_heads_lowers_their_loss(tmp_path: Path, shared_data: Path) -> None:
    from test_train_e2e import rows, sft_with_a_head

    out = tmp_path / "sft"
    done = sft_with_a_head(out, shared_data, "--model.relation_heads=2")
    assert done.returncode == 0, done.stderr[-4000:]
    assert "loss terms: ce, relation x1" in (out / "train.log").read_text(encoding="utf-8")
    losses = [r["relation"] for r in rows(out, "train")]
    assert len(losses) >= 4 and losses[-1] < 0.5 * losses[0]
    assert all(r["relation"] > 0 for r in rows(out, "eval_loss"))  # scored on dev as well
    trained = AnchorAlignModel.from_pretrained(out / "final")
    assert len(trained.relation_head.heads) == 2 and trained.relation_thresholds == (0.0, 1.0)


def test_threshold_halves_scores_each_half_with_the_others_thresholds(with_head, tmp_path: Path) -> None:
    from test_train_e2e import run_cli

    checkpoint = with_head.save_pretrained(tmp_path / "ck")
    data = write_user_dataset(tmp_path / "toy", TOY_META, {"dev": toy_samples()})
    done = run_cli("scripts/threshold_halves.py", "--dataset", str(data), "--split", "dev", str(checkpoint))
    assert done.returncode == 0, done.stderr
    rows = [line.split(" | ") for line in done.stdout.splitlines()[2:]]
    assert [r[1] for r in rows] == ["even", "odd"]
    assert all(float(r[3]) >= 0 for r in rows)  # (0, 1), no change, is on the grid of the half that chose
