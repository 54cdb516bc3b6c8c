"""The OpenAI wire format: bodies checked into requests (each bad field named), response and
chunk shapes, and the text a stream releases while a stop string may still appear."""

from __future__ import annotations

import json

import pytest

from dresd.decoding.metrics import DecodeMetrics
from dresd.serving.openai_api import (SSE_DONE, ApiError, IncrementalText, chunk, dresd_stats, parse_request,
                                      response, sse, usage)


def parse(body, kind="completion"):
    return parse_request(json.dumps(body).encode() if not isinstance(body, bytes) else body, kind, 16)


def test_a_good_body_becomes_a_typed_request():
    req = parse({"prompt": "hi", "max_tokens": 5, "temperature": 0, "top_p": 0.9, "seed": 3, "stop": "\n",
                 "stream": True, "stream_options": {"include_usage": True}, "model": "x", "user": "u",
                 "dresd": {"method": "pld", "budget": "off"}})
    assert (req.prompt, req.max_tokens, req.temperature, req.top_p, req.seed, req.stop) == ("hi", 5, 0.0, 0.9, 3, ["\n"])
    assert req.stream and req.include_usage and (req.method, req.budget) == ("pld", "off")
    defaults = parse({"prompt": ["one prompt"]})
    assert (defaults.prompt, defaults.max_tokens, defaults.temperature, defaults.method) == ("one prompt", 16, 1.0, None)
    chat = parse({"messages": [{"role": "system", "content": "be brief"},
                               {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                  "max_completion_tokens": 7}, "chat")
    assert chat.messages[1] == {"role": "user", "content": "hi"} and chat.max_tokens == 7


@pytest.mark.parametrize("body, kind, param, words", [
    (b"\xff{}", "completion", "body", "not UTF-8"),
    (b"{oops", "completion", "body", "not valid JSON"),
    (b"[1]", "completion", "body", "JSON object"),
    ({"max_tokens": 3}, "completion", "prompt", "prompt is required"),
    ({"prompt": "  "}, "completion", "prompt", "prompt is empty"),
    ({"prompt": ["a", "b"]}, "completion", "prompt", "one prompt per request"),
    ({"prompt": "hi"}, "chat", "messages", "messages is required"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "chat", "messages[0].role", "must be one of"),
    ({"messages": [{"role": "user", "content": 3}]}, "chat", "messages[0].content", "string or a list"),
    ({"prompt": "hi", "max_tokens": 0}, "completion", "max_tokens", ">= 1, got 0"),
    ({"prompt": "hi", "max_tokens": 2.5}, "completion", "max_tokens", ">= 1, got 2.5"),
    ({"prompt": "hi", "temperature": -1}, "completion", "temperature", ">= 0"),
    ({"prompt": "hi", "temperature": "hot"}, "completion", "temperature", "must be a number"),
    ({"prompt": "hi", "top_p": 0}, "completion", "top_p", "(0, 1]"),
    ({"prompt": "hi", "top_p": 1.01}, "completion", "top_p", "(0, 1]"),
    ({"prompt": "hi", "seed": "s"}, "completion", "seed", "integer"),
    ({"prompt": "hi", "stop": ["a", ""]}, "completion", "stop", "non-empty"),
    ({"prompt": "hi", "n": 2}, "completion", "n", "n must be 1"),
    ({"prompt": "hi", "dresd": {"method": "medusa"}}, "completion", "dresd.method", "unknown method 'medusa'"),
    ({"prompt": "hi", "dresd": {"budget": "max"}}, "completion", "dresd.budget", "one of ['auto', 'off']"),
    ({"prompt": "hi", "dresd": {"k": 1}}, "completion", "dresd.k", "not a known option"),
])
def test_a_bad_body_is_refused_naming_the_field(body, kind, param, words):
    with pytest.raises(ApiError) as err:
        parse(body, kind)
    assert err.value.status == 400 and err.value.param == param and words in err.value.message
    assert err.value.body()["error"]["param"] == param


def test_responses_and_chunks_have_openai_shapes():
    m = DecodeMetrics(new_tokens=6, target_calls=3, drafted=5, accepted=3)
    stats = dresd_stats("v1", "dresd", m)
    assert stats == {"datastore_version": "v1", "method": "dresd", "drafted_tokens": 5, "accepted_tokens": 3,
                     "target_calls": 3, "mean_accepted_tokens": round(m.mean_accepted_tokens, 4)}
    chat = parse({"messages": [{"role": "user", "content": "hi"}]}, "chat")
    body = response(chat, "id1", "dresd", "hello", "stop", usage(4, 2), stats)
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == "hello"
    assert body["usage"]["total_tokens"] == 6 and body["dresd"]["datastore_version"] == "v1"
    first = chunk(chat, "id1", "dresd", "", first=True)
    assert first["choices"][0]["delta"] == {"role": "assistant"}
    last = chunk(chat, "id1", "dresd", None, use=usage(4, 2), empty=True)
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 2
    text = chunk(parse({"prompt": "hi"}), "id2", "dresd", "abc", "length")
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "abc"
    assert sse({"a": 1}) == b'data: {"a": 1}\n\n' and SSE_DONE == b"data: [DONE]\n\n"


class CharTokenizer:
    """One token per character (ids are code points); 0xFFFD stands for a split character."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def ids(text):
    return [ord(c) for c in text]


def test_incremental_text_holds_back_a_possible_stop_string_and_cuts_at_one():
    t = IncrementalText(CharTokenizer(), ["END"])
    assert t.update(ids("hello E")) == ("hello ", False)  # "E" may start "END"
    assert t.update(ids("hello EN")) == ("", False)
    assert t.update(ids("hello ENx")) == ("ENx", False)  # it did not
    assert t.update(ids("hello ENx wEND and more")) == (" w", True)
    assert t.text == "hello ENx w"


def test_incremental_text_waits_for_a_split_character_and_flushes_at_the_end():
    t = IncrementalText(CharTokenizer(), [])
    assert t.update(ids("ab") + [0xFFFD]) == ("ab", False)
    assert t.update(ids("abc")) == ("c", False)
    t2 = IncrementalText(CharTokenizer(), ["zz"])
    assert t2.update(ids("az")) == ("a", False)
    assert t2.update(ids("az"), final=True) == ("z", False)
