"""Stage 1: corpus files -> raw rows, one Ray task per file (files stream, rows stream)."""

from __future__ import annotations

import json

import ray

from dresd.config import CorpusConfig
from dresd.corpus import CorpusError, list_corpus_files, read_rows


def _file_rows(item: dict, on_error: str) -> list[dict]:
    """Every raw row of one file as a flat dict; an unreadable file is one reject row (skip mode)."""
    path = item["path"]
    try:
        rows = [
            {
                "file": r.file,
                "row": r.row,
                "data": json.dumps(r.data, default=str) if r.data is not None else "",
                "error": r.error or "",
                "detail": r.detail or "",
            }
            for r in read_rows(path, on_error)
        ]
    except CorpusError as err:
        if on_error == "fail":
            raise
        return [{"file": path, "row": 0, "data": "", "error": "unreadable_file", "detail": str(err)}]
    return rows


def read_corpus(cfg: CorpusConfig) -> ray.data.Dataset:
    """A dataset of raw rows {file, row, data (JSON text), error, detail} in file order."""
    files = list_corpus_files(cfg.paths)
    ds = ray.data.from_items([{"path": p} for p in files], override_num_blocks=max(len(files), 1))
    # Reading is I/O-bound: a small CPU share keeps it schedulable beside the model actors.
    ds = ds.flat_map(_file_rows, fn_kwargs={"on_error": cfg.on_error}, num_cpus=0.25)
    if cfg.max_records is not None:
        ds = ds.limit(cfg.max_records)
    return ds
