"""Benchmark of the corpus builder (`augment run`) against a loopback server; prints a markdown
table for BENCHMARKS.md.

Three measurements, each of the real runner (planning, client, journal with fsync, parsing,
synthesis, selection, outputs), never of a stripped-down loop:

1. efficiency: ``--requests`` requests (default 2,000: half as many SciERC sources) at
   ``--concurrency`` (64) against a server that answers after a fixed delay L (0.2 s). The ideal
   wall time is N * L / concurrency; efficiency is that divided by the measured time of the
   request phase (first request sent to last answer journalled), and also of the whole run.
2. cpu: the CPU time that parsing, validation and synthesis take per accepted (synthesised)
   sample, replaying the journal of (1) through the same function the runner uses.
3. memory: peak resident memory of a 10,000-sample SciERC run (L = 0), in a fresh process.

The server runs in its own process so that its threads do not share the runner's interpreter.

    python scripts/bench_augment.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def delay_server(latency: float, variants: int):
    """``python -m augment.scripted_server`` in a child process; yields its base URL."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "augment.scripted_server",
            "--delay",
            str(latency),
            "--variants",
            str(variants),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("listening "):
            raise RuntimeError(f"the delay server did not start: {line!r}")
        yield line.split()[1]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _config(args: argparse.Namespace, url: str, out: Path, **kw: Any):
    from augment.config import AugmentConfig

    base = dict(
        dataset=args.dataset,
        data_dir=args.data_dir,
        base_url=url,
        out=str(out),
        concurrency=args.concurrency,
        timeout=30.0,
        variants=3,
    )
    return AugmentConfig(**{**base, **kw})


def bench_efficiency(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from augment.runner import run

    n_sources = args.requests // 2
    out = work / "efficiency"
    with delay_server(args.latency, 3) as url:
        cfg = _config(args, url, out, cap=10**9, max_sources=n_sources)
        cpu0, t0 = time.process_time(), time.perf_counter()
        summary = run(cfg)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    n = summary.stats["requests"]["answered"]
    ideal = n * args.latency / args.concurrency
    phase = summary.stats["request_phase_s"]
    return {
        "requests": n,
        "ideal_s": ideal,
        "request_phase_s": phase,
        "run_s": wall,
        "efficiency": ideal / phase,
        "efficiency_whole_run": ideal / wall,
        "cpu_s": cpu,
        "samples": summary.stats["samples"]["selected"],
        "out": out,
    }


def bench_cpu(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Replay the journal of the efficiency run through the runner's per-source processing."""
    from augment.config import load_config
    from augment.journal import read_journal
    from augment.plan import make_plan

    cfg = load_config(out / "config.json", {}).resolved()
    plan = make_plan(cfg)
    entries = read_journal(out / "journal.jsonl").entries
    work = []
    for index in plan.order:
        specs = plan.requests(index)
        if all(s.key in entries for s in specs):
            work.append((index, {s.kind: entries[s.key] for s in specs}))
    samples = 0
    cpu0 = time.process_time()
    for index, outcomes in work:
        samples += len(plan.process(index, outcomes).records)
    cpu = time.process_time() - cpu0
    return {
        "sources": len(work),
        "samples": samples,
        "cpu_s": cpu,
        "us_per_sample": 1e6 * cpu / max(samples, 1),
    }


def _current_rss_mib() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_memory_child(args: argparse.Namespace) -> None:
    """Run in a fresh process: a cap-sized run at L = 0; prints JSON with peak RSS of the runner
    and of its processing child (which has exited, and the delay server not yet, when read)."""
    import augment.runner as runner

    base = _current_rss_mib()
    with tempfile.TemporaryDirectory() as tmp, delay_server(0.0, 3) as url:
        t0 = time.perf_counter()
        summary = runner.run(_config(args, url, Path(tmp) / "memory", cap=args.cap))
        wall = time.perf_counter() - t0
        child_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "samples": summary.stats["samples"]["selected"],
                "requests": summary.stats["requests"]["answered"],
                "run_s": wall,
                "peak_rss_mib": peak_kib / 1024,
                "worker_peak_rss_mib": child_kib / 1024,
                "after_imports_rss_mib": base,
            }
        )
    )


def bench_memory(args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", "memory-child", "--cap", str(args.cap)]
    cmd += ["--dataset", args.dataset, "--concurrency", str(args.concurrency)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (load {load}), Python {platform.python_version()}, {platform.system()} {platform.release()}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data-dir", default=os.environ.get("ANCHORALIGN_DATA", str(REPO.parent / "shared" / "data"))
    )
    p.add_argument("--dataset", default="scierc")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--latency", type=float, default=0.2, help="server delay L in seconds")
    p.add_argument("--cap", type=int, default=10_000, help="corpus size of the memory run")
    p.add_argument("--part", choices=["all", "efficiency", "memory", "memory-child"], default="all")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    if args.part == "memory-child":
        bench_memory_child(args)
        return

    started = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    host = machine()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("all", "efficiency"):
            eff = bench_efficiency(args, Path(tmp))
            results["cpu"] = bench_cpu(args, eff.pop("out"))
            results["efficiency"] = eff
    if args.part in ("all", "memory"):
        results["memory"] = bench_memory(args)

    command = "python scripts/bench_augment.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\n`{command.strip()}` ({started}; {host})\n")
    print("| measurement | value |")
    print("|---|---|")
    if "efficiency" in results:
        e = results["efficiency"]
        print(
            f"| efficiency, {e['requests']} requests, concurrency {args.concurrency}, L = {args.latency * 1000:.0f} ms "
            f"| {e['efficiency']:.3f} (ideal {e['ideal_s']:.2f} s, request phase {e['request_phase_s']:.2f} s) |"
        )
        print(
            f"| same, whole run (loading, outputs included) | {e['efficiency_whole_run']:.3f} "
            f"({e['run_s']:.2f} s, {e['cpu_s']:.2f} s CPU) |"
        )
    if "cpu" in results:
        c = results["cpu"]
        print(
            f"| CPU for parsing + validation + synthesis, per accepted sample | {c['us_per_sample']:.0f} us "
            f"({c['samples']} samples from {c['sources']} sources in {c['cpu_s']:.2f} s) |"
        )
    if "memory" in results:
        m = results["memory"]
        print(
            f"| peak RSS, {m['samples']}-sample {args.dataset} run ({m['requests']} requests, L = 0) "
            f"| runner {m['peak_rss_mib']:.0f} MiB ({m['after_imports_rss_mib']:.0f} MiB after imports), "
            f"processing child {m['worker_peak_rss_mib']:.0f} MiB; {m['run_s']:.1f} s |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"command": command, "date": started, "machine": host, **results}, indent=2)
        )


if __name__ == "__main__":
    main()
