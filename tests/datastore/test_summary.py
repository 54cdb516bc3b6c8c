"""`dresd datastore show`'s description of a manifest."""

from __future__ import annotations

from dresd.datastore.summary import describe

MANIFEST = {
    "version": "v2", "created_at": "2026-12-06T07:00:00+0000", "format_version": 2, "parent": "v1",
    "change": {"kind": "delete", "sources": ["a"]},
    "model": {"name": "SmolLM2-135M-Instruct", "fingerprint": "abcdef0123456789"},
    "prompt_format": {"name": "chat", "fingerprint": "0123456789abcdef"}, "value_len": 20,
    "counts": {"records": 1090, "tokens": 211879, "keys": 185719, "rejected": {"too_long": 10}},
    "files": {"tokens.npy": {"bytes": 423886}, "index.faiss": {"bytes": 5573928}},
    "index": {"factory": "IVF2154,PQ32x4fs,RFlat", "params": {"dim": 64, "on_disk": False}},
    "check": {"recall@50": 0.9374, "self_mrr@50": 0.98},
}


def test_describe_answers_what_an_operator_asks_in_order():
    lines = describe(MANIFEST, deleted_keys=561, current="v2")
    assert lines[0] == "version   v2 (CURRENT), created 2026-12-06T07:00:00+0000, format 2"
    assert lines[1] == "made by   delete on v1"
    assert lines[2] == "model     SmolLM2-135M-Instruct (fingerprint abcdef012345)"
    assert "1,090 records, 211,879 tokens, 185,719 keys, 561 deleted (until compaction)" in lines[4]
    assert lines[5] == "size      5.7 MiB in 2 files, 28.3 B per token"
    assert lines[6] == "index     IVF2154,PQ32x4fs,RFlat, 64 dims"
    assert lines[7] == "check     recall@50 0.937, self_mrr@50 0.980"
    assert lines[8] == "rejected  too_long: 10"


def test_a_build_without_deletes_or_rejects_says_less():
    m = dict(MANIFEST, parent=None, change=None, counts={"records": 3, "tokens": 30, "keys": 27}, check={})
    m["index"] = {"factory": "IVF64,PQ8np", "params": {"dim": 8, "on_disk": True}}
    lines = describe(m, current="v1")
    assert lines[0].startswith("version   v2, created")  # not the current one
    assert lines[1] == "made by   a full build"
    assert "deleted" not in lines[4] and not any(line.startswith(("check", "rejected")) for line in lines)
    assert lines[-1] == "index     IVF64,PQ8np, on-disk lists (index.ivfdata), 8 dims"
