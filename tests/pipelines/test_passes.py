"""The passes' driver-side pieces (pipelines/passes.py), no Ray: the count stage's rows and the
fit stage's rows come back in any order and are put in shard order. The Ray Data graphs
themselves run in tests/pipelines/test_build.py and test_update.py."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipelines.embed import SAMPLE_SCHEMA
from pipelines.passes import _counts, counts_of, sample_of
from pipelines.rows import blob, shard_table


def test_the_count_stage_keeps_counts_and_drops_the_tokens():
    seqs = [np.arange(6, dtype=np.int32), np.arange(3, dtype=np.int32)]
    table = shard_table("00000-000001", "f.jsonl", seqs, [2, 0], ["a", "b"], 3, ["bad_json"], ["m"])
    out = _counts(table)
    assert "tokens" not in out.column_names
    [(sid, c)] = counts_of(out).items()
    assert sid == "00000-000001" and c["record_keys"].tolist() == [3, 2] and c["record_tokens"].tolist() == [6, 3]
    assert (c["rows_read"], c["rejects"], c["messages"]) == (3, ["bad_json"], ["m"])


def _sample_row(sid: str, states: np.ndarray) -> pa.Table:
    return pa.table({"shard": [sid], "key_ids": [list(range(len(states)))], "hidden": [blob(states, np.float32)],
                     "n": [len(states)], "width": [states.shape[1]], "node": ["n1"], "dtype": ["float32"]},
                    schema=SAMPLE_SCHEMA)


def test_the_sample_is_in_shard_order_whatever_order_the_actors_finish_in():
    a, b = np.ones((2, 3), np.float32), np.full((1, 3), 2.0, np.float32)
    select = {"00000-000000": np.array([0, 1]), "00001-000000": np.array([4])}
    got = sample_of([_sample_row("00001-000000", b), _sample_row("00000-000000", a)], select)
    assert list(got) == ["00000-000000", "00001-000000"] and got["00000-000000"].dtype == "float32"
    np.testing.assert_array_equal(np.concatenate([h.states for h in got.values()]), np.concatenate([a, b]))
    with pytest.raises(RuntimeError, match=r"no states came back for shard\(s\) \['00001-000000'\]"):
        sample_of([_sample_row("00000-000000", a)], select)
