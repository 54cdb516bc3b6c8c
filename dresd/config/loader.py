"""One way to load a config, for every command and job: dataclass defaults, then a YAML file,
then command-line flags, then `--set key.sub=value` overrides, each value type- and
choice-checked against the dataclass field it lands in, then the config's own checks.

Everything fails as a ConfigError: one line that names the key and what it allows, raised
before Ray starts or a model loads. No Ray, torch or numpy here, so a bad command line fails
in milliseconds.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml

T = typing.TypeVar("T")

_NONE_WORDS = {"none", "null", "~"}
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}
# An argparse dest that starts with this carries a config key (see add_flag).
_FLAG_PREFIX = "config:"


class ConfigError(ValueError):
    """A bad command line, config file or override: reported as one line, exit code 1 or 2."""


def describe(hint: Any) -> str:
    """A type annotation as a user reads it: 'an integer', 'one of [...]', 'a list of ...'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        arms = [describe(a) for a in args if a is not type(None)]
        return " or ".join(arms) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in (list, tuple):
        return f"a list of {describe(args[0]) if args else 'values'}"
    if dataclasses.is_dataclass(hint):
        return f"a section of {hint.__name__} fields"
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def check_value(value: Any, hint: Any, key: str) -> Any:
    """`value` (as YAML or a flag gives it) checked against the field type `hint`: returned,
    converted where lossless (an integer for a float field, a list for a tuple), or a
    ConfigError naming `key` and what it allows."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arm in (a for a in args if a is not type(None)):
            try:
                return check_value(value, arm, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not {describe(hint)}")
    if origin is Literal:
        if any(value == choice and type(value) is type(choice) for choice in args):
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, dict):
            return from_dict(hint, value, key)
        raise ConfigError(f"{key}: expected {describe(hint)}, got {value!r}")
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: {value!r} is not {describe(hint)}")
        elem = args[0] if args else Any
        items = [check_value(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin or hint) is tuple else items
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        dict: isinstance(value, dict),
    }.get(hint, True)
    if not ok:
        raise ConfigError(f"{key}: {value!r} is not {describe(hint)}")
    return float(value) if hint is float else value


def parse_value(raw: str, hint: Any, key: str) -> Any:
    """The text of a `--set` override (or a text flag) converted to the field type `hint`.

    Lists are comma-separated (`a,b`) or YAML (`[a, b]`); `none`/`null` sets an optional
    field to None; strings are taken as written."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    text = raw.strip()
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.lower() in _NONE_WORDS:
            return None
        for arm in (a for a in args if a is not type(None)):
            try:
                return parse_value(raw, arm, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {raw!r} is not {describe(hint)}")
    if origin is Literal:
        for choice in args:
            if str(choice) == text:
                return choice
        raise ConfigError(f"{key}: {raw!r} is not one of {list(args)}")
    if dataclasses.is_dataclass(hint):
        subkeys = [f"{key}.{f.name}" for f in dataclasses.fields(hint)]
        raise ConfigError(f"{key} is a section, not a value: set one of {subkeys}")
    if hint is bool:
        if text.lower() in _TRUE_WORDS | _FALSE_WORDS:
            return text.lower() in _TRUE_WORDS
        raise ConfigError(f"{key}: {raw!r} is not a boolean (true/false)")
    if hint in (int, float):
        try:
            return hint(text)
        except ValueError:
            raise ConfigError(f"{key}: {raw!r} is not {describe(hint)}") from None
    if hint is str:
        return raw
    if origin in (list, tuple) or hint in (list, tuple):
        if text.startswith("["):
            try:
                items = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ConfigError(f"{key}: {raw!r} is not a valid list: {exc}") from None
            if not isinstance(items, list):
                raise ConfigError(f"{key}: {raw!r} is not a valid list")
            items = ["" if v is None else str(v) for v in items]
        else:
            items = [s.strip() for s in text.split(",")] if text else []
        elem = args[0] if args else Any
        out = [parse_value(item, elem, f"{key}[{i}]") for i, item in enumerate(items)]
        return tuple(out) if (origin or hint) is tuple else out
    try:
        return check_value(yaml.safe_load(raw), hint, key)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot parse {raw!r}: {exc}") from None


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Dataclass `cls` from a plain dict (a YAML mapping), recursing into sections.

    Unknown keys and values of the wrong type or outside a field's choices raise ConfigError
    naming the key (`where` is the dotted key of this section, "" at the top); fields left out
    keep their defaults."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected {describe(cls)}, got {data!r}")
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown} for {cls.__name__}; known: {sorted(known)}")
    return cls(**{name: check_value(value, hints[name], f"{where}.{name}" if where else name)
                  for name, value in data.items()})


def load_yaml(cls: type[T], path: str | Path) -> T:
    """Dataclass `cls` from a YAML file (see from_dict)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    try:
        return from_dict(cls, data)
    except (ConfigError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """Plain-dict form of a config (for manifests, logs and Ray task arguments)."""
    return dataclasses.asdict(config)


def _field_of(cfg: Any, key: str, what: str) -> tuple[Any, str, Any]:
    """(the dataclass holding dotted `key`, its last part, that field's type hint)."""
    parts = key.split(".")
    obj, where = cfg, type(cfg).__name__
    for depth, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            raise ConfigError(f"{what} {key}: unknown key {part!r} in {where}; known keys: {names}")
        if depth == len(parts) - 1:
            return obj, part, typing.get_type_hints(type(obj))[part]
        obj, where = getattr(obj, part), ".".join(parts[: depth + 1])
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"{what} {key}: {where} is a value, not a section")
    raise AssertionError("unreachable")


def set_value(cfg: Any, key: str, value: Any, what: str = "--set") -> None:
    """Set dotted `key` of the nested dataclass `cfg` to `value`, checked against its type."""
    obj, name, hint = _field_of(cfg, key, what)
    setattr(obj, name, check_value(value, hint, key))


def apply_override(cfg: Any, override: str) -> None:
    """Apply one `a.b.c=value` to the nested dataclass `cfg` in place."""
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. corpus.max_records=100")
    obj, name, hint = _field_of(cfg, key, "--set")
    setattr(obj, name, parse_value(raw, hint, key))


def apply_overrides(cfg: T, overrides: Iterable[str]) -> T:
    """A copy of `cfg` with every `--set` override applied, in order."""
    cfg = copy.deepcopy(cfg)
    for override in overrides:
        apply_override(cfg, override)
    return cfg


def check_config(cfg: Any, where: str = "config") -> None:
    """Run the `problems()` of `cfg` and of every section in it; raise them as one ConfigError."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_config(value, f"{where}.{f.name}")
    problems = cfg.problems() if hasattr(cfg, "problems") else []
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = (),
                flags: dict[str, Any] | None = None) -> T:
    """`cls` from its defaults, then the YAML file `path`, then `flags` ({dotted key: value},
    values already typed), then the `--set` overrides; then checked (check_config)."""
    cfg = load_yaml(cls, path) if path else cls()
    for key, value in (flags or {}).items():
        set_value(cfg, key, value, what="flag for")
    cfg = apply_overrides(cfg, overrides)
    check_config(cfg, str(path) if path else cls.__name__)
    return cfg


# ----------------------------------------------------------------------------- argparse


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, required: bool = False) -> None:
    """--config FILE.yaml and --set KEY=VALUE (repeatable) for a command over config `cls`."""
    parser.add_argument("--config", required=required, metavar="FILE.yaml",
                        help=f"{cls.__name__} YAML (unknown keys and bad values are errors); flags and --set override it")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE",
                        help="override one config field, e.g. --set corpus.max_records=100 (repeatable; applied last)")


def add_flag(parser: argparse.ArgumentParser, flag: str, cls: type, key: str, help: str = "",
             append: bool = False, negate: bool = False, switch: bool = False, **kwargs: Any) -> None:
    """A flag that sets config key `key` of `cls`: its choices come from the field's type, and
    its value is checked like any other (a list field takes a comma list, or one item per use
    with `append`; `switch` / `negate` make a valueless flag that sets a boolean field to
    True / False)."""
    _, _, hint = _field_of(cls(), key, "flag for")
    dest = _FLAG_PREFIX + key
    if negate or switch:
        parser.add_argument(flag, dest=dest, action="store_const", const=switch, default=None, help=help, **kwargs)
        return
    arms = [a for a in typing.get_args(hint) if a is not type(None)]
    base = arms[0] if len(arms) == 1 and typing.get_origin(hint) in (typing.Union, types.UnionType) else hint
    if typing.get_origin(base) is Literal:
        kwargs.setdefault("choices", list(typing.get_args(base)))
    else:  # the help shows the flag's own name, not the internal dest that carries the key
        kwargs.setdefault("metavar", flag.lstrip("-").replace("-", "_").upper())
    parser.add_argument(flag, dest=dest, action="append" if append else "store", default=None, help=help, **kwargs)


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The config a parsed command line asks for: --config, then the flags made by add_flag
    that were given, then --set (see load_config)."""
    flags = {}
    for dest, value in vars(args).items():
        if dest.startswith(_FLAG_PREFIX) and value is not None:
            key = dest[len(_FLAG_PREFIX):]
            _, _, hint = _field_of(cls(), key, "flag for")
            flags[key] = parse_value(value, hint, key) if isinstance(value, str) else value
    return load_config(cls, getattr(args, "config", None), getattr(args, "overrides", ()), flags)
