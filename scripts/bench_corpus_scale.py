"""Corpus-scale benchmark: pretraining on a corpus of a million samples, cold and from the cache.

Builds a corpus of ``--samples`` records (``masked.jsonl`` + ``unmasked.jsonl``, the layout
``augment run`` writes) by repeating CoNLL04's training sentences under new ids, then runs the
stage as a user would, twice, with an empty training-set cache (``$ANCHORALIGN_CACHE``, here a
folder of the work directory) the first time:

    python pretrain/run.py --config pretrain/configs/conll04.yaml --model.backbone=tiny \\
        --trainer.max-steps=2 --data-dir DATA --data.corpus-dir CORPUS --output-dir RUN ...

Reported for each run: the seconds from the start of the process to the start of training (the
"phase etu (step 0)" line of ``train.log``) and to the end of the first optimizer step (its row
in ``metrics.jsonl``, written at every step here), the peak resident memory of the whole process
tree (sampled every 50 ms) and whether the training sets came from the cache. The targets: first
step within 180 s and peak under 3 GiB on the 2-CPU development machine.

    python scripts/bench_corpus_scale.py --data-dir ../shared/data                 # 1,000,000 samples
    python scripts/bench_corpus_scale.py --data-dir ../shared/data --samples 20000 --json out.json
    python scripts/bench_corpus_scale.py --data-dir ../shared/data --new-mentions     # new words everywhere
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
GIB = 1 << 30


def make_corpus(out: Path, data_dir: str, n: int, new_mentions: bool = False) -> None:
    """``n`` records in each corpus file: CoNLL04's training sentences in turn, ids ``bench-<i>``.

    With ``new_mentions``, every word of an unmasked mention gets the record's number appended
    (``Smith`` -> ``Smith417``), so that each record brings words never seen before, as rewritten
    mentions do; the masked corpus hides mentions and is the same either way.
    """
    from anchoralign.datasets import load_split
    from augment.synthesize import mask_sample

    train = load_split("conll04", "train", data_dir)
    pairs = [(s.to_record(), mask_sample(s).to_record()) for s in train]
    out.mkdir(parents=True, exist_ok=True)
    with (
        (out / "unmasked.jsonl").open("w", encoding="utf-8") as fu,
        (out / "masked.jsonl").open("w", encoding="utf-8") as fm,
    ):
        for i in range(n):
            unmasked, masked = pairs[i % len(pairs)]
            extra = {"id": f"bench-{i}", "source_id": unmasked["id"], "origin": "cross"}
            tokens = list(unmasked["tokens"])
            if new_mentions:
                for e in unmasked["entities"]:
                    tokens[e["start"] : e["end"]] = [f"{w}{i}" for w in tokens[e["start"] : e["end"]]]
            fu.write(json.dumps({**unmasked, **extra, "tokens": tokens}, ensure_ascii=False) + "\n")
            fm.write(json.dumps({**masked, **extra}, ensure_ascii=False) + "\n")


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a child that has just exited
            total += p.memory_info().rss
    return total


def first_step_row(run: Path) -> bool:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return False
    return any(json.loads(line).get("kind") == "train" for line in path.read_text().splitlines() if line)


def run_once(args: argparse.Namespace, corpus: Path, run: Path, cache: Path) -> dict[str, Any]:
    shutil.rmtree(run, ignore_errors=True)
    command = [
        sys.executable, "pretrain/run.py", "--config", "pretrain/configs/conll04.yaml",
        "--model.backbone=tiny", "--trainer.max-steps=2", f"--data-dir={args.data_dir}",
        f"--data.corpus-dir={corpus}", f"--output-dir={run}",
        # Measurement: a metrics row at every step; a short final evaluation after the two steps.
        "--trainer.log-every=1", "--trainer.progress=false", "--data.limit-eval=8", "--decode.max-len=24",
    ]  # fmt: skip
    if args.new_mentions:
        command.append("--model.max-length=512")  # numbered mentions take more sub-words
    env = {**os.environ, "ANCHORALIGN_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    env.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ps = psutil.Process(proc.pid)
    peak, training, first = 0, None, None
    while proc.poll() is None:
        peak = max(peak, tree_rss(ps))
        now = time.perf_counter() - start
        if training is None and "phase etu (step 0)" in _text(run / "train.log"):
            training = now
        if first is None and training is not None and first_step_row(run):
            first = now
        time.sleep(0.05)
    output = proc.stdout.read().decode("utf-8", "replace") if proc.stdout else ""
    if proc.returncode != 0:
        raise SystemExit(f"the run failed ({proc.returncode}):\n{output[-4000:]}")
    log = _text(run / "train.log")
    return {
        "seconds_to_training": round(training, 1) if training is not None else None,
        "seconds_to_first_step_done": round(first, 1) if first is not None else None,
        "seconds_total": round(time.perf_counter() - start, 1),
        "peak_rss_gib": round(peak / GIB, 2),
        "from_cache": log.count("from the cache"),
        "built": log.count("tokenised in"),
        "cache_lines": [
            line.split(" ", 2)[2]
            for line in log.splitlines()
            if "samples from the cache" in line or "tokenised in" in line
        ],
        "command": " ".join(command[1:]),
    }


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.is_file() else ""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("ANCHORALIGN_DATA", "../shared/data"))
    p.add_argument("--samples", type=int, default=1_000_000, help="records in each corpus file")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "bench-corpus-scale")
    p.add_argument(
        "--new-mentions",
        action="store_true",
        help="every unmasked record brings new words (its mentions numbered): the tokenizer's worst case",
    )
    p.add_argument("--keep", action="store_true", help="keep the corpus and the cache afterwards")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)

    kind = "-new-mentions" if args.new_mentions else ""
    corpus, cache = args.work / f"corpus-{args.samples}{kind}", args.work / "cache"
    if not (corpus / "unmasked.jsonl").is_file():
        print(f"building the corpus in {corpus} ...", flush=True)
        make_corpus(corpus, args.data_dir, args.samples, args.new_mentions)
    shutil.rmtree(cache, ignore_errors=True)
    size = sum(f.stat().st_size for f in corpus.glob("*.jsonl"))
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.node()}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / GIB:.0f} GiB",
        "load_average": [round(x, 1) for x in os.getloadavg()],
        "samples_per_file": args.samples,
        "new_mentions": args.new_mentions,
        "corpus_bytes": size,
    }
    for name in ("cold", "cached"):
        print(f"{name} run ...", flush=True)
        results[name] = run_once(args, corpus, args.work / f"run-{name}", cache)
        print(json.dumps(results[name], indent=2), flush=True)
    results["cache_bytes"] = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    print(json.dumps({k: v for k, v in results.items() if k not in ("cold", "cached")}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
