"""Stage 3: token ids -> last-layer hidden states -> what leaves the actor: compressed keys
(the streaming pass) or the sampled keys' states (the fit pass). Full states of the whole
corpus never leave an actor, and nothing here writes to disk.

An actor stage: each actor loads the model once and embeds one shard per call (its Arrow
row, pipelines/rows.py) in length-sorted, padded mini-batches; each record's states are
reduced (compressed, or cut to the sampled keys) as soon as its mini-batch is done, so even a
shard's states are never held at once. Keys are the decoder's final-norm output at positions
key_start .. len-2 of each record (the last position predicts nothing inside the record).

- With a compressor (`ctag`, in the work folder), the actor z-scores, projects and
  normalises every key with it and passes the shard's row on with its keys as a float16 blob
  (`keys`, `n_keys`, `key_dim`), the node, the dtype and the compressor's summed
  reconstruction error (an update's drift), for the write stage (encode.py).
- Without one (the fit pass), it embeds only the records that hold a key the row's `keep`
  column names and returns those keys' float32 states (`hidden`, `n`, `width`).

When the fit sample holds every key (a corpus of at most index.sample_size keys), the stream
pass does not embed the corpus again: `compress_held`, a task stage, compresses the states
the fit pass returned, record by record as the actors do, and the datastore is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray
import torch

from dresd.config import ModelConfig
from dresd.datastore.compression import compress, reconstruction_error
from dresd.model.loading import load_model, node_threads
from dresd.model.resolve import check_identity
from pipelines.merge import load_compressor_codec
from pipelines.rows import add_columns, blob, shard_rows
from pipelines.scratch import Scratch


class Embed:
    """Callable class for `map_batches(compute=ActorPoolStrategy(...), batch_format="pyarrow")`."""

    def __init__(self, model_dir: str | None, device: str, threads: int, batch_size: int, dtype: str = "auto",
                 identity: dict | None = None, work: str | None = None, ctag: str | None = None):
        threads = threads or node_threads()  # not Ray's OMP_NUM_THREADS (the CPU reservation)
        # `model_dir` is the model's name as ModelConfig.path takes it, resolved on this node.
        # Embedding runs long forwards only: the decode-step weight copy would be dead memory.
        self.lm = load_model(ModelConfig(path=model_dir, device=device, threads=threads, dual_layout=False,
                                         dtype=dtype))
        if identity is not None:  # the model the driver planned with, on every node
            node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
            check_identity(identity, self.lm.identity, f"embedding actor on node {node[:12]} (model {model_dir!r})")
        self.batch_size = batch_size
        self.compressor = load_compressor_codec(Scratch(work), ctag) if ctag else None

    @torch.inference_mode()
    def embed(self, seqs: list[np.ndarray]) -> list[np.ndarray]:
        """Final-norm hidden states (len, D) of each sequence, batched with right padding."""
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.from_numpy(np.array(s, dtype=np.int64))
            mask[i, : len(s)] = 1
        device = self.lm.device
        out = self.lm.model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        hidden = out.last_hidden_state.float().cpu().numpy()
        return [hidden[i, : len(s)] for i, s in enumerate(seqs)]

    def embed_keys(self, seqs: list[np.ndarray], key_starts: list[int], each=None) -> np.ndarray:
        """(n_keys, D) hidden states of every key position, records in order; with `each`,
        each record's states go through `each(record index, states)` as soon as its mini-batch
        is done and what it returns is concatenated instead (a shard's full states are then
        never held at once)."""
        # Length-sorted mini-batches waste less compute on padding.
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        keys: list[np.ndarray | None] = [None] * len(seqs)
        for b in range(0, len(order), self.batch_size):
            idx = order[b : b + self.batch_size]
            for i, h in zip(idx, self.embed([seqs[i] for i in idx])):
                states = h[key_starts[i] : len(seqs[i]) - 1]
                keys[i] = states if each is None else each(i, states)
        return np.concatenate(keys) if keys else np.zeros((0, self.lm.identity["hidden_size"]), np.float32)

    def _compressed(self, table: pa.Table) -> pa.Table:
        keys, errors = [], []
        for row in shard_rows(table):
            error = [0.0]

            def each(i: int, states: np.ndarray, row=row, error=error) -> np.ndarray:
                return compress_record(self.compressor, states, row, i, error)

            keys.append(self.embed_keys(row.seqs, list(row.key_starts), each) if len(row.sources)
                        else np.zeros((0, self.compressor.out_dim), np.float16))
            errors.append(error[0])
        node = ray.get_runtime_context().get_node_id()
        return keyed(table, keys, errors, self.compressor.out_dim, [node] * len(keys), [self.lm.dtype] * len(keys))

    def _sampled(self, table: pa.Table) -> pa.Table:
        # The wanted records of every row in the call are embedded together: a fit sample holds
        # a few records a shard, and mini-batches sorted over those few alone pad far more.
        rows = list(shard_rows(table))
        seqs, starts, owner, wanted = [], [], [], []
        for j, row in enumerate(rows):
            counts = row.keys_per_record
            first = np.cumsum(counts) - counts  # each record's first key number in the shard
            record_of = np.searchsorted(np.cumsum(counts), row.keep, side="right")
            for r in np.unique(record_of):
                seqs.append(row.seqs[r])
                starts.append(int(row.key_starts[r]))
                owner.append((j, int(r)))
                wanted.append(row.keep[record_of == r] - first[r])  # key offsets within the record
        picked: list[np.ndarray | None] = [None] * len(seqs)  # filled in mini-batch (length) order

        def each(i: int, states: np.ndarray) -> np.ndarray:
            j, r = owner[i]
            check_finite(states, rows[j].shard, rows[j].file, [len(states)], [rows[j].sources[r]])
            picked[i] = states[wanted[i]]
            return states[:0]

        if seqs:
            self.embed_keys(seqs, starts, each)
        width = self.lm.identity["hidden_size"]
        by_row: list[list[np.ndarray]] = [[] for _ in rows]
        for (j, _), p in zip(owner, picked):  # `owner` runs rows, then records, in order
            by_row[j].append(p)
        states = [np.concatenate(p) if p else np.zeros((0, width), np.float32) for p in by_row]
        node = ray.get_runtime_context().get_node_id()
        return pa.table({"shard": [row.shard for row in rows], "key_ids": [row.keep for row in rows],
                         "hidden": [blob(h, np.float32) for h in states], "n": [len(h) for h in states],
                         "width": [width] * len(rows), "node": [node] * len(rows),
                         "dtype": [self.lm.dtype] * len(rows)}, schema=SAMPLE_SCHEMA)

    def __call__(self, table: pa.Table) -> pa.Table:
        return self._compressed(table) if self.compressor is not None else self._sampled(table)


SAMPLE_SCHEMA = pa.schema([("shard", pa.string()), ("key_ids", pa.list_(pa.int64())), ("hidden", pa.large_binary()),
                           ("n", pa.int64()), ("width", pa.int64()), ("node", pa.string()), ("dtype", pa.string())])


def compress_record(compressor, states: np.ndarray, row, i: int, error: list[float]) -> np.ndarray:
    """Record `i` of shard `row`: its keys' states checked, compressed to float16, and their
    reconstruction error added to `error[0]` (summed over keys: an update's drift is the mean
    over all the keys it adds)."""
    check_finite(states, row.shard, row.file, [len(states)], [row.sources[i]])
    if len(states):
        error[0] += reconstruction_error(compressor, states) * len(states)
    return compress(compressor, states).astype(np.float16)


def keyed(table: pa.Table, keys: list[np.ndarray], errors: list[float], dim: int, nodes: list[str],
          dtypes: list[str]) -> pa.Table:
    """The shard rows of `table` with their compressed keys and what the write stage records:
    the node that embedded them, the model's dtype, the summed reconstruction error."""
    return add_columns(table, {
        "keys": pa.array([blob(k, np.float16) for k in keys], type=pa.large_binary()),
        "n_keys": pa.array([len(k) for k in keys], type=pa.int64()),
        "key_dim": pa.array([dim] * len(keys), type=pa.int32()),
        "node": nodes, "dtype": dtypes,  # the manifest records the dtype
        "recon_error_sum": pa.array(errors, type=pa.float64())})


@dataclass
class Held:
    """A shard's states that the fit pass embedded (every key of it), kept for the stream pass."""

    states: object  # float32 (keys, D), records in order: an array, or its Ray object ref
    node: str  # the node whose actor embedded them
    dtype: str  # the model's dtype there


def compress_held(table: pa.Table, work: str, ctag: str, held: dict[str, Held]) -> pa.Table:
    """The stream pass's stage in place of the actors when the fit sample was the whole corpus:
    each shard's keys compressed from the states the fit pass already embedded (the same
    records, so the same states), record by record as the actors compress them."""
    compressor = load_compressor_codec(Scratch(work), ctag)
    keys, errors, nodes, dtypes = [], [], [], []
    some = next(iter(held.values()))
    for row in shard_rows(table):
        h = held.get(row.shard)
        error = [0.0]
        if h is None:  # the fit reads no shard without keys (rejects only)
            if row.keys_per_record.sum():
                raise RuntimeError(f"work shard {row.shard} of {row.file}: the fit pass returned no states for it")
            keys.append(np.zeros((0, compressor.out_dim), np.float16))
            h = some
        else:
            states = ray.get(h.states) if isinstance(h.states, ray.ObjectRef) else h.states
            per_record = np.split(states, np.cumsum(row.keys_per_record)[:-1])
            keys.append(np.concatenate([compress_record(compressor, s, row, i, error)
                                        for i, s in enumerate(per_record)]))
        errors.append(error[0])
        nodes.append(h.node)
        dtypes.append(h.dtype)
    return keyed(table, keys, errors, compressor.out_dim, nodes, dtypes)


class NonFiniteStates(RuntimeError):
    """Hidden states that are NaN or infinite: keys from them would break the whole index."""


def check_finite(hidden: np.ndarray, shard: str, file: str, keys_per_record: list[int], sources: list[str]) -> None:
    """Refuse a shard whose hidden states are not all finite, naming the shard, its file and
    the records (source ids) whose keys are broken; nothing of the shard is written."""
    bad = np.flatnonzero(~np.isfinite(hidden).all(axis=1))
    if not len(bad):
        return
    record = np.searchsorted(np.cumsum(keys_per_record), bad, side="right")
    names = [sources[r] for r in np.unique(record)]
    raise NonFiniteStates(
        f"work shard {shard} of {file}: {len(bad)} of {len(hidden)} hidden states are NaN or infinite, "
        f"in {len(names)} record(s) {names[:5]}, key rows {bad[:5].tolist()}; the model's forward is broken "
        "on these inputs, so the shard is refused and nothing is written")
