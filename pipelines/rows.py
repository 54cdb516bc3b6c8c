"""The Arrow rows that cross the build's stages: one row per shard, every field a typed column.

Nothing crosses as a pickled payload. Token ids travel as list<int32> columns (a shard's
records concatenated, with int64 record offsets); arrays of numbers travel as large_binary
blobs of one stated dtype (float16 keys, float32 hidden states) beside explicit shape columns,
so a 4,096-wide state needs no per-element Arrow overhead and any stage can check the shape.

    shard, file         the shard id (sorts in corpus order) and the file its rows came from
    tokens              list<int32>   the shard's records, concatenated
    offsets             list<int64>   record starts within tokens, plus the end
    key_starts          list<int32>   first key position of each record
    sources             list<string>  source id of each record
    rows_read           int64         raw rows the shard covers
    rejects, messages   list<string>  one reason per rejected row; the first reject messages
    keep                list<int64>   (fit pass only) the shard's key numbers to return
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

SHARD_SCHEMA = pa.schema([
    ("shard", pa.string()), ("file", pa.string()), ("tokens", pa.list_(pa.int32())),
    ("offsets", pa.list_(pa.int64())), ("key_starts", pa.list_(pa.int32())), ("sources", pa.list_(pa.string())),
    ("rows_read", pa.int64()), ("rejects", pa.list_(pa.string())), ("messages", pa.list_(pa.string())),
])


@dataclass
class ShardRow:
    """One shard's tokenized records, as a stage reads them from its Arrow batch."""

    shard: str
    file: str
    tokens: np.ndarray  # int32, records concatenated
    offsets: np.ndarray  # int64, record starts + end
    key_starts: np.ndarray  # int32
    sources: list[str]
    rows_read: int
    rejects: list[str]  # one reason per rejected row
    messages: list[str]
    keep: np.ndarray | None = None  # fit pass: key numbers (within the shard) to return

    @property
    def seqs(self) -> list[np.ndarray]:
        """Each record's token ids."""
        return [self.tokens[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    @property
    def keys_per_record(self) -> np.ndarray:
        """Keys of each record: positions key_start .. len-2."""
        return (np.diff(self.offsets) - 1 - self.key_starts).astype(np.int64)


def shard_table(shard: str, file: str, seqs: list[np.ndarray], key_starts: list[int], sources: list[str],
                rows_read: int, rejects: list[str], messages: list[str]) -> pa.Table:
    """The one-row table of a tokenized shard."""
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    tokens = np.concatenate(seqs).astype(np.int32) if seqs else np.zeros(0, np.int32)
    return pa.table({
        "shard": [shard], "file": [file], "tokens": [tokens], "offsets": [np.concatenate([[0], np.cumsum(lengths)])],
        "key_starts": [np.asarray(key_starts, dtype=np.int32)], "sources": [sources], "rows_read": [rows_read],
        "rejects": [rejects], "messages": [messages],
    }, schema=SHARD_SCHEMA)


def _list(table: pa.Table, name: str, i: int, dtype) -> np.ndarray:
    return table.column(name)[i].values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)


def shard_rows(table: pa.Table):
    """Yield the ShardRow of every row of an Arrow batch of shards."""
    has_keep = "keep" in table.column_names
    for i in range(table.num_rows):
        yield ShardRow(
            shard=table.column("shard")[i].as_py(), file=table.column("file")[i].as_py(),
            tokens=_list(table, "tokens", i, np.int32), offsets=_list(table, "offsets", i, np.int64),
            key_starts=_list(table, "key_starts", i, np.int32), sources=table.column("sources")[i].as_py(),
            rows_read=table.column("rows_read")[i].as_py(), rejects=table.column("rejects")[i].as_py(),
            messages=table.column("messages")[i].as_py(),
            keep=_list(table, "keep", i, np.int64) if has_keep else None,
        )


def blob(array: np.ndarray, dtype) -> bytes:
    """The bytes of a 2-D array in `dtype` (its shape travels in columns of its own)."""
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def unblob(data: bytes, rows: int, width: int, dtype) -> np.ndarray:
    """The (rows, width) array a `blob` holds; a size that does not match is refused."""
    out = np.frombuffer(data, dtype=dtype)
    if out.size != rows * width:
        raise ValueError(f"a blob of {out.size} {np.dtype(dtype).name} values does not hold ({rows}, {width})")
    return out.reshape(rows, width)


def add_columns(table: pa.Table, columns: dict[str, pa.Array | list]) -> pa.Table:
    """`table` with `columns` appended (one value per row)."""
    for name, values in columns.items():
        table = table.append_column(name, values if isinstance(values, pa.Array) else pa.array(values))
    return table
