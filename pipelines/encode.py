"""Stage 4: a shard's compressed keys -> its work files; once the index is trained, its keys
-> IVF codes.

- `write_shards`, the streaming pass's last stage (a task per shard, after the embedding
  actors, so the model's actors never wait on the disk): it receives the shard's Arrow row
  (the read stage's token columns plus the keys the actor compressed, a float16 blob with its
  shape), checks the key count the count pass planned, and writes the shard (shards.py),
  the compressor's marker last. Only a receipt goes on.
- `code_shards`, the code pass (a task per shard): the trained index encodes the shard's
  stored keys into codes numbered from its first key id (fixed by the count pass).
"""

from __future__ import annotations

from collections import Counter

import faiss
import numpy as np
import pyarrow as pa

from dresd.storage.faults import fault_point
from pipelines.merge import code_shard, load_trained
from pipelines.rows import shard_rows, unblob
from pipelines.scratch import Scratch
from pipelines.shards import ShardData, meta_name, write_shard

RECEIPT = pa.schema([("shard", pa.string()), ("keys", pa.int64())])


class KeyCountMismatch(RuntimeError):
    """A shard embedded into another number of keys than the count pass found: the corpus
    or the tokenizer changed under the build."""


def write_shards(batch: pa.Table, work: str, ctag: str, plan: dict[str, tuple[int, int]]) -> pa.Table:
    """Write every shard of `batch` (keys made by compressor `ctag`); `plan` gives each shard's
    (first key id, key count). Returns receipts {shard, keys}."""
    scratch = Scratch(work)
    done = []
    for i, row in enumerate(shard_rows(batch)):
        n, dim = int(batch.column("n_keys")[i].as_py()), int(batch.column("key_dim")[i].as_py())
        expected = plan[row.shard][1]
        if n != expected:
            raise KeyCountMismatch(f"work shard {row.shard} of {row.file}: embedded {n} keys where the count pass "
                                   f"found {expected}; the corpus or the tokenizer changed during the build, so "
                                   "rerun it")
        meta = {
            "shard": row.shard, "file": row.file, "rows_read": row.rows_read, "examples": len(row.sources),
            "tokens": int(len(row.tokens)), "keys": n, "rejects": dict(Counter(row.rejects)), "messages": row.messages,
            "node": batch.column("node")[i].as_py(), "dtype": batch.column("dtype")[i].as_py(),
            # Summed, not averaged: an update's drift is the mean over all its keys.
            "recon_error_sum": float(batch.column("recon_error_sum")[i].as_py()),
        }
        keys = unblob(batch.column("keys")[i].as_py(), n, dim, np.float16)
        data = ShardData(tokens=row.tokens, offsets=row.offsets, key_starts=row.key_starts, keys=keys,
                         sources=row.sources)
        write_shard(scratch.path / "shards" / row.shard, data, meta, ctag)
        fault_point("embed_after_shard_rename")
        scratch.push(f"shards/{row.shard}", last=meta_name(ctag))
        done.append((row.shard, n))
    return pa.table({"shard": [s for s, _ in done], "keys": [k for _, k in done]}, schema=RECEIPT)


def code_shards(batch: pa.Table, work: str, ctag: str, tag: str) -> pa.Table:
    """Encode the stored keys of every shard of `batch` (rows {shard, first}) with the
    trained index `tag`. Returns receipts {shard}."""
    faiss.omp_set_num_threads(1)  # a task holds one CPU; the pass runs one per shard
    scratch = Scratch(work)
    trained = load_trained(scratch, tag)
    shards = batch.column("shard").to_pylist()
    for sid, first in zip(shards, batch.column("first").to_pylist()):
        fault_point("during_index_fill")
        code_shard(scratch, sid, ctag, tag, int(first), trained)
    return pa.table({"shard": shards}, schema=pa.schema([("shard", pa.string())]))
