"""Stage 1 (pipelines/read.py) on its own, no Ray: one file's read task yields its shards
in order as one-row Arrow tables, every row in exactly one shard, finished shards skipped,
bad files counted, and the fit pass's selection carried as a `keep` column."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from dresd.config import CorpusConfig
from dresd.datastore.corpus import CorpusError
from dresd.datastore.formatting import shared_prefix_len
from pipelines.read import _file_shards
from pipelines.rows import SHARD_SCHEMA, shard_rows
from pipelines.shards import shard_id
from pipelines.tokenize import cached_tokenizer
from tests_support import write_small_corpus

REJECTS = {"missing_field": 1, "bad_json": 1, "empty_text": 1, "not_string": 1, "too_long": 1}


@pytest.fixture(scope="module")
def tokenize(tiny_model_dir):
    tok = cached_tokenizer(str(tiny_model_dir))
    return dict(model_dir=str(tiny_model_dir), corpus=CorpusConfig(max_tokens=256), eos_id=tok.eos_token_id,
                max_tokens=256, prefix_len=shared_prefix_len(tok, "chat"))


def payload(row) -> dict:
    """A shard row's fields as plain Python: sequences, and rejects counted by reason."""
    return {"seqs": row.seqs, "key_starts": row.key_starts.tolist(), "sources": row.sources,
            "rows_read": row.rows_read, "rejects": dict(Counter(row.rejects)), "messages": row.messages}


def _shards(path, index, tokenize, rows_per_shard=5, max_rows=None, skip=frozenset()):
    out = []
    for block in _file_shards({"path": [str(path)], "index": [index]}, tokenize, rows_per_shard, max_rows, skip):
        assert isinstance(block, pa.Table) and block.schema == SHARD_SCHEMA and block.num_rows == 1  # one shard a block
        [row] = shard_rows(block)
        out.append((row.shard, row.file, payload(row)))
    return out


def test_a_file_becomes_shards_of_consecutive_rows_in_order(tmp_path, tokenize):
    path, good = write_small_corpus(tmp_path)  # 45 rows: 40 good, 5 bad
    shards = _shards(path, 3, tokenize, rows_per_shard=5)
    assert [s for s, _, _ in shards] == [shard_id(3, c) for c in range(9)] == sorted(s for s, _, _ in shards)
    assert all(f == str(path) for _, f, _ in shards)
    assert [p["rows_read"] for _, _, p in shards] == [5] * 9
    # Rows in = rows embedded + rejected, over the file and per shard.
    assert sum(len(p["seqs"]) for _, _, p in shards) == len(good)
    total = {}
    for _, _, p in shards:
        assert p["rows_read"] == len(p["seqs"]) + sum(p["rejects"].values())
        for k, v in p["rejects"].items():
            total[k] = total.get(k, 0) + v
    assert total == REJECTS
    # Shard 1 holds lines 6-10: the missing field (line 6) and the bad JSON (line 10).
    assert shards[1][2]["rejects"] == {"missing_field": 1, "bad_json": 1}
    # Corpus order: good record i is the i-th sequence overall.
    sources = [s for _, _, p in shards for s in p["sources"]]
    lines = [int(s.split(":")[1]) for s in sources]
    assert lines == sorted(lines) and len(set(lines)) == len(good) and {6, 10, 13, 16, 21}.isdisjoint(lines)


def test_last_shard_holds_the_remainder_and_max_rows_stops_early(tmp_path, tokenize):
    path, _ = write_small_corpus(tmp_path)
    shards = _shards(path, 0, tokenize, rows_per_shard=20)
    assert [(s, p["rows_read"]) for s, _, p in shards] == [(shard_id(0, 0), 20), (shard_id(0, 1), 20), (shard_id(0, 2), 5)]
    capped = _shards(path, 0, tokenize, rows_per_shard=4, max_rows=10)
    assert [p["rows_read"] for _, _, p in capped] == [4, 4, 2]
    assert capped[-1][2]["rejects"] == {"bad_json": 1}  # line 10 is the last one read


def test_finished_shards_are_skipped_before_tokenizing(tmp_path, tokenize, monkeypatch):
    import pipelines.read as read_mod

    path, _ = write_small_corpus(tmp_path)
    full = _shards(path, 1, tokenize, rows_per_shard=5)
    skip = frozenset({shard_id(1, 0), shard_id(1, 4), shard_id(1, 8)})
    calls = []
    real = read_mod.Tokenize.tokenize_shard
    monkeypatch.setattr(read_mod.Tokenize, "tokenize_shard", lambda self, f, rows: calls.append(rows[0]["row"]) or real(self, f, rows))
    rest = _shards(path, 1, tokenize, rows_per_shard=5, skip=skip)
    assert [s for s, _, _ in rest] == [s for s, _, _ in full if s not in skip]
    assert calls == [6, 11, 16, 26, 31, 36]  # first rows of the shards not skipped: no work spent on the others
    # A skipped shard does not shift the ids or contents of the ones after it.
    by_id = {s: p for s, _, p in full}
    for s, _, p in rest:
        assert p["sources"] == by_id[s]["sources"] and [x.tolist() for x in p["seqs"]] == [x.tolist() for x in by_id[s]["seqs"]]


def test_an_unreadable_file_is_one_rejected_row_or_an_error(tmp_path, tokenize):
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really parquet")
    [(sid, _, p)] = _shards(broken, 2, tokenize)
    assert sid == shard_id(2, 0)
    assert p["rows_read"] == 1 and p["seqs"] == [] and p["rejects"] == {"unreadable_file": 1}
    assert "broken.parquet" in p["messages"][0]
    # ... unless that shard is finished already.
    assert _shards(broken, 2, tokenize, skip=frozenset({shard_id(2, 0)})) == []
    fail = dict(tokenize, corpus=CorpusConfig(max_tokens=256, on_error="fail"))
    with pytest.raises(CorpusError, match="broken.parquet"):
        _shards(broken, 2, fail)


def test_the_fit_pass_selection_reads_only_its_shards_and_carries_their_keys(tmp_path, tokenize):
    path, _ = write_small_corpus(tmp_path)
    select = {shard_id(0, 2): np.array([0, 5, 7]), shard_id(0, 7): np.array([1])}
    blocks = list(_file_shards({"path": [str(path)], "index": [0]}, tokenize, 5, None, frozenset(), select))
    rows = [r for b in blocks for r in shard_rows(b)]
    assert [r.shard for r in rows] == sorted(select)
    assert [r.keep.tolist() for r in rows] == [[0, 5, 7], [1]]
