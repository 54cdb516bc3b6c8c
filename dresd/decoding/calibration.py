"""Measuring what a verification forward costs on this machine: the CostModel the draft
budget (dresd.decoding.budget) plans with, calibrated once per model, device and thread
count, and cached on disk."""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict
from pathlib import Path

import torch

from dresd.decoding.batch_plan import BatchCostModel
from dresd.decoding.row_cache import RowCache, batch_inputs
from dresd.decoding.budget import CostModel
from dresd.decoding.kv_cache import GrowingCache
from dresd.decoding.tree import build_tree
from dresd.decoding.verify import forward, verify_token_tree
from dresd.model.fastpath.cpu_linear import has_dual_layout, kernel_tag, packed_formats
from dresd.storage.cache import cache_root, cached_measurement

# Positions per forward the calibration times; the CostModel interpolates between them.
CALIBRATION_POSITIONS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# Batch sizes and positions per row the batched calibration times (batch 1 is the curve
# above); the BatchCostModel interpolates between them and extrapolates beyond.
BATCH_SIZES = (2, 4, 8, 16)
BATCH_POSITIONS = (1, 2, 4, 8, 16)


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
    # The fastest repetition (the first round warms caches): another process's slice of the
    # cores only ever adds time, and on a busy machine it lands in most samples; what
    # decoding's own steps cost on top, the planner measures as it goes (observe_step).
    seconds = [min(times[k][1:]) for k in positions]
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


@torch.inference_mode()
def calibrate_batch_cost(model, single: CostModel, context: int = 256, batches: tuple[int, ...] = BATCH_SIZES,
                         positions: tuple[int, ...] = BATCH_POSITIONS, reps: int = 3) -> BatchCostModel:
    """Time batched verification forwards (dresd.decoding.batch_spec's inputs: per-row tree
    masks over a row cache) for each batch size x positions per row; batch 1 is `single`."""
    device = model.device
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    alone = GrowingCache()
    forward(model, torch.randint(0, vocab, (1, context), generator=gen).to(device), alone, logits=False)
    chains = {k: build_tree(1, [[(10 + j) % vocab for j in range(k - 1)]] if k > 1 else []) for k in positions}
    times: dict[tuple[int, int], list[float]] = {(b, k): [] for b in batches for k in positions}
    for b in batches:
        cache = RowCache(model, b)
        for slot in range(b):
            for layer, own in zip(cache.layers, alone.layers):
                layer.write_row(slot, own.keys, own.values)
        nothing = torch.zeros(0, dtype=torch.long, device=device)
        # Rounds over every k, as calibrate_cost does: a passing slowdown lands in one sample of each.
        for _ in range(reps + 1):
            for k in positions:
                trees = {slot: chains[k] for slot in range(b)}
                ids, pos, mask, columns = batch_inputs(trees, dict.fromkeys(range(b), context), b, context, 0,
                                                       model.dtype)
                t0 = time.perf_counter()
                cache.target(columns.to(device))
                hidden, _ = forward(model, ids.to(device), cache, pos.to(device), mask.to(device),
                                    logits=device.type != "cpu")
                cache.target(None)
                if device.type == "cpu":  # the lazy head reads about one row per sequence
                    model.get_output_embeddings()(hidden[:, :1])
                else:
                    torch.cuda.synchronize(device)
                times[(b, k)].append(time.perf_counter() - t0)
                for layer in cache.layers:  # back to the prefix
                    layer.settle(nothing, nothing, nothing, context)
    seconds = [[single.cost(k) for k in positions]]
    for b in batches:
        # The fastest repetition: batched forwards are long enough that another process's
        # slice of the cores lands in most samples of a busy machine, and only ever adds time.
        row = [min(times[(b, k)][1:]) for k in positions]
        for i in range(1, len(row)):  # costs never fall with k, nor with the batch size
            row[i] = max(row[i], row[i - 1])
        seconds.append([max(t, below) for t, below in zip(row, seconds[-1])])
    return BatchCostModel([1, *batches], list(positions), seconds, context, single.key)


def cached_batch_cost_model(model, cache_dir: str | Path | None = None, refresh: bool = False) -> BatchCostModel:
    """The batched cost model for this model/device/thread count: read from the cache or measured
    once. Its batch-1 curve is cached_cost_model's, what the one-sequence loop plans with."""
    single = cached_cost_model(model, cache_dir, refresh)
    base = Path(cache_dir) if cache_dir else cache_root()
    key = _cost_key(model, model.device) + "|batch-v1"
    path = base / "cost" / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".json")
    return BatchCostModel(**cached_measurement(path, key, lambda: asdict(calibrate_batch_cost(model, single)),
                                               refresh))

