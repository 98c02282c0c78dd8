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


# Import names that differ from their distribution's name.
DISTRIBUTION_OF = {"yaml": "pyyaml", "llama_cpp": "llama-cpp-python"}


def test_every_third_party_import_is_declared():
    import ast
    import re

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [d for ds in project["optional-dependencies"].values() for d in ds]
    declared = {re.split(r"[\[<>=!~; ]", s, maxsplit=1)[0].lower() for s in specs}
    local = {"anchoralign", "augment", "pretrain", "sft"}
    imported = set()
    for root in local:
        for path in (REPO / root).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    imported |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    imported.add(node.module.split(".")[0])
    third_party = {m for m in imported - local - set(sys.stdlib_module_names) if m != "__future__"}
    undeclared = {
        m for m in third_party if DISTRIBUTION_OF.get(m, m).lower().replace("_", "-") not in declared
    }
    assert not undeclared, f"imported but not declared in pyproject.toml: {sorted(undeclared)}"


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


def _commands(text: str) -> list[str]:
    """Shell command lines, without pip's -q (CI keeps its log short)."""
    return [line.replace(" -q ", " ").strip() for line in text.splitlines()]


def test_ci_installs_and_tests_exactly_as_the_readme_says():
    readme = (REPO / "README.md").read_text()
    setup = readme.split("## Set-up", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    install, test = _commands(setup)[:2]
    ci = _commands((REPO / ".ci" / "run").read_text())
    assert install in ci, f".ci/run does not install as the README does: {install}"
    assert test in ci, f".ci/run does not run the README's test command: {test}"
