"""Stage 3: token sequences -> last-layer hidden states at every key position.

An actor stage: each actor loads the model once and embeds padded batches. Keys are the
decoder's final-norm output at positions key_start .. len-2 of each record (the last
position predicts nothing inside the record).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from dresd.config import ModelConfig
from dresd.models import load_model


class Embed:
    """Callable class for `map_batches(compute=ActorPoolStrategy(...))`."""

    def __init__(self, model_dir: str, device: str, threads: int):
        # Ray pins OMP threads to the actor's CPU reservation; set the real count explicitly.
        threads = threads or max(1, os.cpu_count() or 1)
        self.lm = load_model(ModelConfig(path=model_dir, device=device, threads=threads))

    @torch.inference_mode()
    def embed(self, seqs: list[np.ndarray]) -> list[np.ndarray]:
        """Final-norm hidden states (len, D) of each sequence, batched with right padding."""
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        device = self.lm.device
        out = self.lm.model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        hidden = out.last_hidden_state.float().cpu().numpy()
        return [hidden[i, : len(s)] for i, s in enumerate(seqs)]

    def __call__(self, batch: dict) -> dict:
        # Reject rows ride along with an empty key block so the driver can count them.
        out = {k: list(v) for k, v in batch.items()}
        ok = [i for i, reason in enumerate(batch["reject"]) if not reason]
        hidden = self.embed([batch["ids"][i] for i in ok]) if ok else []
        dim = self.lm.identity["hidden_size"]
        out["hidden"] = [np.zeros((0, dim), np.float32)] * len(out["ids"])
        for i, h in zip(ok, hidden):
            start, end = int(batch["key_start"][i]), len(batch["ids"][i]) - 1
            out["hidden"][i] = h[start:end]
        return out
