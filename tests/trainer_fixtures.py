"""A tiny stand-in model with AnchorAlignModel's call contract, its data, a stand-in loss and a
scripted evaluator: what the trainer and checkpoint tests drive the real loop with (in this
process, on gloo)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from anchoralign.config import PretrainConfig, load_config
from anchoralign.evaluation import EvalResult
from anchoralign.losses import LOSS_KEYS, weighted_total
from anchoralign.schedule import Phase
from anchoralign.schema import Sample

DIM, CLASSES, N_SAMPLES = 6, 3, 24
FEATURES = torch.randn(64, DIM, generator=torch.Generator().manual_seed(0))


class StandIn(nn.Module):
    """model(batch, decoders) -> {ner,fwd,rev}_logits [B,1,V]; save_pretrained(dir, train_config)."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.hidden = nn.Linear(DIM, 8)
        self.out = nn.Linear(8, CLASSES)
        self.norm = nn.LayerNorm(8)
        self.drop = nn.Dropout(dropout)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(
        self, batch: Mapping[str, torch.Tensor], decoders=("ner", "fwd", "rev"), spans: bool = True
    ) -> dict[str, torch.Tensor]:
        h = self.drop(torch.tanh(self.norm(self.hidden(batch["x"]))))
        logits = self.out(h)[:, None, :]
        every = {"ner_logits": logits, "fwd_logits": 0.5 * logits, "rev_logits": 2.0 * logits}
        return {f"{name}_logits": every[f"{name}_logits"] for name in decoders}

    def save_pretrained(self, directory: Path, train_config: object = None) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), Path(directory) / "weights.pt")


def samples(n: int = N_SAMPLES, prefix: str = "s") -> list[Sample]:
    return [Sample(id=f"{prefix}{i}", tokens=[f"w{i}"] * (1 + i % 5)) for i in range(n)]


def collate(batch: Sequence[Sample]) -> dict[str, torch.Tensor]:
    idx = [int(s.id.lstrip("sm")) for s in batch]
    return {"x": FEATURES[idx], "y": torch.tensor([i % CLASSES for i in idx])}


class Loss:
    """Stand-in for loss_terms: real CE, made-up alignment terms; records the weights and teachers it got."""

    def __init__(self) -> None:
        self.seen: list[dict[str, float]] = []
        self.teachers: list[torch.Tensor | None] = []

    def __call__(
        self, outputs, batch, weights, teacher_logits=None, teacher_gate=False
    ) -> dict[str, torch.Tensor]:
        if torch.is_grad_enabled():
            self.seen.append(dict(weights))
            self.teachers.append(teacher_logits)
        y = batch["y"]
        terms = {k: torch.zeros(()) for k in LOSS_KEYS}
        for name in ("ner", "fwd", "rev"):
            terms[f"ce_{name}"] = F.cross_entropy(outputs[f"{name}_logits"][:, 0].float(), y)
        teacher = outputs["ner_logits"] if teacher_logits is None else teacher_logits
        if "kl_ner_re" in weights:
            terms["kl_ner_re"] = (teacher.detach() - outputs["fwd_logits"]).pow(2).mean()
        if "kl_fwd_rev" in weights:
            terms["kl_fwd_rev"] = (outputs["fwd_logits"] - outputs["rev_logits"]).abs().mean()
        if "suppress" in weights:
            terms["suppress"] = outputs["rev_logits"].softmax(-1)[..., 0].mean()
        terms["loss"] = weighted_total(terms, weights)
        return terms


class ScriptedEvaluator:
    """Returns scripted scores call by call; records whether the free-running rate was asked for."""

    def __init__(
        self, valid_rates: Sequence[float], f1: Sequence[float] | None = None, ner: Sequence[float] = (50.0,)
    ):
        self.valid_rates, self.f1, self.ner = list(valid_rates), list(f1 or []), list(ner)
        self.calls = 0
        self.validity: list[bool] = []

    def __call__(self, model: nn.Module, device: torch.device, validity: bool) -> EvalResult:
        self.validity.append(validity)
        i = self.calls
        self.calls += 1
        rate = self.valid_rates[min(i, len(self.valid_rates) - 1)]
        f1 = self.f1[min(i, len(self.f1) - 1)] if self.f1 else 0.0
        ner = self.ner[min(i, len(self.ner) - 1)]
        scores = {"rel_strict_f1": f1, "ner_f1": ner, "primary": "rel_strict_f1", "complete_rate": 1.0}
        if validity:
            scores["free_valid_rate"] = rate
        return EvalResult(scores=scores, losses={"dev": {k: 1.0 for k in LOSS_KEYS}})


def cfg_of(tmp_path: Path, *overrides: str) -> PretrainConfig:
    base = [
        "--dataset=conll04",
        f"--output_dir={tmp_path / 'run'}",
        "--phases.epochs=[1,1,1]",
        "--optim.lr=0.05",
        "--optim.micro_batch_size=4",
        "--trainer.zero_stage=2",
        "--optim.warmup_ratio=0.2",
        "--trainer.log_every=2",
        "--loss.alpha=0.5",
        "--loss.beta=0.25",
        "--loss.gamma=2",
        "--trainer.progress=false",
    ]
    return load_config(PretrainConfig, None, [*base, *overrides])


def phases_of(etu: int = 1, ce: int = 1, align: int = 1) -> list[Phase]:
    return [
        Phase("etu", "masked", etu, False),
        Phase("poa-ce", "plain", ce, False),
        Phase("poa-align", "plain", align, True),
    ]


def sets_of() -> dict[str, list[Sample]]:
    return {"masked": samples(N_SAMPLES, "m"), "plain": samples(N_SAMPLES)}


def rows_of(run: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def weights_at(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / "weights.pt")
