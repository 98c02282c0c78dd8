"""A wheel carries everything a non-editable install needs: every package, the prompt
templates, label metadata and stage configs."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def test_every_package_directory_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(REPO).parts)
        for root in ("anchoralign", "augment", "pretrain", "sft")
        for init in (REPO / root).rglob("__init__.py")
    }
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"


def test_the_wheel_holds_templates_metadata_and_configs(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = {p.name for p in (REPO / "prompts").glob("*.txt")}
    assert templates and {f"augment/prompt_templates/{t}" for t in templates} <= names
    assert {
        f"anchoralign/metadata/{p.name}" for p in (REPO / "anchoralign" / "metadata").glob("*.json")
    } <= names
    assert "pretrain/configs/conll04.yaml" in names and "sft/configs/conll04.yaml" in names
    assert "augment/transport.py" in names and "anchoralign/formats/dygie.py" in names
