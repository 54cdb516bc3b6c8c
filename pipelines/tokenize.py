"""Stage 1b: a shard's raw rows -> token sequences, rejects counted by reason.

Runs inside the read task (see read.py): tokenizing is cheap next to embedding, and doing it
where the rows are read keeps one shard per block on its way to the embedding actors.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache

import numpy as np
from transformers import AutoTokenizer

from dresd.config import CorpusConfig
from dresd.datastore.corpus import RawRow, RecordError, extract_examples
from dresd.datastore.formatting import record_ids
from dresd.model.resolve import model_folder


class Tokenize:
    """One tokenizer + the corpus rules; `tokenize_shard` turns raw rows into sequences."""

    def __init__(self, model_dir: str | None, corpus: CorpusConfig, eos_id: int, max_tokens: int, prefix_len: int):
        self.tokenizer = cached_tokenizer(model_dir)
        self.corpus = corpus
        self.eos_id = eos_id
        self.max_tokens = max_tokens
        # Keys start after the template head that every prompt shares (identical states).
        self.prefix_len = prefix_len

    def _examples(self, file: str, raw: dict) -> list[tuple[str, list[int], int]]:
        """(source id, token ids, first key position) of each example in one raw row."""
        row = int(raw["row"])
        out = []
        for ex in extract_examples(RawRow(file, row, raw["data"], raw["error"], raw["detail"]), self.corpus):
            try:
                ids = record_ids(self.tokenizer, ex, self.corpus.prompt_format, self.max_tokens, self.eos_id)
            except RecordError as err:
                # record_ids names the record by source id only: add file and row.
                raise RecordError(err.reason, err.detail, file, row, err.field) from err
            start = self.prefix_len if ex.prompt is not None else 0
            if len(ids) - 1 <= start:
                raise RecordError("no_keys", f"{len(ids)} tokens leave no key positions", file, row)
            out.append((ex.source_id, ids, start))
        return out

    def tokenize_shard(self, file: str, rows: list[dict]) -> dict:
        """Token sequences of one shard plus its reject counts and first reject messages."""
        seqs, starts, sources = [], [], []
        rejects: Counter[str] = Counter()
        messages: list[str] = []
        for raw in rows:
            try:
                examples = self._examples(file, raw)
            except RecordError as err:
                if self.corpus.on_error == "fail":
                    raise
                rejects[err.reason] += 1
                if len(messages) < 5:
                    messages.append(str(err))
                continue
            for sid, ids, start in examples:
                seqs.append(np.asarray(ids, dtype=np.int32))
                starts.append(start)
                sources.append(sid)
        return {"seqs": seqs, "key_starts": starts, "sources": sources, "rows_read": len(rows),
                "rejects": dict(rejects), "messages": messages}


@lru_cache(maxsize=4)
def cached_tokenizer(model_dir: str | None):
    """One tokenizer per worker process (Ray reuses workers across read tasks). `model_dir`
    names the model as ModelConfig.path does; it is resolved on this node."""
    return AutoTokenizer.from_pretrained(str(model_folder(model_dir)[1]), local_files_only=True)
