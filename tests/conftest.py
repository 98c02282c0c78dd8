"""Shared fixtures: where the benchmark data lives (../shared/data beside the checkout)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Many small tensor operations run faster on one thread than on two contended ones (the test
# machines have 2 cores); subprocesses started by the tests inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("ANCHORALIGN_TEST_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session", autouse=True)
def training_set_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The training-set cache of every test (and the trainers they start) is a temporary folder,
    never the user's ~/.cache."""
    from anchoralign.training_set import CACHE_ENV

    folder = tmp_path_factory.mktemp("training-set-cache")
    os.environ[CACHE_ENV] = str(folder)
    return folder


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real benchmark data (read-only); tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"benchmark data not found at {SHARED_DATA} (set ANCHORALIGN_TEST_DATA)")
    return SHARED_DATA


@pytest.fixture()
def gloo(monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-process group on loopback for the trainer; the variables are removed after the test."""
    from anchoralign import distributed

    env = {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(distributed.free_port()),
        "DS_ACCELERATOR": "cpu",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
