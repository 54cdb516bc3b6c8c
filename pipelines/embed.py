"""Stage 3: token sequences -> last-layer hidden states at every key position -> shard files.

An actor stage: each actor loads the model once, embeds a shard's records in padded
mini-batches and writes the shard (see shards.py). Keys are the decoder's final-norm output
at positions key_start .. len-2 of each record (the last position predicts nothing inside
the record). Only a small metadata row travels back to the driver.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import ray
import torch

from dresd.config import ModelConfig
from dresd.model.loading import load_model
from dresd.model.resolve import check_identity
from dresd.storage.faults import fault_point
from pipelines.scratch import Scratch
from pipelines.shards import META, ShardData, write_shard


class Embed:
    """Callable class for `map_batches(compute=ActorPoolStrategy(...))`."""

    def __init__(self, model_dir: str | None, device: str, threads: int, work: str, batch_size: int, dtype: str = "auto",
                 identity: dict | None = None):
        # Ray pins OMP threads to the actor's CPU reservation; set the real count explicitly.
        threads = threads or max(1, os.cpu_count() or 1)
        # `model_dir` is the model's name as ModelConfig.path takes it, resolved on this node.
        # Embedding runs long forwards only: the decode-step weight copy would be dead memory.
        self.lm = load_model(ModelConfig(path=model_dir, device=device, threads=threads, dual_layout=False,
                                         dtype=dtype))
        if identity is not None:  # the model the driver planned with, on every node
            node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
            check_identity(identity, self.lm.identity, f"embedding actor on node {node[:12]} (model {model_dir!r})")
        self.work = Scratch(work)
        self.batch_size = batch_size

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

    def embed_keys(self, seqs: list[np.ndarray], key_starts: list[int]) -> np.ndarray:
        """(n_keys, D) hidden states of every key position, records in order."""
        # Length-sorted mini-batches waste less compute on padding.
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        keys: list[np.ndarray | None] = [None] * len(seqs)
        for b in range(0, len(order), self.batch_size):
            idx = order[b : b + self.batch_size]
            for i, h in zip(idx, self.embed([seqs[i] for i in idx])):
                keys[i] = h[key_starts[i] : len(seqs[i]) - 1]
        dim = self.lm.identity["hidden_size"]
        return np.concatenate(keys) if keys else np.zeros((0, dim), np.float32)

    def __call__(self, batch: dict) -> dict:
        metas = []
        for sid, file, blob in zip(batch["shard"], batch["file"], batch["payload"]):
            p = pickle.loads(blob)
            seqs = p["seqs"]
            # Shard files hold fp16: a state beyond its range is as broken as a NaN (and refused).
            with np.errstate(over="ignore"):
                hidden = self.embed_keys(seqs, p["key_starts"]).astype(np.float16)
            check_finite(hidden, sid, file, [len(s) - 1 - k for s, k in zip(seqs, p["key_starts"])], p["sources"])
            lengths = np.array([len(s) for s in seqs], dtype=np.int64)
            meta = {
                "shard": sid, "file": file, "rows_read": p["rows_read"], "examples": len(seqs),
                "tokens": int(lengths.sum()), "keys": int(len(hidden)), "rejects": p["rejects"],
                "messages": p["messages"], "node": ray.get_runtime_context().get_node_id(),
                "dtype": self.lm.dtype,  # what the keys were made in (the manifest records it)
            }
            data = ShardData(
                tokens=np.concatenate(seqs) if seqs else np.zeros(0, np.int32),
                offsets=np.concatenate([[0], np.cumsum(lengths)]),
                key_starts=np.asarray(p["key_starts"], dtype=np.int32),
                hidden=hidden,
                sources=p["sources"],
            )
            write_shard(self.work.path / "shards" / sid, data, meta)
            fault_point("embed_after_shard_rename")
            self.work.push(f"shards/{sid}", last=META)
            metas.append(meta)
        return {"shard": [m["shard"] for m in metas], "keys": [m["keys"] for m in metas]}


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
        f"work shard {shard} of {file}: {len(bad)} of {len(hidden)} hidden states are NaN or infinite "
        f"(or beyond float16's range), in {len(names)} record(s) {names[:5]}, key rows {bad[:5].tolist()}; "
        "the model's forward is broken on these inputs, so the shard is refused and nothing is written")
