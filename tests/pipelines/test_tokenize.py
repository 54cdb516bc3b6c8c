"""Stage 1b (pipelines/tokenize.py) on its own, no Ray: a shard's raw rows -> token
sequences equal to the shared record layout, rows in = rows embedded + rejects by reason."""

from __future__ import annotations

import numpy as np
import pytest

from dresd.config import CorpusConfig
from dresd.datastore.corpus import Example, RecordError
from dresd.datastore.formatting import record_ids, shared_prefix_len
from pipelines.tokenize import Tokenize, cached_tokenizer

FILE = "/data/corpus.jsonl"


def _row(row, data=None, error=None, detail=None):
    return {"row": row, "data": data, "error": error, "detail": detail}


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return cached_tokenizer(str(tiny_model_dir))


def _stage(tiny_model_dir, tok, corpus=None, max_tokens=256, prefix=None):
    corpus = corpus or CorpusConfig(max_tokens=max_tokens)
    prefix = shared_prefix_len(tok, corpus.prompt_format) if prefix is None else prefix
    return Tokenize(str(tiny_model_dir), corpus, tok.eos_token_id, max_tokens, prefix)


def test_sequences_match_the_record_layout_and_rejects_are_counted(tiny_model_dir, tok):
    stage = _stage(tiny_model_dir, tok)
    prefix = stage.prefix_len
    assert prefix > 0  # the chat template head shared by every prompt
    good = {1: ("hello?", "world and more"), 4: ("second?", "reply " * 5), 7: ("third?", "x")}
    rows = [
        _row(1, {"prompt": good[1][0], "response": good[1][1]}),
        _row(2, {"prompt": "no response"}),  # missing_field
        _row(3, None, "bad_json", "Expecting value"),  # unreadable line, reason kept
        _row(4, {"prompt": good[4][0], "response": good[4][1]}),
        _row(5, {"prompt": "x" * 600, "response": "y"}),  # too_long at max_tokens=256
        _row(6, {"prompt": "p", "response": 7}),  # not_string
        _row(7, {"prompt": good[7][0], "response": good[7][1]}),
        _row(8, {"prompt": "p", "response": "  "}),  # empty_text
    ]
    out = stage.tokenize_shard(FILE, rows)

    expected = [record_ids(tok, Example("s", p, r), "chat", 256, tok.eos_token_id) for p, r in good.values()]
    assert [s.tolist() for s in out["seqs"]] == expected
    assert all(s.dtype == np.int32 for s in out["seqs"])
    assert all(s[-1] == tok.eos_token_id for s in out["seqs"])
    assert out["key_starts"] == [prefix] * 3
    assert out["sources"] == ["corpus.jsonl:1", "corpus.jsonl:4", "corpus.jsonl:7"]
    assert out["rows_read"] == len(rows) == len(out["seqs"]) + sum(out["rejects"].values())
    assert out["rejects"] == {"missing_field": 1, "bad_json": 1, "too_long": 1, "not_string": 1, "empty_text": 1}
    # Messages name file, row and field: the reject is findable in the corpus.
    assert len(out["messages"]) == 5
    assert out["messages"][0].startswith(f"{FILE}: row 2: field 'response'")
    assert any(f"{FILE}: row 5" in m and "[too_long]" in m for m in out["messages"])


def test_only_the_first_five_messages_are_kept_but_every_reject_is_counted(tiny_model_dir, tok):
    stage = _stage(tiny_model_dir, tok)
    out = stage.tokenize_shard(FILE, [_row(i, {"prompt": f"q{i}"}) for i in range(1, 9)])
    assert out["seqs"] == [] and out["rows_read"] == 8
    assert out["rejects"] == {"missing_field": 8}
    assert [m.split(":")[1].strip() for m in out["messages"]] == [f"row {i}" for i in range(1, 6)]


def test_text_records_start_keys_at_zero_and_long_ones_are_cut(tiny_model_dir, tok):
    corpus = CorpusConfig(kind="text", max_tokens=16)
    stage = _stage(tiny_model_dir, tok, corpus, max_tokens=16)
    out = stage.tokenize_shard(FILE, [_row(1, {"text": "short"}), _row(2, {"text": "z" * 100})])
    assert out["key_starts"] == [0, 0]
    assert out["seqs"][0].tolist() == tok.encode("short", add_special_tokens=False) + [tok.eos_token_id]
    assert len(out["seqs"][1]) == 16 and out["seqs"][1][-1] == tok.eos_token_id


def test_one_row_can_give_several_examples(tiny_model_dir, tok):
    conv = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
            {"from": "human", "value": "again"}, {"from": "gpt", "value": "sure"}]
    corpus = CorpusConfig(kind="conversations", conversation_mode="full", max_tokens=256)
    out = _stage(tiny_model_dir, tok, corpus).tokenize_shard(FILE, [_row(3, {"conversations": conv})])
    assert out["rows_read"] == 1 and out["rejects"] == {}
    assert out["sources"] == ["corpus.jsonl:3:turn1", "corpus.jsonl:3:turn2"]
    assert [s.tolist() for s in out["seqs"]] == [
        record_ids(tok, Example("s", h, r), "chat", 256, tok.eos_token_id) for h, r in (("hi", "hello"), ("again", "sure"))]


def test_a_record_with_no_key_position_after_the_head_is_rejected(tiny_model_dir, tok):
    ids = record_ids(tok, Example("s", "q", "a"), "chat", 256, tok.eos_token_id)
    # Keys run from prefix_len to len-2: a head as long as the record leaves none.
    stage = _stage(tiny_model_dir, tok, prefix=len(ids) - 1)
    out = stage.tokenize_shard(FILE, [_row(1, {"prompt": "q", "response": "a"}),
                                      _row(2, {"prompt": "q", "response": "ab"})])
    assert out["rejects"] == {"no_keys": 1}
    assert len(out["seqs"]) == 1 and out["sources"] == ["corpus.jsonl:2"]
    assert "row 1" in out["messages"][0] and "[no_keys]" in out["messages"][0]


def test_fail_mode_raises_naming_file_and_row(tiny_model_dir, tok):
    stage = _stage(tiny_model_dir, tok, CorpusConfig(on_error="fail", max_tokens=256))
    good = _row(1, {"prompt": "q", "response": "a"})
    assert len(stage.tokenize_shard(FILE, [good])["seqs"]) == 1
    with pytest.raises(RecordError, match=rf"{FILE}: row 2: field 'prompt'.*\[too_long\]") as err:
        stage.tokenize_shard(FILE, [good, _row(2, {"prompt": "x" * 600, "response": "y"})])
    assert err.value.reason == "too_long"
