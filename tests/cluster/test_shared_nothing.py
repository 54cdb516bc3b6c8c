"""The build and update jobs on a shared-nothing cluster (tests/cluster/conftest.py: a CPU-0
head and two workers, each with its own ~/.cache and scratch, token auth, a `file://` folder
as the only shared storage), submitted with `ray job submit --working-dir`, give the same
datastore as one-node runs: token-stream checksum, key positions, sources and the
neighbours of a fixed query set.

The model is named by a storage URI only: every node fetches it into its own cache, and the
workers' embedding actors check their copy against the identity the driver read.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import yaml
from tests_support import TINY_VOCAB, write_small_corpus
from tiny_models import make_tiny_llama

from dresd.datastore.index import search
from dresd.datastore.store import Datastore
from jobs.build import parse as parse_build
from jobs.update import parse as parse_update

pytestmark = [pytest.mark.cluster, pytest.mark.subprocess]  # ray: from ray_session (the one-node runs)

JOB_TIMEOUT_S = 480


def _yaml(path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _configs(folder, model: str, corpus: str, extra: str, sources: list[str]) -> tuple[str, str]:
    """(build config, update config) files: the same for the cluster and the one-node runs."""
    common = {"model": {"path": model, "device": "cpu"}, "embed_actors": 2, "embed_cpus": 0.75, "embed_threads": 1}
    corpus_cfg = {"kind": "prompt_response", "max_tokens": 256, "prompt_format": "chat"}
    build = _yaml(folder / "build.yaml", {**common, "corpus": {**corpus_cfg, "paths": [corpus]},
                                          "index": {"dim": 16, "flat_below": 100000}, "value_len": 8,
                                          "shard_rows": 10, "check_sample": 50})
    update = _yaml(folder / "update.yaml", {**common, "corpus": {**corpus_cfg, "paths": [extra]},
                                            "shard_rows": 10, "sources": sources, "compact": True})
    return build, update


def _one_node(build: str, update: str, root: str) -> None:
    from pipelines.build import build_datastore
    from pipelines.update import compact, delete_sources, update_datastore

    build_datastore(parse_build(["--config", build, "--output", root]))
    cfg = parse_update(["--config", update, "--output", root])
    update_datastore(cfg)
    delete_sources(root, cfg.sources)
    compact(root)


def _versions(root: str) -> list[Datastore]:
    """CURRENT of datastore `root` (a folder or URI) and its ancestors, oldest first."""
    chain = [Datastore(root)]
    while chain[0].manifest.get("parent"):
        chain.insert(0, Datastore(root, version=chain[0].manifest["parent"]))
    return chain


@pytest.fixture(scope="module")
def inputs(shared_nothing_cluster):
    """The model and corpora, on the shared store (one-node runs read them as local paths)."""
    c = shared_nothing_cluster
    model = make_tiny_llama(c.shared / "models" / "tiny", vocab_size=TINY_VOCAB, init_std=0.3)
    corpus, _ = write_small_corpus(c.shared)
    extra = c.shared / "extra.jsonl"
    extra.write_text("".join(json.dumps({"prompt": f"more {i}?", "response": f"reply {i} " + "xyz " * (i % 4 + 2)}) + "\n"
                             for i in range(15)))
    return model, corpus, extra


def test_build_and_update_jobs_on_a_shared_nothing_cluster_match_one_node(shared_nothing_cluster, inputs, ray_session,
                                                                          tmp_path, monkeypatch):
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache"))  # this process's reads of the URI stores
    c = shared_nothing_cluster
    model, corpus, extra = inputs
    sources = ["corpus.jsonl:2", "extra.jsonl:3"]

    # The cluster: everything by storage URI, configs read by the driver from the shared store.
    build, update = _configs(c.shared, c.uri("models/tiny"), c.uri("corpus.jsonl"), c.uri("extra.jsonl"), sources)
    store = c.uri("store")
    t0 = time.perf_counter()
    # First a local output: the scratch path exists on every node, but as another folder on
    # each, so the build is refused before anything is embedded.
    running = c.submit(f"python -m jobs.build --config {build} --output {c.scratch}/store 2>&1 | "
                       "grep 'nodes .* do not share' && "
                       f"python -m jobs.build --config {build} --output {store} && "
                       f"python -m jobs.update --config {update} --output {store}", JOB_TIMEOUT_S)

    # Meanwhile one node: a local model path, local files, a local root.
    local = tmp_path / "local"
    local.mkdir()
    build, update = _configs(local, str(model), str(corpus), str(extra), sources)
    _one_node(build, update, str(tmp_path / "one"))
    job = running.result()
    took = time.perf_counter() - t0
    assert job.returncode == 0, job.stdout[-6000:] + job.stderr[-3000:]
    print(f"build + update jobs on the cluster: {took:.1f} s")

    # Each worker resolved the model itself, into its own cache.
    for node in ("worker1", "worker2"):
        assert list((c.nodes[node] / "dresd" / "models" / "fetched").glob("tiny-*/tiny/config.json")), node

    one, two = Datastore(tmp_path / "one"), Datastore(store)
    chain_one, chain_two = _versions(str(tmp_path / "one")), _versions(store)
    assert [v.manifest.get("change", {}).get("kind") for v in chain_two] == [None, "add", "delete", "compact"]
    for a, b in zip(chain_one, chain_two):
        assert a.manifest["files"]["tokens.npy"]["sha256"] == b.manifest["files"]["tokens.npy"]["sha256"]
        assert np.array_equal(a.key_positions, b.key_positions)
        assert a.sources == b.sources
        assert a.manifest["model"] == b.manifest["model"]
    assert not any(s in two.sources for s in sources)
    rng = np.random.default_rng(0)
    q = rng.normal(size=(30, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    # Same neighbours up to fp32 near-ties (keys embedded by other processes): nearly every top-10 id.
    ia, ib = search(one.index, q, 10)[1], search(two.index, q, 10)[1]
    assert np.mean([len(set(x) & set(y)) / 10 for x, y in zip(ia.tolist(), ib.tolist())]) >= 0.95


def _decode_config(path, model: str, prompts: str, output: str) -> str:
    # dual_layout off: each node would build the packed CPU kernel into its own cache first.
    return _yaml(path, {"model": {"path": model, "device": "cpu", "dual_layout": False}, "prompts": prompts, "prompt_field": "prompt",
                        "max_new_tokens": 8, "batch_size": 4, "chunk_rows": 5, "limit": 20, "actors": 2,
                        "actor_cpus": 0.75, "threads": 1, "output": output, "id_corpus": True,
                        "speculative": {"method": "greedy"}})


def test_decode_and_id_corpus_jobs_on_a_shared_nothing_cluster_match_one_node(shared_nothing_cluster, inputs,
                                                                              ray_session, tmp_path, monkeypatch):
    """Batch decoding into parts on the store, its in-distribution corpus, and a datastore
    built from that corpus: the same text, corpus and token stream as on one node."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.decode import parse as parse_decode
    from pipelines.build import build_datastore
    from pipelines.decode import run_decode

    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path / "cache"))  # this process's reads of the URI stores
    c = shared_nothing_cluster
    model, corpus, _ = inputs
    # An earlier run's part outside this plan (as a larger `limit` leaves): removed, and listed.
    c.shared.joinpath("dec").mkdir()
    pq.write_table(pa.table({"row": [99]}), c.shared / "dec" / "part-000009.parquet")
    dec = _decode_config(c.shared / "d.yaml", c.uri("models/tiny"), c.uri("corpus.jsonl"), c.uri("dec"))
    build, _ = _configs(c.shared, c.uri("models/tiny"), c.uri("dec.jsonl"), c.uri("corpus.jsonl"), [])
    t0 = time.perf_counter()
    running = c.submit(f"python -m jobs.decode --config {dec} && "
                       f"python -m jobs.build --config {build} --output {c.uri('id-store')}", JOB_TIMEOUT_S)

    local = tmp_path / "local"
    local.mkdir()
    one = run_decode(parse_decode(["--config", _decode_config(local / "d.yaml", str(model), str(corpus),
                                                               str(tmp_path / "dec"))]))
    assert one.decoded > 0 and not one.failed
    build, _ = _configs(local, str(model), str(tmp_path / "dec.jsonl"), str(corpus), [])
    build_datastore(parse_build(["--config", build, "--output", str(tmp_path / "id-store")]))
    job = running.result()
    took = time.perf_counter() - t0
    assert job.returncode == 0, job.stdout[-6000:] + job.stderr[-3000:]
    print(f"decode + id-corpus build jobs on the cluster: {took:.1f} s")
    assert "removed 1 part(s) outside this plan" in job.stdout

    names = sorted(p.name for p in (c.shared / "dec").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "dec").iterdir())  # no temporaries, no orphans
    for n in names:
        a, b = pq.read_table(tmp_path / "dec" / n).to_pylist(), pq.read_table(c.shared / "dec" / n).to_pylist()
        assert [(r["id"], r["response"], r["token_ids"]) for r in a] == [(r["id"], r["response"], r["token_ids"]) for r in b]
    assert (c.shared / "dec.jsonl").read_text() == (tmp_path / "dec.jsonl").read_text()
    x, y = Datastore(tmp_path / "id-store"), Datastore(c.uri("id-store"))
    assert x.manifest["files"]["tokens.npy"]["sha256"] == y.manifest["files"]["tokens.npy"]["sha256"]
    assert np.array_equal(x.key_positions, y.key_positions) and x.sources == y.sources
