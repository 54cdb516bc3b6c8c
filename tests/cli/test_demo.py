"""The README's demo on the real packaged model, made small: build, compare, reuse."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from dresd.cli.demo import run_demo
from dresd.config import DemoConfig

pytestmark = [pytest.mark.real_model, pytest.mark.ray]


def test_demo_builds_compares_and_reuses_its_datastore(tmp_path, capsys, ray_session):
    cfg = DemoConfig(workdir=str(tmp_path), prompts=2, records=24, max_new_tokens=12)
    assert run_demo(cfg) == 0
    out = capsys.readouterr().out
    assert "building a datastore from 24 ShareGPT records (held out: 2 prompts)" in out
    assert "all speculative outputs identical to greedy: True" in out
    rows = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    methods = {r["method"] for r in rows}
    assert methods == {"greedy", "dresd", "hybrid", "dresd-ref", "pld"}
    by_method = {m: [r["token_ids"] for r in rows if r["method"] == m] for m in methods}
    assert all(by_method[m] == by_method["greedy"] for m in methods)
    assert all(len(t) > 0 for t in by_method["greedy"])
    table = (tmp_path / "results.md").read_text()
    assert "| greedy |" in table and "| dresd |" in table

    # The same store settings: the datastore is reused, not rebuilt (one new token a prompt:
    # the run above checked the decoding).
    assert run_demo(replace(cfg, max_new_tokens=1)) == 0
    assert "reusing datastore" in capsys.readouterr().out
