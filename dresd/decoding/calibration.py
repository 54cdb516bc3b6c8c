"""Measuring what a verification forward costs on this machine: the CostModel the draft
budget (dresd.decoding.budget) plans with, calibrated once per model, device and thread
count, and cached on disk."""

from __future__ import annotations

import hashlib
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from dresd.decoding.budget import CostModel
from dresd.decoding.kv_cache import GrowingCache
from dresd.decoding.tree import build_tree
from dresd.decoding.verify import forward, verify_token_tree
from dresd.model.fastpath.cpu_linear import has_dual_layout, kernel_tag, packed_formats
from dresd.storage.cache import cache_root, cached_measurement

# Positions per forward the calibration times; the CostModel interpolates between them.
CALIBRATION_POSITIONS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def _cost_key(model, device: torch.device) -> str:
    cfg = model.config
    name = getattr(cfg, "_name_or_path", "") or cfg.model_type
    shape = f"{cfg.model_type}-{cfg.num_hidden_layers}x{cfg.hidden_size}-v{cfg.vocab_size}-{model.dtype}"
    layout = f"|packed-{kernel_tag()}-bits{packed_formats(model)}" if has_dual_layout(model) else ""
    # step-v2 names the decode step the costs were timed with (dresd.decoding.kv_cache,
    # dresd.model.fastpath.lean_forward): bump it whenever the decode step changes, so cached costs are re-timed.
    return f"{name}|{shape}|{device}|threads={torch.get_num_threads()}{layout}|step-v2"


def calibrate_cost(model, context: int = 256, positions: tuple[int, ...] = CALIBRATION_POSITIONS,
                   reps: int = 5) -> CostModel:
    """Time greedy verification steps over k positions (tree-masked, as decoding runs them) on this machine."""
    device = model.device
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (1, context), generator=gen).to(device)
    cache = GrowingCache()
    forward(model, prefix, cache, logits=False)
    trees = {}
    for k in positions:
        # Two branches: the mask is a real tree mask, as in verification.
        half = (k - 1) // 2
        # Token ids wrap at the vocabulary (tiny test models have a few hundred ids); the
        # branches start vocab // 2 apart, so they never merge.
        drafts = [[(10 + j) % vocab for j in range(half)],
                  [(10 + vocab // 2 + j) % vocab for j in range(k - 1 - half)]]
        trees[k] = build_tree(1, [d for d in drafts if d])
    times: dict[int, list[float]] = {k: [] for k in positions}
    # Rounds over every k, not all of one k's repetitions in a row: a passing slowdown of
    # the machine then lands in one sample of each k instead of every sample of one k
    # (which the monotone fix below would carry to every larger k, in a cached model).
    for _ in range(reps + 1):
        for k in positions:
            t0 = time.perf_counter()
            verify_token_tree(model, cache, trees[k])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[k].append(time.perf_counter() - t0)
            cache.crop(context - cache.get_seq_length())  # back to the prefix, whatever was accepted
    seconds = [statistics.median(times[k][1:]) for k in positions]  # the first round warms caches
    # Noise can make a larger k look cheaper; costs never fall with k.
    for i in range(1, len(seconds)):
        seconds[i] = max(seconds[i], seconds[i - 1])
    return CostModel(list(positions), seconds, context, _cost_key(model, device))


def cached_cost_model(model, cache_dir: str | Path | None = None, refresh: bool = False) -> CostModel:
    """The cost model for this model/device/thread count: read from the cache or measured once."""
    base = Path(cache_dir) if cache_dir else cache_root()
    key = _cost_key(model, model.device)
    path = base / "cost" / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".json")
    return CostModel(**cached_measurement(path, key, lambda: asdict(calibrate_cost(model)), refresh))
