"""Stage 4 (pipelines/encode.py), no Ray: the write stage stores a shard's keys as float16
with its token stream, refuses a key count the count pass did not plan, and leaves a shard
complete or absent; the code pass encodes the stored keys like a direct faiss add with
global ids, without the shared quantizer, and skips what is done."""

from __future__ import annotations

import os
from types import SimpleNamespace

import faiss
import numpy as np
import pytest
import ray

import pipelines.shards as shards_mod
from dresd.config import IndexConfig
from dresd.datastore.compression import compress
from encoded_shards import SIZES, code_all, encoded_row, make_codec, random_states, write_all
from pipelines.encode import KeyCountMismatch, write_shards
from pipelines.merge import ivf_part, load_trained
from pipelines.scratch import Scratch
from pipelines.shards import codes_name, done_shards, keys_name, meta_name, shard_keys


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """The written rows carry the embedding node; nothing here asks Ray."""
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node-a"))


def test_the_write_stage_stores_float16_keys_and_refuses_an_unplanned_count(tmp_path):
    work, hidden = Scratch(str(tmp_path)), random_states()
    comp, _, ctag, _ = make_codec(work, hidden, IndexConfig(dim=16, kind="flat"))
    firsts = write_all(work, hidden, comp, ctag)
    sid = "00001-000000"
    meta = done_shards(work, ctag)[sid]
    assert (meta["keys"], meta["rejects"], meta["recon_error_sum"]) == (150, {}, 0.5)
    assert done_shards(work, ctag)["00000-000001"]["rejects"] == {"empty_text": 1}
    keys = np.asarray(shard_keys(work, sid, ctag))
    np.testing.assert_array_equal(keys, compress(comp, hidden[sid]).astype(np.float16))
    assert set(os.listdir(work.path / "shards" / sid)) == {  # no temporary files left behind
        "tokens.npy", "offsets.npy", "key_starts.npy", "sources.json", keys_name(ctag), meta_name(ctag)}
    with pytest.raises(KeyCountMismatch, match="embedded 150 keys where the count pass found 151"):
        write_shards(encoded_row(sid, compress(comp, hidden[sid])), work.location, ctag, {sid: (firsts[sid], 151)})


def test_a_crash_before_the_marker_leaves_no_shard_and_a_rerun_replaces_it(tmp_path, monkeypatch):
    work, hidden = Scratch(str(tmp_path)), random_states()
    comp, _, ctag, _ = make_codec(work, hidden, IndexConfig(dim=16, kind="flat"))
    sid = "00000-000000"
    plan = {sid: (0, 200)}

    def crash(path):
        raise OSError("disk full")

    real_npy = shards_mod._npy  # the keys (float16) fail to write; the token files before them do not
    monkeypatch.setattr(shards_mod, "_npy", lambda array: crash if array.dtype == np.float16 else real_npy(array))
    with pytest.raises(OSError, match="disk full"):
        write_shards(encoded_row(sid, compress(comp, hidden[sid])), work.location, ctag, plan)
    monkeypatch.undo()
    assert done_shards(work, ctag) == {}  # tokens written, keys not, no marker: not a shard
    write_shards(encoded_row(sid, compress(comp, hidden[sid])), work.location, ctag, plan)
    assert list(done_shards(work, ctag)) == [sid]


def test_the_code_pass_equals_a_direct_add_with_global_ids_and_skips_finished_codes(tmp_path):
    work, hidden = Scratch(str(tmp_path)), random_states()
    comp, _, ctag, tag = make_codec(work, hidden, IndexConfig(dim=16, kind="ivfpq", pq_m=8, nlist=4))
    firsts = write_all(work, hidden, comp, ctag)
    code_all(work, ctag, tag, firsts)
    sid, first = "00001-000000", firsts["00001-000000"]
    assert first == 200
    path = work.path / "shards" / sid / codes_name(tag, 200)
    got = faiss.read_index(str(path))
    trained = load_trained(work, tag)
    direct = ivf_part(trained)  # a view into `trained`, which must outlive it
    direct.add_with_ids(np.asarray(shard_keys(work, sid, ctag), np.float32), np.arange(200, 350))
    ivf_got, ivf_direct = faiss.extract_index_ivf(got), faiss.extract_index_ivf(direct)
    assert got.ntotal == 150 and ivf_got.quantizer.ntotal == 0  # the shared quantizer is left out
    for i in range(ivf_got.nlist):  # ids are global key numbers: this shard's keys follow the first 200
        n = ivf_got.invlists.list_size(i)
        assert n == ivf_direct.invlists.list_size(i)
        np.testing.assert_array_equal(faiss.rev_swig_ptr(ivf_got.invlists.get_ids(i), n),
                                      faiss.rev_swig_ptr(ivf_direct.invlists.get_ids(i), n))
    stamp = path.stat().st_mtime_ns
    code_all(work, ctag, tag, firsts)  # a rerun finds every codes file finished
    assert path.stat().st_mtime_ns == stamp and sum(SIZES.values()) == 350
