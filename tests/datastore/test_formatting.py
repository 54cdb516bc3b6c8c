"""Prompt layout shared by build and decode time (SmolLM2 tokenizer from the packaged GGUF)."""

from __future__ import annotations

import re

import pytest

from dresd.datastore.corpus import Example, RecordError
from dresd.datastore.formatting import (
    PROMPT_FORMATS,
    format_fingerprint,
    format_prompt_ids,
    record_ids,
    response_header,
    shared_prefix_len,
    split_record,
)

PROMPTS = ["a", "Zebra 123?", "Write a haiku about autumn.", "def f(x):\n    return x",
           "¿Dónde está la biblioteca?", "1"]


@pytest.mark.parametrize("fmt", PROMPT_FORMATS)
def test_format_prompt_ids_plain_ints(smol_tokenizer, fmt):
    ids = format_prompt_ids(smol_tokenizer, "Hello there", fmt)
    assert isinstance(ids, list) and ids and all(type(t) is int for t in ids)


def test_chat_layout(smol_tokenizer):
    tok = smol_tokenizer
    ids = format_prompt_ids(tok, "Hello there", "chat")
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system")  # the template's default system message
    assert "<|im_start|>user\nHello there<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_qa_layout(smol_tokenizer):
    ids = format_prompt_ids(smol_tokenizer, "Hello there", "qa")
    assert smol_tokenizer.decode(ids) == "Question: Hello there\nAnswer:\n"


def test_unknown_format(smol_tokenizer):
    with pytest.raises(ValueError, match="alpaca"):
        format_prompt_ids(smol_tokenizer, "x", "alpaca")


@pytest.mark.parametrize("fmt", PROMPT_FORMATS)
def test_record_starts_with_prompt(smol_tokenizer, fmt):
    tok = smol_tokenizer
    eos = tok.eos_token_id
    ex = Example("f:1", "What is the capital of France?", "Paris is the capital.", None)
    ids = record_ids(tok, ex, fmt, None, eos)
    prompt = format_prompt_ids(tok, ex.prompt, fmt)
    assert ids[: len(prompt)] == prompt
    assert ids[len(prompt):-1] == tok(ex.response, add_special_tokens=False).input_ids
    assert ids[-1] == eos
    assert record_ids(tok, ex, fmt, 1024, eos) == ids  # short records are not cut


@pytest.mark.parametrize("fmt", PROMPT_FORMATS)
def test_truncation_cuts_response(smol_tokenizer, fmt):
    tok = smol_tokenizer
    eos = tok.eos_token_id
    ex = Example("f:2", "Tell me a story.", "Once upon a time " * 50, None)
    prompt = format_prompt_ids(tok, ex.prompt, fmt)
    full_response = tok(ex.response, add_special_tokens=False).input_ids
    limit = len(prompt) + 10
    ids = record_ids(tok, ex, fmt, limit, eos)
    assert len(ids) == limit
    assert ids[: len(prompt)] == prompt
    assert ids[len(prompt):-1] == full_response[:9]
    assert ids[-1] == eos
    # one response token still fits
    assert record_ids(tok, ex, fmt, len(prompt) + 2, eos) == prompt + full_response[:1] + [eos]


@pytest.mark.parametrize("fmt", PROMPT_FORMATS)
def test_too_long_prompt(smol_tokenizer, fmt):
    tok = smol_tokenizer
    ex = Example("long.jsonl:3", "word " * 200, "reply", None)
    n = len(format_prompt_ids(tok, ex.prompt, fmt))
    for limit in (n + 1, n, 50):
        with pytest.raises(RecordError) as exc:
            record_ids(tok, ex, fmt, limit, tok.eos_token_id)
        assert exc.value.reason == "too_long"
        assert "long.jsonl:3" in str(exc.value)


def test_text_record(smol_tokenizer):
    tok = smol_tokenizer
    eos = tok.eos_token_id
    ex = Example("t:1", None, None, "plain text " * 30)
    body = tok(ex.text, add_special_tokens=False).input_ids
    assert record_ids(tok, ex, "chat", None, eos) == body + [eos]
    assert record_ids(tok, ex, "qa", 8, eos) == body[:7] + [eos]


@pytest.mark.parametrize("fmt", PROMPT_FORMATS)
def test_shared_prefix_len(smol_tokenizer, fmt):
    tok = smol_tokenizer
    n = shared_prefix_len(tok, fmt)
    if fmt == "chat":
        assert n > 10
    else:
        assert n == len(tok("Question:", add_special_tokens=False).input_ids)
    # A prompt opening with whitespace merges into the template's last fixed token.
    ids = [format_prompt_ids(tok, p, fmt) for p in [*PROMPTS, "\n\nhi"]]
    head = ids[0][:n]
    assert all(x[:n] == head for x in ids)
    assert len({x[n] for x in ids}) >= 2  # the next token is not shared


def test_fingerprint(smol_tokenizer):
    chat = format_fingerprint(smol_tokenizer, "chat")
    qa = format_fingerprint(smol_tokenizer, "qa")
    assert re.fullmatch("[0-9a-f]{64}", chat) and re.fullmatch("[0-9a-f]{64}", qa)  # sha256 hex
    assert chat != qa
    assert format_fingerprint(smol_tokenizer, "chat") == chat  # stable


def test_fingerprint_changes_with_the_chat_template_only_for_chat(byte_tokenizer):
    from tiny_models import make_byte_tokenizer

    edited = make_byte_tokenizer()
    assert format_fingerprint(edited, "chat") == format_fingerprint(byte_tokenizer, "chat")  # same layout
    # A template that lays out the same ids for the probe but reads differently still counts.
    edited.chat_template = byte_tokenizer.chat_template + "{# edited #}"
    assert format_fingerprint(edited, "chat") != format_fingerprint(byte_tokenizer, "chat")
    # A template that lays the prompt out differently changes it too; "qa" uses no template.
    edited.chat_template = byte_tokenizer.chat_template.replace("'\\n'", "'\\n\\n'")
    assert format_prompt_ids(edited, "x", "chat") != format_prompt_ids(byte_tokenizer, "x", "chat")
    assert format_fingerprint(edited, "chat") != format_fingerprint(byte_tokenizer, "chat")
    assert format_fingerprint(edited, "qa") == format_fingerprint(byte_tokenizer, "qa")


# ------------------------------------------------------------ response header / records


@pytest.fixture(params=["smol", "byte"])
def any_tokenizer(request, smol_tokenizer, byte_tokenizer):
    return smol_tokenizer if request.param == "smol" else byte_tokenizer


HEADER_PROMPTS = [*PROMPTS, " leading space", "ends with a newline\n", "Question: nested?\nAnswer:"]


@pytest.mark.parametrize("fmt", PROMPT_FORMATS)
def test_response_header_ends_every_prompt(any_tokenizer, fmt):
    tok = any_tokenizer
    header = response_header(tok, fmt)
    assert header and all(type(t) is int for t in header)
    for p in HEADER_PROMPTS:
        ids = format_prompt_ids(tok, p, fmt)
        assert ids[-len(header):] == header, p
    text = tok.decode(header)
    if fmt == "chat":
        assert text == "<|im_end|>\n<|im_start|>assistant\n"
    else:
        assert text == "\nAnswer:\n"


@pytest.mark.parametrize("fmt", PROMPT_FORMATS)
def test_split_record_cuts_after_header(any_tokenizer, fmt):
    tok = any_tokenizer
    eos = tok.eos_token_id
    header, head = response_header(tok, fmt), shared_prefix_len(tok, fmt)
    for i, p in enumerate(["What is the capital of France?", "a", "def f(x):\n    return x"]):
        ex = Example(f"f:{i}", p, f"Answer number {i}.", None)
        record = record_ids(tok, ex, fmt, None, eos)
        prompt, response = split_record(record, header, head)
        assert prompt == format_prompt_ids(tok, p, fmt)
        assert response == tok(ex.response, add_special_tokens=False).input_ids + [eos]
        assert prompt + response == record
        # start=0 finds the same cut: the header does not occur in the template's head.
        assert split_record(record, header) == (prompt, response)


def test_split_record_without_header_and_with_start():
    header = [7, 8]
    assert split_record([1, 2, 3, 4], header) == ([], [1, 2, 3, 4])
    assert split_record([1, 7, 3, 8], header) == ([], [1, 7, 3, 8])
    assert split_record([1, 2, 7], header) == ([], [1, 2, 7])  # a header cut off by the end
    assert split_record([], header) == ([], [])
    # The first occurrence wins; `start` skips earlier ones.
    record = [7, 8, 1, 7, 8, 2, 3]
    assert split_record(record, header) == ([7, 8], [1, 7, 8, 2, 3])
    assert split_record(record, header, start=1) == ([7, 8, 1, 7, 8], [2, 3])
    assert split_record(record, header, start=4) == ([], record)
    # A record that ends right after the header: empty response.
    assert split_record([1, 7, 8], header) == ([1, 7, 8], [])
