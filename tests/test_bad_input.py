"""Bad input, case by case (issue 25 item 6): each is refused, rejected or counted with a
message that names what is wrong and where, and each test records the message it asserts.

Every test calls `record_property("expected", ...)` with the fragment it asserts and
`record_property("message", ...)` with the whole error text or reject reason, so a
`--junitxml` run carries both. docs/reliability.md ("Bad input") lists the cases.

No Ray: stages are called directly (read, tokenize, embed, publish), and a build or update
runs whole with its Ray Data passes replaced by the same stages run in this process
(`no_ray_embedding`); the checks under test all run before or after the passes.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import ray

import pipelines.build as build_mod
from dresd.cli.main import main as dresd_main
from dresd.config import BuildConfig, CorpusConfig, DecodeConfig, IndexConfig, ModelConfig, to_dict
from dresd.datastore.compression import fit_compressor
from dresd.datastore.corpus import CorpusError
from dresd.datastore.formatting import shared_prefix_len
from dresd.datastore.index import choose_index_params
from dresd.datastore.store import Datastore, DatastoreError, list_versions, read_current
from dresd.datastore.publish import publish
from pipelines.embed import Embed, NonFiniteStates
from pipelines.read import _file_shards
from pipelines.rows import add_columns, shard_rows
from pipelines.shards import shard_id
from pipelines.tokenize import cached_tokenizer
from tests_support import make_manifest, make_parts, one_torch_thread, passes_in_process, publish_for_model

single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def expect(record_property, message: str, fragment: str) -> None:
    """Assert `fragment` is in `message`, recording both for the reliability page."""
    record_property("expected", fragment)
    record_property("message", message)
    assert fragment in message, message


def _jsonl(path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _good(n: int, tag: str = "") -> list[dict]:
    return [{"prompt": f"question {tag}{i}?", "response": f"answer {tag}{i}: " + "abc " * (i % 3 + 2)} for i in range(n)]


@pytest.fixture(scope="module")
def tokenize(tiny_model_dir):
    """The read stage's tokenizer settings for the tiny model (pipelines/read.py `_file_shards`)."""
    tok = cached_tokenizer(str(tiny_model_dir))
    return dict(model_dir=str(tiny_model_dir), corpus=CorpusConfig(max_tokens=256), eos_id=tok.eos_token_id,
                max_tokens=256, prefix_len=shared_prefix_len(tok, "chat"))


def _shards(path, tokenize, rows_per_shard=4, corpus=None):
    """(shard id, its fields) of every shard the read stage yields; rejects counted by reason."""
    tokenize = dict(tokenize, corpus=corpus) if corpus else tokenize
    out = []
    for block in _file_shards({"path": [str(path)], "index": [0]}, tokenize, rows_per_shard, None, frozenset()):
        for r in shard_rows(block):
            out.append((r.shard, {"seqs": r.seqs, "sources": r.sources, "rows_read": r.rows_read,
                                  "rejects": dict(Counter(r.rejects)), "messages": r.messages}))
    return out


@pytest.fixture
def no_ray_embedding(monkeypatch):
    """Builds and updates run their passes in this process: the read, embed and encode stages
    called directly, as the Ray Data graphs would call them (tests_support.passes_in_process)."""
    passes_in_process(monkeypatch)


@pytest.fixture
def nothing_starts(monkeypatch):
    """Fails the test if Ray is joined or any pass over the corpus starts."""
    import pipelines.work as work_mod
    from pipelines import passes

    def started(*args, **kwargs):
        raise AssertionError("Ray was joined or embedding started")

    monkeypatch.setattr(work_mod, "ensure_ray", started)
    for name in ("count_pass", "fit_pass", "stream_pass", "code_pass"):
        monkeypatch.setattr(passes, name, started)


def _build_cfg(tiny_model_dir, tmp_path, paths, **corpus) -> BuildConfig:
    return BuildConfig(model=ModelConfig(path=str(tiny_model_dir)), corpus=CorpusConfig(paths=paths, max_tokens=256, **corpus),
                       index=IndexConfig(dim=16), output=str(tmp_path / "store"), value_len=8, shard_rows=4)


# ----------------------------------------------------------------------------- empty corpora

EMPTY_CORPORA = {
    "empty": [],
    "all_rejected": [{"prompt": "no response"}, "{not json", {"prompt": "p", "response": "  "}],
}
EMPTY_COUNTS = {"empty": "0 rows read, 0 rejected",
                "all_rejected": "3 rows read, 3 rejected (bad_json: 1, empty_text: 1, missing_field: 1)"}


@pytest.mark.parametrize("case", EMPTY_CORPORA)
def test_a_build_of_a_corpus_without_usable_rows_fails_naming_it_and_the_rejects(
        case, tiny_model_dir, tmp_path, no_ray_embedding, record_property):
    path = _jsonl(tmp_path / f"{case}.jsonl", EMPTY_CORPORA[case])
    cfg = _build_cfg(tiny_model_dir, tmp_path, [path])
    with pytest.raises(DatastoreError) as err:
        build_mod.build_datastore(cfg)
    assert f"corpus ['{path}']: no usable records, so nothing is published" in str(err.value)
    expect(record_property, str(err.value), EMPTY_COUNTS[case])
    assert read_current(cfg.output) is None and list_versions(cfg.output) == []


@pytest.mark.parametrize("case", EMPTY_CORPORA)
def test_update_add_of_a_corpus_without_usable_rows_publishes_nothing(
        case, tiny_lm, tmp_path, no_ray_embedding, record_property):
    root = tmp_path / "store"
    parent = publish_for_model(root, tiny_lm, version="v1")
    path = _jsonl(tmp_path / f"{case}.jsonl", EMPTY_CORPORA[case])
    from pipelines.update import update_datastore

    cfg = BuildConfig(model=ModelConfig(path=str(tiny_lm.model.name_or_path)),
                      corpus=CorpusConfig(paths=[path], max_tokens=256), output=str(root), shard_rows=4)
    with pytest.raises(DatastoreError) as err:
        update_datastore(cfg)
    assert f"update add: corpus ['{path}']: no usable records, so nothing is published over version v1" in str(err.value)
    expect(record_property, str(err.value), EMPTY_COUNTS[case])
    assert read_current(root) == parent and list_versions(root) == ["v1"]


def test_compact_of_a_store_whose_every_record_is_deleted_is_refused(tmp_path, record_property):
    from pipelines.update import compact, delete_sources

    root = tmp_path / "store"
    publish(root, make_parts(), make_manifest(), version="v1")
    deleted = delete_sources(root, ["src-0", "src-1", "src-2"])
    with pytest.raises(DatastoreError) as err:
        compact(root)
    expect(record_property, str(err.value), "every one of its 3 records is deleted")
    assert "empty datastore, which is refused; nothing is published" in str(err.value)
    assert read_current(root) == deleted.name and len(list_versions(root)) == 2


# ----------------------------------------------------------------------------- NaN states

@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_an_embedded_shard_with_non_finite_states_is_refused_naming_shard_and_records(
        bad, tiny_model_dir, tokenize, tmp_path, monkeypatch, record_property):
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "here"))
    path = _jsonl(tmp_path / "c.jsonl", _good(3))
    [block] = list(_file_shards({"path": [path], "index": [0]}, tokenize, 4, None, frozenset()))
    keys = int(sum(r.keys_per_record.sum() for r in shard_rows(block)))
    block = add_columns(block, {"keep": pa.array([list(range(keys))], pa.list_(pa.int64()))})  # as the fit pass asks
    stage = Embed(str(tiny_model_dir), "cpu", 1, 8)
    real, [row] = stage.embed, list(shard_rows(block))
    second = row.seqs[1]

    def broken(seqs):  # the second record's third key goes bad, as a broken forward would
        states = real(seqs)
        for s, h in zip(seqs, states):
            if np.array_equal(s, second):
                h[row.key_starts[1] + 2, 5] = bad
        return states

    monkeypatch.setattr(stage, "embed", broken)
    with pytest.raises(NonFiniteStates) as err:
        stage(block)
    msg = str(err.value)
    assert f"work shard {shard_id(0, 0)} of {path}" in msg and "1 record(s) ['c.jsonl:2']" in msg
    expect(record_property, msg, "hidden states are NaN or infinite")


def test_nan_in_the_compressor_fit_sample_is_refused_naming_rows(record_property):
    sample = np.random.default_rng(0).normal(size=(20, 8))
    sample[[4, 11], 2] = np.nan
    with pytest.raises(ValueError) as err:
        fit_compressor(sample, 4)
    expect(record_property, str(err.value), "compressor fit sample: 2 of 20 rows hold NaN or infinite values (rows [4, 11])")


# ----------------------------------------------------------------------------- forced IVF-PQ

@pytest.mark.parametrize("on_disk, need", [(False, 16), (True, 256)], ids=["ivfpq", "ivfpq_on_disk"])
def test_a_forced_ivfpq_index_on_a_tiny_corpus_is_refused_before_embedding(
        on_disk, need, tiny_model_dir, tmp_path, nothing_starts, record_property):
    if on_disk:  # 3 prompt/response records: about 90 keys
        cfg = _build_cfg(tiny_model_dir, tmp_path, [_jsonl(tmp_path / "c.jsonl", _good(3))])
    else:  # 2 text records of 5 characters: 5 keys each
        cfg = _build_cfg(tiny_model_dir, tmp_path, [_jsonl(tmp_path / "c.jsonl", [{"text": "hello"}, {"text": "world"}])],
                         kind="text")
    cfg.index = IndexConfig(dim=16, pq_m=8, kind="ivfpq", on_disk=on_disk)
    with pytest.raises(DatastoreError) as err:
        build_mod.build_datastore(cfg)
    msg = str(err.value)
    expect(record_property, msg, f"needs at least {need} keys to train its IVF-PQ index, but the corpus gives")
    assert "(counted after tokenizing, before embedding)" in msg
    assert ("gives 10 " in msg) if not on_disk else ("with index.on_disk" in msg)
    # The index layout refuses it too, and "auto" falls back to an exact flat index.
    with pytest.raises(ValueError, match=f"needs at least {need} keys"):
        choose_index_params(need - 1, cfg.index)
    assert choose_index_params(15, IndexConfig(dim=16, pq_m=8, flat_below=0)).kind == "flat"


# ----------------------------------------------------------------------------- configs and flags

YAML_CASES = [
    ("corpus:\n  paths: [x.jsonl]\n  max_records: ten\n", "corpus.max_records: 'ten' is not an integer or null"),
    ("corpus:\n  paths: [x.jsonl]\nindex:\n  kind: hnsw\n", "index.kind: 'hnsw' is not one of ['auto', 'flat', 'ivfpq']"),
    ("corpus:\n  paths: x.jsonl\n", "corpus.paths: 'x.jsonl' is not a list of a string"),
    ("corpus:\n  paths: [x.jsonl]\nvalue_len: true\n", "value_len: True is not an integer"),
    ("corpus:\n  paths: [x.jsonl]\nembed_actor: 2\n", "config: unknown key(s) ['embed_actor'] for BuildConfig"),
]


@pytest.mark.parametrize("text, message", YAML_CASES, ids=["not_int", "not_a_choice", "not_a_list", "bool_for_int",
                                                           "unknown_key"])
def test_a_bad_yaml_value_fails_dresd_build_and_the_build_job_naming_file_and_key(
        text, message, tmp_path, capsys, nothing_starts, record_property):
    from jobs.build import main as job_main
    from jobs.common import run_job

    path = tmp_path / "build.yaml"
    path.write_text(text)
    assert dresd_main(["build", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dresd build: error:") and len(err.splitlines()) == 1
    expect(record_property, err, f"{path}: {message}")
    # The job takes the same file and fails the same way, with the jobs' exit code for any error.
    assert run_job(job_main, ["--config", str(path)]) == 1
    assert f"{path}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--max-new-tokens", "-5"], "max_new_tokens must be >= 0, got -5"),
    (["--temperature", "-0.5"], "temperature must be a finite number >= 0, got -0.5"),
    (["--top-p", "0"], "top_p must be in (0, 1], got 0.0"),
    (["--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
    (["--method", "greedy,dresdd"], "--method (methods, speculative.method): unknown method 'dresdd'; known: "),
], ids=["negative_max_new_tokens", "negative_temperature", "top_p_0", "top_p_above_1", "unknown_method"])
def test_bad_generate_flags_exit_2_naming_the_field_before_the_model_loads(flags, message, capsys, monkeypatch,
                                                                            record_property):
    import dresd.decoding.engine as engine_mod

    monkeypatch.setattr(engine_mod.Engine, "open", lambda *a, **k: pytest.fail("the model was loaded"))
    assert dresd_main(["generate", "--prompt", "hi", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dresd generate: error:") and len(err.splitlines()) == 1
    expect(record_property, err, message)


# ----------------------------------------------------------------------------- text and files

def test_a_lone_surrogate_prompt_is_a_decode_reject_not_a_crash(tiny_model_dir, tmp_path, record_property):
    from pipelines.decode import DecodeChunks, read_prompts

    # json.dumps writes the lone surrogate as the escape \ud800, which json.loads reads back.
    path = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": "fine?"}, {"prompt": "bad \ud800 text"}, {"prompt": "ok"}])
    cfg = DecodeConfig(model=ModelConfig(path=str(tiny_model_dir), device="cpu"), prompts=path, max_new_tokens=2,
                       output=str(tmp_path / "out"), threads=1)
    rows = read_prompts(cfg)
    assert [r["reject"] for r in rows] == [None, "bad_unicode", None]
    (tmp_path / "out").mkdir()
    receipt = DecodeChunks(to_dict(cfg), str(tmp_path / "out")).decode_chunk(0, "key", rows)
    assert receipt["written"] and receipt["done"] == 2 and json.loads(receipt["failed"]) == {}
    expect(record_property, receipt["rejects"], '"bad_unicode": 1')


def test_a_lone_surrogate_in_a_corpus_row_is_a_build_reject(tokenize, tmp_path, record_property):
    path = _jsonl(tmp_path / "c.jsonl", _good(2) + [{"prompt": "q\ud800", "response": "r"}])
    [(_, p)] = _shards(path, tokenize)
    assert p["rows_read"] == 3 and len(p["seqs"]) == 2 and p["rejects"] == {"bad_unicode": 1}
    expect(record_property, p["messages"][0], "row 3: field 'prompt': text holds a lone surrogate '\\ud800' at character 2")


def _truncated_gz(tmp_path, rows: int = 40):
    blob = gzip.compress("".join(json.dumps(r) + "\n" for r in _good(rows)).encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(blob[: len(blob) * 2 // 3])
    # The whole lines the cut file still holds: everything zlib can decompress from it.
    return path, zlib.decompressobj(wbits=31).decompress(path.read_bytes()).count(b"\n")


def test_a_truncated_jsonl_gz_keeps_the_rows_before_the_break_and_rejects_the_break_once(
        tokenize, tmp_path, record_property):
    path, whole = _truncated_gz(tmp_path)
    assert 4 < whole < 40
    shards = _shards(path, tokenize, rows_per_shard=4)
    # Every shard in order, from shard 0: none is re-emitted holding only the reject.
    assert [s for s, _ in shards] == [shard_id(0, c) for c in range(len(shards))]
    assert sum(len(p["seqs"]) for _, p in shards) == whole
    assert sum(p["rows_read"] for _, p in shards) == whole + 1
    rejects = [(s, p["rejects"], p["messages"]) for s, p in shards if p["rejects"]]
    assert len(rejects) == 1 and rejects[0][1] == {"truncated_file": 1} and rejects[0][0] == shards[-1][0]
    msg = rejects[0][2][0]
    assert str(path) in msg
    expect(record_property, msg, f"row {whole + 1}: file breaks after line {whole}: EOFError")
    # Under --on-error fail the build stops there, naming the file and the line.
    with pytest.raises(CorpusError, match=f"file breaks after line {whole}"):
        _shards(path, tokenize, corpus=CorpusConfig(max_tokens=256, on_error="fail"))


# ----------------------------------------------------------------------------- source ids

def test_a_source_id_given_twice_is_one_source_and_a_delete_removes_every_record(tokenize, tmp_path, record_property):
    """Rule (docs/operations.md, Corpora): with corpus.id_field, records that share an id are
    one source, kept as they are; `update delete --source ID` tombstones all of them."""
    from pipelines.update import delete_sources

    ids = CorpusConfig(max_tokens=256, id_field="id")
    rows = [dict(r, id=i) for r, i in zip(_good(3), ["doc-1", "doc-2", "doc-1"])]  # twice in one file
    other = [dict(r, id="doc-2") for r in _good(1, "b")]  # and again in another
    sources = [s for path in (_jsonl(tmp_path / "a.jsonl", rows), _jsonl(tmp_path / "b.jsonl", other))
               for _, p in _shards(path, tokenize, corpus=ids) for s in p["sources"]]
    assert sources == ["doc-1", "doc-2", "doc-1", "doc-2"]

    root = tmp_path / "store"
    parts = make_parts(records=[[10, 11, 12], [20, 21, 22], [30, 31, 32], [40, 41, 42]])
    parts.sources = sources
    publish(root, parts, make_manifest(), version="v1")
    delete_sources(root, ["doc-2"])
    store = Datastore(root)
    pos = np.asarray(store.key_positions)
    per_record = [bool(store.deleted[(pos >= lo) & (pos < hi)].all())
                  for lo, hi in zip(store.record_offsets[:-1], store.record_offsets[1:])]
    assert per_record == [False, True, False, True]
    expect(record_property, json.dumps(store.manifest["change"]), '"records": 2')


def test_default_ids_of_two_files_with_one_name_are_refused_before_embedding(
        tiny_model_dir, tmp_path, nothing_starts, record_property):
    a = _jsonl(tmp_path / "2023" / "part-0.jsonl", _good(2))
    b = _jsonl(tmp_path / "2024" / "part-0.jsonl", _good(2, "b"))
    with pytest.raises(DatastoreError) as err:
        build_mod.build_datastore(_build_cfg(tiny_model_dir, tmp_path, [a, b]))
    assert f"corpus files {a} and {b} share the file name 'part-0.jsonl'" in str(err.value)
    expect(record_property, str(err.value), "default source ids ('part-0.jsonl:<row>') would clash")
    # With ids of their own the same files are fine (refused here only for want of Ray).
    with pytest.raises(AssertionError, match="Ray was joined"):
        build_mod.build_datastore(_build_cfg(tiny_model_dir, tmp_path, [a, b], id_field="prompt"))


def test_update_add_of_a_file_name_the_store_already_uses_is_refused_before_embedding(
        tiny_model_dir, tmp_path, nothing_starts, record_property):
    from pipelines.update import update_datastore

    root = tmp_path / "store"
    parts = make_parts()
    parts.sources = ["data.jsonl:1", "data.jsonl:2", "data.jsonl:3"]  # built from day1/data.jsonl, no id field
    publish(root, parts, make_manifest(), version="v1")
    path = _jsonl(tmp_path / "day2" / "data.jsonl", _good(2))
    cfg = BuildConfig(model=ModelConfig(path=str(tiny_model_dir)), corpus=CorpusConfig(paths=[path]), output=str(root))
    with pytest.raises(DatastoreError) as err:
        update_datastore(cfg)
    assert "already holds source ids of a file named 'data.jsonl' (e.g. 'data.jsonl:1')" in str(err.value)
    expect(record_property, str(err.value), f"adding {path} would reuse its default ids 'data.jsonl:<row>'")
    assert read_current(root) == "v1"


# ----------------------------------------------------------------------------- tombstones

def test_a_tombstone_file_of_the_wrong_length_is_refused_on_open(tmp_path, record_property):
    root = tmp_path / "store"
    parts = make_parts()  # 9 keys
    # A publisher that got the mask wrong: its manifest and checksums agree with the file.
    parts.deleted = np.ones(5, dtype=bool)
    vdir = publish(root, parts, make_manifest(), version="v1")
    with pytest.raises(DatastoreError) as err:
        Datastore(root)
    assert str(vdir / "deleted.npy") in str(err.value)
    expect(record_property, str(err.value), "5 tombstones (dtype bool, shape (5,)), but the version has 9 keys")
