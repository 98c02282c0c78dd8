"""Fitting a span head on a trained checkpoint's frozen encoder (``anchoralign.span_fit``) and
`anchoralign fit-span-head` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from model_fixtures import (
    TOY_META,
    cli,
    one_cpu_thread,  # noqa: F401  (autouse)
    tiny_model,
    toy_samples,
    write_user_dataset,
)

from anchoralign import relation_fit
from anchoralign.config import DecodeConfig
from anchoralign.decode import predict, predict_long
from anchoralign.linearize import structure
from anchoralign.model import AnchorAlignModel
from anchoralign.relation_fit import FitConfig, choose_relation_thresholds, fit_relation_head
from anchoralign.schema import Entity, Sample
from anchoralign.span_fit import SpanFitConfig, fit_span_head


def _training_data() -> list[Sample]:
    """The toy sentences four times over, and one with a mention four words wide."""
    wide = Sample(
        id="wide",
        tokens=["The", "Bank", "of", "New", "England", "failed", "."],
        entities=[Entity(start=1, end=5, type="Org")],
    )
    return [s.model_copy(update={"id": f"{s.id}-{k}"}) for k in range(4) for s in [*toy_samples(), wide]]


def test_fitting_learns_the_training_mentions_and_leaves_the_rest_frozen() -> None:
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # The span head's entities alone: the random RE decoders' mentions would join them through the
    # union, or through a relation between two of the NER decoder's mentions (the typed anchor).
    own = DecodeConfig(max_len=8, entities="ner", anchor="reported")
    cfg = SpanFitConfig(width=3, epochs=60, lr=1e-2, layers=0)
    report = fit_span_head(model, _training_data(), toy_samples(), TOY_META, cfg, own)
    assert model.span_width == 3 and model.span_layers is None
    assert report.losses[-1] < report.losses[0] / 10
    assert report.n_train == 16 and report.n_too_long == 0
    assert report.n_too_wide == 4  # "Bank of New England", four times: wider than 3 words
    assert report.relation_thresholds is None  # no relation head to choose them for
    for name, value in model.state_dict().items():
        if not name.startswith("span_head."):
            assert torch.equal(value, before[name]), name
    predicted = predict(model, toy_samples(), own)
    assert [structure(p.sample)[0] for p in predicted] == [structure(s)[0] for s in toy_samples()]
    assert report.dev_after == 100.0
    decoder = predict(model, toy_samples(), own.model_copy(update={"ner_source": "decoder"}))
    assert report.dev_before < 100.0 and any(
        p.sample.entities != s.entities for p, s in zip(decoder, toy_samples(), strict=True)
    )


def test_fitting_with_own_layers_trains_their_copy_and_leaves_the_shared_encoder_frozen() -> None:
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    own = DecodeConfig(max_len=8, entities="ner", anchor="reported")
    cfg = SpanFitConfig(width=3, epochs=40, lr=1e-2, layers=1, layer_lr=1e-3)
    report = fit_span_head(model, _training_data(), toy_samples(), TOY_META, cfg, own)
    assert model.n_span_layers == 1 and report.losses[-1] < report.losses[0] / 10
    assert report.dev_after == 100.0
    for name, value in model.state_dict().items():
        if not name.startswith(("span_head.", "span_layers.")):
            assert torch.equal(value, before[name]), name
    # The copy started as the encoder's top layer and was trained away from it.
    top = f"backbone.encoder.layers.{len(model.backbone.encoder_layers) - 1}."
    moved = [
        name
        for name, value in model.state_dict().items()
        if name.startswith("span_layers.0.")
        and not torch.equal(value, before[top + name[len("span_layers.0.") :]])
    ]
    assert moved and not model.span_layers.training
    predicted = predict(model, toy_samples(), own)
    assert [structure(p.sample)[0] for p in predicted] == [structure(s)[0] for s in toy_samples()]


def test_a_relation_head_has_its_thresholds_chosen_again_for_the_new_entities(monkeypatch) -> None:
    model = tiny_model()
    fit_relation_head(model, _training_data(), toy_samples(), TOY_META, FitConfig(epochs=2))
    model.relation_thresholds = (0.95, 0.05)  # not what a choice on dev gives: it must change
    decodes = []

    def counted(*args, **kwargs):
        decodes.append(args[1])
        return predict_long(*args, **kwargs)

    monkeypatch.setattr(relation_fit, "predict_long", counted)
    report = fit_span_head(model, _training_data(), toy_samples(), TOY_META, SpanFitConfig(width=3, epochs=2))
    assert report.relation_thresholds == model.relation_thresholds != (0.95, 0.05)
    assert len(decodes) == 2  # before and after: the choice reused the decode that measured the head
    # ... and chose what a decode of its own chooses.
    fresh = choose_relation_thresholds(model, toy_samples(), TOY_META)
    assert (fresh.keep, fresh.add) == report.relation_thresholds


def test_fit_span_head_command_writes_a_checkpoint_whose_entities_evaluate_reports(
    tmp_path: Path, capsys
) -> None:
    checkpoint = tiny_model().save_pretrained(tmp_path / "ck")
    data = write_user_dataset(tmp_path / "toy", TOY_META, {"train": _training_data(), "dev": toy_samples()})
    out = tmp_path / "with_span_head"
    args = [
        "--checkpoint",
        checkpoint,
        "--dataset",
        data,
        "--max-len",
        "8",
        "--entities",
        "ner",
        "--anchor",
        "reported",
    ]
    options = ["--epochs", "60", "--lr", "0.01", "--width", "3", "--layers", "1", "--json"]
    # The training states in files (the same fit as in memory: tests/test_state_store.py), unlinked.
    options += ["--states-dir", tmp_path / "states"]
    fit = ["fit-span-head", *args, "--output", out, *options]
    code, printed, err = cli(fit, capsys)
    assert code == 0, err
    assert (tmp_path / "states").is_dir() and not any((tmp_path / "states").iterdir())
    report = json.loads((out / "span_head.json").read_text())
    assert report == json.loads(printed)
    assert report["fit"]["width"] == 3 and len(report["losses"]) == 60 and report["n_too_wide"] == 4
    assert report["fit"]["layers"] == 1 and report["fit"]["layer_lr"] == SpanFitConfig().layer_lr
    assert report["dev_after"] == 100.0 > report["dev_before"]
    fitted = AnchorAlignModel.from_pretrained(out)
    assert fitted.span_width == 3 and fitted.n_span_layers == 1
    scored = {}
    for name, ck, flags in (
        ("plain", checkpoint, []),
        ("decoder", out, ["--ner-source", "decoder"]),
        ("head", out, []),
    ):
        code, printed, err = cli(
            ["evaluate", "--checkpoint", ck, *args[2:], "--split", "dev", "--json", *flags], capsys
        )
        assert code == 0, err
        scored[name] = json.loads(printed)
    assert scored["decoder"]["ner_f1"] == scored["plain"]["ner_f1"] == round(report["dev_before"], 2)
    assert scored["head"]["ner_f1"] == report["dev_after"]
    code, _, err = cli(fit, capsys)
    assert code != 0 and "not empty" in err
    code, _, err = cli(["fit-span-head", *args, "--output", tmp_path / "zero", "--width", "0"], capsys)
    assert code != 0 and "--width must be at least 1" in err
    code, _, err = cli(["fit-span-head", *args, "--output", tmp_path / "deep", "--layers", "9"], capsys)
    assert code != 0 and "between 0 and the encoder's 2" in err
