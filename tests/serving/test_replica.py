"""A replica's decoding loop in-process on the tiny model: jobs of several methods batched
and answered like in-process decoding, versions switched between jobs only, stop / abort /
deadline ends, and refusals that name the field."""

from __future__ import annotations

import queue
import time

import pytest

from dresd.config import SamplingParams, ServeConfig, SpeculativeConfig
from dresd.datastore.store import Datastore
from dresd.decoding.engine import Engine
from dresd.serving.replica import Job, ReplicaEngine
from dresd.serving.versions import write_pin
from tests_support import one_torch_thread, publish_for_model

single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

SPEC = SpeculativeConfig(len_drafts=4, top_k=8, num_drafts=4)  # the test stores keep 12-token values


@pytest.fixture
def replica(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "store"
    publish_for_model(root, tiny_lm, "v1")
    eng = ReplicaEngine(ServeConfig(speculative=SPEC, datastore=str(root), max_batch=2), "r0", tiny_lm)
    yield eng, root
    eng.close()


def ask(eng, prompt="question 1?", n=10, method="dresd", **kw):
    """Submit a job; returns it and the queue its events arrive in."""
    events: queue.Queue = queue.Queue()
    job = Job(events.put, n, method, kw.pop("budget", "auto"), prompt=prompt, **kw)
    eng.submit(job)
    return job, events


def finish(events, timeout=60):
    """Every event up to the job's last one."""
    out = []
    while not out or out[-1].kind not in ("done", "error"):
        out.append(events.get(timeout=timeout))
    return out


def test_jobs_of_several_methods_batch_and_answer_as_in_process_decoding(replica, tiny_lm):
    eng, root = replica
    ref = Engine(tiny_lm, Datastore(str(root)))
    asked = [(m, p, ask(eng, p, 10, m)) for m in ("dresd", "greedy", "pld") for p in ("question 1?", "another")]
    for method, prompt, (job, events) in asked:
        got = finish(events)
        assert got[0].kind == "started" and got[0].version == "v1" and got[0].prompt_tokens == job.prompt_tokens
        done = got[-1]
        assert done.kind == "done" and done.version == "v1" and done.finish in ("stop", "length")
        expected = ref.generate(prompt, SpeculativeConfig(**{**SPEC.__dict__, "method": method}), 10).token_ids
        assert done.tokens == expected, (method, prompt)
        streamed = [e.tokens for e in got if e.kind == "tokens"]
        assert streamed and streamed[-1] == done.tokens[: len(streamed[-1])]
        assert done.metrics.new_tokens == len(done.tokens)
    snap = eng.snapshot()
    assert snap["requests"]["success"] == 6 and snap["counters"]["dresd:generation_tokens_total"] > 0
    _, events = ask(eng, n=6, sampling=SamplingParams(0.8, 0.9, seed=1))
    assert finish(events)[-1].kind == "done"


def test_a_paced_job_hears_its_first_tokens_at_once_and_then_at_most_once_an_interval(replica):
    eng, _ = replica
    _, every_step = ask(eng, n=12, method="greedy")
    _, paced = ask(eng, n=12, method="greedy", every=3600.0)
    every_step, paced = finish(every_step), finish(paced)
    # Greedy: a token a step, the last one told by "done".
    assert len([e for e in every_step if e.kind == "tokens"]) == len(every_step[-1].tokens) - 1 > 2
    told = [e.tokens for e in paced if e.kind == "tokens"]
    assert len(told) == 1 and len(told[0]) == 1  # the first token, then nothing until done
    assert paced[-1].tokens == every_step[-1].tokens  # each event carries every token so far


def test_a_new_version_serves_the_next_job_while_the_running_one_finishes_on_its_own(replica, tiny_lm):
    eng, root = replica
    _, events1 = ask(eng, n=60, method="greedy")
    assert events1.get(timeout=60).kind == "started"
    publish_for_model(root, tiny_lm, "v2", seed=1)
    _, events2 = ask(eng, n=4, method="greedy")
    done2 = finish(events2)[-1]
    done1 = finish(events1)[-1]
    assert (done1.kind, done1.version, done2.kind, done2.version) == ("done", "v1", "done", "v2")
    write_pin(str(root), "v1")
    assert finish(ask(eng, n=2)[1])[-1].version == "v1"


def test_stop_abort_deadline_and_refusals(replica):
    eng, _ = replica
    job, events = ask(eng, n=200, method="greedy")
    assert events.get(timeout=60).kind == "started"
    assert events.get(timeout=60).kind == "tokens"
    eng.cancel(job, "stop")
    done = finish(events)[-1]
    assert done.kind == "done" and done.finish == "stop" and done.metrics.new_tokens >= 1
    job, events = ask(eng, n=200, method="greedy", deadline=time.monotonic() - 1)  # past at its first step
    err = finish(events)[-1]
    assert err.kind == "error" and err.status == 504 and "deadline" in err.message
    job, events = ask(eng, n=200, method="greedy")
    eng.cancel(job)  # the client left (right after asking): nothing ends it but the cancel
    time.sleep(1.0)
    assert all(e.kind in ("started", "tokens") for e in list(events.queue))
    long = finish(ask(eng, prompt="x" * 3000)[1])[-1]
    assert (long.kind, long.status, long.param) == ("error", 400, "prompt") and "context" in long.message
    snap = eng.snapshot()["requests"]
    assert (snap["success"], snap["timeout"], snap["aborted"], snap["bad_request"]) == (1, 1, 1, 1)


def test_a_method_that_needs_a_datastore_is_refused_on_a_server_without_one(tiny_lm):
    eng = ReplicaEngine(ServeConfig(speculative=SPEC), "bare", tiny_lm)
    try:
        err = finish(ask(eng, method="dresd")[1])[-1]
        assert (err.kind, err.status, err.param) == ("error", 400, "dresd.method") and "needs a datastore" in err.message
        assert finish(ask(eng, n=3, method="pld")[1])[-1].kind == "done"
        events: queue.Queue = queue.Queue()
        turns = [{"role": "system", "content": "brief"}, {"role": "user", "content": "hi"}]
        eng.submit(Job(events.put, 3, "greedy", "auto", messages=turns))
        assert finish(events)[-1].kind == "done"
    finally:
        eng.close()


def publish_continuation(root, lm, prompt: str, n: int) -> list[int]:
    """Publish a store whose one record is `prompt` laid out and the model's greedy
    continuation of it (`n` tokens), which it returns: a corpus SuffixDecoding drafts from."""
    from dresd.datastore.formatting import format_fingerprint
    from dresd.datastore.publish import publish
    from tests_support import make_manifest, make_parts

    plain = Engine(lm)
    ids = plain.prompt_ids(prompt)
    cont = plain.generate(prompt, SpeculativeConfig(method="greedy"), n).token_ids
    record = ids + cont
    parts = make_parts([record, list(range(3, 40))], hidden_dim=lm.identity["hidden_size"])
    manifest = make_manifest(lm.identity, format_fingerprint(lm.tokenizer, "chat"), lm.eos_token_id, 12)
    publish(root, parts, manifest, "v1")
    return cont


@pytest.mark.parametrize("budget", ["off", "auto"])
def test_suffix_drafts_from_the_datastore_at_concurrency_one_as_in_process(tiny_lm, tmp_path, monkeypatch, budget):
    """Issue 22: a served request at concurrency 1 drafts as the same request decoded in-process
    (the replica's batch of one builds the same warmed SuffixDecoding tree and verifies what
    it drafts), so its MAT matches the in-process one; with every draft verified (budget off)
    its counters are the in-process ones exactly."""
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "store"
    prompt, n = "question 1?", 24
    cont = publish_continuation(root, tiny_lm, prompt, n)
    spec = SpeculativeConfig(method="suffix", budget=budget)
    ref = Engine(tiny_lm, Datastore(str(root))).decoder(spec)
    eng = ReplicaEngine(ServeConfig(speculative=SpeculativeConfig(method="greedy"), datastore=str(root), max_batch=8),
                        "r0", tiny_lm)
    try:
        for _ in range(2):  # one request at a time, as a concurrency-1 client sends them
            local = ref.generate_ids(Engine(tiny_lm).prompt_ids(prompt), n)
            done = finish(ask(eng, prompt, n, "suffix", budget=budget)[1])[-1]
            assert done.kind == "done" and done.tokens == local.token_ids == cont
            served, here = done.metrics, local.metrics
            assert here.mean_accepted_tokens > 2  # the record holds the whole answer
            if budget == "off":
                assert (served.target_calls, served.accepted) == (here.target_calls, here.accepted)
            else:  # the planner's timings differ run to run; drafting must not stop
                assert served.mean_accepted_tokens > 0.5 * here.mean_accepted_tokens
    finally:
        eng.close()
