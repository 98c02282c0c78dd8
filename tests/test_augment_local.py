"""The embedded llama.cpp server with the packaged model, end to end: no network, no key."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from anchoralign.errors import UserError
from augment.local_llm import LocalLLMServer, find_packaged_gguf

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _require_local_llm() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (pip install -e '.[local]')")
    try:
        find_packaged_gguf()
    except UserError as err:
        pytest.skip(f"no packaged GGUF model: {err}")


def test_server_starts_answers_and_stops():
    _require_local_llm()
    import httpx

    with LocalLLMServer() as srv:
        r = httpx.post(
            f"{srv.base_url}/chat/completions",
            json={"model": "x", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8},
            timeout=120,
        )
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
        proc = srv._proc
    assert proc is not None and proc.poll() is not None  # stopped on exit


def test_augment_run_with_the_local_model(shared_data, tmp_path):
    _require_local_llm()
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env["PYTHONPATH"] = str(REPO)
    # A few sources are enough to exercise the pipeline; the 135M model's rewrites are mostly
    # rejected, so the cap would otherwise take the whole split to reach.
    cmd = [sys.executable, "-m", "augment.cli", "run", "--dataset", "conll04", "--data-dir", str(shared_data)]
    cmd += ["--llm", "local", "--cap", "20", "--max-sources", "4", "--max-tokens", "160", "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["status"] in ("cap_reached", "source_limit")
    assert stats["requests"]["answered"] + stats["requests"]["cached"] == 8
    assert stats["requests"]["failed"] == 0
    assert stats["model"].startswith("local:") and stats["model"].endswith(".gguf")
    journal = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    assert len(journal) == 8 and all(e["text"] is not None for e in journal)
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    verdicts = sum(v["accepted"] for v in stats["variants"].values()) + len(rejected)
    assert verdicts > 0  # every answer was parsed into accepted or rejected variants
    assert all(r["raw"] is not None for r in rejected if r["reason"] != "request_rejected")
