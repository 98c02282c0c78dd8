"""A scriptable OpenAI-compatible HTTP server on loopback: it serves ``--llm rules``, the tests
and the benchmark.

It speaks just enough of the chat-completions API for the corpus builder: ``GET /v1/models``
and ``POST /v1/chat/completions``. What it answers is decided by a *script*, a function of the
request body and how many times this exact prompt has been asked (1 on the first request), so a
test can fail the first attempt of some prompts and answer the retry. The default script,
:func:`good_answer`, gives the rule-based rewrites of :mod:`augment.rules` (well-formed variants,
deterministic, so two runs get the same answers).

Run it on its own (the benchmark does, so that its threads do not share the runner's GIL)::

    python -m augment.scripted_server --delay 0.2      # prints "listening http://127.0.0.1:PORT/v1"
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from augment.rules import rewrite_answer


@dataclass(frozen=True)
class Reply:
    """What the server does with one request.

    ``text`` is the assistant's answer (status 200). Any other ``status`` sends an OpenAI-style
    error object with ``message``. ``body`` replaces the whole response body (garbage tests);
    ``drop`` closes the connection without a response; ``delay`` is waited first.
    """

    text: str | None = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False
    body: bytes | None = None
    message: str = "error"
    finish_reason: str = "stop"


Script = Callable[[dict[str, Any], int], Reply]


@dataclass(frozen=True)
class LoggedRequest:
    body: dict[str, Any]
    attempt: int
    status: int  # what the server answers (0: the connection is dropped)
    authorization: str
    time: float


def verify_question(body: dict[str, Any]) -> str | None:
    """The question of a verification prompt (``--verify``), or None for a rewrite prompt.
    Verification prompts ask it on a ``Question:`` line of the last user message."""
    users = [m for m in body.get("messages", []) if m.get("role") == "user"]
    lines = str(users[-1].get("content") or "").splitlines() if users else []
    asked = [ln.strip()[len("Question:") :].strip() for ln in lines if ln.strip().startswith("Question:")]
    return asked[0] if asked else None


def good_answer(body: dict[str, Any], k: int = 3) -> str:
    """``k`` numbered, well-formed variants of the prompt's sentence (the rule-based rewrites of
    :mod:`augment.rules`), or, for a verification prompt, "yes"."""
    if verify_question(body) is not None:
        return "yes"
    return rewrite_answer(body, k)


def good_script(k: int = 3, delay: float = 0.0) -> Script:
    def script(body: dict[str, Any], attempt: int) -> Reply:
        return Reply(text=good_answer(body, k), delay=delay)

    return script


def prompt_digest(body: dict[str, Any]) -> str:
    """Identifies a prompt across retries (the messages only)."""
    return hashlib.sha256(json.dumps(body.get("messages"), sort_keys=True).encode()).hexdigest()


class ScriptedServer:
    """A ThreadingHTTPServer on 127.0.0.1 in a background thread; use it as a context manager."""

    def __init__(self, script: Script | None = None, host: str = "127.0.0.1", port: int = 0):
        self.script: Script = script or good_script()
        self.requests: list[LoggedRequest] = []
        self._attempts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._httpd = _Server((host, port), _make_handler(self))
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """The base URL an OpenAI client takes (with ``/v1``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> ScriptedServer:
        # A short poll interval so that stop() returns at once (tests start many servers).
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name="fake-openai"
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> ScriptedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def completions(self) -> list[LoggedRequest]:
        with self._lock:
            return list(self.requests)

    def _next_attempt(self, body: dict[str, Any]) -> int:
        key = prompt_digest(body)
        with self._lock:
            self._attempts[key] = self._attempts.get(key, 0) + 1
            return self._attempts[key]

    def _log(self, body: dict[str, Any], attempt: int, status: int, auth: str) -> None:
        with self._lock:
            self.requests.append(LoggedRequest(body, attempt, status, auth, time.time()))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # A burst of concurrent clients must not be refused by a short listen queue.
    request_queue_size = 256

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (its timeout, a cancelled run) closes the connection under a
        # request being answered: expected here, and not worth a traceback on stderr.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


def _completion_body(body: dict[str, Any], reply: Reply) -> bytes:
    text = reply.text or ""
    prompt_chars = sum(len(str(m.get("content", ""))) for m in body.get("messages", []))
    payload = {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "fake"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": reply.finish_reason,
            }
        ],
        # A rough 4-characters-a-token count, enough to exercise usage accounting.
        "usage": {
            "prompt_tokens": prompt_chars // 4 + 1,
            "completion_tokens": len(text) // 4 + 1,
            "total_tokens": prompt_chars // 4 + len(text) // 4 + 2,
        },
    }
    return json.dumps(payload).encode()


def _make_handler(server: ScriptedServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real endpoints do
        # Headers and body go out in separate writes; with Nagle's algorithm on, the second
        # waits for the client's delayed ACK (~40 ms a response).
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            pass  # quiet: tests read the request log instead

        def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            if self.path.rstrip("/").endswith("/models"):
                self._send(
                    200, json.dumps({"object": "list", "data": [{"id": "fake", "object": "model"}]}).encode()
                )
            else:
                self._send(404, b'{"error": {"message": "not found"}}')

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw)
            except json.JSONDecodeError:
                self._send(400, b'{"error": {"message": "request body is not JSON"}}')
                return
            auth = self.headers.get("Authorization", "")
            attempt = server._next_attempt(body)
            reply = server.script(body, attempt)
            # Logged on receipt, so a test sees a slow request even if its client gave up.
            server._log(body, attempt, 0 if reply.drop else reply.status, auth)
            if reply.delay:
                time.sleep(reply.delay)
            if reply.drop:
                self.close_connection = True
                # Shut the socket down without a byte of response: the client sees a dropped link.
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            try:
                if reply.body is not None:
                    self._send(reply.status, reply.body, reply.headers)
                elif reply.status == 200:
                    self._send(200, _completion_body(body, reply), reply.headers)
                else:
                    err = {"error": {"message": reply.message, "type": "fake_error", "code": reply.status}}
                    self._send(reply.status, json.dumps(err).encode(), reply.headers)
            except (BrokenPipeError, ConnectionResetError):
                # The client gave up (its timeout) before a slow answer was written.
                self.close_connection = True

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="A loopback OpenAI-compatible server with fixed-delay answers."
    )
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--variants", type=int, default=3)
    args = parser.parse_args(argv)
    server = ScriptedServer(good_script(args.variants, args.delay), port=args.port)
    server.start()
    print(f"listening {server.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
