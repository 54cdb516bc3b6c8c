"""The Arrow rows between stages (pipelines/rows.py): typed columns, no pickles, shapes explicit."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipelines.rows import SHARD_SCHEMA, add_columns, blob, shard_rows, shard_table, unblob


def test_a_shard_row_round_trips_through_arrow():
    seqs = [np.array([5, 6, 7, 8], np.int32), np.array([9, 10, 11], np.int32)]
    table = shard_table("00001-000002", "f.jsonl", seqs, [1, 0], ["a", "b"], 4, ["bad_json", "bad_json"], ["m"])
    assert table.schema == SHARD_SCHEMA and table.num_rows == 1
    assert table.schema.field("tokens").type == pa.list_(pa.int32())  # token ids as a list column
    [row] = shard_rows(table)
    assert (row.shard, row.file, row.sources, row.rows_read, row.rejects) == (
        "00001-000002", "f.jsonl", ["a", "b"], 4, ["bad_json", "bad_json"])
    assert [s.tolist() for s in row.seqs] == [[5, 6, 7, 8], [9, 10, 11]] and row.offsets.tolist() == [0, 4, 7]
    assert row.keys_per_record.tolist() == [2, 2] and row.keep is None
    kept = add_columns(table, {"keep": pa.array([[0, 3]], pa.list_(pa.int64()))})
    assert next(shard_rows(kept)).keep.tolist() == [0, 3]
    [empty] = shard_rows(shard_table("00000-000000", "f.jsonl", [], [], [], 2, ["empty_text"] * 2, []))
    assert empty.seqs == [] and empty.tokens.dtype == np.int32 and empty.keys_per_record.tolist() == []


def test_a_blob_holds_one_dtype_and_its_shape_travels_beside_it():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    data = blob(a, np.float16)
    assert len(data) == 12 * 2
    np.testing.assert_array_equal(unblob(data, 3, 4, np.float16), a.astype(np.float16))
    with pytest.raises(ValueError, match=r"does not hold \(4, 4\)"):
        unblob(data, 4, 4, np.float16)
