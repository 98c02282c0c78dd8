"""Where a head fit keeps the encoder states of its training sentences.

A head fitted on a frozen encoder (``span_fit``, ``relation_fit``) runs the encoder once over the
training split and keeps what the head reads of every sentence for all its epochs: 4 KiB a
sub-word in float32 with BART-large, well over 10 GiB for NYT's 56,000 training sentences. In
memory, the default, the process holds all of it. Given a folder, the states go to files there and
are read back through memory maps: the operating system pages them in and out as the epochs walk
over them, so the process holds little more than a batch, and the numbers are the same. Either
way each state is a copy of its own, not a view that would keep its padded batch alive.

Each file is allocated in full before it is written, so a full disk is one clear error rather than
a crash on the first page that cannot be written; and it is unlinked as soon as it is mapped, so a
fit that is killed leaves nothing behind and the space comes back when the states are dropped.

Keeping the states out of memory is not enough on its own: the encoder's batch temporaries are
freed between small allocations that last (each state's tensor object), so the C allocator's heap
cannot shrink, and resident memory grows by about the states' size all the same (measured:
BENCHMARKS.md, "Head fits: where the training states are kept"). Before each new file, the memory
the allocator holds free is given back (glibc's ``malloc_trim``), which bounds that growth to a file.
"""

from __future__ import annotations

import ctypes
import functools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from anchoralign.errors import UserError

# A function that keeps one state for later and returns the tensor to use in its place.
Keep = Callable[[torch.Tensor], torch.Tensor]

# float32 values per file: 64 MiB, so a small fit allocates little, a large one maps few files
# (160 for 10 GiB), and the memory freed between two files is given back often.
CHUNK_FLOATS = 1 << 24


def in_memory(state: torch.Tensor) -> torch.Tensor:
    """The state as a float32 tensor of its own in memory. A copy even when it is float32 already:
    a state is a row of its padded batch, and a view would keep the whole batch alive."""
    return state.detach().to(torch.float32, copy=True)


class MemoryStates:
    """The default keep of a fit's training states: each one copied into memory (``in_memory``),
    and the memory the C allocator holds free given back after every ``trim_floats`` values kept,
    as ``DiskStates`` does before each file: the encoder's freed batch temporaries would otherwise
    stay in the heap beside the states (measured: BENCHMARKS.md, "Head fits: where the training
    states are kept")."""

    def __init__(self, trim_floats: int = CHUNK_FLOATS):
        self.trim_floats = trim_floats
        self.untrimmed = 0  # values kept since the last trim
        self.floats = 0  # values kept so far

    def __call__(self, state: torch.Tensor) -> torch.Tensor:
        if self.untrimmed >= self.trim_floats:
            release_freed_memory()
            self.untrimmed = 0
        kept = in_memory(state)
        self.untrimmed += kept.numel()
        self.floats += kept.numel()
        return kept


class DiskStates:
    """A keep that copies each state into memory-mapped files under ``folder`` (float32, on the
    CPU) and returns a view of its place there."""

    def __init__(self, folder: str | Path, chunk_floats: int = CHUNK_FLOATS):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.chunk_floats = chunk_floats
        self.chunk: np.ndarray | None = None
        self.used = 0
        self.files = 0  # files mapped so far
        self.floats = 0  # values kept so far

    def __call__(self, state: torch.Tensor) -> torch.Tensor:
        values = state.detach().to("cpu", torch.float32).contiguous()
        n = values.numel()
        if self.chunk is None or self.used + n > self.chunk.size:
            self.chunk, self.used = self._new_file(max(n, self.chunk_floats)), 0
        place = self.chunk[self.used : self.used + n]
        place[:] = values.reshape(-1).numpy()
        self.used += n
        self.floats += n
        return torch.from_numpy(place).view(values.shape)

    def _new_file(self, n: int) -> np.ndarray:
        release_freed_memory()
        fd, name = tempfile.mkstemp(prefix="anchoralign-states-", suffix=".f32", dir=self.folder)
        try:
            size = 4 * n
            try:
                os.posix_fallocate(fd, 0, size)
            except AttributeError:  # no posix_fallocate (macOS): a sparse file
                os.ftruncate(fd, size)
            except OSError as err:
                raise UserError(
                    f"cannot keep the encoder states in {self.folder}: {err.strerror} "
                    f"({size / 2**30:.2f} GiB more were needed after {4 * self.floats / 2**30:.2f} GiB)"
                ) from None
            mapped = np.memmap(name, dtype=np.float32, mode="r+", shape=(n,))
        finally:
            os.close(fd)
            os.unlink(name)
        self.files += 1
        return mapped


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to call
        return None


def release_freed_memory() -> None:
    """Give the memory the C allocator holds free back to the system (glibc's ``malloc_trim``;
    elsewhere nothing)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def state_keeper(folder: str | Path | None) -> Keep:
    """Where a fit keeps its training states: in memory (``folder`` None), or in files under ``folder``."""
    return MemoryStates() if folder is None else DiskStates(folder)
