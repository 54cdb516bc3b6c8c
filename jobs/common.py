"""What every job entry point shares: its command line (--config YAML, --set overrides,
--output, --address) loaded by dresd.config.loader like every `dresd` command, the Ray
address choice, and the exit-code convention (0 = done, 1 = any error, message on stderr).

Kept free of Ray and torch imports so that a bad command line fails in milliseconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import typing
from collections.abc import Callable

from dresd.config.loader import ConfigError, add_config_arguments, add_flag, config_from_args

T = typing.TypeVar("T")


class JobArgumentParser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of exiting with status 2."""

    def error(self, message: str) -> typing.NoReturn:  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message} (see --help)")


def parse_job_config(cls: type[T], prog: str, description: str, output_help: str,
                     argv: list[str]) -> tuple[T, argparse.Namespace]:
    """(config, args) from a job's command line: --config YAML, --output, --set; then the Ray
    address (flag, RAY_ADDRESS, config) on top."""
    p = JobArgumentParser(prog=prog, description=description)
    add_config_arguments(p, cls, required=True)
    add_flag(p, "--output", cls, "output", output_help)
    p.add_argument("--address",
                   help="Ray address to join (default: RAY_ADDRESS, then the config's ray_address, then a fresh local Ray)")
    args = p.parse_args(argv)
    cfg = config_from_args(cls, args)
    cfg.ray_address = resolve_address(args.address, cfg.ray_address)
    if (cache := getattr(cfg, "cache", None)) is not None:  # this node's, and the workers' (ensure_ray)
        from dresd.storage.eviction import set_cache_limit

        set_cache_limit(cache.max_gb)
    return cfg, args


def resolve_address(flag: str | None, configured: str | None = None) -> str | None:
    """The Ray address a job joins: --address, then RAY_ADDRESS (set by `ray job submit` for
    the job's driver), then the config's value; None = start a fresh local Ray."""
    return flag or os.environ.get("RAY_ADDRESS") or configured or None


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
