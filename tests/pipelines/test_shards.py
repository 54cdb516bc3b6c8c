"""Work shards: complete-or-absent writes, damaged shards detected, unreadable files named."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.scratch import Scratch
from pipelines.shards import ShardData, ShardError, done_shards, shard_hidden, shard_tokens, write_shard


def _write(work, sid, keys=6):
    data = ShardData(tokens=np.arange(10), offsets=np.array([0, 4, 10]), key_starts=np.array([1, 1]),
                     hidden=np.ones((keys, 8), np.float32), sources=["a", "b"])
    write_shard(work / "shards" / sid, data, {"keys": keys, "tokens": 10})


def test_done_shards_leaves_out_damaged_ones(tmp_path):
    for sid in ("00000-000000", "00000-000001", "00000-000002", "00000-000003"):
        _write(tmp_path, sid)
    assert sorted(done_shards(Scratch(str(tmp_path)))) == ["00000-000000", "00000-000001", "00000-000002", "00000-000003"]
    hidden = tmp_path / "shards" / "00000-000001" / "hidden.npy"
    hidden.write_bytes(hidden.read_bytes()[:100])  # truncated
    (tmp_path / "shards" / "00000-000002" / "meta.json").write_text('{"keys": 99, "tokens": 10}')  # disagrees
    (tmp_path / "shards" / "00000-000003" / "sources.json").write_text("{not json")
    assert sorted(done_shards(Scratch(str(tmp_path)))) == ["00000-000000"]
    (tmp_path / "shards" / ".tmp-x").mkdir()  # an unfinished write is never a shard
    assert sorted(done_shards(Scratch(str(tmp_path)))) == ["00000-000000"]


def test_unreadable_shard_files_raise_naming_the_shard(tmp_path):
    _write(tmp_path, "00000-000007")
    assert shard_hidden(Scratch(str(tmp_path)), "00000-000007").shape == (6, 8)
    assert shard_tokens(Scratch(str(tmp_path)), "00000-000007")[3] == ["a", "b"]
    (tmp_path / "shards" / "00000-000007" / "hidden.npy").write_bytes(b"garbage")
    with pytest.raises(ShardError, match="work shard 00000-000007: cannot read .*hidden.npy"):
        shard_hidden(Scratch(str(tmp_path)), "00000-000007")
    (tmp_path / "shards" / "00000-000007" / "offsets.npy").unlink()
    with pytest.raises(ShardError, match="00000-000007.*offsets.npy"):
        shard_tokens(Scratch(str(tmp_path)), "00000-000007")


def test_uri_scratch_pushes_and_pulls_through_storage(tmp_path, monkeypatch):
    """A file:// scratch: what one process writes and pushes, a fresh mirror pulls back."""
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache-a"))
    work = Scratch(f"file://{tmp_path}/remote/build-1")
    assert work.remote and str(work.path).startswith(str(tmp_path / "cache-a"))
    _write(work.path, "00000-000000")
    work.push("shards/00000-000000", last="meta.json")
    assert (tmp_path / "remote" / "build-1" / "shards" / "00000-000000" / "meta.json").is_file()
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache-b"))  # another node's mirror
    assert not (work.path / "shards").exists()
    assert list(done_shards(work)) == ["00000-000000"]
    assert shard_hidden(work, "00000-000000").shape == (6, 8)
    work.remove()
    assert not (tmp_path / "remote" / "build-1").exists() and not work.path.exists()
