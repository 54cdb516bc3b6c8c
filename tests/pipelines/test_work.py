"""The work folder's corpus-wide steps (pipelines/work.py), no Ray: the count pass's plan is
kept and read back, tallies add up, the token stream is assembled in shard order, and the
scratch is measured."""

from __future__ import annotations

from collections import Counter

import numpy as np

import pipelines.work as work_mod
from dresd.config import BuildConfig
from pipelines.scratch import Scratch
from pipelines.shards import ShardData, write_shard


def test_the_count_pass_runs_once_per_work_folder(tmp_path, monkeypatch):
    runs = []

    def count_pass(cfg, tokenize):
        runs.append(1)
        return {"00000-000000": {"record_keys": np.array([3, 4]), "record_tokens": np.array([9, 9]), "rows_read": 3,
                                 "rejects": ["bad_json"], "messages": ["m"]}}

    monkeypatch.setattr(work_mod.passes, "count_pass", count_pass)
    work = Scratch(str(tmp_path))
    first = work_mod.count_shards(BuildConfig(), work, {})
    again = work_mod.count_shards(BuildConfig(), work, {})
    assert runs == [1] and again["00000-000000"]["record_keys"].tolist() == [3, 4]
    assert again["00000-000000"]["record_keys"].dtype == np.int64 and first.keys() == again.keys()
    assert work_mod.count_tally(again) == (3, Counter({"bad_json": 1}), ["m"])
    assert work_mod.usable_summary(*work_mod.count_tally(again)) == "3 rows read, 1 rejected (bad_json: 1); first reject: m"


def test_the_stream_is_assembled_in_shard_order_and_the_scratch_measured(tmp_path):
    work = Scratch(str(tmp_path))
    for sid, records in (("00000-000001", [[7, 8, 9]]), ("00000-000000", [[1, 2, 3, 4], [5, 6]])):
        lengths = [len(r) for r in records]
        data = ShardData(np.concatenate(records), np.concatenate([[0], np.cumsum(lengths)]), np.zeros(len(records)),
                         np.zeros((sum(lengths) - len(records), 4)), [f"{sid}:{i}" for i in range(len(records))])
        write_shard(work.path / "shards" / sid, data, {"keys": 0}, "tag")
    tokens, ends, key_pos, sources = work_mod.assemble_stream(work, ["00000-000000", "00000-000001"], token_base=10)
    assert np.concatenate(tokens).tolist() == list(range(1, 10)) and ends == [14, 16, 19]
    assert key_pos.tolist() == [10, 11, 12, 14, 16, 17] and sources[0] == "00000-000000:0"
    assert work_mod.scratch_bytes(work) == sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file()) > 0
    assert work_mod.key_dtype({"a": {"dtype": "bfloat16"}, "b": {}}) == "bfloat16+float32"
