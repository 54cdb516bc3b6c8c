"""The decoding deployment's relay, without Ray: a job's engine events become few, small
wire events (consecutive steps merged into one text event), a stop string cancels the job
once and ends the text before it, and errors pass through; after the first text, text leaves
at most once per interval while other events leave at once; a replica takes every core when
no thread count is set. Over Serve it runs in tests/serving/test_app.py."""

from __future__ import annotations

from dresd.config import ModelConfig
from dresd.decoding.metrics import DecodeMetrics
from dresd.model.loading import node_threads
from dresd.serving import openai_api as oa
from dresd.serving.decode_server import (
    Pacer,
    Relay,
    prompt_text,
    replica_model,
)
from dresd.serving.replica import Event


def relay(tokenizer, stop=()):
    stops = []
    req = oa.GenerationRequest("completion", prompt="p", stop=list(stop))
    return Relay(tokenizer, req, "dresd", lambda: stops.append(True)), stops


def ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_steps_that_came_together_are_one_text_event_and_done_carries_the_report(byte_tokenizer):
    r, _ = relay(byte_tokenizer)
    tokens = ids(byte_tokenizer, "hello world")
    out = r.feed([Event("started", version="v1", prompt_tokens=5), Event("tokens", tokens[:3]),
                  Event("tokens", tokens[:6])])
    assert out == [{"kind": "started", "prompt_tokens": 5, "version": "v1"},
                   {"kind": "text", "text": "hello ", "tokens": 6}]
    metrics = DecodeMetrics(new_tokens=len(tokens), target_calls=4, drafted=6, accepted=3)
    done, = r.feed([Event("done", tokens, "v1", 5, "length", metrics)])
    assert done["text"] == "world" and done["tokens"] == len(tokens) and done["finish"] == "length"
    assert done["stats"]["datastore_version"] == "v1" and done["stats"]["accepted_tokens"] == 3


def test_a_stop_string_cancels_the_job_once_and_ends_the_text_before_it(byte_tokenizer):
    r, stops = relay(byte_tokenizer, stop=["wor"])
    tokens = ids(byte_tokenizer, "hello world again")
    first = r.feed([Event("tokens", tokens[:5])])
    second = r.feed([Event("tokens", tokens[:9])])
    later = r.feed([Event("tokens", tokens[:12])])  # a step that ran before the cancel landed
    done, = r.feed([Event("done", finish="stop", metrics=DecodeMetrics(), version="v1")])
    assert "".join(e["text"] for e in first + second + later) + done["text"] == "hello "
    assert stops == [True] and later == [] and done["finish"] == "stop" and done["tokens"] == 9


def test_a_stop_string_first_seen_in_the_last_tokens_still_ends_the_text_and_finishes_with_stop(byte_tokenizer):
    r, _ = relay(byte_tokenizer, stop=["wor"])
    tokens = ids(byte_tokenizer, "hello world")
    first = r.feed([Event("tokens", tokens[:2])])  # a paced stream heard nothing since
    done, = r.feed([Event("done", tokens, "v1", 5, "length", DecodeMetrics())])
    assert "".join(e["text"] for e in first) + done["text"] == "hello " and done["finish"] == "stop"


def test_an_error_passes_through_with_the_field_it_names(byte_tokenizer):
    r, _ = relay(byte_tokenizer)
    out = r.feed([Event("error", status=400, message="too long", param="prompt")])
    assert out == [{"kind": "error", "status": 400, "message": "too long", "param": "prompt"}]


def test_the_crash_hook_reads_prompts_and_chat_turns():
    assert prompt_text(oa.GenerationRequest("completion", prompt="a CRASH b")) == "a CRASH b"
    chat = oa.GenerationRequest("chat", messages=[{"role": "user", "content": "x"}, {"role": "user", "content": "y"}])
    assert prompt_text(chat) == "x\ny"


def text(t: str, n: int) -> dict:
    return {"kind": "text", "text": t, "tokens": n}


def test_the_first_text_leaves_at_once_then_text_is_merged_per_interval():
    p = Pacer(0.1)
    started = {"kind": "started", "prompt_tokens": 3, "version": "v1"}
    assert p.push([started, text("a", 1)], now=0.0) == [started, text("a", 1)]  # the first token's latency
    assert p.due() is None
    assert p.push([text("b", 2)], now=0.03) == [] and p.due() == 0.1
    assert p.push([text("c", 3)], now=0.06) == []
    assert p.push([], now=0.1) == [text("bc", 3)]  # due: what was gathered, as one event
    assert p.push([text("d", 4)], now=0.25) == [text("d", 4)]  # a quiet interval passed
    done = {"kind": "done", "text": "f", "tokens": 6}
    assert p.push([text("e", 5), done], now=0.26) == [text("e", 5), done]  # done never waits, text first
    assert p.due() is None


def test_an_error_flushes_the_held_text_before_it_and_interval_zero_holds_nothing():
    p = Pacer(0.1)
    p.push([text("a", 1)], now=0.0)
    assert p.push([text("b", 2)], now=0.01) == []
    error = {"kind": "error", "status": 504, "message": "late", "param": None}
    assert p.push([error], now=0.02) == [text("b", 2), error]
    q = Pacer(0.0)
    assert [q.push([text(c, i)], now=0.0) for i, c in enumerate("xyz")] == [[text(c, i)] for i, c in enumerate("xyz")]


def test_a_replica_without_a_thread_count_takes_the_cores_of_its_node():
    # Ray leaves OMP_NUM_THREADS at the actor's CPUs (1 by default); `dresd generate` uses them all.
    assert replica_model(ModelConfig(threads=0)).threads == node_threads() >= 1
    assert node_threads(2) == max(1, node_threads() // 2)  # a node's cores shared by two model processes
    assert replica_model(ModelConfig(threads=3)).threads == 3
