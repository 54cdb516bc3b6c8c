"""Stage 2: raw rows -> token sequences (or reject rows with a reason), tokenizer loaded once."""

from __future__ import annotations

import json

import numpy as np
from transformers import AutoTokenizer

from dresd.config import CorpusConfig
from dresd.corpus import RawRow, RecordError, extract_examples
from dresd.formatting import record_ids


class Tokenize:
    """Callable class for `map_batches`: one tokenizer per worker."""

    def __init__(self, model_dir: str, corpus: CorpusConfig, eos_id: int, max_tokens: int, prefix_len: int):
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.corpus = corpus
        self.eos_id = eos_id
        self.max_tokens = max_tokens
        # Keys start after the template head that every prompt shares (identical states).
        self.prefix_len = prefix_len

    def _one(self, file: str, row: int, data: str, error: str, detail: str) -> list[dict]:
        raw = RawRow(file, int(row), json.loads(data) if data else None, error or None, detail or None)
        try:
            examples = extract_examples(raw, self.corpus)
            out = []
            for ex in examples:
                try:
                    ids = record_ids(self.tokenizer, ex, self.corpus.prompt_format, self.max_tokens, self.eos_id)
                except RecordError as err:
                    # record_ids names the record by source id only: add file and row.
                    raise RecordError(err.reason, err.detail, file, int(row), err.field) from err
                start = self.prefix_len if ex.prompt is not None else 0
                if len(ids) - 1 <= start:
                    raise RecordError("no_keys", f"{len(ids)} tokens leave no key positions", file, int(row))
                out.append(_ok(file, row, ex.source_id, ids, start))
            return out
        except RecordError as err:
            if self.corpus.on_error == "fail":
                raise
            return [_reject(file, row, err.reason, str(err))]

    def __call__(self, batch: dict) -> dict:
        rows: list[dict] = []
        for i in range(len(batch["file"])):
            rows.extend(self._one(batch["file"][i], batch["row"][i], batch["data"][i], batch["error"][i], batch["detail"][i]))
        return {k: [r[k] for r in rows] for k in _COLUMNS}


_COLUMNS = ("file", "row", "source_id", "ids", "key_start", "reject", "detail")


def _ok(file, row, source_id, ids, start) -> dict:
    return {"file": file, "row": int(row), "source_id": source_id, "ids": np.asarray(ids, dtype=np.int32),
            "key_start": int(start), "reject": "", "detail": ""}


def _reject(file, row, reason, detail) -> dict:
    return {"file": file, "row": int(row), "source_id": "", "ids": np.zeros(0, dtype=np.int32),
            "key_start": 0, "reject": reason, "detail": detail}
