"""Every command the user-facing docs show is accepted by the parser of the tool it calls.

A renamed flag or config key breaks a documented command silently until a new user pastes it;
here each one is parsed (not run): ``augment``, ``anchoralign``, the stage entry points under
``python``/``deepspeed``/``torchrun`` (flags and ``--config`` file validated into the typed
config), and ``scripts/quality_protocol.py``. Not checked: a block fenced ```` ```bash old-flags ````
(commands of an earlier version, kept as the record of how a result was made), and a sketch:
a command with ``...`` for its other arguments, ``[--optional]`` parts, or a placeholder folder
(``RUN/...``) standing for a run's own output.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from contextlib import redirect_stderr
from io import StringIO
from pathlib import Path

import pytest
from script_loader import load_script

from anchoralign.cli import build_parser as anchoralign_parser
from anchoralign.cli import hyphenated
from anchoralign.config import PretrainConfig, SFTConfig
from anchoralign.errors import UserError
from anchoralign.stages import parse_args
from augment.cli import build_parser as augment_parser

REPO = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "docs/training.md", "benchmarks/quality/README.md", "BENCHMARKS.md"]
STAGES = {"pretrain/run.py": PretrainConfig, "sft/run.py": SFTConfig}
SHELL_OPERATORS = {"|", ">", ">>", "2>&1", "&&", ";", "&"}
ASSIGNMENT = re.compile(r"^([A-Z_][A-Z0-9_]*)=(.*)$")
PLACEHOLDER = re.compile(r"(^|=)[A-Z]{2,}/")  # RUN/full/seed4: a folder the reader fills in


def shell_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, command) of each ``bash`` block's commands, continuation lines joined."""
    in_block, pending, start = False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            in_block, pending = line.strip() == "```bash", ""
            continue
        if not in_block:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""


def documented_commands(path: Path, root: Path = REPO) -> Iterator[tuple[str, list[str]]]:
    """(``file:line``, argv) of each documented command, with the block's variables expanded and
    leading environment assignments, shell operators and comments taken off."""
    variables: dict[str, str] = {}
    for number, line in shell_lines(path.read_text()):
        if "[--" in line:  # a synopsis with optional parts
            continue
        words = shlex.split(
            re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m[1], m[0]), line), comments=True
        )
        if not words:
            continue
        if words[0] == "export":
            words = words[1:]
        cut = next((i for i, w in enumerate(words) if w in SHELL_OPERATORS), len(words))
        words = words[:cut]
        while words and (m := ASSIGNMENT.match(words[0])):
            if len(words) == 1:  # a variable of the block (SMOKE="..."), used by later lines
                variables[m[1]] = m[2]
            words = words[1:]
        if words and "..." not in words and not any(PLACEHOLDER.search(w) for w in words):
            yield f"{path.relative_to(root)}:{number}", words


def check(argv: list[str]) -> str | None:
    """Which tool the command calls, after parsing it; None for a command not checked here."""
    tool, rest = argv[0], argv[1:]
    if tool == "augment":
        augment_parser().parse_args(hyphenated(rest))
    elif tool == "anchoralign":
        anchoralign_parser().parse_args(hyphenated(rest))
    elif tool in ("python", "deepspeed", "torchrun"):
        script = next((i for i, w in enumerate(rest) if w.endswith(".py")), None)
        if script is None:  # python -m pytest
            return None
        name, args = rest[script], rest[script + 1 :]
        if name in STAGES:
            parse_args(STAGES[name], args, prog=name)
        elif name == "scripts/quality_protocol.py":
            load_script("quality_protocol").build_parser().parse_args(args)
        else:
            assert (REPO / name).is_file(), f"{name}: no such script"
        return name
    else:
        return None
    return f"{tool} {argv[1]}"


def test_every_documented_command_parses(monkeypatch):
    monkeypatch.chdir(REPO)  # the commands are written for the repository root
    checked, failures = [], []
    for doc in DOCS:
        for where, argv in documented_commands(REPO / doc):
            try:
                with redirect_stderr(StringIO()) as err:
                    tool = check(argv)
            except SystemExit:
                failures.append(f"{where}: {shlex.join(argv)}\n    {err.getvalue().strip().splitlines()[-1]}")
            except UserError as error:
                failures.append(f"{where}: {shlex.join(argv)}\n    {error}")
            else:
                if tool:
                    checked.append(tool)
    assert not failures, "documented commands that no longer parse:\n" + "\n".join(failures)
    # The extraction found the docs' commands (not nothing): the README's quick start alone has
    # augment, both stages under python and deepspeed, evaluate and predict.
    assert len(checked) >= 30, checked
    assert {
        "augment run",
        "anchoralign evaluate",
        "anchoralign predict",
        "pretrain/run.py",
        "sft/run.py",
    } <= set(checked)


def test_the_extraction_reads_a_block_as_the_shell_would(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(
        "text\n```bash\n"
        'SMOKE="--model.backbone=tiny --optim.lr=1e-3"\n'
        "DS_ACCELERATOR=cpu deepspeed --num_gpus 2 sft/run.py --config c.yaml $SMOKE \\\n"
        "    --seed=3   # a comment\n"
        "anchoralign evaluate --checkpoint x --json > m.json\n"
        "anchoralign evaluate ... --anchor off\n"
        "anchoralign fit-span-head --checkpoint RUN/seed4/best\n"
        "```\n"
        "```bash old-flags\npython sft/run.py --backbone=minilm\n```\n"
        "```python\nnot = a_command\n```\n"
    )
    assert list(documented_commands(doc, root=tmp_path)) == [
        (
            "doc.md:4",
            [
                "deepspeed",
                "--num_gpus",
                "2",
                "sft/run.py",
                "--config",
                "c.yaml",
                "--model.backbone=tiny",
                "--optim.lr=1e-3",
                "--seed=3",
            ],
        ),
        ("doc.md:6", ["anchoralign", "evaluate", "--checkpoint", "x", "--json"]),
    ]


def test_a_renamed_flag_is_caught():
    with pytest.raises(SystemExit), redirect_stderr(StringIO()):
        check(["anchoralign", "evaluate", "--checkpoint", "x", "--no-such-flag"])
    with pytest.raises((SystemExit, UserError)), redirect_stderr(StringIO()):
        check(
            [
                "python",
                "sft/run.py",
                "--config",
                str(REPO / "sft/configs/conll04.yaml"),
                "--optim.no-such-key=1",
            ]
        )
