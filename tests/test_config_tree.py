"""The config machinery: nested files, dotted overrides, one-line errors and the flag generator."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from anchoralign import config_tree
from anchoralign.errors import UserError


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(1.0, ge=0, description="weight of a term")
    use_it: bool = True
    mode: Literal["a", "b"] = "a"


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="a required name")
    data_dir: str | None = None
    epochs: tuple[int, int] = (1, 1)
    inner: Inner = Field(default_factory=Inner)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_nested_file_then_dotted_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\ninner:\n  alpha: 0.5\n  use-it: false\n")
    cfg = config_tree.load(Outer, path, {"inner.mode": "b", "epochs": [2, 3]})
    assert cfg.inner.alpha == 0.5 and cfg.inner.use_it is False  # hyphenated keys accepted
    assert cfg.inner.mode == "b" and cfg.epochs == (2, 3)


def test_unknown_keys_name_the_source_and_suggest(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\ninner:\n  alpah: 0.5\n")
    with pytest.raises(
        UserError, match=r"c.yaml: unknown config key 'inner.alpah' \(did you mean 'inner.alpha'\?\)"
    ):
        config_tree.load(Outer, path)
    with pytest.raises(UserError, match="command line --lrr: unknown config key 'lrr'$"):
        config_tree.load(Outer, None, {"name": "x", "lrr": 1})
    with pytest.raises(UserError, match="unknown config key 'inner.nope'"):
        config_tree.load(Outer, None, {"name": "x", "inner.nope": 1})


def test_bad_values_name_the_field_and_where_they_came_from(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        config_tree.load(Outer, None, {"name": "x", "inner.alpha": -1})
    assert str(err.value) == (
        "command line --inner.alpha: field 'inner.alpha': Input should be greater than or equal to 0 (got -1)"
    )
    path = write(tmp_path, "name: x\ninner:\n  mode: c\n")
    with pytest.raises(UserError, match=r"^.*c.yaml: field 'inner.mode': Input should be 'a' or 'b'"):
        config_tree.load(Outer, path)


def test_a_file_builds_on_its_base_and_says_only_what_it_changes(tmp_path: Path) -> None:
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "base.yaml").write_text(
        "name: x\nepochs: [2, 2]\ninner:\n  alpha: 0.5\n  mode: b\n"
    )
    variant = tmp_path / "recipes" / "variant.yaml"
    variant.write_text("base: base.yaml\ninner:\n  alpha: 0.25\n")  # relative to the variant
    on_top = tmp_path / "on_top.yaml"
    on_top.write_text("base: recipes/variant.yaml\nepochs: [3, 1]\ninner: {}\n")
    cfg = config_tree.load(Outer, on_top, {"inner.use_it": False})
    assert (cfg.name, cfg.epochs) == ("x", (3, 1))
    assert (cfg.inner.alpha, cfg.inner.mode, cfg.inner.use_it) == (0.25, "b", False)
    # An error names the file the value came from, base or not.
    (tmp_path / "recipes" / "base.yaml").write_text("name: x\ninner:\n  mode: c\n")
    with pytest.raises(UserError, match=r"base.yaml: field 'inner.mode'"):
        config_tree.load(Outer, on_top)
    (tmp_path / "recipes" / "base.yaml").write_text("name: x\ninner:\n  alpah: 1\n")
    with pytest.raises(UserError, match=r"recipes/base.yaml: unknown config key 'inner.alpah'"):
        config_tree.load(Outer, variant)


def test_a_base_chain_that_is_missing_or_circular_is_one_line(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("base: b.yaml\nname: x\n")
    b.write_text("base: a.yaml\n")
    with pytest.raises(
        UserError, match=r"a.yaml: its base files form a cycle \(.*a.yaml -> .*b.yaml -> .*a.yaml\)"
    ):
        config_tree.load(Outer, a)
    b.write_text("base: nowhere.yaml\n")
    with pytest.raises(UserError, match=r"nowhere.yaml: config file not found"):
        config_tree.load(Outer, a)
    b.write_text("base: [a.yaml]\n")
    with pytest.raises(
        UserError, match=r"b.yaml: 'base' names the file this one builds on, got \['a.yaml'\]"
    ):
        config_tree.load(Outer, a)


def test_a_missing_required_field_without_a_config_file_names_the_file_option() -> None:
    with pytest.raises(UserError, match="field 'name' is required and no --config file was given"):
        config_tree.load(Outer, None, {})


def test_values_are_read_as_yaml() -> None:
    assert config_tree.parse_value("[1, 2, 3]") == [1, 2, 3]
    assert config_tree.parse_value("null") is None
    assert config_tree.parse_value("false") is False
    assert config_tree.parse_value("runs/a=b") == "runs/a=b"
    assert config_tree.parse_value("[1, 2") == "[1, 2"  # not YAML: validation judges the text


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--config")
    config_tree.add_flags(parser, Outer)
    return parser


def test_flags_cover_every_field_in_both_spellings_and_forms() -> None:
    parser = make_parser()
    args = parser.parse_args(
        ["--name", "x", "--data_dir=d", "--inner.use-it", "--inner.alpha=0.25", "--epochs", "[4,5]"]
    )
    assert config_tree.given_overrides(args) == {
        "name": "x",
        "data_dir": "d",
        "inner.use_it": True,  # a boolean flag alone means true
        "inner.alpha": 0.25,
        "epochs": [4, 5],
    }
    # Only the flags given become overrides; the file keeps the rest.
    assert config_tree.given_overrides(parser.parse_args([])) == {}
    help_text = parser.format_help()
    for flag in ("--name", "--data-dir", "--epochs", "--inner.alpha", "--inner.use-it", "--inner.mode"):
        assert flag in help_text
    assert "weight of a term (float; default 1.0)" in help_text
    assert '(one of a|b; default "a")' in help_text


class Other(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: str = "x"
    seed_count: int = 1


class TwoSections(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inner: Inner = Field(default_factory=Inner)
    other: Other = Field(default_factory=Other)


def test_short_flags_for_keys_whose_last_part_is_unique() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    config_tree.add_flags(parser, TwoSections, short_names=True)
    args = parser.parse_args(["--alpha=0.5", "--seed_count", "3", "--use-it=false"])
    assert config_tree.given_overrides(args) == {
        "inner.alpha": 0.5,
        "other.seed_count": 3,
        "inner.use_it": False,
    }
    with pytest.raises(SystemExit):  # 'mode' is in both sections: no short flag
        parser.parse_args(["--mode=a"])
    assert "--inner.mode" in parser.format_help() and "--other.mode" in parser.format_help()
    plain = argparse.ArgumentParser(allow_abbrev=False)
    config_tree.add_flags(plain, TwoSections)
    with pytest.raises(SystemExit):  # off by default
        plain.parse_args(["--alpha=0.5"])


def test_unknown_flags_are_one_line_with_a_suggestion() -> None:
    with pytest.raises(
        UserError,
        match=r"command line --inner.alph: unknown config key 'inner.alph' \(did you mean 'inner.alpha'\?\)",
    ):
        config_tree.parse_known_or_fail(make_parser(), ["--inner.alph=1"], Outer)


def test_differences_list_changed_leaves() -> None:
    a = config_tree.load(Outer, None, {"name": "x"})
    b = config_tree.load(Outer, None, {"name": "x", "inner.alpha": 2, "epochs": [1, 2]})
    assert config_tree.differences(a, b) == ["epochs: [1, 1] -> [1, 2]", "inner.alpha: 1.0 -> 2.0"]
    assert config_tree.differences(a, b, frozenset({"inner.alpha", "epochs"})) == []
