"""Where a head fit keeps its training states (``anchoralign.state_store``): files under a folder
give the same fits as memory, and leave nothing behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from model_fixtures import (
    one_cpu_thread,  # noqa: F401  (autouse)
    tiny_model,
    toy_samples,
)

from anchoralign import state_store
from anchoralign.errors import UserError
from anchoralign.relation_fit import FitConfig, train_relation_head
from anchoralign.span_fit import SpanFitConfig, train_span_head
from anchoralign.state_store import DiskStates, MemoryStates, in_memory, state_keeper


def test_disk_states_keep_the_values_across_files_and_unlink_them(tmp_path: Path) -> None:
    keep = DiskStates(tmp_path / "states", chunk_floats=10)
    states = [torch.arange(6, dtype=torch.bfloat16).view(2, 3), torch.ones(3), torch.full((4, 3), 2.5)]
    kept = [keep(s) for s in states]
    for state, view in zip(states, kept, strict=True):
        assert view.dtype == torch.float32 and view.shape == state.shape
        assert torch.equal(view, state.float())
    # 6 + 3 values fill the first file of 10; the next 12 need one of their own, larger than a chunk.
    assert (keep.files, keep.floats) == (2, 21)
    # Mapped and unlinked at once: nothing on disk, even while the states are in use.
    assert os.listdir(tmp_path / "states") == []
    assert kept[0].sum().item() == 15.0


def test_state_keeper_is_memory_without_a_folder(tmp_path: Path) -> None:
    assert isinstance(state_keeper(None), MemoryStates)
    assert isinstance(state_keeper(tmp_path), DiskStates)
    state = torch.ones(2, dtype=torch.bfloat16)
    assert in_memory(state).dtype == torch.float32


def test_a_state_kept_in_memory_does_not_keep_its_batch_alive() -> None:
    batch = torch.arange(24, dtype=torch.float32).view(4, 6)
    kept = in_memory(batch[1, :3])  # float32 already: .float() would return the view itself
    assert torch.equal(kept, torch.tensor([6.0, 7.0, 8.0]))
    assert kept.untyped_storage().nbytes() == 3 * 4
    batch.zero_()
    assert kept.sum().item() == 21.0


def test_memory_states_give_freed_memory_back_every_so_many_values(monkeypatch: pytest.MonkeyPatch) -> None:
    trims = []
    monkeypatch.setattr(state_store, "release_freed_memory", lambda: trims.append(keep.floats))
    keep = MemoryStates(trim_floats=10)
    for _ in range(7):
        keep(torch.ones(4))
    # 4, 8, 12 values kept: the trim comes before the fourth state, then after 12 more values.
    assert trims == [12, 24]
    assert keep.floats == 28


def test_a_full_disk_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space, raising=False)
    keep = DiskStates(tmp_path, chunk_floats=2**20)
    with pytest.raises(
        UserError, match=r"cannot keep the encoder states in .*: No space left on device \(0.00 GiB"
    ):
        keep(torch.ones(3))
    assert os.listdir(tmp_path) == []


def _fit_twice(fit, tmp_path: Path) -> tuple[dict, dict]:
    """The same fit on two copies of one model: states in memory, then on disk."""
    weights = []
    for states_dir in (None, tmp_path / "states"):
        model = tiny_model()
        losses = fit(model, states_dir)
        weights.append(({k: v.clone() for k, v in model.state_dict().items()}, losses))
    return weights[0], weights[1]


@pytest.mark.parametrize("layers", [0, 1])
def test_a_span_fit_on_disk_is_the_fit_in_memory(tmp_path: Path, layers: int) -> None:
    cfg = SpanFitConfig(width=3, epochs=3, lr=1e-2, layers=layers, layer_lr=1e-3)
    memory, disk = _fit_twice(lambda m, d: train_span_head(m, toy_samples() * 3, cfg, print, d)[0], tmp_path)
    assert len(memory[1]) == 3 and memory[1] == disk[1]
    assert memory[0].keys() == disk[0].keys()
    for name, value in memory[0].items():
        assert torch.equal(value, disk[0][name]), name


@pytest.mark.parametrize("layers", [0, 1])
def test_a_relation_fit_on_disk_is_the_fit_in_memory(tmp_path: Path, layers: int) -> None:
    cfg = FitConfig(epochs=3, layers=layers)
    memory, disk = _fit_twice(
        lambda m, d: train_relation_head(m, toy_samples() * 3, cfg, print, d)[0], tmp_path
    )
    assert len(memory[1]) == 3 and memory[1] == disk[1]
    for name, value in memory[0].items():
        assert torch.equal(value, disk[0][name]), name
