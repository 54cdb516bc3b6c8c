"""A build on a simulated two-node cluster (its own Ray instance, in a subprocess) runs
work on both nodes and equals a one-node build."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dresd.config import BuildConfig, CorpusConfig, IndexConfig, ModelConfig
from dresd.datastore.store import Datastore
from dresd.datastore.index import search
from pipelines.build import build_datastore
from tests_support import write_small_corpus

pytestmark = [pytest.mark.cluster, pytest.mark.subprocess]  # ray: from ray_session (conftest.py)

TWO_NODE_SCRIPT = textwrap.dedent("""
    import dataclasses, json, sys
    import ray
    from ray.cluster_utils import Cluster
    from dresd.config import BuildConfig, CorpusConfig, IndexConfig, ModelConfig
    from pipelines.build import build_datastore

    model, corpus, out = sys.argv[1:4]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address)
    # 1.5 CPUs per embedding actor: two actors cannot share one 2-CPU node.
    cfg = BuildConfig(model=ModelConfig(path=model), corpus=CorpusConfig(paths=[corpus], max_tokens=256),
                      index=IndexConfig(dim=16, pq_m=8, flat_below=1000), output=out, value_len=8,
                      shard_rows=5, embed_actors=2, embed_cpus=1.5, embed_threads=1)
    report = build_datastore(cfg)
    # The same build with a URI output: its scratch is a URI too, mirrored per node, so the
    # nodes exchange shards and fills through storage instead of a shared folder.
    uri = build_datastore(dataclasses.replace(cfg, output="file://" + out + "-uri"))
    print("REPORT" + json.dumps({"nodes": report.nodes, "keys": report.keys, "rows_read": report.rows_read,
                                 "rejected": report.rejected, "cluster_nodes": [n["NodeID"] for n in ray.nodes()],
                                 "uri_nodes": uri.nodes, "uri_keys": uri.keys}))
    ray.shutdown()
    cluster.shutdown()
""")


def test_two_node_build_uses_both_nodes_and_matches_one_node(ray_session, tiny_model_dir, tmp_path):
    corpus, _ = write_small_corpus(tmp_path)
    one = BuildConfig(model=ModelConfig(path=str(tiny_model_dir)), corpus=CorpusConfig(paths=[str(corpus)], max_tokens=256),
                      index=IndexConfig(dim=16, pq_m=8, flat_below=1000), output=str(tmp_path / "one"), value_len=8,
                      shard_rows=5)
    single = build_datastore(one)
    proc = subprocess.run([sys.executable, "-c", TWO_NODE_SCRIPT, str(tiny_model_dir), str(corpus), str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("REPORT"))[len("REPORT"):])
    assert len(set(report["cluster_nodes"])) == 2
    assert len(report["uri_nodes"]["embed"]) == 2 and len(report["uri_nodes"]["fill"]) == 2
    assert report["uri_keys"] == single.keys
    assert len(report["nodes"]["embed"]) == 2, f"embedding ran on {report['nodes']['embed']}"
    assert len(report["nodes"]["fill"]) == 2, f"index fill ran on {report['nodes']['fill']}"
    assert (report["keys"], report["rows_read"], report["rejected"]) == (single.keys, single.rows_read, single.rejected)
    a, b = Datastore(one.output), Datastore(tmp_path / "two")
    assert a.manifest["files"]["tokens.npy"]["sha256"] == b.manifest["files"]["tokens.npy"]["sha256"]
    assert np.array_equal(a.key_positions, b.key_positions)
    c = Datastore(f"file://{tmp_path}/two-uri")
    assert c.manifest["files"]["tokens.npy"]["sha256"] == a.manifest["files"]["tokens.npy"]["sha256"]
    assert not (tmp_path / "two-uri" / ".build").exists() or not any((tmp_path / "two-uri" / ".build").iterdir())
    rng = np.random.default_rng(0)
    q = rng.normal(size=(30, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    # Same neighbours up to fp32 near-ties: nearly every top-10 id agrees.
    ia, ib = search(a.index, q, 10)[1], search(b.index, q, 10)[1]
    assert np.mean([len(set(x) & set(y)) / 10 for x, y in zip(ia.tolist(), ib.tolist())]) >= 0.95
