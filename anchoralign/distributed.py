"""Process-group set-up for every way a trainer is started, and the rank helpers it needs.

Launchers (``deepspeed``, ``torchrun``, ``deepspeed --hostfile``) set the rendezvous variables; a
plain ``python pretrain/run.py`` sets none, and DeepSpeed would then try MPI discovery, so
:func:`setup` fills in a one-process group on 127.0.0.1. Without a GPU, DeepSpeed is pointed at
its CPU accelerator and the gloo backend here, in one place, before it is imported.

The console of a run is the project's own (``anchoralign.runlog``, rank 0): :func:`setup` also
keeps DeepSpeed's start-up notices out of it (its logger at warnings, the notice it prints itself)
and lets only rank 0 show Python warnings, which every rank would otherwise repeat. The launcher
is a process of its own: ``deepspeed --log_level=error`` keeps its lines out (docs/training.md).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch
import torch.distributed as dist

from anchoralign.net import free_port

RENDEZVOUS_KEYS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
# Set by MPI launchers; DeepSpeed reads these itself, so they count as "a launcher was used".
_MPI_KEYS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def single_process_env(environ: Mapping[str, str], port: int) -> dict[str, str]:
    """The variables to add for a one-process group, or {} when a launcher already set them (pure)."""
    if any(k in environ for k in ("RANK", "WORLD_SIZE", *_MPI_KEYS)):
        return {}
    defaults = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
    }
    return {k: v for k, v in defaults.items() if k not in environ}


def backend() -> str | None:
    """gloo without a GPU; None lets DeepSpeed pick its accelerator's backend (nccl on CUDA)."""
    return None if torch.cuda.is_available() else "gloo"


def setup(environ: MutableMapping[str, str] = os.environ) -> None:
    """Initialise the process group once (idempotent)."""
    if dist.is_available() and dist.is_initialized():
        return
    if not torch.cuda.is_available():
        # Must be set before DeepSpeed first resolves its accelerator (at import of its engine).
        environ.setdefault("DS_ACCELERATOR", "cpu")
        _share_cpu_cores(environ)
    environ.update(single_process_env(environ, free_port()))
    import deepspeed
    from deepspeed.utils import logger as deepspeed_logger

    deepspeed_logger.setLevel(logging.WARNING)
    for handler in deepspeed_logger.handlers:
        handler.setLevel(logging.WARNING)
    # ZeRO calls torch's all_gather_into_tensor / reduce_scatter_tensor, deprecated under those
    # names since torch 2.10: a warning at every run that only DeepSpeed can act on.
    warnings.filterwarnings(
        "ignore",
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
        category=FutureWarning,
    )
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        deepspeed.init_distributed(dist_backend=backend())
    # Its CPU backend print()s "DeepSpeed ... deepspeed_shm_comm_op built successfully" on every
    # start and rank, past its own log level; anything else it printed is passed on.
    for line in printed.getvalue().splitlines():
        if not line.endswith("built successfully"):
            print(line)
    if rank() != 0:
        # Every rank runs the same code and would repeat rank 0's warnings word for word.
        warnings.simplefilter("ignore")


def _share_cpu_cores(environ: Mapping[str, str]) -> None:
    """Split the cores between the ranks of one machine unless the launcher pinned threads.

    Two CPU ranks with torch's default (all cores each) oversubscribe the machine and run several
    times slower than one rank.
    """
    if "OMP_NUM_THREADS" in environ:
        return
    local = int(environ.get("LOCAL_WORLD_SIZE") or environ.get("LOCAL_SIZE") or 1)
    if local > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def rank() -> int:
    return (
        dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))
    )


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s value on every rank (identity in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def mean_over_ranks(values: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """Each value averaged over the ranks (identity in one process); every rank must call it."""
    if not values or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))
