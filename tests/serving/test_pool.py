"""The serving layer on a tiny model: a pool of decoder actors, bad input, actor deaths,
datastore publish / pin / rollback while serving."""

from __future__ import annotations

import time
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import ray

from dresd.config import BuildConfig, CorpusConfig, IndexConfig, ModelConfig, SpeculativeConfig
from dresd.datastore.store import Datastore
from dresd.datastore.publish import DatastoreParts, publish
from dresd.decoding.engine import Engine
from dresd.serving.decoder import DecodeRequest
from dresd.serving.pool import DecoderPool
from pipelines.build import build_datastore
from tests_support import write_small_corpus

GREEDY = SpeculativeConfig(method="greedy")


@pytest.fixture(scope="module")
def store(ray_session, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    path, _ = write_small_corpus(tmp)
    cfg = BuildConfig(model=ModelConfig(path=str(tiny_model_dir)), corpus=CorpusConfig(paths=[str(path)], max_tokens=256),
                      index=IndexConfig(dim=16), output=str(tmp / "store"), value_len=8, shard_rows=50)
    build_datastore(cfg)
    return cfg.output


@pytest.fixture(scope="module")
def engine(store, tiny_model_dir):
    """The same model and store in this process: the reference outputs."""
    return Engine.open(ModelConfig(path=str(tiny_model_dir), threads=1), store)


@pytest.fixture(scope="module")
def pool(store, tiny_model_dir):
    # 0.5 CPU each: the shared 2-CPU Ray keeps room for anything else scheduled beside it.
    spec = SpeculativeConfig(top_k=16, num_drafts=4, len_drafts=6)  # the store keeps 8-token values
    p = DecoderPool(ModelConfig(path=str(tiny_model_dir)), store, size=2, num_cpus=0.5, threads=1, speculative=spec)
    yield p
    p.shutdown()


def republish(root: str) -> str:
    """Publish a copy of the current version as a new one (what a rebuild does, minus the build)."""
    ds = Datastore(root)
    parts = DatastoreParts(np.asarray(ds.tokens), ds.record_offsets, np.asarray(ds.key_positions),
                           ds.sources, ds.compressor, ds.index, ds.deleted)
    manifest = {k: v for k, v in ds.manifest.items() if k not in ("files", "version", "created_at", "format_version")}
    return publish(root, parts, manifest).name


_EXPECTED: dict = {}


def expected(engine, prompt, n):
    """Plain greedy tokens computed in this process (cached: several tests reuse them)."""
    if (prompt, n) not in _EXPECTED:
        _EXPECTED[prompt, n] = engine.generate(prompt, GREEDY, n).token_ids
    return _EXPECTED[prompt, n]


def test_concurrent_clients_get_greedy_outputs(pool, engine):
    # 3 client threads x 3 requests, every method/verifier: all equal plain greedy (lossless).
    modes = [("greedy", "tree"), ("dresd", "tree"), ("dresd", "batch")]
    reqs = [[DecodeRequest(f"question {3 * t + j}?", 24, *modes[j]) for j in range(3)] for t in range(3)]

    def client(batch):
        if batch[0].prompt.endswith("0?"):
            return [pool.generate([r])[0] for r in batch]  # one at a time
        return pool.generate(batch)  # all at once

    with ThreadPoolExecutor(3) as ex:
        results = list(ex.map(client, reqs))
    names = set()
    for batch, resps in zip(reqs, results):
        for req, resp in zip(batch, resps):
            assert resp.ok, resp.error
            assert resp.request_id == req.request_id
            assert resp.token_ids == expected(engine, req.prompt, 24)
            assert resp.text and resp.metrics["new_tokens"] == len(resp.token_ids)
            assert resp.datastore_version == Datastore(pool.root).version
            names.add(resp.actor)
    assert names == set(pool.names)
    assert sum(d["requests_served"] for d in pool.infos()) >= 9


def test_bad_requests_fail_cleanly_and_pool_keeps_serving(pool, engine):
    bad = [
        (DecodeRequest("   "), "prompt is empty"),
        (DecodeRequest("hi", method="nope"), "unknown method 'nope'"),
        (DecodeRequest("hi", verify="list"), "unknown verify"),
        (DecodeRequest("x" * 3000), "context is 2048"),
        (DecodeRequest("hi", max_new_tokens=0), "max_new_tokens"),
        (DecodeRequest("hi", temperature=0.7, verify="batch"), "speculative sampling"),
        (DecodeRequest("hi", temperature=-1.0), "temperature must be a finite number >= 0"),
        (DecodeRequest("hi", temperature=0.5, top_p=0.0), "top_p must be in (0, 1]"),
    ]
    resps = pool.generate([r for r, _ in bad])
    for (req, msg), resp in zip(bad, resps):
        assert not resp.ok and msg in resp.error, (req, resp.error)
        assert resp.token_ids == [] and resp.request_id == req.request_id
    good = pool.generate([DecodeRequest("question 1?", 16)])[0]
    assert good.ok and good.token_ids == expected(engine, "question 1?", 16)
    # Plain sampling: seeded runs repeat; a different temperature/seed is still well-formed.
    s = pool.generate([DecodeRequest("hi", 16, "greedy", temperature=0.8, top_p=0.9, seed=3) for _ in range(2)])
    assert s[0].ok and s[1].ok and s[0].token_ids == s[1].token_ids and len(s[0].token_ids) >= 1
    # Speculative sampling with drafts: seeded runs repeat too.
    s = pool.generate([DecodeRequest("hi", 16, "dresd", temperature=0.8, top_p=0.9, seed=3) for _ in range(2)])
    assert s[0].ok and s[1].ok and s[0].token_ids == s[1].token_ids and len(s[0].token_ids) >= 1


def test_publish_pin_rollback_while_serving(pool, engine, store):
    v1 = Datastore(store).version
    assert set(pool.versions().values()) == {v1}
    prompt = _long_prompt(engine)
    long = DecodeRequest(prompt, 600)
    stream, stop = [], threading.Event()

    def client():  # a steady stream of short requests, one at a time
        k = 0
        while not stop.is_set():
            req = DecodeRequest(f"question {k % 9}?", 16)
            t = time.monotonic()
            stream.append((t, req.prompt, pool.generate([req])[0]))
            k += 1

    with ThreadPoolExecutor(1) as ex:
        fut = ex.submit(client)
        long_ref = pool.submit(long)
        _wait_busy(pool, long.request_id)
        while len(stream) < 2:
            time.sleep(0.02)
        v2 = republish(store)  # published while `long` and the stream run
        t_pub = time.monotonic()
        while sum(t > t_pub for t, _, _ in stream) < 3:
            time.sleep(0.02)
        stop.set()
        fut.result(timeout=60)
    got = ray.get(long_ref)
    # The request in flight during the publish finishes on the version it started with.
    assert got.ok and got.datastore_version == v1 and got.token_ids == expected(engine, prompt, 600)
    assert any(r.datastore_version == v1 for t, _, r in stream if t < t_pub)
    for t, p, r in stream:
        assert r.ok and r.token_ids == expected(engine, p, 16), r.error
        # Every response names its version; requests sent after the publish use the new one.
        assert r.datastore_version in ((v2,) if t > t_pub else (v1, v2))
    # An actor switches at its next request (or a refresh); until then it reports the old one.
    assert set(pool.versions().values()) <= {v1, v2}
    assert pool.refresh() == {name: v2 for name in pool.names} == pool.versions()

    assert set(pool.pin(v1).values()) == {v1}
    pinned = pool.generate([DecodeRequest("question 3?", 12) for _ in range(3)])
    assert all(r.ok and r.datastore_version == v1 for r in pinned)  # CURRENT is still v2
    assert set(pool.unpin().values()) == {v2}
    assert all(r.datastore_version == v2 for r in pool.generate([DecodeRequest("question 4?", 12)]))

    assert set(pool.rollback(v1).values()) == {v1}
    assert Datastore(store).version == v1
    assert all(r.ok and r.datastore_version == v1 for r in pool.generate([DecodeRequest("question 5?", 12)] * 2))
    assert pool.versions() == {name: v1 for name in pool.names}


def _long_prompt(engine):
    """A prompt whose greedy reply is long (no early EOS), so a kill lands mid-request."""
    cands = {p: len(expected(engine, p, 600)) for p in ("question 1?", "hello", "question 11?", "question 21?")}
    prompt = max(cands, key=cands.get)
    assert cands[prompt] >= 300, cands
    return prompt


def _wait_busy(pool, rid, timeout=60.0):
    """Index of the actor decoding request `rid` (polled through info(), which runs beside it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for i, d in enumerate(pool.infos()):
            if d["busy"] == rid:
                return i
        time.sleep(0.02)
    raise AssertionError(f"request {rid} never started")


@pytest.mark.parametrize("no_restart", [False, True], ids=["restarted", "gone-for-good"])
def test_actor_killed_mid_request_loses_nothing(pool, engine, no_restart):
    prompt = _long_prompt(engine)
    want = expected(engine, prompt, 600)
    req = DecodeRequest(prompt, 600, method="dresd")
    with ThreadPoolExecutor(1) as ex:
        fut = ex.submit(pool.generate, [req, DecodeRequest("question 2?", 8)])
        i = _wait_busy(pool, req.request_id)
        pid = pool.infos()[i]["pid"]
        ray.kill(pool.actors[i], no_restart=no_restart)
        resps = fut.result(timeout=120)
    assert resps[0].ok and resps[0].token_ids == want, resps[0].error
    assert resps[1].ok
    if not no_restart:
        assert resps[0].actor == pool.names[i]  # Ray re-ran it on the restarted actor
    assert pool.infos()[i]["pid"] != pid  # a new process: the kill did land
    # The killed actor is back (restarted by Ray, or recreated by the pool) and serves again.
    assert [d["actor"] for d in pool.infos()] == pool.names
    again = pool.generate([DecodeRequest("question 3?", 8) for _ in range(2)])
    assert all(r.ok for r in again) and {r.actor for r in again} == set(pool.names)


def test_a_pools_pin_is_recorded_in_the_root_until_unpinned(tmp_path):
    """No Ray: the pool's pin calls go to stand-in actors, to see what lands in the root."""
    from types import SimpleNamespace

    from dresd.storage.pins import root_pins

    pool = DecoderPool.__new__(DecoderPool)
    actor = SimpleNamespace(pin=SimpleNamespace(remote=lambda version: version))
    pool.root, pool.pool_id, pool.names, pool.actors, pool._inflight = str(tmp_path), "abcd1234", ["a"], [], []
    pool.actors, pool._pinned = [actor], None
    pool._get = lambda refs, what: refs
    assert pool.pin("v1") == {"a": "v1"} and root_pins(str(tmp_path)) == {"pins/pool-abcd1234": "v1"}
    assert pool.unpin() == {"a": None} and root_pins(str(tmp_path)) == {}
    pool.pin("v2")
    pool.actors = []  # nothing for ray.kill: shutdown still removes the pool's pin
    pool.shutdown()
    assert root_pins(str(tmp_path)) == {}
