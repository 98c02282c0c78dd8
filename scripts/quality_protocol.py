"""The quality protocol on CoNLL04 with the MiniLM backbone (issue: alignment and the span-based peer).

Per seed:

1. ``ce``: fine-tune from the bare backbone with the three cross-entropies only (curriculum
   warm-up, then the full training set) on the schedule of 2 + 28 epochs, stopped after epoch 24
   (``trainer.stop_after_epoch``; until 2026-12-02 the protocol stopped the process itself and
   left ``stopped.txt``; dev F1 was flat from about epoch 13 in seeds 1 and 2, and the CPU time
   went to more seeds and settings); ``best/`` (full dev set) is the shared, cross-entropy-converged
   checkpoint of the seed;
2. one alignment phase per setting, each from that same checkpoint, so that only the alignment
   phase differs: ``full`` (alignment and suppression), ``no_alignment`` (the same epochs with
   cross-entropy only), ``no_ner_re``, ``no_fwd_rev``, ``no_suppress``, ``ema`` (``full``
   evaluated, selected and exported on the moving average of the weights); and, asked for by
   name, ``long`` (twice the epochs), ``mix`` (the training set joined by the pretraining
   corpus, for half the epochs), ``span_head`` (``full`` with a new span head for the
   entities) and ``pair_loss`` (``full`` with a relation head trained beside the decoders);
   ``best/`` by dev again;
3. ``anchoralign evaluate`` of each ``best/`` on test, written as
   ``<out>/<result>/seed<k>/predictions.jsonl`` and ``metrics.json`` (``--out``, default
   ``benchmarks/quality/conll04-rerun``; ``<result>`` is ``result_name`` below), and on
   dev, the same two files in ``seed<k>/dev/`` (committed for the settings measured since
   2026-12-01; earlier dev figures in BENCHMARKS.md were scored by hand), and the
   decoding ablations on the ``full`` checkpoints (``no_constraint``: no anchor-guided filter;
   ``no_aggregation``: forward relations only; ``no_both``; ``span_anchor``: the constraint on
   mention spans only; ``reported_anchor``: on the reported entities, the union's included;
   ``span_head_decoder``: the ``span_head`` setting's checkpoints with the NER decoder's entities;
   ``span_head_anchor``: the same with relations anchored on the span head's entities;
   ``ner_decoder``: a ``--model span_head`` variant's entities from its NER decoder, not its head;
   ``entity_union`` and ``ner_entities``: ``--entities union``, the default since it was
   measured, and ``ner``) and on the ``ce`` checkpoints (``ce_only``: the shared starting point;
   after pretraining only this one, ``pretrain_NAME_ce_only``).
4. ``head`` (asked for in ``--steps``): ``anchoralign fit-relation-head`` on each setting's ``best/``
   (a pair classifier over the frozen encoder, its vote thresholds chosen on dev), evaluated like
   the others as ``relation_head`` (of ``full``; ``pretrain_NAME_relation_head`` after pretraining)
   or ``<setting>_relation_head`` (``--heads K``: K heads averaged, ``relation_headK``;
   ``--relation-layers K``: the head with its own fine-tuned copy of the encoder's top K layers,
   ``relation_head_topK``); its decoding ablations, asked for by name: ``relation_head_fixed``
   (the vote at 0.5 / 0.5, not the dev-chosen thresholds) and ``relation_head_add_only`` (the head
   only adds relations).
5. ``span`` (asked for in ``--steps``): ``anchoralign fit-span-head`` on each setting's ``best/``
   (a span classifier for the entities over the frozen encoder), evaluated as ``span_fit`` (of
   ``full``) or ``<setting>_span_fit``; with ``head`` too, the relation head is fitted on that
   checkpoint, over its entities: ``[<setting>_]span_fit_relation_head``. The head has its own
   fine-tuned copy of the encoder's top K layers (``--span-layers K``, default 2), and ``span_fit``
   is named ``span_fit_topK`` (``span_fit`` for 0: the head over the frozen encoder's output).
6. ``ce_heads`` (asked for in ``--steps``): both fits on stage 1's ``best/`` instead, span head then
   relation head, evaluated as ``ce_only_span_fit_relation_head``: what stage 2 adds once the heads
   are fitted.

Every step is a command of the product (printed before it runs) and is skipped when its output
exists, so the protocol can be stopped and started again; training steps resume from their
checkpoints. ``--summary`` prints the table of means and standard deviations from the committed
metrics, re-scored from the committed predictions against the gold test (and dev) file read
directly (mentions told apart by their text, the product's figures; ``--keys offsets`` by their
token offsets, as span-based extractors are scored); ``--compare A,B`` the paired difference of
two settings on test and on dev; ``--errors NAME`` why each of its gold relations was missed.
Each evaluation step also commits the training run's dev curve (``seed<k>/dev/curve.jsonl``, one
row per evaluation); ``--curves A[,B]`` prints its level over the later epochs, seed by seed.

With ``--pretrain NAME=DIR`` every seed is first pretrained on the augment corpus in DIR, and the
cross-entropy stage starts from that model (with ``--ce-epochs N``, a stage 1 of N epochs on its
own full schedule instead of 24 of 30): the settings ``pretrain_NAME`` (and
``pretrain_NAME_<setting>`` for others than ``full``) compare with ``full``, which has no pretraining.
The pretrain step also evaluates the pretrained model itself (its ``final/``, where stage 1
starts) as ``pretrain_NAME_pretrained``. ``--pretrain-setting S`` changes pretraining's alignment
phase (``PRETRAIN_SETTINGS``: ``noalign``, cross-entropy only; ``gate``, the NER-RE term only where
the NER teacher is right) and names everything after it ``pretrain_NAME_S``.

The decoding ablations of the recipe (``recipe_no_constraint``, ``recipe_no_aggregation``,
``recipe_no_both``, asked for by name with ``--steps eval``) evaluate the checkpoints of ``full``
with both heads fitted (``--steps align,span,head``).

With ``--model VARIANT`` (``MODELS``: ``span_head``, ``joint``, ``span_head_joint``, ``smooth``,
``span_head_joint_smooth``, ``long_ema``) both fine-tuning stages train that model variant, from
the same pretrained models as the plain one; its runs and results are named
``[pretrain_NAME_]with_VARIANT`` as above (``pretrain_rulesall_with_span_head_no_alignment``).

    python scripts/quality_protocol.py --data-dir ../shared/data --seeds 1,2,3
    python scripts/quality_protocol.py --data-dir ../shared/data --seeds 1 --settings full --steps ce,align,eval
    python scripts/quality_protocol.py --data-dir ../shared/data --summary
    python scripts/quality_protocol.py --data-dir ../shared/data --seeds 1,2,3 --settings full --steps span,head
    python scripts/quality_protocol.py --data-dir ../shared/data --seeds 1 --settings full \
        --steps pretrain,ce,align,eval --pretrain llm=corpus/conll04-llm
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SFT_CONFIG = "sft/configs/conll04.yaml"

# What both kinds of training run share: the packaged MiniLM encoder with prefix decoders that read
# the representation of each word they wrote, mixed precision on the CPU, batches of 16 bucketed by
# length, the full dev set scored after every epoch.
COMMON = [
    "--model.backbone=minilm",
    "--model.decoder-input=pointer",
    "--optim.micro_batch_size=16",
    "--optim.schedule=linear",
    "--trainer.precision=bf16",
    "--trainer.zero_stage=0",
    "--data.bucket_batches=8",
    "--eval.loss_splits=[]",
    "--trainer.progress=false",
]
# The heads the shipped SFT config fits after training are the protocol's own steps here (span,
# head), each reported as a result of its own; stage 1 has no such section.
NO_FIT = ["--fit.span_head=false", "--fit.relation_head=false"]
# 1. Cross-entropy until convergence: 2 curriculum epochs, then 28 on the whole training set, on
# that schedule, but stopped after epoch CE_STOP_AFTER_EPOCH (the learning rate is then still at
# a fifth of its peak: the schedule is not shortened).
CE = ["--optim.lr=1e-4", "--optim.warmup_ratio=0.06"]
CE_STOP_AFTER_EPOCH = 24
# With --ce-epochs N: 2 + (N - 2) epochs on their own schedule, nothing stopped (12 after
# pretraining scored below 24 of 30: BENCHMARKS.md).
# 0. With --pretrain: stage 1 on an augmented corpus first (Entity Type Understanding on the masked
# corpus, then the unmasked one without and with alignment), at a constant learning rate as in the
# paper; the cross-entropy stage then starts from its final model.
PRETRAIN_CONFIG = "pretrain/configs/conll04.yaml"
PRETRAIN_EPOCHS = "2,3,5"  # of the 1,000-sample corpora; a larger corpus is given fewer (--pretrain-epochs)
PRETRAIN = [
    "--optim.lr=1e-4",
    "--optim.schedule=constant",
    "--optim.warmup_ratio=0.06",
    "--loss.ramp_steps=58",
]
# Pretraining with its last phase changed (--pretrain-setting), named pretrain_NAME_<setting>: the
# teacher of the alignment terms is not one-hot there (right at about 95% of the aligned pairs,
# not 100% as after stage 1), so this is where the terms can carry information.
# - noalign: phase 3 with cross-entropy only, so that the pair differs by pretraining's alignment;
# - gate: phase 3 with the NER-RE term only where the NER teacher's top token is the gold one.
PRETRAIN_SETTINGS = {
    "noalign": ["--loss.alignment=false"],
    "gate": ["--loss.teacher_gate=true"],
}
# The pretrained model itself (its final/, the model stage 1 starts from) evaluated as a result:
# pretrain_NAME[_<setting>]_pretrained.
PRETRAINED = "pretrained"
# 2. The alignment phase from the converged checkpoint: 6 epochs at a lower learning rate, the
# alignment terms ramped in over the first epoch (58 steps). Weights chosen on dev (BENCHMARKS.md).
ALIGN_EPOCHS = 6
ALIGN = [
    "--optim.lr=3e-5",
    "--optim.warmup_ratio=0.1",
    "--loss.ramp_steps=58",
    "--loss.alpha=1.0",
    "--loss.beta=1.0",
    "--loss.gamma=0.1",
]
SETTINGS = {
    "full": ["--trainer.grad_norm_every=58"],
    "no_alignment": ["--loss.alignment=false"],
    "no_ner_re": ["--loss.ner_re=false"],
    "no_fwd_rev": ["--loss.fwd_rev=false"],
    "no_suppress": ["--loss.suppress=false"],
    # The full method with its evaluations, best/ and final/ on the moving average of the weights.
    "ema": ["--trainer.grad_norm_every=58", "--optim.ema_decay=0.99"],
}
# Weight choices tried on dev (seed 1): alpha = beta = w, gamma = w / 10.
SWEEP = {
    f"weights_{w}": [f"--loss.alpha={w}", f"--loss.beta={w}", f"--loss.gamma={float(w) / 10:g}"]
    for w in ("0.1", "0.3", "3")
}
# Stage 2 with other data or length, same loss as `full`: twice the epochs (`long`), or half the
# epochs over the training set joined by the pretraining corpus's unmasked samples (`mix`, with
# --pretrain; about as many steps as `long`, and dev scored every 58 steps so that best/ is
# chosen among as many points).
ALIGN_VARIANTS = {
    "long": ["--trainer.grad_norm_every=58"],
    "mix": ["--trainer.grad_norm_every=58", "--eval.every=58"],
}
VARIANT_EPOCHS = {"long": 2 * ALIGN_EPOCHS, "mix": ALIGN_EPOCHS // 2}
# Stage 2 of `full` with a span head (anchoralign/span_head.py) added to the model: it is new, so it
# trains at 10x the stage's learning rate; its mentions are the entities and the anchor.
# The span head of model.span_head_width, its new parameters at ten times the learning rate.
SPAN_HEAD = ["--model.span-head-width=8", "--optim.new-lr-mult=10"]
NER_HEADS = {"span_head": ["--trainer.grad_norm_every=58", *SPAN_HEAD]}
# Stage 2 of `full` with a relation head trained beside the decoders on the gold entity pairs
# (its encoder no longer frozen, unlike fit-relation-head's); new, so at ten times the stage's rate.
# Its checkpoints carry the head with the vote off, (0, 1): the head step only chooses thresholds.
RELATION_HEADS = {
    "pair_loss": ["--trainer.grad_norm_every=58", "--model.relation-heads=1", "--optim.new-lr-mult=10"]
}
# The full method with the alignment terms changed:
# - teacher_gate (loss.teacher_gate): the NER-RE term only where the NER decoder's top token is the
#   gold one, so that a wrong teacher teaches nothing;
# - temperature_T (loss.align_temperature): both terms on distributions softened by T, because the
#   decoders are one-hot on the training set once stage 1 has converged.
ALIGN_LOSSES = {
    "teacher_gate": ["--trainer.grad_norm_every=58", "--loss.teacher_gate=true"],
    **{f"temperature_{t}": ["--trainer.grad_norm_every=58", f"--loss.align_temperature={t}"] for t in (2, 4)},
}
TRAINED = {
    **SETTINGS,
    **SWEEP,
    **ALIGN_VARIANTS,
    **ALIGN_LOSSES,
    **NER_HEADS,
    **RELATION_HEADS,
}  # every stage-2 setting
# Model variants (--model): flags of both fine-tuning stages, so that the variant is trained from
# stage 1 on; pretraining is shared with the plain model.
# best/ chosen on the mean of dev NER and relation F1 rather than relations alone.
MEAN_SELECTION = ["--eval.best-metric=ner_f1+rel_strict_f1"]
# Label smoothing of the decoders' cross-entropies (a regulariser for 922 training sentences).
SMOOTH = ["--loss.label-smoothing=0.1"]
MODELS = {
    "span_head": SPAN_HEAD,
    "joint": MEAN_SELECTION,
    "span_head_joint": [*SPAN_HEAD, *MEAN_SELECTION],
    "smooth": SMOOTH,
    # The entity recipe (span head, best/ on the mean) with the regulariser that lifted NER F1.
    "span_head_joint_smooth": [*SPAN_HEAD, *MEAN_SELECTION, *SMOOTH],
    # A slow moving average of the weights (horizon about 500 steps, 9 epochs of stage 1) evaluated,
    # selected and exported in both stages; its raw weights train exactly as the plain model's.
    "long_ema": ["--optim.ema_decay=0.998"],
}
# A relation head fitted on the frozen encoder of a trained setting's best/ (anchoralign
# fit-relation-head; its vote thresholds chosen on dev), evaluated as its own result:
# ``relation_head`` for ``full``, ``<setting>_relation_head`` for the others.
HEAD = "relation_head"
# The span step's results (--steps span): a span head fitted on the setting's best/ for the entities.
SPAN_FIT = "span_fit"
# The encoder's top layers the span step's head gets its own copy of (fit-span-head --layers): the
# recipe's two since 2026-12-02; 0 gives the committed span_fit results of the frozen encoder.
SPAN_LAYERS = 2
# The same for the head step's relation head (fit-relation-head --layers): none by default; K > 0
# names its results relation_head_topK.
RELATION_LAYERS = 0


def head_setting(setting: str, heads: int = 1, layers: int = 0) -> str:
    """The head result's name: ``relation_head`` of ``full`` (``relation_head5`` with ``--heads 5``,
    ``relation_head_top2`` with ``--relation-layers 2``)."""
    return fitted_setting(setting, with_layers(HEAD if heads == 1 else f"{HEAD}{heads}", layers))


def with_layers(fit: str, layers: int) -> str:
    """A fit's name with its head's own top layers: ``fit_topK``, ``fit`` itself for none."""
    return fit if layers == 0 else f"{fit}_top{layers}"


def fitted_setting(setting: str, fit: str) -> str:
    """A fit's result name: ``fit`` of ``full``, ``<setting>_<fit>`` of the others."""
    return fit if setting == "full" else f"{setting}_{fit}"


# What --steps may name, in the order a seed runs them.
STEPS = ("pretrain", "ce", "ce_heads", "align", "eval", "span", "head")
# The recipe's checkpoints: `full` with the span head (its own top layers) and the relation head
# fitted on it (--steps align,span,head).
RECIPE = head_setting(fitted_setting("full", with_layers(SPAN_FIT, SPAN_LAYERS)))
# Decoding ablations: evaluate flags on the checkpoints of a training setting.
DECODING = {
    # The paper's decoding ablations on the recipe: the relation head votes on the relations that
    # the decoders' output gives after the anchor constraint and the aggregation, so both still
    # act there.
    "recipe_no_constraint": (RECIPE, ["--anchor", "off"]),
    "recipe_no_aggregation": (RECIPE, ["--aggregate", "false"]),
    "recipe_no_both": (RECIPE, ["--anchor", "off", "--aggregate", "false"]),
    "no_constraint": ("full", ["--anchor", "off"]),
    "no_aggregation": ("full", ["--aggregate", "false"]),
    "no_both": ("full", ["--anchor", "off", "--aggregate", "false"]),
    "span_anchor": ("full", ["--anchor", "span"]),
    # Relations anchored on the reported entities, the union's included.
    "reported_anchor": ("full", ["--anchor", "reported"]),
    # The entities of the NER decoder only (the behaviour before `union` became the default), and
    # `union` spelled out (the committed rows decoded before it was the default compare with it).
    "ner_entities": ("full", ["--entities", "ner"]),
    "entity_union": ("full", ["--entities", "union"]),
    # The span head's checkpoints with the NER decoder's entities instead, or with relations
    # anchored on the span head's entities rather than the NER decoder's mentions.
    "span_head_decoder": ("span_head", ["--ner-source", "decoder"]),
    "span_head_anchor": ("span_head", ["--anchor", "reported"]),
    # A model with a span head (``--model span_head``) decoding its entities with the NER decoder.
    "ner_decoder": ("full", ["--ner-source", "decoder"]),
    "ce_only": ("ce", []),
    # The relation head's checkpoints (--steps head) with its vote at fixed thresholds instead of
    # those chosen on dev, or allowed only to add relations, never to drop one the decoders wrote.
    "relation_head_fixed": (HEAD, ["--relation-keep", "0.5", "--relation-add", "0.5"]),
    "relation_head_add_only": (HEAD, ["--relation-keep", "0"]),
    # The fitted span head's checkpoints (--steps span) with its mentions alone among the entities
    # (no RE decoder's unclaimed mention), or with relations anchored on the reported entities.
    "span_fit_ner_entities": (SPAN_FIT, ["--entities", "ner"]),
    "span_fit_reported_anchor": (SPAN_FIT, ["--anchor", "reported"]),
}


def _env() -> dict[str, str]:
    # The code of this checkout, whatever is installed: the protocol measures the commit it is in.
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(REPO)}


def run(cmd: list[str], dry: bool, stdout: Path | None = None) -> None:
    print("+ " + " ".join(cmd), flush=True)
    if dry:
        return
    env = _env()
    if stdout is None:
        subprocess.run(cmd, cwd=REPO, env=env, check=True)
        return
    stdout.parent.mkdir(parents=True, exist_ok=True)
    tmp = stdout.with_name(stdout.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=f)
    tmp.replace(stdout)


def run_dir(args: argparse.Namespace, setting: str, seed: int) -> Path:
    """Runs without pretraining under ``runs/``; with ``--pretrain NAME=DIR`` under
    ``runs/pretrain_NAME/``; with ``--model VARIANT`` the fine-tuning runs under
    ``runs/[pretrain_NAME_]with_VARIANT/`` (pretraining stays shared)."""
    return args.runs / (args.pretrained if setting == "pretrain" else args.prefix) / setting / f"seed{seed}"


def result_name(args: argparse.Namespace, setting: str) -> str:
    """``full`` (no pretraining), ``pretrain_NAME`` (its full method), ``pretrain_NAME_<setting>``;
    with ``--model VARIANT`` the prefix ``[pretrain_NAME_]with_VARIANT`` in the same way."""
    if not args.prefix:
        return setting
    return args.prefix if setting == "full" else f"{args.prefix}_{setting}"


def pretrain(args: argparse.Namespace, seed: int) -> None:
    """Stage 1 on the corpus: Entity Type Understanding, then Progressive Objective Activation."""
    out = run_dir(args, "pretrain", seed)
    if (out / "final").is_dir():
        return
    cmd = [sys.executable, "pretrain/run.py", "--config", PRETRAIN_CONFIG, f"--data-dir={args.data_dir}"]
    cmd += [
        *COMMON,
        *PRETRAIN,
        f"--phases.epochs=[{args.pretrain_epochs}]",
        f"--data.corpus-dir={args.corpus}",
        *PRETRAIN_SETTINGS.get(args.pretrain_setting, []),
    ]
    cmd += [f"--seed={seed}", f"--output-dir={out}"]
    run(cmd, args.dry_run)


def align_flags(args: argparse.Namespace, setting: str) -> list[str]:
    """Stage 2's flags: its length, and for ``mix`` the corpus's unmasked samples as extra training data."""
    flags = [f"--phases.epochs=[0,0,{VARIANT_EPOCHS.get(setting, ALIGN_EPOCHS)}]", *ALIGN]
    if setting == "mix":
        if args.corpus is None:
            raise SystemExit("--settings mix needs --pretrain NAME=CORPUS: it trains on that corpus too")
        flags.append(f"--data.extra-train=[{args.corpus / 'unmasked.jsonl'}]")
    return flags


def train(args: argparse.Namespace, setting: str, seed: int) -> None:
    out = run_dir(args, setting, seed)
    # stopped.txt: a stage 1 the protocol stopped itself, before trainer.stop_after_epoch existed.
    if (out / "final").is_dir() or (out / "stopped.txt").is_file():
        return
    start = run_dir(args, "pretrain", seed) / "final" if args.pretrained else None
    epochs = "2,28" if args.ce_epochs is None else f"2,{args.ce_epochs - 2}"
    ce = [f"--init-from={start or 'null'}", f"--phases.epochs=[{epochs},0]", *CE]
    if args.ce_epochs is None:
        ce.append(f"--trainer.stop_after_epoch={args.ce_stop_after}")
    stage = (
        ce
        if setting == "ce"
        else [f"--init-from={run_dir(args, 'ce', seed) / 'best'}", *align_flags(args, setting)]
    )
    extra = [*MODELS.get(args.model, []), *([] if setting == "ce" else TRAINED[setting])]
    cmd = [
        sys.executable,
        "sft/run.py",
        "--config",
        SFT_CONFIG,
        f"--data-dir={args.data_dir}",
        *COMMON,
        *NO_FIT,
        *stage,
    ]
    cmd = [*cmd, *extra, f"--seed={seed}", f"--output-dir={out}"]
    run(cmd, args.dry_run)


def fit_head(args: argparse.Namespace, setting: str, seed: int, trained_head: bool) -> None:
    """``fit-relation-head`` on the setting's ``best/``, written as the ``best/`` of its head setting;
    ``trained_head``: the checkpoint has a relation head trained with the model, whose thresholds
    alone are chosen."""
    out = run_dir(args, head_setting(setting, args.heads, args.relation_layers), seed) / "best"
    extra = (
        ["--thresholds-only"]
        if trained_head
        else [f"--heads={args.heads}", f"--layers={args.relation_layers}"]
    )
    fit(args, "fit-relation-head", setting, seed, out, extra)


def span_fit(args: argparse.Namespace) -> str:
    """The span step's result: ``span_fit``, or ``span_fit_topK`` with ``--span-layers K``."""
    return with_layers(SPAN_FIT, args.span_layers)


def fit_span(args: argparse.Namespace, setting: str, seed: int, name: str | None = None) -> None:
    """``fit-span-head`` on the setting's ``best/``, written as the ``best/`` of the span setting of
    ``name`` (default: the setting's own). Its own layers are always given, so that a change of
    the command's default does not change what a result name means."""
    out = run_dir(args, fitted_setting(name or setting, span_fit(args)), seed) / "best"
    fit(args, "fit-span-head", setting, seed, out, [f"--layers={args.span_layers}"])


def fit_ce_heads(args: argparse.Namespace, seed: int) -> None:
    """Both fits on stage 1's ``best/``, named as ``ce_only``'s; only the result with both heads is
    evaluated."""
    fit_span(args, "ce", seed, name="ce_only")
    span = fitted_setting("ce_only", span_fit(args))
    fit_head(args, span, seed, trained_head=False)
    head = head_setting(span, args.heads, args.relation_layers)
    evaluate(args, head, head, seed, [])


def fit(args: argparse.Namespace, command: str, setting: str, seed: int, out: Path, extra: list[str]) -> None:
    if (out / "config.json").is_file():
        return
    cmd = [sys.executable, "-m", "anchoralign.cli", command]
    cmd += ["--checkpoint", str(run_dir(args, setting, seed) / "best"), "--dataset", "conll04"]
    cmd += ["--data-dir", str(args.data_dir), f"--seed={seed}", "--output", str(out), *extra]
    run(cmd, args.dry_run)


# Where a result's predictions and metrics of each split go, under its seed folder: test, which the
# issue re-scores, at the top; dev, the split that decides, beside it in dev/.
SPLIT_FOLDERS = {"test": ".", "dev": "dev"}


def evaluate(
    args: argparse.Namespace,
    name: str,
    trained: str,
    seed: int,
    flags: list[str],
    checkpoint: str = "best",
    result: str | None = None,
) -> None:
    """``checkpoint`` of the setting's run evaluated on each split as the result ``result`` (default:
    ``result_name`` of ``name``)."""
    result = result or result_name(args, name)
    for split, sub in SPLIT_FOLDERS.items():
        folder = args.out / result / f"seed{seed}" / sub
        if (folder / "metrics.json").is_file():
            continue
        cmd = [
            sys.executable,
            "-m",
            "anchoralign.cli",
            "evaluate",
            "--checkpoint",
            str(run_dir(args, trained, seed) / checkpoint),
        ]
        cmd += ["--dataset", "conll04", "--split", split, "--data-dir", str(args.data_dir), "--json"]
        out = folder / "predictions.jsonl"
        run([*cmd, *flags, "--output", str(out)], args.dry_run, folder / "metrics.json")
    if not flags and not args.dry_run:  # a decoding ablation shares its training's curve
        write_curve(run_dir(args, trained, seed) / "metrics.jsonl", args.out / result / f"seed{seed}")


# The dev figures of every evaluation during training, committed beside the result (dev/curve.jsonl):
# best/ is one point of that curve, picked on the same dev set, and a spike can be picked; the
# curve's level over the later epochs (--curves) is the steadier measure of a recipe.
CURVE_KEYS = ("step", "epoch", "phase", "ner_f1", "rel_strict_f1")
CURVE_FILE = "curve.jsonl"


def write_curve(metrics: Path, seed_dir: Path) -> None:
    """The training run's dev evaluations (CURVE_KEYS of each) as ``seed_dir/dev/curve.jsonl``;
    written again after each evaluation step, so results committed before it get theirs."""
    if not metrics.is_file():
        return
    rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line]
    curve = [
        {k: r[k] for k in CURVE_KEYS} for r in rows if r.get("kind") == "eval" and r.get("split") == "dev"
    ]
    if curve:
        (seed_dir / "dev").mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(r) + "\n" for r in curve)
        (seed_dir / "dev" / CURVE_FILE).write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Summary: re-scored from the committed predictions, gold read straight from the data file


# How a mention is told apart: by its text (the product's headline figures) or by its token
# offsets, where each occurrence of a repeated mention is an entity of its own (how span-based
# extractors score, and so the figures to set beside theirs); --keys picks one. Each keying's
# suffix of its figures in metrics.json (anchoralign/metrics.py writes them; this script reads
# the gold itself and does not import the product).
KEYS = {"text": "", "offsets": "_offsets"}


def gold_split(data_dir: Path, split: str, by: str = "text") -> dict[str, tuple[set, set]]:
    """Gold (entities, strict relations) of conll04_<split>.json, read directly, by ``orig_id``."""
    sentences = json.loads((data_dir / "conll04" / f"conll04_{split}.json").read_text(encoding="utf-8"))
    return {str(s["orig_id"]): keys(s["tokens"], s["entities"], s["relations"], by) for s in sentences}


def keys(tokens: list[str], entities: list[dict], relations: list[dict], by: str = "text") -> tuple[set, set]:
    def mention(e: dict) -> tuple[str | tuple[int, int], str]:
        at = (e["start"], e["end"]) if by == "offsets" else " ".join(tokens[e["start"] : e["end"]])
        return at, e["type"]

    ents = {mention(e) for e in entities}
    rels = {(*mention(entities[r["head"]]), *mention(entities[r["tail"]]), r["type"]) for r in relations}
    return ents, rels


def f1(pred: list[set], gold: list[set]) -> float:
    tp = sum(len(p & g) for p, g in zip(pred, gold, strict=True))
    n_pred, n_gold = sum(map(len, pred)), sum(map(len, gold))
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    return 100 * 2 * p * r / (p + r) if p + r else 0.0


def predicted(predictions: Path, gold: dict[str, tuple[set, set]], by: str = "text") -> list[tuple[set, set]]:
    """The (entities, strict relations) of a predictions file (ids ``conll04-<split>-<orig_id>``)
    in the order of ``gold``, keyed as ``gold`` is (``by``); a sentence it lacks predicts nothing."""
    found = {}
    for line in predictions.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        found[rec["id"].rsplit("-", 1)[1]] = keys(rec["tokens"], rec["entities"], rec["relations"], by)
    return [found.get(orig, (set(), set())) for orig in gold]


def rescore(predictions: Path, gold: dict[str, tuple[set, set]], by: str = "text") -> tuple[float, float]:
    """NER F1 and relation strict F1 of a predictions file, ``gold`` keyed ``by``."""
    pred = predicted(predictions, gold, by)
    gold_sets = list(gold.values())
    return f1([p[0] for p in pred], [g[0] for g in gold_sets]), f1(
        [p[1] for p in pred], [g[1] for g in gold_sets]
    )


# What --errors sorts each gold relation (and each false one) into, in the order of its table.
ERROR_KINDS = (
    "found",
    "both entities found",  # the relation not written, or with another type or direction
    "a type wrong",  # both mentions found, one with another type
    "a mention missed",
    "false, gold entities",  # a relation the gold lacks between two gold entities
    "false, other entity",
)


def relation_errors(pred: list[tuple[set, set]], gold: list[tuple[set, set]]) -> dict[str, int]:
    """Each gold relation of each sentence as found or by why it was missed, and each false one by
    whether both its entities are gold ones; entities and relations as ``keys`` gives them."""
    counts = dict.fromkeys(ERROR_KINDS, 0)
    for (p_ents, p_rels), (g_ents, g_rels) in zip(pred, gold, strict=True):
        p_texts = {text for text, _ in p_ents}
        for h_text, h_type, t_text, t_type, rel in g_rels:
            if (h_text, h_type, t_text, t_type, rel) in p_rels:
                kind = "found"
            elif {(h_text, h_type), (t_text, t_type)} <= p_ents:
                kind = "both entities found"
            elif {h_text, t_text} <= p_texts:
                kind = "a type wrong"
            else:
                kind = "a mention missed"
            counts[kind] += 1
        for h_text, h_type, t_text, t_type, _ in p_rels - g_rels:
            gold_pair = {(h_text, h_type), (t_text, t_type)} <= g_ents
            counts["false, gold entities" if gold_pair else "false, other entity"] += 1
    return counts


def errors(args: argparse.Namespace, name: str) -> None:
    """``relation_errors`` of each seed of result ``name``, on test and on dev where committed."""
    print(f"{name}: gold relations found or missed, and false ones{keyed(args)}")
    print("| split | seed | " + " | ".join(ERROR_KINDS) + " |")
    print("|---" * (2 + len(ERROR_KINDS)) + "|")
    for split, sub in SPLIT_FOLDERS.items():
        gold = gold_split(args.data_dir, split, args.keys)
        seeds = sorted(d for d in (args.out / name).glob("seed*") if finished(d / sub))
        if split == "test" and not seeds:
            raise SystemExit(f"--errors: no finished results under {args.out / name}")
        for seed_dir in seeds:
            counts = relation_errors(
                predicted(seed_dir / sub / "predictions.jsonl", gold, args.keys), list(gold.values())
            )
            cells = " | ".join(str(counts[k]) for k in ERROR_KINDS)
            print(f"| {split} | {seed_dir.name.removeprefix('seed')} | {cells} |")


def finished(seed_dir: Path) -> bool:
    """Whether a result folder is complete: ``metrics.json`` is written after ``predictions.jsonl``,
    so a folder without it is an evaluation still running, or stopped."""
    return (seed_dir / "metrics.json").is_file()


# What --compare and --curves compare: index into a re-scored sentence's (entities, strict
# relations), its name, and its key in metrics.json and curve.jsonl.
COMPARED = {"rel": (1, "relation strict F1", "rel_strict_f1"), "ner": (0, "NER F1", "ner_f1")}


# Student's t distribution's 0.975 quantile by degrees of freedom: a two-sided 95% interval for the
# mean of a few seeds' figures (more than 30 degrees of freedom take 30's, a little wider).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
T_975 += (2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086)
T_975 += (2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def seed_interval(values: list[float]) -> tuple[float, float] | None:
    """(low, high): the 95% t interval of the mean of ``values``, one per seed (training draws
    taken as normal around the recipe's mean); None for fewer than two."""
    if len(values) < 2:
        return None
    half = T_975[min(len(values) - 1, len(T_975)) - 1] * statistics.stdev(values) / len(values) ** 0.5
    mean = statistics.mean(values)
    return mean - half, mean + half


def keyed(args: argparse.Namespace) -> str:
    """How a figure's mentions are told apart, said where it is not by their text."""
    return "" if args.keys == "text" else f" by {args.keys}"


def compare(args: argparse.Namespace, a: str, b: str, resamples: int = 2000) -> None:
    """Relation strict F1 (or NER F1, ``--metric ner``) of setting ``a`` minus ``b``, paired by
    seed, with a 95% interval from resampling the sentences (the same resample for every seed):
    how much of a difference the 288 test (231 dev) sentences alone could make, which the
    seed-to-seed spread does not show. Test, then dev where both settings have dev results: a
    difference that only one split shows is a property of that split's sentences as much as of
    the settings."""
    for split, sub in SPLIT_FOLDERS.items():
        seeds = sorted(
            d.name
            for d in (args.out / a).glob("seed*")
            if finished(d / sub) and finished(args.out / b / d.name / sub)
        )
        if not seeds:
            if split == "test":
                raise SystemExit(f"--compare: no seed has finished results under both {a} and {b}")
            print(f"{a} - {b}: no seed has {split} results under both")
            continue
        low, diffs, high = paired_difference(args, a, b, split, seeds, resamples)
        over_seeds = seed_interval(diffs)
        seeds_part = f"; over the seeds {over_seeds[0]:+.2f} to {over_seeds[1]:+.2f}" if over_seeds else ""
        print(
            f"{a} - {b}: {COMPARED[args.metric][1]}{keyed(args)} {statistics.mean(diffs):+.2f} (mean of {len(seeds)} "
            f"seeds paired); 95% interval over {split} sentences {low:+.2f} to {high:+.2f}{seeds_part}"
        )


def paired_difference(
    args: argparse.Namespace, a: str, b: str, split: str, seeds: list[str], resamples: int
) -> tuple[float, list[float], float]:
    """(low, differences, high): ``compare``'s difference on one split, seed by seed, with the 95%
    interval of their mean over resampled sentences."""
    gold = gold_split(args.data_dir, split, args.keys)
    sub = SPLIT_FOLDERS[split]

    at = COMPARED[args.metric][0]

    def counts(setting: str, seed: str) -> np.ndarray:  # per sentence: tp, n_pred, n_gold
        pred = predicted(args.out / setting / seed / sub / "predictions.jsonl", gold, args.keys)
        rows = [
            (len(p[at] & g[at]), len(p[at]), len(g[at])) for p, g in zip(pred, gold.values(), strict=True)
        ]
        return np.array(rows, dtype=np.int64)

    pairs = [(counts(a, s), counts(b, s)) for s in seeds]

    def micro_f1(c: np.ndarray) -> np.ndarray:  # (..., sentences, 3) -> F1 over the sentences
        tp, n_pred, n_gold = c[..., 0].sum(-1), c[..., 1].sum(-1), c[..., 2].sum(-1)
        return 100 * 2 * tp / np.maximum(n_pred + n_gold, 1)

    diffs = [float(micro_f1(x) - micro_f1(y)) for x, y in pairs]
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(gold), size=(resamples, len(gold)))
    boot = np.mean([micro_f1(x[picks]) - micro_f1(y[picks]) for x, y in pairs], axis=0)
    low, high = np.percentile(boot, [2.5, 97.5])
    return float(low), diffs, float(high)


def summary(args: argparse.Namespace) -> None:
    """Mean ± sd over seeds of each setting with the 95% t interval of the mean (``seed_interval``),
    each seed's relation F1, and the difference from ``full`` paired by seed (the settings of one
    seed share its cross-entropy checkpoint, so the paired difference is the comparison the
    protocol is built for); dev relation F1 where a setting's dev results are committed."""
    scores = {split: checked_scores(args, split) for split in SPLIT_FOLDERS}
    results, dev = scores["test"], scores["dev"]

    def cell(values: list[float]) -> str:  # one seed: no spread to show
        sd = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.2f}{sd}"

    def interval(values: list[float]) -> str:
        bounds = seed_interval(values)
        return f"{bounds[0]:.2f} to {bounds[1]:.2f}" if bounds else "-"

    if args.keys != "text":
        print(f"figures{keyed(args)}")
    print(
        "| setting | seeds | NER F1 | relation strict F1 | relation boundary F1 "
        "| 95% interval of the mean, NER; relation | relation strict F1 by seed "
        "| vs full, paired | dev relation strict F1 (seeds) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    full = results.get("full", {})
    for name, by_seed in results.items():
        cols = list(zip(*by_seed.values(), strict=True))
        seeds = ", ".join(f"{s.removeprefix('seed')}: {v[1]:.2f}" for s, v in by_seed.items())
        shared = [s for s in by_seed if s in full]
        paired = (
            cell([by_seed[s][1] - full[s][1] for s in shared]) + f" ({len(shared)})"
            if shared and name != "full"
            else ""
        )
        dev_rel = [v[1] for v in dev.get(name, {}).values()]
        dev_cell = f"{cell(dev_rel)} ({len(dev_rel)})" if dev_rel else ""
        print(
            f"| {name} | {len(by_seed)} | {cell(cols[0])} | {cell(cols[1])} | {cell(cols[2])} "
            f"| {interval(list(cols[0]))}; {interval(list(cols[1]))} | {seeds} "
            f"| {paired} | {dev_cell} |"
        )


def curve_level(curve: dict[int, float], from_epoch: int) -> tuple[float, float, float]:
    """(mean, sd, max) of a dev curve (epoch -> F1) over its epochs from ``from_epoch`` on."""
    values = [v for e, v in curve.items() if e >= from_epoch]
    if not values:
        raise ValueError(f"no evaluation at or after epoch {from_epoch}")
    return statistics.mean(values), statistics.pstdev(values), max(values)


def read_curve(path: Path, key: str) -> dict[int, float]:
    """epoch -> ``key`` of a committed ``curve.jsonl``."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return {int(r["epoch"]): float(r[key]) for r in rows}


def curves(args: argparse.Namespace, names: list[str]) -> None:
    """The committed dev curves of one or two results, seed by seed: the mean, sd and max of dev
    F1 over the later epochs (from ``--from-epoch``; default the second half of the epochs the
    results share), and for two results the difference of the means paired by seed, over the
    same epochs of both."""
    key = COMPARED[args.metric][2]
    seeds = sorted(d.name for d in (args.out / names[0]).glob("seed*"))
    by_seed = {
        s: [read_curve(args.out / n / s / "dev" / CURVE_FILE, key) for n in names]
        for s in seeds
        if all((args.out / n / s / "dev" / CURVE_FILE).is_file() for n in names)
    }
    if not by_seed:
        raise SystemExit(f"--curves: no seed has a committed dev/{CURVE_FILE} under {' and '.join(names)}")
    print(f"dev {COMPARED[args.metric][1]} over the training curve, later epochs")
    print(
        "| seed | epochs | "
        + " | ".join(f"{n}: mean ± sd (max)" for n in names)
        + (" | difference |" if len(names) == 2 else " |")
    )
    print("|---" * (2 + len(names) + (len(names) == 2)) + "|")
    means: list[list[float]] = []
    for seed, runs in by_seed.items():
        common = sorted(set(runs[0]).intersection(*runs[1:]))
        start = args.from_epoch or common[len(common) // 2]
        levels = [curve_level({e: r[e] for e in common}, start) for r in runs]
        means.append([m for m, _, _ in levels])
        cells = [f"{m:.2f} ± {sd:.2f} ({top:.2f})" for m, sd, top in levels]
        diff = [f"{levels[0][0] - levels[1][0]:+.2f}"] if len(names) == 2 else []
        print(f"| {seed.removeprefix('seed')} | {start}-{common[-1]} | " + " | ".join([*cells, *diff]) + " |")
    over = [statistics.mean(col) for col in zip(*means, strict=True)]
    diff = [f"{statistics.mean(a - b for a, b in means):+.2f}"] if len(names) == 2 else []
    print(f"| mean of {len(means)} | | " + " | ".join([*(f"{m:.2f}" for m in over), *diff]) + " |")


def checked_scores(args: argparse.Namespace, split: str) -> dict[str, dict[str, tuple[float, float, float]]]:
    """setting -> seed -> (NER F1, relation strict F1, relation boundary F1) of ``split``, keyed as
    ``--keys`` says, each re-scored from its predictions; stops at a ``metrics.json`` the
    predictions do not reproduce, by text or (where it has them) by offsets."""
    golds = {by: gold_split(args.data_dir, split, by) for by in KEYS}
    sub = SPLIT_FOLDERS[split]
    results: dict[str, dict[str, tuple[float, float, float]]] = {}
    # A link is another name of a result, not a result of its own: conll04-rerun's protocol names
    # of the results in conll04/, and no_pretrain (issue 10's name of full) in conll04-2026-11-30/.
    for folder in sorted(p for p in args.out.iterdir() if p.is_dir() and not p.is_symlink()):
        for seed_dir in sorted(folder.glob("seed*")):
            where = seed_dir / sub
            if not finished(where):
                if split == "test":  # dev results are committed for the later settings only
                    print(
                        f"{seed_dir}: no metrics.json (an evaluation running or stopped): left out",
                        file=sys.stderr,
                    )
                continue
            metrics = json.loads((where / "metrics.json").read_text(encoding="utf-8"))
            figures = {}
            for by, gold in golds.items():
                suffix = KEYS[by]
                if f"ner{suffix}_f1" not in metrics:  # written before the offsets figures were
                    continue
                ner, rel = rescore(where / "predictions.jsonl", gold, by)
                written = metrics[f"ner{suffix}_f1"], metrics[f"rel_strict{suffix}_f1"]
                if abs(ner - written[0]) > 0.01 or abs(rel - written[1]) > 0.01:
                    raise SystemExit(
                        f"{where}: re-scored {ner:.2f}/{rel:.2f} by {by} differ from metrics.json"
                    )
                figures[by] = (ner, rel, metrics[f"rel_boundary{suffix}_f1"])
            if args.keys not in figures:
                raise SystemExit(
                    f"{where}: its metrics.json has no figures by {args.keys}; evaluate it again"
                )
            results.setdefault(folder.name, {})[seed_dir.name] = figures[args.keys]
    return results


def build_parser() -> argparse.ArgumentParser:
    """The command line (the README's commands are parsed with it by the tests)."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds")
    p.add_argument(
        "--settings",
        default=",".join(SETTINGS),
        help=f"training settings ({', '.join(TRAINED)}) or decoding ablations to evaluate "
        f"on their checkpoints ({', '.join(DECODING)}; without pretraining they follow their setting)",
    )
    p.add_argument(
        "--steps",
        default="ce,align,eval",
        help=f"{', '.join(STEPS)} (comma-separated)",
    )
    p.add_argument(
        "--pretrain",
        metavar="NAME=DIR",
        help="pretrain on the augment corpus in DIR first; runs and results are named pretrain_NAME",
    )
    p.add_argument(
        "--pretrain-setting",
        choices=PRETRAIN_SETTINGS,
        help="pretraining's alignment phase changed (runs and results named pretrain_NAME_SETTING): "
        "noalign, cross-entropy only; gate, the NER-RE term only where the NER teacher is right",
    )
    p.add_argument(
        "--pretrain-epochs",
        default=PRETRAIN_EPOCHS,
        help=f"epochs of the three pretraining phases (default {PRETRAIN_EPOCHS}, for 1,000 samples)",
    )
    p.add_argument(
        "--ce-epochs",
        type=int,
        help=f"stage 1 in N epochs, schedule and all (default: {CE_STOP_AFTER_EPOCH} of a 30-epoch schedule); "
        "give the runs their own name (--pretrain NAME=DIR)",
    )
    p.add_argument(
        "--heads",
        type=int,
        default=1,
        metavar="K",
        help="relation heads fitted side by side and averaged by the head step (results named relation_headK if K > 1)",
    )
    p.add_argument(
        "--span-layers",
        type=int,
        default=SPAN_LAYERS,
        metavar="K",
        help="the span step's head gets its own fine-tuned copy of the encoder's top K layers "
        f"(fit-span-head --layers; default {SPAN_LAYERS}; results named span_fit_topK, span_fit for 0)",
    )
    p.add_argument(
        "--relation-layers",
        type=int,
        default=RELATION_LAYERS,
        metavar="K",
        help="the head step's relation head gets its own fine-tuned copy of the encoder's top K layers "
        f"(fit-relation-head --layers; default {RELATION_LAYERS}; results named relation_head_topK for K > 0)",
    )
    p.add_argument(
        "--ce-stop-after",
        type=int,
        default=CE_STOP_AFTER_EPOCH,
        metavar="EPOCH",
        help=f"stop stage 1 after this epoch of its 30-epoch schedule (default {CE_STOP_AFTER_EPOCH}): replays a "
        "stage 1 up to where a selection rule peaked on a run of the same seed (the training does not depend on the rule)",
    )
    p.add_argument(
        "--model",
        choices=MODELS,
        help="train both fine-tuning stages with this model variant (pretraining stays shared); "
        "runs and results are named [pretrain_NAME_]with_VARIANT",
    )
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "quality" / "conll04", help="run folders")
    p.add_argument(
        "--out",
        type=Path,
        default=REPO / "benchmarks" / "quality" / "conll04-rerun",
        help="committed results, by result name (default benchmarks/quality/conll04-rerun; the issue's "
        "names of the recipe's results are in benchmarks/quality/conll04)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument("--summary", action="store_true", help="print the table of the committed results")
    p.add_argument(
        "--keys",
        choices=KEYS,
        default="text",
        help="what --summary, --compare and --errors score by: mention text (the product's figures, "
        "the default) or token offsets (each occurrence of a repeated mention its own, as span-based "
        "extractors are scored); --summary checks metrics.json both ways",
    )
    p.add_argument(
        "--compare",
        metavar="A,B",
        help="relation F1 of result A minus B, paired by seed, with a 95%% interval from resampling test (and dev) sentences",
    )
    p.add_argument(
        "--curves",
        metavar="A[,B]",
        help="the committed dev curves of result A (and B, paired by seed): mean, sd and max over the later epochs",
    )
    p.add_argument(
        "--errors",
        metavar="NAME",
        help="result NAME's gold relations by why they were missed, and its false ones by their entities",
    )
    p.add_argument(
        "--from-epoch",
        type=int,
        metavar="E",
        help="--curves from this epoch on (default: the second half of the epochs evaluated)",
    )
    p.add_argument(
        "--metric", choices=COMPARED, default="rel", help="what --compare and --curves compare (default rel)"
    )
    return p


def main() -> None:
    p = build_parser()
    args = p.parse_args()
    args.data_dir = args.data_dir.resolve()
    if args.span_layers < 0:
        p.error("--span-layers: 0 or more")
    if args.relation_layers < 0:
        p.error("--relation-layers: 0 or more")
    if args.ce_epochs is not None and args.ce_epochs < 3:
        p.error("--ce-epochs: at least 3 (2 of curriculum warm-up, then the whole training set)")
    if not 1 <= args.ce_stop_after <= 30 or (
        args.ce_epochs is not None and args.ce_stop_after != CE_STOP_AFTER_EPOCH
    ):
        p.error(
            "--ce-stop-after: an epoch of the 30-epoch stage 1 (1 to 30), not with --ce-epochs, which is never stopped"
        )
    args.pretrained, args.corpus = "", None
    if args.pretrain:
        name, _, corpus = args.pretrain.partition("=")
        args.pretrained, args.corpus = f"pretrain_{name}", Path(corpus).resolve()
        if args.pretrain_setting:
            args.pretrained += f"_{args.pretrain_setting}"
    elif args.pretrain_setting:
        p.error("--pretrain-setting: with --pretrain NAME=DIR")
    variant = f"with_{args.model}" if args.model else ""
    args.prefix = "_".join(filter(None, [args.pretrained, variant]))
    if args.summary:
        summary(args)
        return
    if args.compare:
        a, _, b = args.compare.partition(",")
        compare(args, a, b)
        return
    if args.errors:
        errors(args, args.errors)
        return
    if args.curves:
        names = [n for n in args.curves.split(",") if n]
        if not 1 <= len(names) <= 2:
            p.error("--curves: one result, or two to compare (A,B)")
        curves(args, names)
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = [s for s in args.settings.split(",") if s]
    unknown = [s for s in settings if s not in {**TRAINED, **DECODING}]
    if unknown:
        p.error(f"--settings: unknown {', '.join(unknown)} (known: {', '.join([*TRAINED, *DECODING])})")
    steps = set(args.steps.split(","))
    if steps - set(STEPS):
        p.error(f"--steps: unknown {', '.join(sorted(steps - set(STEPS)))} (known: {', '.join(STEPS)})")
    for seed in seeds:
        if "pretrain" in steps and args.pretrained:
            pretrain(args, seed)
            result = f"{args.pretrained}_{PRETRAINED}"  # the model stage 1 starts from
            evaluate(args, PRETRAINED, "pretrain", seed, [], checkpoint="final", result=result)
        if "ce" in steps:
            train(args, "ce", seed)
        if "ce_heads" in steps:
            fit_ce_heads(args, seed)
        for setting in settings:
            if setting in DECODING:  # asked for by name: evaluated below
                continue
            if "align" in steps:
                train(args, setting, seed)
            if "eval" in steps:
                evaluate(args, setting, setting, seed, [])
            base = setting
            if "span" in steps:
                base = fitted_setting(setting, span_fit(args))
                fit_span(args, setting, seed)
                evaluate(args, base, base, seed, [])
            if "head" in steps:
                fit_head(args, base, seed, trained_head=setting in RELATION_HEADS)
                name = head_setting(base, args.heads, args.relation_layers)
                evaluate(args, name, name, seed, [])
        if "eval" in steps:
            for name, (trained, flags) in DECODING.items():
                # After pretraining only ce_only unless asked for: what the second stage adds.
                if name in settings or trained == "ce" or (trained in settings and not args.pretrained):
                    evaluate(args, name, trained, seed, flags)


if __name__ == "__main__":
    main()
