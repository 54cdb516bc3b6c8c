"""Stage 1: corpus files -> tokenized shards (runs of consecutive rows), one task per file.

Each yielded table is one shard: one Arrow row (pipelines/rows.py) holding its id, its file,
its records' token ids and its reject reasons (tokenize.py). Shards finished by an earlier run
of the same build are skipped here, before any real work; the fit pass asks for some shards
only, each with the key numbers it wants back (`select`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray

from dresd.config import CorpusConfig
from dresd.datastore.corpus import CorpusError, list_corpus_files, read_rows
from pipelines.rows import add_columns, shard_table
from pipelines.shards import shard_id
from pipelines.tokenize import Tokenize


def _raw(r) -> dict:
    return {"row": r.row, "data": r.data, "error": r.error, "detail": r.detail}


def _table(tok: Tokenize, sid: str, path: str, rows: list[dict]) -> pa.Table:
    p = tok.tokenize_shard(path, rows)
    # One reason per rejected row: a list column, counted again wherever totals are wanted.
    rejects = [reason for reason, n in sorted(p["rejects"].items()) for _ in range(n)]
    return shard_table(sid, path, p["seqs"], p["key_starts"], p["sources"], p["rows_read"], rejects, p["messages"])


def _file_shards(batch: dict, tokenize: dict, shard_rows: int, max_rows: int | None, skip: frozenset,
                 select: dict[str, np.ndarray] | None = None):
    """Yield the shards of one file, one table of one row each; in skip mode a file that
    cannot be read on from some row is one reject in the shard of that row, after the shards
    of the rows before it (an unreadable file: one shard holding one reject).

    With `select` (shard id -> key numbers within the shard), only those shards are
    tokenized and yielded, each with a `keep` column of its key numbers.
    """
    path, findex = str(batch["path"][0]), int(batch["index"][0])
    tok = Tokenize(**tokenize)
    on_error = tok.corpus.on_error
    rows, chunk, last = [], 0, 0

    def wanted(sid: str) -> bool:
        return sid not in skip and (select is None or sid in select)

    def shard() -> pa.Table:
        sid = shard_id(findex, chunk)
        table = _table(tok, sid, path, rows)
        if select is None:
            return table
        return add_columns(table, {"keep": pa.array([select[sid]], type=pa.list_(pa.int64()))})

    try:
        for r in read_rows(path, on_error):
            if max_rows is not None and r.row > max_rows:
                break
            rows.append(_raw(r))
            last = r.row
            if len(rows) == shard_rows:
                if wanted(shard_id(findex, chunk)):
                    yield shard()
                rows, chunk = [], chunk + 1
    except CorpusError as err:
        if on_error == "fail":
            raise
        # Appended where the file broke: the shards already written keep their good rows.
        rows.append({"row": last + 1, "data": None, "error": "unreadable_file", "detail": str(err)})
    if rows and wanted(shard_id(findex, chunk)):
        yield shard()


def count_keys(cfg: CorpusConfig, tokenize: dict, stop_at: int, batch_rows: int = 256) -> int:
    """The keys the corpus gives, tokenized here in the driver with nothing embedded; the
    count stops once it reaches `stop_at`, so a large corpus costs a few batches of rows.

    Lets a build refuse a corpus too small for its index before any embedding.
    """
    tok = Tokenize(**tokenize)
    total = 0

    def keys(rows: list[dict], path: str) -> int:
        p = tok.tokenize_shard(path, rows)
        return sum(len(s) - 1 - k for s, k in zip(p["seqs"], p["key_starts"]))

    for path in list_corpus_files(cfg.paths):
        rows = []
        try:
            for r in read_rows(path, cfg.on_error):
                if cfg.max_records is not None and r.row > cfg.max_records:
                    break
                rows.append(_raw(r))
                if len(rows) == batch_rows:
                    total, rows = total + keys(rows, path), []
                    if total >= stop_at:
                        return total
        except CorpusError:
            if cfg.on_error == "fail":
                raise
        total += keys(rows, path)
        if total >= stop_at:
            return total
    return total


def read_shards(cfg: CorpusConfig, tokenize: dict, shard_rows: int, skip: frozenset = frozenset(),
                select: dict[str, np.ndarray] | None = None) -> ray.data.Dataset:
    """A dataset of tokenized shards (rows of pipelines/rows.py), in no promised order: every
    row carries its shard id, and whoever needs corpus order sorts by it.

    `tokenize` holds the keyword arguments of `Tokenize` (model_dir, corpus, eos_id, ...).
    """
    files = list_corpus_files(cfg.paths)
    ds = ray.data.from_items([{"path": p, "index": i} for i, p in enumerate(files)],
                             override_num_blocks=max(len(files), 1))
    # Reading is I/O-bound: a small CPU share keeps it schedulable beside the model actors.
    return ds.map_batches(_file_shards, batch_size=1, num_cpus=0.25, fn_kwargs={
        "tokenize": tokenize, "shard_rows": shard_rows, "max_rows": cfg.max_records, "skip": skip, "select": select})
