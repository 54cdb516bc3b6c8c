"""jobs/update.py's command line: the YAML config with --set, the steps it asks for, and a
config that asks for nothing refused before any work (the steps themselves run end to end
in tests/cluster/test_shared_nothing.py and tests/pipelines/test_update.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.common import ConfigError
from jobs.update import parse, steps

CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "update.yaml"


def test_the_shipped_config_loads_and_set_chooses_the_steps():
    base = ["--config", str(CONFIG), "--output", "file:///tmp/store"]
    cfg = parse(base + ["--set", "corpus.paths=[new.jsonl]", "--set", "embed_actors=3", "--set", "work_dir=file:///tmp/w"])
    assert steps(cfg) == ["add"] and cfg.embed_actors == 3 and cfg.work_dir == "file:///tmp/w"
    cfg = parse(base + ["--set", "sources=[a:1,b:2]", "--set", "compact=true"])
    assert steps(cfg) == ["delete", "compact"] and cfg.sources == ["a:1", "b:2"]
    cfg = parse(base + ["--set", "compact=true", "--set", "reindex=true", "--set", "index.flat_below=1000"])
    assert steps(cfg) == ["compact", "reindex"] and cfg.index.flat_below == 1000
    assert steps(parse(base + ["--set", "reindex=true"])) == ["reindex"]


def test_nothing_to_do_and_bad_keys_are_one_line_errors():
    with pytest.raises(ConfigError, match="nothing to do"):
        parse(["--config", str(CONFIG), "--output", "x"])
    with pytest.raises(ConfigError, match="compactt"):
        parse(["--config", str(CONFIG), "--output", "x", "--set", "compactt=true"])
