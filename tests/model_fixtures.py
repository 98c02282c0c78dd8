"""Helpers for the model, batching, decoding and evaluate/predict tests (imported, not a conftest).

A hand-made label set and sentences for fast tests, a plain training loop, and the CoNLL04
over-fitted checkpoint, trained once per test session however many modules ask for it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from anchoralign.cli import build_parser, run_cli
from anchoralign.datasets import DatasetMeta
from anchoralign.schema import Entity, Relation, Sample, write_jsonl

TOY_META = DatasetMeta(
    name="toy",
    language="en",
    entity_types={"Peop": "person", "Org": "organization, a company", "Loc": "location"},
    relation_types={"Work_For": "works for", "Live_In": "lives in"},
    symmetric_relations=frozenset(),
    boundary_only=False,
    splits=("train", "test"),
)


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """Autouse in every module that imports it: torch on one thread for the module's tests.

    These tests run many small operations; on a CPU shared with other jobs, two busy-waiting
    threads make them several times slower (the over-fit training: about 50 s instead of 2-4 min).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy_samples() -> list[Sample]:
    def ent(s, e, t):
        return Entity(start=s, end=e, type=t)

    return [
        Sample(
            id="s1",
            tokens=["Ann", "Lee", "works", "for", "Acme", "in", "Oslo", "."],
            entities=[ent(0, 2, "Peop"), ent(4, 5, "Org"), ent(6, 7, "Loc")],
            relations=[Relation(head=0, tail=1, type="Work_For"), Relation(head=0, tail=2, type="Live_In")],
        ),
        Sample(
            id="s2",
            tokens=["Bob", "Pusterla", "lives", "in", "Paris", "."],
            entities=[ent(0, 2, "Peop"), ent(4, 5, "Loc")],
            relations=[Relation(head=0, tail=1, type="Live_In")],
        ),
        Sample(id="s3", tokens=["Nothing", "happened", "."]),
    ]


def tiny_model(meta=TOY_META, seed: int = 0, paradigm: int = 3, **options):
    from anchoralign.model import AnchorAlignModel

    torch.manual_seed(seed)
    return AnchorAlignModel.from_backbone("tiny", meta, paradigm, **options)


def train(
    model, samples, steps: int, lr: float = 3e-3, batch_size: int = 15, stop_below: float | None = None
):
    """A plain AdamW loop on the three cross-entropies; stops early once a whole epoch is below ``stop_below``."""
    from anchoralign.losses import CE_TERMS, loss_terms

    weights = dict.fromkeys(CE_TERMS, 1.0)
    collate = model.collator()
    batches = [collate(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses: list[float] = []
    model.train()
    for step in range(steps):
        batch = batches[step % len(batches)]
        loss = loss_terms(model(batch), batch, weights)["loss"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        recent = losses[-len(batches) :]
        if stop_below is not None and len(losses) >= len(batches) and max(recent) < stop_below:
            break
    model.eval()
    return losses


# The over-fitted CoNLL04 checkpoint: trained once per session (keyed by the session's tmp root).
OVERFIT_N = 30
OVERFIT_MAX_STEPS = 300
OVERFIT_STOP_BELOW = 0.05  # summed cross-entropies, every batch of an epoch
_TRAINED: dict[str, tuple[Path, list[float]]] = {}


def conll04_first(shared_data: Path, n: int = OVERFIT_N) -> tuple[DatasetMeta, list[Sample]]:
    from anchoralign.datasets import get_meta, load_split

    if not (shared_data / "conll04" / "conll04_train.json").is_file():
        pytest.skip(f"CoNLL04 not found under {shared_data}")
    return get_meta("conll04", str(shared_data)), load_split("conll04", "train", str(shared_data))[:n]


def overfit_checkpoint(tmp_path_factory, shared_data: Path) -> tuple[Path, list[float]]:
    """Directory of a tiny model over-fitted on the first 30 CoNLL04 training sentences, and its losses."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _TRAINED:
        meta, samples = conll04_first(shared_data)
        torch.manual_seed(0)
        model = tiny_model(meta)
        losses = train(model, samples, OVERFIT_MAX_STEPS, stop_below=OVERFIT_STOP_BELOW)
        directory = tmp_path_factory.mktemp("overfit") / "checkpoint"
        model.save_pretrained(
            directory, train_config={"steps": len(losses), "lr": 3e-3, "samples": OVERFIT_N}
        )
        _TRAINED[key] = (directory, losses)
    return _TRAINED[key]


def init_from_config(output: Path, init_from: Path, **model):
    """A toy SFT config that starts from ``init_from`` with the ``model`` section's fields given."""
    from anchoralign.config import SFTConfig

    return SFTConfig.model_validate(
        {
            "dataset": "toy",
            "output_dir": str(output),
            "init_from": str(init_from),
            "phases": {"epochs": [0, 1, 0]},
            "optim": {"lr": 1e-4},
            "model": model,
        }
    )


def write_user_dataset(directory: Path, meta: DatasetMeta, splits: dict[str, list[Sample]]) -> Path:
    """A user dataset directory (meta.json + <split>.jsonl) that ``anchoralign.datasets`` reads by path."""
    directory.mkdir(parents=True, exist_ok=True)
    spec = {
        "name": meta.name,
        "language": meta.language,
        "entity_types": meta.entity_types,
        "relation_types": meta.relation_types,
        "symmetric_relations": sorted(meta.symmetric_relations),
        "boundary_only": meta.boundary_only,
    }
    (directory / "meta.json").write_text(json.dumps(spec), encoding="utf-8")
    for split, samples in splits.items():
        write_jsonl(directory / f"{split}.jsonl", samples)
    return directory


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run ``anchoralign ARGV`` in-process: (exit status, stdout, stderr)."""
    code = run_cli(build_parser(), [str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# Small checkpoints on disk, to exercise the real from_pretrained paths without a network.
TOY_TEXT = [
    "Ann Lee works for Acme in Oslo .",
    "Bob Pusterla lives in Paris .",
    "Acme hired Ann , a person who lives in Oslo .",
    "organization company person location works for lives in separator",
]


def byte_level_tokenizer():
    """A whitespace-sensitive byte-level BPE tokenizer (like BART's), trained on a few sentences."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe.train_from_iterator(TOY_TEXT * 5, vocab_size=400, min_frequency=1, special_tokens=specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        cls_token="<s>",
        sep_token="</s>",
    )


def save_tiny_bart(directory: Path) -> Path:
    """A random 1+1-layer BART and its byte-level tokenizer, saved as a hub-style directory."""
    from transformers import BartConfig, BartModel

    tok = byte_level_tokenizer()
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=len(tok),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.eos_token_id,
    )
    BartModel(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def save_tiny_bert(directory: Path) -> Path:
    """A random 2-layer BERT encoder with the MiniLM tokenizer, saved as a hub-style directory."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from anchoralign.backbones import minilm_dir

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


REPO_ROOT = Path(__file__).resolve().parent.parent
