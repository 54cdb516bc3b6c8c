"""What every job entrypoint shares: YAML config + `--set key.sub=value` overrides, the Ray
address choice, and the exit-code convention (0 = done, 1 = any error, message on stderr).

Kept free of Ray and torch imports so that a bad command line fails in milliseconds.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import traceback
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import yaml

from dresd.config import load_yaml

T = typing.TypeVar("T")

_NONE_WORDS = {"none", "null", "~"}
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}


class ConfigError(ValueError):
    """A bad command line, config file or override: reported as one line, exit code 1."""


class JobArgumentParser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of exiting with status 2."""

    def error(self, message: str) -> typing.NoReturn:  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message} (see --help)")


def parse_job_config(cls, prog: str, description: str, output_help: str, argv: list[str]):
    """(config, args) from a job's command line: --config YAML + --set overrides, then
    --output and the Ray address (flag, RAY_ADDRESS, config) applied on top."""
    p = job_parser(prog, description)
    p.add_argument("--output", help=f"{output_help} (same as --set output=PATH)")
    args = p.parse_args(argv)
    cfg = load_config(cls, args.config, args.overrides)
    if args.output:
        cfg.output = args.output
    cfg.ray_address = resolve_address(args.address, cfg.ray_address)
    return cfg, args


def job_parser(prog: str, description: str) -> JobArgumentParser:
    """A parser with the flags every job takes: --config, --address, --set."""
    p = JobArgumentParser(prog=prog, description=description)
    p.add_argument("--config", required=True, help="YAML config file (unknown keys are errors)")
    p.add_argument(
        "--address",
        help="Ray address to join (default: RAY_ADDRESS, then the config's ray_address, then a fresh local Ray)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.SUB=VALUE",
        help="override one config field, e.g. --set corpus.max_records=100 (repeatable)",
    )
    return p


# ----------------------------------------------------------------------------- overrides


def _field_hints(obj: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(obj))


def convert_value(raw: str, hint: Any, key: str) -> Any:
    """Convert the text `raw` to the type `hint` of field `key` (raises ConfigError)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    text = raw.strip()

    if hint is Any:
        return yaml.safe_load(raw)
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in args if a is not type(None)]
        if len(arms) < len(args) and text.lower() in _NONE_WORDS:
            return None
        errors = []
        for arm in arms:
            try:
                return convert_value(raw, arm, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: cannot convert {raw!r} to {hint}")
    if origin is Literal:
        for choice in args:
            if str(choice) == text:
                return choice
        raise ConfigError(f"{key}: {raw!r} is not one of {list(args)}")
    if dataclasses.is_dataclass(hint):
        subkeys = [f.name for f in dataclasses.fields(hint)]
        raise ConfigError(f"{key} is a section, not a value: set one of {[f'{key}.{s}' for s in subkeys]}")
    if hint is bool:
        if text.lower() in _TRUE_WORDS:
            return True
        if text.lower() in _FALSE_WORDS:
            return False
        raise ConfigError(f"{key}: {raw!r} is not a boolean (true/false)")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}: {raw!r} is not an integer") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}: {raw!r} is not a number") from None
    if hint is str:
        return raw
    if origin in (list, tuple) or hint in (list, tuple):
        elem = args[0] if args else Any
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
        out = [convert_value(item, elem, f"{key}[{i}]") for i, item in enumerate(items)]
        return tuple(out) if (origin or hint) is tuple else out
    # Anything else: let YAML decide (dicts, unusual annotations).
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot parse {raw!r}: {exc}") from None


def apply_override(cfg: Any, override: str) -> None:
    """Apply one `a.b.c=value` to the nested dataclass `cfg` in place (raises ConfigError)."""
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. corpus.max_records=100")
    parts = key.split(".")
    obj, where = cfg, type(cfg).__name__
    for depth, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            raise ConfigError(f"--set {key}: unknown key {part!r} in {where}; known keys: {names}")
        hint = _field_hints(obj)[part]
        dotted = ".".join(parts[: depth + 1])
        if depth == len(parts) - 1:
            setattr(obj, part, convert_value(raw, hint, dotted))
            return
        value = getattr(obj, part)
        if not dataclasses.is_dataclass(value):
            raise ConfigError(f"--set {key}: {dotted} is a value, not a section")
        obj, where = value, dotted


def apply_overrides(cfg: T, overrides: Iterable[str]) -> T:
    """A copy of `cfg` with every `--set` override applied, in order."""
    cfg = copy.deepcopy(cfg)
    for override in overrides:
        apply_override(cfg, override)
    return cfg


def load_config(cls: type[T], path: str | os.PathLike, overrides: Iterable[str] = ()) -> T:
    """Load `cls` from YAML (unknown keys are errors) and apply the overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = load_yaml(cls, path)
    except (ValueError, TypeError, yaml.YAMLError) as exc:
        raise ConfigError(str(exc)) from None
    return apply_overrides(cfg, overrides)


# ----------------------------------------------------------------------------- Ray address


def resolve_address(flag: str | None, configured: str | None = None) -> str | None:
    """The Ray address a job joins: --address, then RAY_ADDRESS (set by `ray job submit` for
    the job's driver), then the config's value; None = start a fresh local Ray."""
    return flag or os.environ.get("RAY_ADDRESS") or configured or None


# ----------------------------------------------------------------------------- running


def run_job(main: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """Run a job's `main(argv)`; any error -> a message on stderr and exit code 1.

    Config errors are one line. Failures of the job itself print their traceback first
    (job logs are where a cluster run is debugged), then the one-line summary.
    """
    try:
        return main(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - the exit-code convention is the point
        traceback.print_exc(file=sys.stderr)
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
