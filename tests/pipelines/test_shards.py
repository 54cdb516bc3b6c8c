"""Work shards: complete-or-absent per codec, damaged shards detected, unreadable files named."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.scratch import Scratch
from pipelines.shards import (ShardData, ShardError, done_shards, first_key_ids, keys_name, meta_name, shard_keys,
                              shard_tokens, write_shard)

TAG = "abc123def456"


def _write(work, sid, keys=6, tag=TAG):
    data = ShardData(tokens=np.arange(10), offsets=np.array([0, 4, 10]), key_starts=np.array([1, 1]),
                     keys=np.ones((keys, 8), np.float32), sources=["a", "b"])
    write_shard(work / "shards" / sid, data, {"keys": keys, "tokens": 10, "first_id": 0, "codes": None}, tag)


def test_done_shards_leaves_out_damaged_ones_and_other_codecs(tmp_path):
    for sid in ("00000-000000", "00000-000001", "00000-000002", "00000-000003"):
        _write(tmp_path, sid)
    work = Scratch(str(tmp_path))
    assert sorted(done_shards(work, TAG)) == ["00000-000000", "00000-000001", "00000-000002", "00000-000003"]
    assert done_shards(work, "other") == {}  # encoded with another codec: not done for this one
    assert sorted(done_shards(work, TAG, ["00000-000001", "00000-000009"])) == ["00000-000001"]
    keys = tmp_path / "shards" / "00000-000001" / keys_name(TAG)
    keys.write_bytes(keys.read_bytes()[:100])  # truncated
    (tmp_path / "shards" / "00000-000002" / meta_name(TAG)).write_text('{"keys": 99, "tokens": 10}')  # disagrees
    (tmp_path / "shards" / "00000-000003" / "sources.json").write_text("{not json")
    assert sorted(done_shards(work, TAG)) == ["00000-000000"]
    (tmp_path / "shards" / ".tmp-x").mkdir()  # an unfinished write is never a shard
    assert sorted(done_shards(work, TAG)) == ["00000-000000"]
    _write(tmp_path, "00000-000000", tag="other")  # a second codec beside the first: both complete
    assert list(done_shards(work, "other")) == list(done_shards(work, TAG)) == ["00000-000000"]


def test_unreadable_shard_files_raise_naming_the_shard(tmp_path):
    _write(tmp_path, "00000-000007")
    work = Scratch(str(tmp_path))
    assert shard_keys(work, "00000-000007", TAG).shape == (6, 8) and shard_keys(work, "00000-000007", TAG).dtype == np.float16
    assert shard_tokens(work, "00000-000007")[3] == ["a", "b"]
    (tmp_path / "shards" / "00000-000007" / keys_name(TAG)).write_bytes(b"garbage")
    with pytest.raises(ShardError, match=f"work shard 00000-000007: cannot read .*{keys_name(TAG)}"):
        shard_keys(work, "00000-000007", TAG)
    (tmp_path / "shards" / "00000-000007" / "offsets.npy").unlink()
    with pytest.raises(ShardError, match="00000-000007.*offsets.npy"):
        shard_tokens(work, "00000-000007")


def test_first_key_ids_number_keys_across_shards_in_order():
    assert first_key_ids({"b": 5, "a": 3, "c": 0}, ["a", "b", "c"], base=10) == {"a": 10, "b": 13, "c": 18}
    assert first_key_ids({}, []) == {}


def test_uri_scratch_pushes_and_pulls_through_storage(tmp_path, monkeypatch):
    """A file:// scratch: what one process writes and pushes, a fresh mirror pulls back."""
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache-a"))
    work = Scratch(f"file://{tmp_path}/remote/build-1")
    assert work.remote and str(work.path).startswith(str(tmp_path / "cache-a"))
    _write(work.path, "00000-000000")
    work.push("shards/00000-000000", last=meta_name(TAG))
    assert (tmp_path / "remote" / "build-1" / "shards" / "00000-000000" / meta_name(TAG)).is_file()
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache-b"))  # another node's mirror
    assert not (work.path / "shards").exists()
    assert list(done_shards(work, TAG)) == ["00000-000000"]
    assert shard_keys(work, "00000-000000", TAG).shape == (6, 8)
    work.remove()
    assert not (tmp_path / "remote" / "build-1").exists() and not work.path.exists()
