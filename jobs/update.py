"""Ray job: change a DReSD datastore from a YAML UpdateConfig: add a corpus, delete records by
source id, compact, reindex; each step publishes one version, in that order.

    python -m jobs.update --config jobs/configs/update.yaml \
        [--address ADDR] [--output ROOT] [--set corpus.paths=[new.jsonl] --set sources=[a:1] ...]

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.update --config jobs/configs/update.yaml --output s3://bucket/stores/sharegpt

A step runs when its config asks for it: add when corpus.paths is non-empty, delete when
sources is, compact when `compact` is true, reindex when `reindex` is true (skipped, and
said, when the store already has the layout its size and the `index` settings choose). The
add embeds with embed_actors actors (embed_cpus / embed_gpus each) like jobs/build.py;
delete, compact and reindex run on the driver.
Exit code 0 = every step asked for published; 1 = a config error or a failed step (the steps
before it stay published). All the work is pipelines.update.
"""

from __future__ import annotations

import sys

from dresd.config import UpdateConfig
from jobs.common import ConfigError, parse_job_config, run_job


def parse(argv: list[str]) -> UpdateConfig:
    """Command line -> the UpdateConfig to run (no Ray, no model loading)."""
    cfg, args = parse_job_config(UpdateConfig, "python -m jobs.update",
                                 "Add to, delete from, compact and reindex a DReSD datastore (one version per step).",
                                 "datastore root to update", argv)
    if not (cfg.corpus.paths or cfg.sources or cfg.compact or cfg.reindex):
        raise ConfigError(f"{args.config}: nothing to do: give corpus.paths (add), sources (delete), "
                          "compact: true or reindex: true")
    return cfg


def steps(cfg: UpdateConfig) -> list[str]:
    """The steps `cfg` asks for, in the order they run."""
    return [name for name, wanted in (("add", cfg.corpus.paths), ("delete", cfg.sources), ("compact", cfg.compact),
                                      ("reindex", cfg.reindex)) if wanted]


def main(argv: list[str]) -> int:
    cfg = parse(argv)
    todo = steps(cfg)
    print(f"updating datastore {cfg.output}: {', '.join(todo)} (ray: {cfg.ray_address or 'local'})", flush=True)
    from pipelines.update import (  # Ray, torch, faiss: after the config
        compact,
        delete_sources,
        reindex,
        same_layout,
        update_datastore,
    )

    for step in todo:
        if step == "add":
            print("\n".join(update_datastore(cfg).lines()), flush=True)
        elif step == "delete":
            print(f"delete {len(cfg.sources)} source(s): published {delete_sources(cfg.output, cfg.sources)}", flush=True)
        elif step == "compact":
            print(f"compact: published {compact(cfg.output)}", flush=True)
        elif layout := same_layout(cfg.output, cfg.index):
            print(f"reindex: skipped, the store already has the layout {layout}", flush=True)
        else:
            print(f"reindex: published {reindex(cfg.output, cfg.index, cfg.check_sample)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
