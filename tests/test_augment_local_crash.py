"""A local llama.cpp server that dies during a run: the run says so, and how, instead of blaming
the network. The server is a stand-in that answers the readiness check, then crashes with
SIGSEGV on its first request, as a native llama.cpp build does on a CPU whose AMX it cannot use."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from augment_fixtures import run_config

import augment.local_llm as local_llm
from anchoralign.errors import UserError
from augment.runner import run

CRASHING_SERVER = """
import os, signal, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'{"object": "list", "data": [{"id": "local", "object": "model"}]}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        print("evaluating the prompt", flush=True)
        os.kill(os.getpid(), signal.SIGSEGV)

    def log_message(self, *args):
        pass

HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


@pytest.fixture
def crashing_server(tmp_path, monkeypatch):
    script = tmp_path / "crashing_server.py"
    script.write_text(CRASHING_SERVER)
    monkeypatch.setattr(
        local_llm,
        "server_command",
        lambda gguf, port, *_args, **_kw: [sys.executable, str(script), str(port)],
    )
    # The stand-in needs no llama-cpp-python; the server wrapper checks for it before starting.
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "llama_cpp" else find_spec(name, *a)
    )
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    return gguf


def test_a_server_that_crashes_is_named_with_its_signal_and_the_fix(crashing_server, shared_data, tmp_path):
    out = tmp_path / "out"
    cfg = run_config(
        shared_data, None, out, llm="local", gguf=str(crashing_server), max_sources=2, max_retries=0
    )
    with pytest.raises(UserError) as caught:
        run(cfg)
    message = str(caught.value)
    assert "the llama.cpp server" in message and "killed by SIGSEGV" in message
    assert "-DGGML_NATIVE=OFF" in message  # the rebuild that avoids the crash
    assert "evaluating the prompt" in message  # the server's own last output


def test_crash_report_is_none_while_the_server_runs(crashing_server):
    with local_llm.LocalLLMServer(crashing_server, startup_timeout_s=30) as srv:
        assert srv.crash_report() is None
    assert srv.crash_report() is None  # stopped by us: not a crash


def test_an_exit_code_is_reported_without_the_rebuild_hint(crashing_server):
    srv = local_llm.LocalLLMServer(crashing_server)

    class Exited:
        def poll(self):
            return 3

    srv._proc = Exited()  # type: ignore[assignment]
    report = srv.crash_report()
    assert report is not None and "exited with code 3" in report and "NATIVE" not in report
