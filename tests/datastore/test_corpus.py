"""Raw corpus reading: formats, reject reasons with exact locations, packaged data sets."""

from __future__ import annotations

import gzip
import json

import pytest

from dresd.config import CorpusConfig
from dresd.datastore.corpus import (
    CorpusError,
    Example,
    RawRow,
    RecordError,
    extract_examples,
    list_corpus_files,
    mtbench_first_turns,
    read_rows,
    sharegpt_first_turns,
)

GOOD = {"prompt": "What is 2+2?", "response": "4."}
PR = CorpusConfig(kind="prompt_response")


def _jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def mixed_jsonl(tmp_path):
    return _jsonl(tmp_path / "mixed.jsonl", [
        json.dumps(GOOD),                                   # line 1 ok
        "",                                                 # line 2 blank: ignored
        '{"prompt": "broken", ',                            # line 3 bad json
        json.dumps({"prompt": "no response"}),              # line 4 missing response
        json.dumps({"prompt": "   ", "response": "x"}),     # line 5 empty prompt
        json.dumps({"prompt": "p", "response": 42}),        # line 6 non-string response
        json.dumps([1, 2]),                                 # line 7 not an object
        json.dumps({"prompt": "last", "response": "one"}),  # line 8 ok
    ])


def _outcomes(path, cfg=PR):
    """(row, reason or None, message or None) per raw row, skip mode."""
    out = []
    for raw in read_rows(path, "skip"):
        if raw.error:
            out.append((raw.row, raw.error, None))
            continue
        try:
            extract_examples(raw, cfg)
            out.append((raw.row, None, None))
        except RecordError as err:
            out.append((raw.row, err.reason, str(err)))
    return out


def test_jsonl_skip_mode_reasons_and_locations(mixed_jsonl):
    got = _outcomes(mixed_jsonl)
    assert [(r, reason) for r, reason, _ in got] == [
        (1, None), (3, "bad_json"), (4, "missing_field"), (5, "empty_text"),
        (6, "not_string"), (7, "not_object"), (8, None)]
    messages = {r: m for r, _, m in got if m}
    for row, field in ((4, "response"), (5, "prompt"), (6, "response")):
        assert mixed_jsonl in messages[row]
        assert f"row {row}" in messages[row]
        assert repr(field) in messages[row]
    bad = [raw for raw in read_rows(mixed_jsonl, "skip") if raw.row == 3][0]
    assert bad.data is None and bad.error == "bad_json"
    # extract_examples on an unreadable row raises with its reason and location
    with pytest.raises(RecordError) as exc:
        extract_examples(bad, PR)
    assert exc.value.reason == "bad_json" and "row 3" in str(exc.value)


def test_jsonl_fail_mode_raises_at_bad_line(mixed_jsonl):
    rows = []
    with pytest.raises(CorpusError) as exc:
        for raw in read_rows(mixed_jsonl, "fail"):
            rows.append(raw.row)
    assert rows == [1]
    assert mixed_jsonl in str(exc.value) and "row 3" in str(exc.value)
    assert exc.value.file == mixed_jsonl and exc.value.row == 3


def test_record_error_is_corpus_error_and_names_everything(tmp_path):
    path = _jsonl(tmp_path / "one.jsonl", [json.dumps({"prompt": "p"})])
    (raw,) = read_rows(path, "fail")
    with pytest.raises(CorpusError) as exc:
        extract_examples(raw, PR)
    err = exc.value
    assert isinstance(err, RecordError)
    assert (err.reason, err.file, err.row, err.field) == ("missing_field", path, 1, "response")


def test_good_example_fields_and_ids(tmp_path):
    path = _jsonl(tmp_path / "ids.jsonl", [json.dumps({**GOOD, "uid": 7}), json.dumps(GOOD)])
    rows = list(read_rows(path, "fail"))
    assert extract_examples(rows[1], PR) == [Example("ids.jsonl:2", GOOD["prompt"], GOOD["response"], None)]
    assert extract_examples(rows[0], CorpusConfig(id_field="uid"))[0].source_id == "7"
    with pytest.raises(RecordError) as exc:
        extract_examples(rows[1], CorpusConfig(id_field="uid"))
    assert exc.value.reason == "missing_field" and exc.value.field == "uid"


def test_text_kind(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [json.dumps({"body": "hello"}), json.dumps({"body": ""}),
                                         json.dumps({"body": None})])
    cfg = CorpusConfig(kind="text", text_field="body")
    rows = list(read_rows(path, "fail"))
    assert extract_examples(rows[0], cfg) == [Example("t.jsonl:1", None, None, "hello")]
    assert [o[1] for o in _outcomes(path, cfg)] == [None, "empty_text", "missing_field"]


def test_json_list_and_gz(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps([GOOD, {"prompt": 1, "response": "r"}, "oops"]))
    assert [o[1] for o in _outcomes(str(p))] == [None, "not_string", "not_object"]
    g = tmp_path / "b.jsonl.gz"
    with gzip.open(g, "wt") as fh:
        fh.write(json.dumps(GOOD) + "\nnot json\n")
    assert [o[:2] for o in _outcomes(str(g))] == [(1, None), (2, "bad_json")]
    b = tmp_path / "bytes.jsonl"  # a BOM is accepted; one line of bad UTF-8 is one bad row
    b.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n\xff\xfe garbage\n"
                  + json.dumps(GOOD).encode() + b"\n")
    assert [o[:2] for o in _outcomes(str(b))] == [(1, None), (2, "bad_json"), (3, None)]


def test_truncated_json_list(tmp_path):
    p = tmp_path / "cut.json"
    p.write_text(json.dumps([GOOD, GOOD])[:-20])
    assert [o[:2] for o in _outcomes(str(p))] == [(1, None), (2, "bad_json")]
    with pytest.raises(CorpusError, match=r"cut\.json: row 2"):
        list(read_rows(str(p), "fail"))
    q = tmp_path / "obj.json"
    q.write_text(json.dumps(GOOD))
    for mode in ("skip", "fail"):
        with pytest.raises(CorpusError, match="obj.json"):
            list(read_rows(str(q), mode))


def test_parquet_rows_and_nulls(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"prompt": ["a", None, "c"], "response": ["x", "y", ""]}), p)
    got = _outcomes(str(p))
    assert [o[:2] for o in got] == [(1, None), (2, "missing_field"), (3, "empty_text")]
    assert "row 2" in got[1][2] and "'prompt'" in got[1][2] and str(p) in got[1][2]


def test_unreadable_files_raise_in_both_modes(tmp_path):
    corrupt = tmp_path / "bad.parquet"
    corrupt.write_bytes(b"PAR1 this is not really parquet")
    missing = tmp_path / "gone.jsonl"
    not_gzip = tmp_path / "plain.jsonl.gz"
    not_gzip.write_text(json.dumps(GOOD) + "\n")
    for mode in ("skip", "fail"):
        for path in (corrupt, missing, not_gzip):
            with pytest.raises(CorpusError) as exc:
                list(read_rows(str(path), mode))
            assert str(path) in str(exc.value)


def test_unreadable_path_is_named(tmp_path):
    # A directory where a file is expected cannot be opened (root bypasses chmod, so this
    # is the portable way to get an OS-level read failure).
    p = tmp_path / "locked.jsonl"
    p.mkdir()
    with pytest.raises(CorpusError, match="locked.jsonl"):
        list(read_rows(str(p), "skip"))


def test_list_corpus_files(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for name in ("b.jsonl", "a.parquet", "c.jsonl.gz", "d.json", "notes.txt"):
        (d / name).write_text("")
    assert list_corpus_files([str(d), "sharegpt"]) == [
        str(d / n) for n in ("a.parquet", "b.jsonl", "c.jsonl.gz", "d.json")] + ["sharegpt"]
    with pytest.raises(CorpusError, match="nowhere.jsonl"):
        list_corpus_files([str(tmp_path / "nowhere.jsonl")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="empty"):
        list_corpus_files([str(tmp_path / "empty")])
    with pytest.raises(CorpusError, match="notes.txt"):
        list_corpus_files([str(d / "notes.txt")])


def test_datasets_folder(tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_list([GOOD, {"prompt": "p", "response": ""}]).save_to_disk(str(folder))
    assert list_corpus_files([str(folder)]) == [str(folder)]
    assert list_corpus_files([str(tmp_path)]) == [str(folder)]
    got = _outcomes(str(folder))
    assert [o[:2] for o in got] == [(1, None), (2, "empty_text")]


CONV = CorpusConfig(kind="conversations", id_field="id")


def _conv_row(turns, **extra):
    return RawRow("conv.jsonl", 5, {"id": "c1", "conversations": turns, **extra})


def test_conversation_first_turn_skips_leading_gpt():
    turns = [{"from": "gpt", "value": "earlier reply"}, {"from": "human", "value": "Q1"},
             {"from": "gpt", "value": "A1"}, {"from": "human", "value": "Q2"},
             {"from": "gpt", "value": "A2"}]
    assert extract_examples(_conv_row(turns), CONV) == [Example("c1", "Q1", "A1", None)]
    full = CorpusConfig(kind="conversations", conversation_mode="full")
    assert extract_examples(_conv_row(turns), full) == [
        Example("conv.jsonl:5:turn1", "Q1", "A1", None),
        Example("conv.jsonl:5:turn2", "Q2", "A2", None)]


def test_bad_conversations():
    for turns in ([{"from": "gpt", "value": "x"}], [{"from": "human", "value": "q"}], [], "text"):
        with pytest.raises(RecordError) as exc:
            extract_examples(_conv_row(turns), CONV)
        assert exc.value.reason == "bad_conversation"
        assert "conv.jsonl" in str(exc.value) and "row 5" in str(exc.value)
        assert "'conversations'" in str(exc.value)
    with pytest.raises(RecordError) as exc:
        extract_examples(_conv_row([{"from": "human", "value": ""},
                                    {"from": "gpt", "value": "a"}]), CONV)
    assert exc.value.reason == "empty_text" and exc.value.field == "conversations[0].value"
    with pytest.raises(RecordError) as exc:
        extract_examples(RawRow("conv.jsonl", 5, {"id": "c1"}), CONV)
    assert exc.value.reason == "missing_field"


def test_sharegpt_parse_recovers_records():
    first = None
    count = 0
    gpt_first = None
    for raw in read_rows("sharegpt", "fail"):
        count += 1
        assert raw.row == count and raw.error is None
        turns = raw.data["conversations"]
        if gpt_first is None and turns and turns[0]["from"] == "gpt" and len(turns) >= 3:
            gpt_first = raw
        first = first or raw
    assert count >= 17_000
    assert first.data["id"] and first.row == 1
    (ex,) = extract_examples(gpt_first, CONV)
    turns = gpt_first.data["conversations"]
    i = next(k for k, t in enumerate(turns) if t["from"] == "human")
    assert ex.prompt == turns[i]["value"] and ex.response == turns[i + 1]["value"]
    assert ex.source_id == gpt_first.data["id"]


def test_sharegpt_first_turns_dedup_and_caps():
    turns = sharegpt_first_turns()
    assert len(turns) > 5_000
    prompts = [p.strip() for _, p, _ in turns]
    assert len(set(prompts)) == len(prompts)
    assert prompts.count("hi") <= 1
    assert all(0 < len(p) <= 2000 and 0 < len(r) <= 2000 for _, p, r in turns)
    assert sharegpt_first_turns() == turns  # deterministic
    short = sharegpt_first_turns(max_chars=200)
    assert 0 < len(short) < len(turns)
    assert all(len(p) <= 200 and len(r) <= 200 for _, p, r in short)


def test_mtbench_first_turns():
    qs = mtbench_first_turns()
    assert len(qs) == 80
    assert all(isinstance(q, str) and q.strip() for q in qs)
    assert len(set(qs)) == 80


def test_corpus_folder_and_rows_through_uris(tmp_path, monkeypatch):
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"prompt": "p", "response": "r"}\nnot json\n')
    (folder / "notes.txt").write_text("ignored")
    uri = f"file://{folder}"
    files = list_corpus_files([uri])
    assert files == [f"{uri}/a.jsonl"]
    rows = list(read_rows(files[0], on_error="skip"))
    assert [r.row for r in rows] == [1, 2] and rows[1].error == "bad_json"
    assert all(r.file == files[0] for r in rows)  # rows name the URI, not the cached copy
    with pytest.raises(CorpusError, match=rf"{uri}/a.jsonl.*row 2"):
        list(read_rows(files[0], on_error="fail"))
    with pytest.raises(CorpusError, match="corpus path not found"):
        list_corpus_files([f"file://{tmp_path}/nope"])
