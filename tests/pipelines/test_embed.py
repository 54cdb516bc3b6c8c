"""Stage 3 (pipelines/embed.py) on its own, no Ray: the actor class called directly. Its keys
equal a direct forward of the tiny model; the streaming pass gets them compressed with the
frozen codec (float16 blobs, nothing written), the fit pass exactly the states of the keys it
asked for, embedding only the records that hold them."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import ray
import torch
import transformers

from dresd.datastore.compression import compress, fit_compressor, reconstruction_error
from pipelines.embed import SAMPLE_SCHEMA, Embed, Held, compress_held
from pipelines.merge import save_compressor_codec
from pipelines.rows import shard_table, unblob
from pipelines.scratch import Scratch
from tests_support import one_torch_thread

single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)
LENGTHS = [7, 3, 12, 5, 9]
NODE = "node-under-test"


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """The actor asks Ray for its node id (which would start a local Ray): answer it here."""
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: NODE))


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """The tiny model loaded by transformers alone: each sequence run by itself, no padding."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()

    def states(seq) -> np.ndarray:
        with torch.inference_mode():
            out = model(torch.tensor([list(seq)]), output_hidden_states=True)
            h = out.hidden_states[-1][0]
            # The final-norm output: the state the model predicts the next token from.
            assert torch.allclose(model.lm_head(h), out.logits[0], atol=1e-5)
        return h.numpy()

    return states


@pytest.fixture(scope="module")
def seqs():
    rng = np.random.default_rng(0)
    return [rng.integers(3, 259, size=n).astype(np.int32) for n in LENGTHS]


def _embed(tiny_model_dir, batch_size=2, **kw) -> Embed:
    return Embed(str(tiny_model_dir), device="cpu", threads=1, batch_size=batch_size, **kw)


def _shard(seqs, starts, sid="00000-000000", rejects=()):
    return shard_table(sid, "a.jsonl", list(seqs), starts, [f"s{i}" for i in range(len(seqs))],
                       len(seqs) + len(rejects), list(rejects), [f"m{r}" for r in rejects])


def _expected(reference, seqs, starts) -> np.ndarray:
    return np.concatenate([reference(s)[k : len(s) - 1] for s, k in zip(seqs, starts)])


def test_padded_batch_states_equal_each_sequence_alone(tiny_model_dir, seqs, reference):
    got = _embed(tiny_model_dir).embed(seqs)  # one right-padded batch of 5
    assert [h.shape for h in got] == [(n, 64) for n in LENGTHS]
    for s, h in zip(seqs, got):
        np.testing.assert_allclose(h, reference(s), atol=1e-4)


def test_keys_are_the_states_at_key_positions_in_record_order(tiny_model_dir, seqs, reference):
    stage = _embed(tiny_model_dir, batch_size=2)  # length-sorted mini-batches of 2
    starts = [2, 0, 4, 1, 8]
    keys = stage.embed_keys(seqs, starts)
    # Keys: positions start .. len-2 (the last token predicts nothing inside its record).
    assert keys.shape == (sum(n - 1 - k for n, k in zip(LENGTHS, starts)), 64)
    np.testing.assert_allclose(keys, _expected(reference, seqs, starts), atol=1e-4)
    assert stage.embed_keys([], []).shape == (0, 64)


@pytest.fixture(scope="module")
def codec(tmp_path_factory, reference, seqs):
    """A compressor fitted on the reference states of every sequence: (work folder, ctag, compressor)."""
    work = Scratch(str(tmp_path_factory.mktemp("codec")))
    comp = fit_compressor(np.concatenate([reference(s) for s in seqs]), 16)
    return work, save_compressor_codec(work, comp), comp


def test_the_stream_call_returns_each_shard_compressed_with_the_compressor_and_writes_nothing(
        tiny_model_dir, seqs, reference, codec):
    work, tag, comp = codec
    stage = _embed(tiny_model_dir, work=work.location, ctag=tag)
    before = sorted(p.name for p in work.path.iterdir())
    starts = [1, 0, 2]
    out = stage(_shard(seqs[:3], starts, rejects=["bad_json"]))
    assert out.num_rows == 1 and out.column("shard")[0].as_py() == "00000-000000"
    n, dim = out.column("n_keys")[0].as_py(), out.column("key_dim")[0].as_py()
    hidden = _expected(reference, seqs[:3], starts)
    assert (n, dim) == (len(hidden), 16)
    keys = unblob(out.column("keys")[0].as_py(), n, dim, np.float16)
    np.testing.assert_allclose(keys.astype(np.float32), compress(comp, hidden), atol=2e-3)
    assert out.column("recon_error_sum")[0].as_py() == pytest.approx(reconstruction_error(comp, hidden) * n, rel=1e-3)
    assert (out.column("node")[0].as_py(), out.column("dtype")[0].as_py()) == (NODE, "float32")
    assert out.column("rejects")[0].as_py() == ["bad_json"]  # the read stage's columns pass through
    assert sorted(p.name for p in work.path.iterdir()) == before  # nothing written by the actor
    empty = stage(_shard([], [], sid="00000-000001", rejects=["empty_text"] * 2))
    assert empty.column("n_keys")[0].as_py() == 0 and empty.column("keys")[0].as_py() == b""


def test_a_bfloat16_stage_records_its_dtype_and_near_float32_keys(tiny_model_dir, seqs, reference, codec):
    work, tag, comp = codec
    stage = _embed(tiny_model_dir, dtype="bfloat16", work=work.location, ctag=tag)
    assert stage.lm.dtype == "bfloat16"
    out = stage(_shard(seqs[:3], [1, 0, 2]))
    assert out.column("dtype")[0].as_py() == "bfloat16"  # the build's manifest records it
    n = out.column("n_keys")[0].as_py()
    keys = unblob(out.column("keys")[0].as_py(), n, 16, np.float16).astype(np.float32)
    expected = compress(comp, _expected(reference, seqs[:3], [1, 0, 2]))
    assert (keys * expected).sum(1).min() > 0.95 and not np.allclose(keys, expected, atol=2e-3)


def test_the_fit_call_returns_the_kept_keys_states_embedding_only_their_records(tiny_model_dir, seqs, reference,
                                                                                  monkeypatch):
    stage = _embed(tiny_model_dir)
    starts = [2, 0, 4, 1, 8]
    per_record = [n - 1 - k for n, k in zip(LENGTHS, starts)]  # 4, 2, 7, 3, 0
    table = _shard(seqs, starts).append_column("keep", pa.array([[1, 6, 7, 14]]))  # records 0, 2, 2, 3
    embedded = []
    real = stage.embed_keys
    monkeypatch.setattr(stage, "embed_keys", lambda s, k, each=None: embedded.append(len(s)) or real(s, k, each))
    out = stage(table)
    assert out.schema == SAMPLE_SCHEMA and embedded == [3]  # records 0, 2 and 3 only
    assert out.column("key_ids")[0].as_py() == [1, 6, 7, 14]
    got = unblob(out.column("hidden")[0].as_py(), out.column("n")[0].as_py(), out.column("width")[0].as_py(), np.float32)
    every = _expected(reference, seqs, starts)
    assert sum(per_record) == len(every)
    np.testing.assert_allclose(got, every[[1, 6, 7, 14]], atol=1e-4)


def test_a_fit_call_of_several_shards_embeds_their_records_together_and_splits_them_back(tiny_model_dir, seqs,
                                                                                         reference, monkeypatch):
    stage = _embed(tiny_model_dir)
    a = _shard(seqs[:2], [2, 0]).append_column("keep", pa.array([[0, 5]]))  # record 0 key 0, record 1 key 1
    b = _shard(seqs[2:], [4, 1, 8], sid="00000-000001").append_column("keep", pa.array([[6, 8]]))  # 2: 6; 3: 1
    embedded = []
    real = stage.embed_keys
    monkeypatch.setattr(stage, "embed_keys", lambda s, k, each=None: embedded.append(len(s)) or real(s, k, each))
    out = stage(pa.concat_tables([a, b]))
    assert embedded == [4]  # one sorted batch run over both shards' wanted records
    assert out.column("shard").to_pylist() == ["00000-000000", "00000-000001"]
    for i, (part, starts, keep) in enumerate([(seqs[:2], [2, 0], [0, 5]), (seqs[2:], [4, 1, 8], [6, 8])]):
        got = unblob(out.column("hidden")[i].as_py(), out.column("n")[i].as_py(), 64, np.float32)
        np.testing.assert_allclose(got, _expected(reference, part, starts)[keep], atol=1e-4)


def test_states_held_from_a_fit_of_every_key_compress_to_the_actors_keys_bit_for_bit(tiny_model_dir, seqs, codec):
    """The fit pass embeds a whole-corpus sample in the same mini-batches as the stream pass:
    compressing its states (compress_held) instead of embedding again changes no bit."""
    work, tag, _ = codec
    starts = [1, 0, 2, 3]
    table = _shard(seqs[:4], starts, rejects=["bad_json"])
    every = table.append_column("keep", pa.array([list(range(sum(n - 1 - k for n, k in zip(LENGTHS, starts))))]))
    fit = _embed(tiny_model_dir)(every)
    states = unblob(fit.column("hidden")[0].as_py(), fit.column("n")[0].as_py(), 64, np.float32)
    held = compress_held(table, work.location, tag, {"00000-000000": Held(states, "fit-node", "float32")})
    actor = _embed(tiny_model_dir, work=work.location, ctag=tag)(table)
    assert held.column_names == actor.column_names
    for name in ("keys", "n_keys", "key_dim", "recon_error_sum", "dtype", "rejects", "tokens"):
        assert held.column(name).equals(actor.column(name)), name
    assert held.column("node")[0].as_py() == "fit-node"  # where the states were embedded
