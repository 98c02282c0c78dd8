"""The embedded offline LLM: a llama.cpp OpenAI-compatible server on a free loopback port.

``augment run --llm local`` starts ``python -m llama_cpp.server`` (the optional ``local`` extra,
``pip install -e '.[local]'``) with a GGUF model (see :mod:`augment.local_models` for the ones
known by name), waits until ``/v1/models`` answers, and stops the server when the run ends,
however it ends.

The server answers one request at a time. Every prompt of a run starts with one of two long
prefixes (the system message and few-shot examples of the mention or the context template), and
the runner interleaves the two kinds, so llama.cpp's own reuse of the previous prompt's prefix
would only ever find the few words both templates share. The server's RAM cache of states
(looked up by longest token prefix) keeps the state of the last prompt of each kind, so each
request evaluates only its own few dozen tokens (measured in BENCHMARKS.md).

The server runs in its own session so that Ctrl-C reaches only the runner, which then shuts the
server down in order (terminate, then kill after a grace period).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import httpx

from anchoralign.errors import UserError
from anchoralign.net import free_port

MODEL_ALIAS = "local"
INSTALL_HINT = (
    "install the optional extra: pip install -e '.[local]' (or pip install 'llama-cpp-python[server]')"
)
# A server killed by one of these crashed in llama.cpp's compiled kernels, most often because it
# was built for instructions the machine advertises but does not run: a native build on a virtual
# machine whose CPU reports AMX (Intel Sapphire Rapids and later) faults on its first matrix tile.
CRASH_SIGNALS = (signal.SIGSEGV, signal.SIGILL, signal.SIGBUS)
REBUILD_HINT = (
    "rebuild llama-cpp-python for AVX2 instead of the build machine's own instructions: "
    'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON" '
    "pip install --force-reinstall --no-deps --no-cache-dir 'llama-cpp-python[server]' (README, Set-up)"
)
# Room for the states of the last few prompts (a 1.5B model's state at ~700 tokens is ~20 MB), so
# at least one of each kind is kept; the least recently used go first. The cache counts only that
# state: each entry also holds a copy of the logits of up to n_batch positions (n_batch x vocab x 4
# bytes: 311 MB for Qwen's 152k vocabulary at the default n_batch of 512), which took a server with
# a 256 MB cache to 8 GB and the OOM killer. With 64 MB and n_batch 128 an entry is ~100 MB all
# told and the server stays ~0.5 GB above its size without a cache (BENCHMARKS.md).
DEFAULT_CACHE_BYTES = 64 << 20
N_BATCH = 128


def default_threads() -> int:
    """llama.cpp threads for prompt and answer: half the cores this process may use, at most 8,
    so one thread on a 2-core machine.

    llama.cpp's threads meet at a barrier after every step; when another process takes a core
    (a training run beside the corpus build), a thread waits for its descheduled partner and the
    whole step stalls. Measured on 2 busy cores (BENCHMARKS.md): 2 threads wrote 0.3 answer
    tokens a second, 1 thread 23. On idle cores 2 threads would be faster, but by less than 2x,
    so the safe choice wins; ``--local-threads`` overrides it."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores // 2))


def server_command(
    gguf: Path, port: int, n_ctx: int, n_threads: int, seed: int, cache_bytes: int = 0
) -> list[str]:
    cache = (
        ["--cache", "true", "--cache_type", "ram", "--cache_size", str(cache_bytes)] if cache_bytes else []
    )
    return [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--model_alias",
        MODEL_ALIAS,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
        "--n_threads",
        str(n_threads),
        "--n_threads_batch",
        str(n_threads),
        "--n_batch",
        str(N_BATCH),
        "--seed",
        str(seed),
        "--verbose",
        "False",
        *cache,
    ]


class LocalLLMServer:
    """Context manager: ``with LocalLLMServer() as srv: use(srv.base_url, srv.model)``."""

    def __init__(
        self,
        gguf: str | Path,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        seed: int = 0,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        startup_timeout_s: float = 180.0,
    ):
        if importlib.util.find_spec("llama_cpp") is None:
            raise UserError(f"--llm local needs llama-cpp-python: {INSTALL_HINT}")
        self.gguf = Path(gguf)
        if not self.gguf.is_file():
            raise UserError(f"{self.gguf}: GGUF model file not found")
        self.n_ctx = n_ctx
        self.n_threads = n_threads or default_threads()
        self.seed = seed
        self.cache_bytes = cache_bytes
        self.startup_timeout_s = startup_timeout_s
        self.port = 0
        self.model = MODEL_ALIAS
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: tempfile._TemporaryFileWrapper[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> LocalLLMServer:
        self.port = free_port()
        # A file, not a pipe: a chatty server must never block on a full pipe nobody reads.
        self._log = tempfile.NamedTemporaryFile(prefix="augment-llama-", suffix=".log", delete=False)  # noqa: SIM115
        self._proc = subprocess.Popen(
            server_command(self.gguf, self.port, self.n_ctx, self.n_threads, self.seed, self.cache_bytes),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        with httpx.Client(timeout=2.0, trust_env=False) as http:
            while time.monotonic() < deadline:
                code = self._proc.poll()
                if code is not None:
                    tail = self.log_tail()
                    self.stop()
                    raise UserError(
                        f"the llama.cpp server exited with code {code} while starting "
                        f"(model {self.gguf}); its last output:\n{tail}"
                    )
                try:
                    if http.get(f"{self.base_url}/models").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.25)
        tail = self.log_tail()
        self.stop()
        raise UserError(
            f"the llama.cpp server did not answer on {self.base_url} within {self.startup_timeout_s:g} s; "
            f"its last output:\n{tail}"
        )

    def crash_report(self) -> str | None:
        """None while the server runs (or was never started); once it has died on its own, how it
        ended and its last output, so that a run's failed requests are not blamed on the network."""
        code = None if self._proc is None else self._proc.poll()
        if code is None:
            return None
        if code < 0:
            sig = signal.Signals(-code)
            how = f"killed by {sig.name}"
            if sig in CRASH_SIGNALS:
                how += f", a crash in its compiled code; {REBUILD_HINT}"
        else:
            how = f"exited with code {code}"
        return f"the llama.cpp server (model {self.gguf}) stopped during the run, {how}; its last output:\n{self.log_tail()}"

    def log_tail(self, n_chars: int = 2000) -> str:
        if self._log is None:
            return ""
        try:
            text = Path(self._log.name).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return text[-n_chars:].strip() or "(no output)"

    def stop(self, grace_s: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            Path(self._log.name).unlink(missing_ok=True)
            self._log = None

    def __enter__(self) -> LocalLLMServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
