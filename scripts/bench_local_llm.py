"""Throughput and yield of the embedded LLM (`augment run --llm local`) on this machine.

Each setting runs the real runner (client, journal, parsing, synthesis) on the first ``--sources``
sources of the seeded order, into a fresh folder, against a llama.cpp server started with that
setting's options; settings run one after the other under the same conditions. Prints one JSON
object per setting and a markdown table for BENCHMARKS.md.

    python scripts/bench_local_llm.py --data-dir ../shared/data --sources 6 \\
        --setting cache=0 --setting cache=256

``--raw-speed 2/2,1/1`` instead measures llama.cpp alone (no server, no runner) with N answer
/ M prompt threads, each in a fresh process: prompt and answer tokens a second.

``--show-sample DIR`` instead prints ``--n`` samples of a built corpus picked at random
(``--seed``), each with its entities and relations written out, for counting the semantically
wrong ones by hand (BENCHMARKS.md).

A setting is comma-separated key=value pairs: ``cache`` (MiB of the server's RAM state cache, 0
for none), ``concurrency``, ``max_tokens`` (a number or ``auto``), ``temperature``, ``threads``,
``variants``, ``verify`` (0/1), ``server_seed`` (llama.cpp's sampling seed; default ``--seed``), ``mention_prompt``, ``context_prompt``, ``model`` (a
``--local-model`` name) and ``gguf``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from augment import runner
from augment.config import AugmentConfig
from augment.local_llm import LocalLLMServer, default_threads
from augment.local_models import LOCAL_MODELS

DEFAULTS: dict[str, Any] = {"cache": 64, "concurrency": 2, "threads": 0, "model": "qwen"}


def parse_setting(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        out[key.strip()] = value.strip()
    return out


def run_setting(args: argparse.Namespace, setting: dict[str, Any], out: Path) -> dict[str, Any]:
    s = {**DEFAULTS, **setting}
    gguf = Path(s["gguf"]) if s.get("gguf") else LOCAL_MODELS[s["model"]].locate()
    cfg_values: dict[str, Any] = {
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "llm": "local",
        "gguf": str(gguf),
        "max_sources": args.sources,
        "cap": 10**6,
        "concurrency": int(s["concurrency"]),
        "out": str(out),
        "seed": args.seed,
    }
    for key in ("temperature",):
        if key in s:
            cfg_values[key] = float(s[key])
    for key in ("variants",):
        if key in s:
            cfg_values[key] = int(s[key])
    for key in ("max_tokens", "mention_prompt", "context_prompt"):
        if key in s:
            cfg_values[key] = s[key]
    if "verify" in s:
        cfg_values["verify"] = s["verify"] in ("1", "true", "yes")
    cfg = AugmentConfig.model_validate(cfg_values).resolved()
    threads = int(s["threads"]) or default_threads()
    started = time.perf_counter()
    server_seed = int(s.get("server_seed", args.seed))
    with LocalLLMServer(gguf, n_threads=threads, seed=server_seed, cache_bytes=int(s["cache"]) << 20) as srv:
        startup = time.perf_counter() - started
        api_cfg = cfg.model_copy(update={"llm": "api", "gguf": None, "base_url": srv.base_url})
        t0 = time.perf_counter()
        summary = runner.run(api_cfg, fsync=False)
        wall = time.perf_counter() - t0
    st = summary.stats
    answered = st["requests"]["answered"]
    accepted = {k: v["accepted"] for k, v in st["variants"].items()}
    rejected = sum(st["rejected_by_reason"].values())
    variants = sum(accepted.values()) + rejected
    samples = st["samples"]["selected"]
    return {
        "setting": {k: v for k, v in s.items()},
        "server_start_s": round(startup, 1),
        "wall_s": round(wall, 1),
        "requests": answered,
        "s_per_request": round(wall / answered, 2) if answered else None,
        "prompt_tokens_per_request": round(st["tokens"]["prompt"] / answered) if answered else None,
        "completion_tokens_per_request": round(st["tokens"]["completion"] / answered) if answered else None,
        "accepted": accepted,
        "rejected_by_reason": st["rejected_by_reason"],
        "accepted_share": round(sum(accepted.values()) / variants, 3) if variants else None,
        "samples": samples,
        "samples_per_hour": round(samples / wall * 3600) if wall else None,
        "verification": st.get("verification"),
        "load_1min_after": round(os.getloadavg()[0], 2),
    }


RAW_SPEED = """
import os, sys, time, llama_cpp
n, nb = int(sys.argv[2]), int(sys.argv[3])
llm = llama_cpp.Llama(sys.argv[1], n_ctx=2048, n_threads=n, n_threads_batch=nb, verbose=False)
toks = llm.tokenize(("word " * 300).encode())
t = time.time(); llm.eval(toks); tp = time.time() - t
llm.reset()
t = time.time(); out = llm("Write three sentences about ships.\\n", max_tokens=60, temperature=0.7); tg = time.time() - t
print(f"threads {n}/{nb}: prompt {len(toks) / tp:.1f} tokens/s, answer "
      f"{out['usage']['completion_tokens'] / tg:.1f} tokens/s, load {os.getloadavg()[0]:.2f}", flush=True)
"""


def raw_speed(pairs: str) -> None:
    import subprocess
    import sys

    gguf = LOCAL_MODELS["qwen"].locate()
    for pair in pairs.split(","):
        n, nb = pair.split("/")
        subprocess.run(
            [sys.executable, "-c", RAW_SPEED, str(gguf), n, nb], check=True, stderr=subprocess.DEVNULL
        )


def show_sample(folder: Path, n: int, seed: int) -> None:
    import random

    records = [json.loads(line) for line in (folder / "unmasked.jsonl").read_text().splitlines()]
    for k, rec in enumerate(random.Random(seed).sample(records, min(n, len(records))), start=1):
        tokens, ents = rec["tokens"], rec["entities"]
        marked = list(tokens)
        for i, e in enumerate(ents):
            marked[e["start"]] = f"[{marked[e['start']]}"
            marked[e["end"] - 1] = f"{marked[e['end'] - 1]}]{i}:{e['type']}"
        mention = [" ".join(tokens[e["start"] : e["end"]]) for e in ents]
        rels = "; ".join(f"{mention[r['head']]} {r['type']} {mention[r['tail']]}" for r in rec["relations"])
        print(f"{k}. {rec['id']} ({rec['origin']})\n   {' '.join(marked)}\n   relations: {rels or '-'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="conll04")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--sources", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--setting", action="append", default=[], help="key=value,...; repeat for each")
    p.add_argument("--keep", help="folder to keep each setting's run in (default: a temporary one)")
    p.add_argument("--show-sample", metavar="DIR", help="print --n random samples of the corpus in DIR")
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--raw-speed", metavar="N/M,...", help="llama.cpp alone with N answer / M prompt threads")
    args = p.parse_args()
    if args.raw_speed:
        raw_speed(args.raw_speed)
        return
    if args.show_sample:
        show_sample(Path(args.show_sample), args.n, args.seed)
        return
    settings = [parse_setting(t) for t in (args.setting or [""])]
    print(
        f"# {dt.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.2f} at start",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.keep) if args.keep else Path(tmp)
        for i, setting in enumerate(settings):
            row = run_setting(args, setting, base / f"setting{i}")
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\n| setting | s/request | prompt tok | answer tok | accepted | samples | samples/hour |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        name = ", ".join(f"{k}={v}" for k, v in r["setting"].items())
        acc = f"{sum(r['accepted'].values())} ({r['accepted_share']:.0%})" if r["accepted_share"] else "0"
        print(
            f"| {name} | {r['s_per_request']} | {r['prompt_tokens_per_request']} | "
            f"{r['completion_tokens_per_request']} | {acc} | {r['samples']} | {r['samples_per_hour']} |"
        )


if __name__ == "__main__":
    main()
