"""The build's three Ray Data passes over the corpus, each a graph of the stage modules.

    count   read -> tokenize -> key counts per record             (tasks; nothing embedded)
    fit     read -> tokenize -> embed the sampled records         (actor pool) -> sampled states
    stream  read -> tokenize -> embed -> compress -> write        (actors, then tasks) -> shard files
            read -> tokenize -> compress held states -> write      (tasks: the fit sample was every key)
    code    shard ids -> stored keys -> IVF codes                 (tasks, once the index is trained)

One shard per task comes from the stages' own arguments: the read stage yields a table per
shard, `repartition(target_num_rows_per_block=1)` keeps each in a block of its own (a file's
shards would otherwise share blocks, and with them one actor), and `batch_size=1` hands an
actor one shard per call. The read and the repartition run to the end (`materialize`: token
ids, small next to the states embedded from them) before the embedding actors start: a
repartition task takes a whole CPU, and once the actors hold a node's CPUs it would wait
for them while they wait for its blocks (seen on a cluster of two 1-CPU workers). No order
is promised: every row carries its shard id, and the driver sorts by it wherever order
matters.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray

from dresd.config import BuildConfig
from pipelines.embed import Embed, Held, compress_held
from pipelines.encode import code_shards, write_shards
from pipelines.read import read_shards
from pipelines.rows import shard_rows, unblob
from pipelines.runtime import ensure_ray


def _counts(table: pa.Table) -> pa.Table:
    """A shard's per-record key counts, rows read and rejects: what the fit plan needs."""
    rows = list(shard_rows(table))
    return pa.table({
        "shard": [r.shard for r in rows], "record_keys": [r.keys_per_record for r in rows],
        "record_tokens": [np.diff(r.offsets) for r in rows],
        "rows_read": [r.rows_read for r in rows], "rejects": [r.rejects for r in rows],
        "messages": [r.messages for r in rows]},
        schema=pa.schema([("shard", pa.string()), ("record_keys", pa.list_(pa.int64())),
                          ("record_tokens", pa.list_(pa.int64())), ("rows_read", pa.int64()),
                          ("rejects", pa.list_(pa.string())), ("messages", pa.list_(pa.string()))]))


def counts_of(table: pa.Table) -> dict[str, dict]:
    """The count stage's rows as {shard id: {record_keys, record_tokens, rows_read, rejects, messages}}."""
    return {r["shard"]: {"record_keys": np.asarray(r["record_keys"], dtype=np.int64),
                         "record_tokens": np.asarray(r["record_tokens"], dtype=np.int64),
                         "rows_read": int(r["rows_read"]), "rejects": list(r["rejects"]),
                         "messages": list(r["messages"])} for r in table.to_pylist()}


def count_pass(cfg: BuildConfig, tokenize: dict) -> dict[str, dict]:
    """Every shard's counts (counts_of), by shard id."""
    ensure_ray(cfg.ray_address)
    # The same CPU share as the read stage, so Ray fuses the two into one task per file.
    ds = read_shards(cfg.corpus, tokenize, cfg.shard_rows).map_batches(_counts, batch_format="pyarrow",
                                                                       num_cpus=0.25)
    out = {}
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        out.update(counts_of(batch))
    return out


def _embed_stage(ds: ray.data.Dataset, cfg: BuildConfig, identity: dict, shards: int, per_call: int = 1,
                 **codec) -> ray.data.Dataset:
    gpus = cfg.embed_gpus if cfg.embed_gpus >= 0 else (1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0)
    # Workers get the model's name, resolved on each node (dresd.model.resolve), and the
    # identity the driver saw, which each embedding actor checks its own copy against.
    kwargs = dict(model_dir=cfg.model.path, device=cfg.model.device, threads=cfg.embed_threads,
                  batch_size=cfg.batch_size, dtype=cfg.model.dtype, identity=identity, **codec)
    return ds.repartition(target_num_rows_per_block=1).materialize().map_batches(
        Embed, fn_constructor_kwargs=kwargs, batch_size=per_call, batch_format="pyarrow",
        # One call in flight per actor: calls are large, so this balances them over actors.
        compute=ray.data.ActorPoolStrategy(size=max(1, min(cfg.embed_actors, -(-shards // per_call))),
                                           max_tasks_in_flight_per_actor=1),
        num_cpus=cfg.embed_cpus, num_gpus=gpus)


def fit_pass(cfg: BuildConfig, tokenize: dict, identity: dict, select: dict[str, np.ndarray],
             per_call: int = 1) -> dict[str, Held]:
    """The float32 hidden states of the selected keys (shard id -> key numbers in the shard),
    by shard id in shard order, whatever order the actors finish in. An actor call embeds
    `per_call` shards' sampled records together (fit.shards_per_call)."""
    ensure_ray(cfg.ray_address)
    ds = _embed_stage(read_shards(cfg.corpus, tokenize, cfg.shard_rows, select=select), cfg, identity, len(select),
                      per_call)
    return sample_of(ds.iter_batches(batch_format="pyarrow", batch_size=None), select)


def sample_of(batches, select: dict[str, np.ndarray]) -> dict[str, Held]:
    """The fit stage's rows (Arrow batches, any order) as each shard's states, in shard order."""
    parts = {}
    for batch in batches:
        for i in range(batch.num_rows):
            n, width = batch.column("n")[i].as_py(), batch.column("width")[i].as_py()
            parts[batch.column("shard")[i].as_py()] = Held(
                unblob(batch.column("hidden")[i].as_py(), n, width, np.float32),
                batch.column("node")[i].as_py(), batch.column("dtype")[i].as_py())
    missing = sorted(set(select) - set(parts))
    if missing:
        raise RuntimeError(f"fit pass: no states came back for shard(s) {missing[:5]}")
    return {s: parts[s] for s in sorted(parts)}


def stream_pass(cfg: BuildConfig, tokenize: dict, identity: dict, work: str, ctag: str,
                plan: dict[str, tuple[int, int]], skip: frozenset, held: dict[str, Held] | None = None) -> list[str]:
    """Embed, compress (compressor `ctag`) and write every shard of `plan` (shard id ->
    (first key id, keys)) not in `skip` into the work folder; returns the shard ids written.
    With `held` (every shard's states from the fit pass), nothing is embedded again."""
    ensure_ray(cfg.ray_address)
    todo = len(set(plan) - skip)
    if not todo:
        return []
    ds = read_shards(cfg.corpus, tokenize, cfg.shard_rows, skip=skip)
    if held is None:
        ds = _embed_stage(ds, cfg, identity, todo, work=work, ctag=ctag)
    else:
        # Through the object store: each task fetches its own shard's states only.
        refs = {s: Held(ray.put(h.states), h.node, h.dtype) for s, h in held.items()}
        ds = ds.map_batches(compress_held, batch_size=1, batch_format="pyarrow", num_cpus=0.25,
                            fn_kwargs=dict(work=work, ctag=ctag, held=refs))
    # Writing is a task per shard beside the actors: a small CPU share.
    ds = ds.map_batches(write_shards, batch_size=1, batch_format="pyarrow", num_cpus=0.25,
                        fn_kwargs=dict(work=work, ctag=ctag, plan=plan))
    return [row["shard"] for row in ds.iter_rows()]


def code_pass(cfg: BuildConfig, work: str, ctag: str, tag: str, first_ids: dict[str, int]) -> list[str]:
    """Encode every shard of `first_ids` (shard id -> first key id) with the trained index
    `tag`, a task per shard; returns the shard ids coded."""
    ensure_ray(cfg.ray_address)
    rows = [{"shard": s, "first": f} for s, f in sorted(first_ids.items())]
    if not rows:
        return []
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        code_shards, batch_size=1, batch_format="pyarrow", num_cpus=1, fn_kwargs=dict(work=work, ctag=ctag, tag=tag))
    return [row["shard"] for row in ds.iter_rows()]
