"""The model: backbones, label tokens, pointer outputs, gradients, parameter counts, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from model_fixtures import (
    TOY_META,
    one_cpu_thread,  # noqa: F401  (autouse)
    save_tiny_bart,
    save_tiny_bert,
    tiny_model,
    toy_samples,
)
from safetensors.torch import load_file

from anchoralign.backbones import BartBackbone, EncoderOnlyBackbone
from anchoralign.errors import UserError
from anchoralign.linearize import DECODERS
from anchoralign.losses import CE_TERMS, loss_terms
from anchoralign.model import AnchorAlignModel, entity_token, label_name, relation_token
from anchoralign.schema import mask_token


@pytest.fixture(scope="module")
def model():
    return tiny_model().eval()


@pytest.fixture(scope="module")
def batch(model):
    return model.collator()(toy_samples())


def test_logits_cover_the_restricted_vocabulary_and_mask_invalid_ids(model, batch):
    out = model(batch)
    v = model.labels.n_fixed + 8
    assert out["ner_logits"].shape == (3, batch["ner_input"].shape[1], v)
    assert out["fwd_logits"].shape == (3, batch["fwd_input"].shape[1], v)
    for logits in out.values():
        assert torch.isfinite(logits).all()
        invalid = ~batch["vocab_mask"][:, None, :].expand_as(logits)
        assert (logits[invalid] <= torch.finfo(logits.dtype).min / 2).all()
        assert (logits[~invalid].abs() < 1e4).all()


def test_word_scores_are_dot_products_with_the_pointer_representations(model, batch):
    state = model.encode(batch)
    e = model.backbone.embed_tokens.weight
    b, i = 1, 1  # "Pusterla", several sub-words: its first one is used
    start = batch["word_starts"][b, i]
    expected_rep = (state.hidden[b, start] + e[batch["input_ids"][b, start]]) / 2
    torch.testing.assert_close(state.word_reps[b, i], expected_rep)
    hidden = torch.randn(3, 1, e.shape[1])
    logits = model.pointer_logits(hidden, state)
    n_fixed = model.labels.n_fixed
    torch.testing.assert_close(logits[b, 0, n_fixed + i], hidden[b, 0] @ expected_rep)
    label = model.labels.entity_id("Org")
    torch.testing.assert_close(
        logits[b, 0, label], hidden[b, 0] @ e[model.tokenizer.convert_tokens_to_ids("<ent:Org>")]
    )


def test_decoder_inputs_read_words_as_their_first_sub_word(model, batch):
    state = model.encode(batch)
    n_fixed = model.labels.n_fixed
    ids = torch.tensor([[0, 1, 2, 3, n_fixed, n_fixed + 1]] * 3)
    tokens = model.to_token_ids(ids, state)
    tok = model.tokenizer
    assert tokens[1, :4].tolist() == [
        tok.cls_token_id,
        tok.sep_token_id,
        *tok.convert_tokens_to_ids(["<sep>", "<ent:Peop>"]),
    ]
    assert tokens[1, 4].item() == tok.convert_tokens_to_ids("bob")
    assert tokens[1, 5].item() == tok("Pusterla", add_special_tokens=False)["input_ids"][0]


def test_label_tokens_are_single_tokens_initialised_from_their_names():
    model = tiny_model()
    tok = model.tokenizer
    assert tok.tokenize("<mask0> <mask63> <ent:Org> <rel:Live_In>") == [
        "<mask0>",
        "<mask63>",
        "<ent:Org>",
        "<rel:Live_In>",
    ]
    weight = model.backbone.embed_tokens.weight.detach()
    # The name is the description up to its first comma ("organization, a company").
    pieces = tok("organization", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(weight[tok.convert_tokens_to_ids(entity_token("Org"))], weight[pieces].mean(0))
    pieces = tok("lives in", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(
        weight[tok.convert_tokens_to_ids(relation_token("Live_In"))], weight[pieces].mean(0)
    )
    pieces = tok("[MASK] 7", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(weight[tok.convert_tokens_to_ids(mask_token(7))], weight[pieces].mean(0))


def test_label_init_description_uses_the_whole_description():
    model = tiny_model(label_init="description")
    tok = model.tokenizer
    weight = model.backbone.embed_tokens.weight.detach()
    pieces = tok("organization, a company", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(weight[tok.convert_tokens_to_ids(entity_token("Org"))], weight[pieces].mean(0))


def test_label_name_is_the_description_before_its_first_comma():
    assert label_name("location, a place such as a city") == "location"
    assert label_name("临床表现，即症状") == "临床表现"
    assert label_name("works for") == "works for"


def test_gradients_reach_the_shared_encoder_all_three_decoders_and_label_tokens():
    model = tiny_model().train()
    batch = model.collator()(toy_samples())
    terms = loss_terms(
        model(batch),
        batch,
        {**dict.fromkeys(CE_TERMS, 1.0), "kl_ner_re": 1.0, "kl_fwd_rev": 1.0, "suppress": 1.0},
    )
    terms["loss"].backward()
    bb = model.backbone
    for name, module in [("encoder", bb.encoder.layers), *[(d, bb.decoders[d].layers) for d in DECODERS]]:
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads), name
        assert sum(g.abs().sum().item() for g in grads) > 0, name
    label_row = model.tokenizer.convert_tokens_to_ids("<rel:Work_For>")
    assert bb.embed_tokens.weight.grad[label_row].abs().sum() > 0


def test_each_decoder_only_gets_gradients_from_its_own_loss():
    model = tiny_model().train()
    batch = model.collator()(toy_samples())
    out = model(batch)
    ce_ner = loss_terms(out, batch, dict.fromkeys(CE_TERMS, 1.0))["ce_ner"]
    ce_ner.backward()
    assert all(p.grad is None for p in model.backbone.decoders["fwd"].layers.parameters())
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.decoders["ner"].parameters()
    )


def test_parameter_counts_add_up_with_the_embedding_table_counted_once(model):
    counts = model.parameter_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters()) == model.num_parameters()
    parts = counts["embeddings"] + counts["encoder"] + sum(counts[f"decoder_{d}"] for d in DECODERS)
    assert parts == counts["total"]
    assert counts["decoder_ner"] == counts["decoder_fwd"] == counts["decoder_rev"] > 0
    assert counts["embeddings"] == len(model.tokenizer) * 128


def test_checkpoint_round_trip_gives_identical_outputs(model, batch, tmp_path):
    model.save_pretrained(tmp_path / "ck", train_config={"lr": 0.001, "stage": "sft"})
    files = {p.name for p in (tmp_path / "ck").iterdir()}
    assert files == {"config.json", "labels.json", "model.safetensors", "tokenizer", "train_config.yaml"}
    labels = json.loads((tmp_path / "ck" / "labels.json").read_text())
    assert list(labels["entity_types"]) == ["Peop", "Org", "Loc"] and labels["paradigm"] == 3
    assert yaml.safe_load((tmp_path / "ck" / "train_config.yaml").read_text()) == {
        "lr": 0.001,
        "stage": "sft",
    }
    # One copy of the shared table however many modules point at it.
    stored = load_file(tmp_path / "ck" / "model.safetensors")
    assert sum(t.shape == model.backbone.embed_tokens.weight.shape for t in stored.values()) == 1
    loaded = AnchorAlignModel.from_pretrained(tmp_path / "ck")
    assert loaded.labels == model.labels and loaded.paradigm == model.paradigm and loaded.meta == TOY_META
    with torch.no_grad():
        a, b = model(batch), loaded(batch)
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    # Loading re-ties the table: growing it in one place is seen by every decoder.
    assert loaded.backbone.decoders["rev"].embed_tokens is loaded.backbone.embed_tokens


def test_broken_checkpoints_are_user_errors(model, tmp_path):
    with pytest.raises(UserError, match="checkpoint directory not found"):
        AnchorAlignModel.from_pretrained(tmp_path / "missing")
    directory = model.save_pretrained(tmp_path / "ck")
    (directory / "labels.json").unlink()
    with pytest.raises(UserError, match=r"missing labels\.json"):
        AnchorAlignModel.from_pretrained(directory)
    directory = model.save_pretrained(tmp_path / "ck2")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(UserError, match="checkpoint format 99"):
        AnchorAlignModel.from_pretrained(directory)


def test_bart_directory_loads_through_from_pretrained_and_seeds_all_three_decoders(tmp_path):
    from transformers import BartModel

    source = save_tiny_bart(tmp_path / "bart")
    model = AnchorAlignModel.from_backbone(str(source), TOY_META)
    assert isinstance(model.backbone, BartBackbone)
    reference = BartModel.from_pretrained(source)
    ref_enc = reference.encoder.layers[0].fc1.weight
    torch.testing.assert_close(model.backbone.encoder.layers[0].fc1.weight, ref_enc)
    for name in DECODERS:
        dec = model.backbone.decoders[name]
        torch.testing.assert_close(
            dec.layers[0].encoder_attn.k_proj.weight, reference.decoder.layers[0].encoder_attn.k_proj.weight
        )
        assert dec.embed_tokens is model.backbone.embed_tokens
    assert (
        model.backbone.decoders["ner"].layers[0].fc1.weight
        is not model.backbone.decoders["fwd"].layers[0].fc1.weight
    )
    # Byte-level BPE: mid-sentence word forms, and label tokens intact.
    batch = model.collator()(toy_samples())
    out = model(batch)
    assert out["rev_logits"].shape[-1] == model.labels.n_fixed + 8
    model.save_pretrained(tmp_path / "ck")
    loaded = AnchorAlignModel.from_pretrained(tmp_path / "ck")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(batch)["ner_logits"], loaded(batch)["ner_logits"])


def test_encoder_only_backbone_gets_prefix_decoders_without_random_weights(tmp_path):
    from transformers import BertModel

    source = save_tiny_bert(tmp_path / "bert")
    model = AnchorAlignModel.from_backbone(str(source), TOY_META)
    assert model.backbone.new_parameter_names() == []
    reference = BertModel.from_pretrained(source, add_pooling_layer=False).state_dict()
    for name in DECODERS:
        decoder = model.backbone.decoders[name].model
        for key, value in decoder.state_dict().items():
            if key != "embeddings.word_embeddings.weight":  # the shared, grown table
                torch.testing.assert_close(value, reference[key], msg=key)
        assert decoder.embeddings.word_embeddings is model.backbone.embed_tokens
    batch = model.collator()(toy_samples())
    terms = loss_terms(model(batch), batch, dict.fromkeys(CE_TERMS, 1.0))
    terms["loss"].backward()
    for name in DECODERS:
        key = model.backbone.decoders[name].layers[0].attention.self.key.weight
        assert key.grad is not None and key.grad.abs().sum() > 0
    model.save_pretrained(tmp_path / "ck")
    loaded = AnchorAlignModel.from_pretrained(tmp_path / "ck")
    assert loaded.backbone.decoder_attention == "prefix"
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(batch)["fwd_logits"], loaded(batch)["fwd_logits"])


def test_prefix_decoder_with_a_cache_matches_the_full_pass(tmp_path):
    source = save_tiny_bert(tmp_path / "bert")
    model = AnchorAlignModel.from_backbone(str(source), TOY_META).eval()
    batch = model.collator()(toy_samples())
    with torch.no_grad():
        state = model.encode(batch)
        ids = batch["fwd_input"]
        full = model.decoder_logits("fwd", ids, state)
        cache = model.backbone.new_cache()
        steps = [model.decoder_logits("fwd", ids[:, t : t + 1], state, cache) for t in range(ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


def test_encoder_only_backbone_with_cross_attention_gets_decoders_copied_from_its_layers(tmp_path):
    from transformers import BertModel

    source = save_tiny_bert(tmp_path / "bert")
    model = AnchorAlignModel.from_backbone(str(source), TOY_META, decoder_attention="cross")
    assert model.backbone.new_parameter_names() and all(
        ".crossattention." in n for n in model.backbone.new_parameter_names()
    )
    assert isinstance(model.backbone, EncoderOnlyBackbone)
    reference = BertModel.from_pretrained(source, add_pooling_layer=False)
    for name in DECODERS:
        assert model.backbone.decoders[name].config.is_decoder
        layer = model.backbone.decoders[name].encoder.layer[1]
        torch.testing.assert_close(
            layer.attention.self.query.weight, reference.encoder.layer[1].attention.self.query.weight
        )
        torch.testing.assert_close(layer.output.dense.weight, reference.encoder.layer[1].output.dense.weight)
        assert hasattr(layer, "crossattention")
    batch = model.collator()(toy_samples())
    terms = loss_terms(model(batch), batch, dict.fromkeys(CE_TERMS, 1.0))
    terms["loss"].backward()
    for name in DECODERS:
        cross = model.backbone.decoders[name].encoder.layer[0].crossattention.self.key.weight
        assert cross.grad is not None and cross.grad.abs().sum() > 0


def test_minilm_backbone_is_partly_pretrained_offline():
    model = AnchorAlignModel.from_backbone("minilm", TOY_META)
    counts = model.parameter_counts()
    assert counts["embeddings"] == len(model.tokenizer) * 384
    # Prefix decoders: each is a copy of the encoder's layers and nothing more.
    assert counts["decoder_ner"] == counts["encoder"]
    batch = model.collator()(toy_samples()[:2])
    with torch.no_grad():
        assert torch.isfinite(model.eval()(batch)["fwd_logits"]).all()


def test_unusable_backbones_are_user_errors(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UserError, match="'gpt2' model; supported"):
        AnchorAlignModel.from_backbone(str(tmp_path / "gpt2"), TOY_META)
    with pytest.raises(UserError, match="cannot load the config of backbone"):
        AnchorAlignModel.from_backbone(str(tmp_path / "no" / "such" / "dir"), TOY_META)
    with pytest.raises(UserError, match="unknown tiny backbone option"):
        AnchorAlignModel.from_backbone("tiny", TOY_META, d_modle=64)


def test_pointer_decoder_input_reads_the_word_it_pointed_at():
    model = tiny_model(decoder_input="pointer").eval()
    batch = model.collator()(toy_samples())
    with torch.no_grad():
        state = model.encode(batch)
        ids = batch["fwd_input"]
        embeds = model.decoder_inputs(ids, state)
        n_fixed = model.labels.n_fixed
        b, t = torch.nonzero(ids >= n_fixed)[0].tolist()
        torch.testing.assert_close(embeds[b, t], state.word_reps[b, ids[b, t] - n_fixed])
        b, t = torch.nonzero(ids < n_fixed)[0].tolist()  # <bos>, labels and <sep>: their token rows
        token = model.to_token_ids(ids, state)[b, t]
        torch.testing.assert_close(embeds[b, t], model.backbone.embed_tokens.weight[token])
    assert tiny_model(decoder_input="token").decoder_input == "token"


def test_decoder_input_auto_is_pointer_for_prefix_decoders_only(tmp_path):
    source = str(save_tiny_bert(tmp_path / "bert"))
    assert AnchorAlignModel.from_backbone(source, TOY_META).decoder_input == "pointer"
    cross = AnchorAlignModel.from_backbone(source, TOY_META, decoder_attention="cross")
    assert cross.decoder_input == "token"
    assert tiny_model().decoder_input == "token"  # BART-family decoders


def test_decoder_input_is_saved_with_the_checkpoint(tmp_path):
    model = tiny_model(decoder_input="pointer")
    model.save_pretrained(tmp_path / "ck")
    assert AnchorAlignModel.from_pretrained(tmp_path / "ck").decoder_input == "pointer"
    with pytest.raises(UserError, match="decoder_input must be one of token, pointer"):
        tiny_model(decoder_input="embedding")


def _tiny_of(backbone: str, tmp_path) -> AnchorAlignModel:
    """A tiny model of either backbone family, in eval mode."""
    if backbone == "bart":
        return tiny_model().eval()
    return AnchorAlignModel.from_backbone(str(save_tiny_bert(tmp_path / "bert")), TOY_META).eval()


@pytest.mark.parametrize("backbone", ["bart", "bert"])
def test_span_head_own_layers_start_as_the_encoders_and_round_trip(backbone, tmp_path):
    # A copy of the top layers, run on their input, gives the encoder's own output: before any fit,
    # a head over its own layers scores every span as the same head over the shared output does.
    model = _tiny_of(backbone, tmp_path)
    n_layers = len(model.backbone.encoder_layers)
    batch = model.collator()(toy_samples())
    torch.manual_seed(0)
    model.add_span_head(3, pooled=True)
    head = model.span_head.eval()
    with torch.no_grad():
        shared = model.span_logits(model.encode(batch))
    for layers in (1, n_layers):
        model.add_span_head(3, pooled=True, layers=layers)
        model.span_head = head  # the same head, over its own layers
        model.span_layers.eval()
        assert model.n_span_layers == layers and model.head_input_layers == (n_layers - layers,)
        with torch.no_grad():
            torch.testing.assert_close(model.span_logits(model.encode(batch)), shared)
    # Copies, not the encoder's own modules: fitting them leaves the encoder as it was.
    own = dict(model.span_layers[0].named_parameters())
    for name, value in model.backbone.encoder_layers[0].named_parameters():
        assert own[name] is not value and own[name].requires_grad
    with torch.no_grad():
        for p in model.span_layers.parameters():
            p.add_(0.01 * torch.randn_like(p))
        moved = model.span_logits(model.encode(batch))
    assert not torch.allclose(moved, shared)
    model.save_pretrained(tmp_path / "ck")
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["span_layers"] == n_layers
    loaded = AnchorAlignModel.from_pretrained(tmp_path / "ck")
    assert loaded.n_span_layers == n_layers and loaded.parameter_counts() == model.parameter_counts()
    with torch.no_grad():
        torch.testing.assert_close(loaded.span_logits(loaded.encode(batch)), moved)
    with pytest.raises(UserError, match="between 0 and the encoder's"):
        model.add_span_head(3, layers=n_layers + 1)


@pytest.mark.parametrize("backbone", ["bart", "bert"])
def test_relation_head_own_layers_start_as_the_encoders_and_round_trip(backbone, tmp_path):
    # As the span head's: before any fit, the relation head over its own copy of the top layers
    # reads exactly what it reads over the shared output, beside a span head with a copy of another depth.
    model = _tiny_of(backbone, tmp_path)
    n_layers = len(model.backbone.encoder_layers)
    batch = model.collator()(toy_samples())
    model.add_span_head(3, layers=1)
    model.add_relation_head()
    model.eval()  # new modules start in training mode: no dropout in what is compared
    with torch.no_grad():
        state = model.encode(batch)
        shared = model.relation_inputs(state)
        spans = model.span_logits(state)
    torch.testing.assert_close(shared[0], model.word_states(state))
    torch.testing.assert_close(shared[1], state.hidden[:, 0])
    for layers in (n_layers, 1):
        model.add_relation_head(layers=layers)
        model.eval()
        assert model.n_relation_layers == layers
        assert model.head_input_layers == tuple(sorted({n_layers - 1, n_layers - layers}))
        with torch.no_grad():
            state = model.encode(batch)
            for own, expected in zip(model.relation_inputs(state), shared, strict=True):
                torch.testing.assert_close(own, expected)
            torch.testing.assert_close(model.span_logits(state), spans)
    # The relation head's copy is its own, not the span head's or the encoder's.
    assert (
        model.relation_layers[0].parameters().__next__() is not model.span_layers[0].parameters().__next__()
    )
    with torch.no_grad():
        for p in model.relation_layers.parameters():
            p.add_(0.01 * torch.randn_like(p))
        moved = model.relation_inputs(model.encode(batch))
        torch.testing.assert_close(model.span_logits(model.encode(batch)), spans)
    assert not torch.allclose(moved[0], shared[0])
    model.save_pretrained(tmp_path / "ck")
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["relation_head"]["layers"] == 1
    loaded = AnchorAlignModel.from_pretrained(tmp_path / "ck")
    assert loaded.n_relation_layers == 1 and loaded.parameter_counts() == model.parameter_counts()
    with torch.no_grad():
        for own, expected in zip(loaded.relation_inputs(loaded.encode(batch)), moved, strict=True):
            torch.testing.assert_close(own, expected)
    with pytest.raises(UserError, match="the relation head's own layers must be between 0"):
        model.add_relation_head(layers=n_layers + 1)
