"""Typed, nested configs: loading, overrides, errors and the one command-line generator.

Every tool's options are one pydantic model (sections are nested models). The same machinery
serves them all:

- :func:`load` reads a YAML or JSON file (nested like the model; a file may build on another,
  named by its ``base`` key, and replace its values), applies ``section.key`` overrides and
  validates; an unknown key or a bad value is one :class:`UserError` line naming the key and
  where it came from (the file or the flag), with a suggestion for a misspelt key;
- :func:`add_flags` turns a model into ``argparse`` flags, one per field (``--loss.alpha``,
  ``--data-dir``), with help text from the field descriptions, so every field is reachable from
  the command line and documented in ``--help``; :func:`given_overrides` collects the flags a user
  gave.

Flags are spelled with hyphens (``--max-retries``, ``--optim.micro-batch-size``); the spelling
with underscores is accepted everywhere too. Values are read as YAML (``[1,1,1]``, ``true``,
``null``, ``3e-5``), both as ``--key=value`` and ``--key value``; a boolean flag given alone means
true.
"""

from __future__ import annotations

import argparse
import difflib
import json
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from anchoralign.errors import UserError, first_error

M = TypeVar("M", bound=BaseModel)

# argparse dest of a config flag: this prefix and the field's dotted path, so that the flags of a
# config are told apart from a tool's other arguments.
_DEST = "config:"


# ---------------------------------------------------------------------------------------------
# The tree of fields


def _section(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def leaves(cls: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted path, FieldInfo)`` of every leaf field, sections first-to-last in declaration order."""
    for name, field in cls.model_fields.items():
        sub = _section(field.annotation)
        if sub is not None:
            yield from leaves(sub, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def flag_name(path: str) -> str:
    """``optim.micro_batch_size`` -> ``--optim.micro-batch-size``."""
    return "--" + path.replace("_", "-")


def _normalise(key: str) -> str:
    return key.replace("-", "_")


# ---------------------------------------------------------------------------------------------
# Loading


def read_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping (JSON is YAML); keys may use hyphens or underscores."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML or JSON ({err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config keys to values, got {type(data).__name__}")
    return _normalised_keys(data)


# A file's key naming the file it builds on (a path relative to it): that file's values are read
# first, then this file's replace them key by key, so that a variant says only what it changes.
BASE_KEY = "base"


def read_tree(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The values of the file ``path`` over those of its ``base`` chain, and the file each dotted
    key's value comes from."""
    chain: list[tuple[Path, dict[str, Any]]] = []
    current = Path(path)
    while True:
        if any(current.resolve() == seen.resolve() for seen, _ in chain):
            names = " -> ".join(str(seen) for seen, _ in chain)
            raise UserError(f"{path}: its {BASE_KEY} files form a cycle ({names} -> {current})")
        data = read_file(current)
        base = data.pop(BASE_KEY, None)
        chain.append((current, data))
        if base is None:
            break
        if not isinstance(base, str) or not base.strip():
            raise UserError(f"{current}: '{BASE_KEY}' names the file this one builds on, got {base!r}")
        current = current.parent / base
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for file, data in reversed(chain):
        for key, value in _flat(data):
            if not isinstance(value, Mapping):  # an empty section replaces none of its base's values
                _set(values, key, value)
            sources[key] = str(file)
    return values, sources


def _normalised_keys(data: Mapping[str, Any]) -> dict[str, Any]:
    return {_normalise(str(k)): _normalised_keys(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def parse_value(raw: str) -> Any:
    """A flag's text read as YAML (``[1,1,1]``, ``true``, ``null``); text that is not YAML stays text."""
    if not raw.strip():
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw  # validation judges it


def _flat(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _set(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = tree
    for p in parents:
        child = node.get(p)
        if not isinstance(child, dict):
            child = node[p] = {}
        node = child
    node[last] = value


def _unknown(cls: type[BaseModel], path: str) -> str | None:
    """None if ``path`` names a field (or a whole section) of ``cls``; else the first unknown part."""
    model: type[BaseModel] | None = cls
    walked = ""
    for part in path.split("."):
        if model is None or part not in model.model_fields:
            return walked + part
        walked += part + "."
        model = _section(model.model_fields[part].annotation)
    return None


def unknown_key_error(cls: type[BaseModel], path: str, source: str) -> UserError:
    bad = _unknown(cls, path) or path
    known = [p for p, _ in leaves(cls)] + list(cls.model_fields)
    close = difflib.get_close_matches(bad, known, n=1) or difflib.get_close_matches(
        bad.rsplit(".", 1)[-1], known, n=1
    )
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UserError(f"{source}: unknown config key '{bad}'{hint}")


def load(
    cls: type[M],
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    override_source: Mapping[str, str] | None = None,
) -> M:
    """The file's values, then the dotted ``overrides``, validated as ``cls``.

    ``override_source`` names where each override came from (default: ``command line --key``).
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        values, sources = read_tree(path)
        for key, source in sources.items():
            if _unknown(cls, key) is not None:
                raise unknown_key_error(cls, key, source)
    for key, value in (overrides or {}).items():
        key = _normalise(key)
        source = (override_source or {}).get(key, f"command line {flag_name(key)}")
        if _unknown(cls, key) is not None:
            raise unknown_key_error(cls, key, source)
        _set(values, key, value)
        sources[key] = source
    try:
        return cls.model_validate(values)
    except ValidationError as err:
        where, msg, given = first_error(err)
        missing = err.errors()[0]["type"] == "missing"
        # The key as given may be a prefix of the path pydantic reports (phases.epochs.1).
        parts = where.split(".")
        given_key = next(
            (".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in sources), None
        )
        source = sources[given_key] if given_key else (str(path) if path is not None else "config")
        if missing and path is None:
            raise UserError(
                f"field '{where}' is required and no --config file was given: pass --config FILE "
                f"or {flag_name(where)}=VALUE"
            ) from None
        shown = f" (got {given!r})" if given_key and not missing else ""
        raise UserError(f"{source}: field '{where}': {msg}{shown}") from None


def dump(cfg: BaseModel) -> dict[str, Any]:
    """The config as plain nested data (what :func:`load` reads back)."""
    return cfg.model_dump(mode="json")


def differences(old: BaseModel, new: BaseModel, ignore: frozenset[str] = frozenset()) -> list[str]:
    """``key: old -> new`` for every leaf that differs, except the dotted keys in ``ignore``."""
    a, b = dict(_flat(dump(old))), dict(_flat(dump(new)))
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(a.keys() | b.keys())
        if k not in ignore and a.get(k) != b.get(k)
    ]


# ---------------------------------------------------------------------------------------------
# Command-line flags


def type_name(annotation: Any) -> str:
    """A readable type for ``--help``: ``int or null``, ``one of fp32|bf16``, ``[int, int, int]``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + "|".join(str(a) for a in args)
    if origin is tuple:
        return "[" + ", ".join(type_name(a) for a in args) + "]"
    if origin is list:
        return f"list of {type_name(args[0])}"
    if args:
        names = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    return getattr(annotation, "__name__", str(annotation))


def _is_bool(annotation: Any) -> bool:
    return annotation is bool or (get_origin(annotation) is not None and bool in get_args(annotation))


def field_help(field: Any) -> str:
    if field.is_required():
        default = "required"
    else:
        default = f"default {json.dumps(field.get_default(call_default_factory=True), default=str)}"
    text = f"{field.description} " if field.description else ""
    return f"{text}({type_name(field.annotation)}; {default})".replace("%", "%%")


def add_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type[BaseModel],
    prefix: str = "",
    skip: Sequence[str] = (),
    alias_prefix: str = "",
    short_names: bool = False,
) -> None:
    """One flag per leaf field of ``cls`` (under ``prefix``), except the dotted paths in ``skip``;
    with ``alias_prefix`` each flag is also accepted under it (``--beam`` and ``--decode.beam``);
    with ``short_names`` a key whose last part no other key of the tree has is also accepted by that
    part alone (``--backbone`` for ``--model.backbone``; ``--lr`` is ambiguous only if two sections
    have one).

    A flag's default is "not given", so only what the user typed overrides the config file. The
    parser should be made with ``allow_abbrev=False``: a shortened key must be an unknown key.
    """
    groups: dict[str, Any] = {}
    last_parts = Counter(path.rsplit(".", 1)[-1] for path, _ in leaves(cls))
    for path, field in leaves(cls):
        if path in skip:
            continue
        section = path.split(".")[0] if "." in path else ""
        if section and hasattr(parser, "add_argument_group") and section not in groups:
            groups[section] = parser.add_argument_group(f"{prefix}{section}")
        target = groups.get(section, parser)
        full = prefix + path
        names = [flag_name(full)]
        if "_" in full:
            names.append("--" + full)  # the other spelling
        if alias_prefix:
            names.append(flag_name(alias_prefix + full))
        last = path.rsplit(".", 1)[-1]
        if short_names and "." in path and last_parts[last] == 1:
            names += [flag_name(last)] + (["--" + last] if "_" in last else [])
        bool_flag = _is_bool(field.annotation)
        target.add_argument(
            *names,
            dest=_DEST + path,
            default=argparse.SUPPRESS,
            type=parse_value,
            nargs="?" if bool_flag else None,
            const=True if bool_flag else None,
            metavar="VALUE",
            help=field_help(field),
        )


def given_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The dotted config keys of the flags that :func:`add_flags` made and the user gave, with their values."""
    return {dest[len(_DEST) :]: v for dest, v in vars(args).items() if dest.startswith(_DEST)}


def parse_known_or_fail(
    parser: argparse.ArgumentParser, argv: Sequence[str], cls: type[BaseModel]
) -> argparse.Namespace:
    """``parser.parse_args`` whose unknown flags become one line naming them (with a suggestion)."""
    args, unknown = parser.parse_known_args(list(argv))
    flags = [u for u in unknown if u.startswith("-")]
    if flags:
        key = _normalise(flags[0].split("=", 1)[0].lstrip("-"))
        raise unknown_key_error(cls, key, f"command line {flags[0].split('=', 1)[0]}")
    if unknown:
        raise UserError(f"unexpected argument {unknown[0]!r} (options are --key=value)")
    return args
