"""Ray job: build (or add a version to) a DReSD datastore from a YAML BuildConfig.

    python -m jobs.build --config jobs/configs/build_sharegpt.yaml \
        [--address ADDR] [--output PATH] [--set corpus.max_records=500 ...]

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.build --config jobs/configs/build_sharegpt.yaml --output s3://my-bucket/stores/sharegpt

Ray address: --address, else RAY_ADDRESS (`ray job submit` sets it for the job's driver),
else the config's `ray_address`, else a fresh local Ray. Prints the build summary and exits
0; any error prints a message on stderr and exits 1. All the work is pipelines.build.
"""

from __future__ import annotations

import sys

from dresd.config import BuildConfig
from jobs.common import ConfigError, parse_job_config, run_job


def parse(argv: list[str]) -> BuildConfig:
    """Command line -> the BuildConfig to run (no Ray, no model loading)."""
    cfg, args = parse_job_config(BuildConfig, "python -m jobs.build",
                                 "Build a DReSD datastore (corpus -> Ray Data embed -> faiss index).", "datastore root", argv)
    if not cfg.corpus.paths:
        raise ConfigError(f"{args.config}: corpus.paths is empty (give files, folders or 'sharegpt')")
    return cfg


def main(argv: list[str]) -> int:
    cfg = parse(argv)
    print(f"building datastore {cfg.output} from {cfg.corpus.paths} (ray: {cfg.ray_address or 'local'})", flush=True)
    from pipelines.build import build_datastore  # imports Ray, torch, faiss: after the config is known good

    report = build_datastore(cfg)
    print("\n".join(report.lines()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
