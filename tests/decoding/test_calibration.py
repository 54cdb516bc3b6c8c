"""Tests for dresd.decoding.calibration: timing verification forwards on a tiny model and
caching the resulting CostModel per model, device and thread count."""

from __future__ import annotations

import json

import pytest
import torch

import dresd.decoding.calibration as calibration
from dresd.decoding.budget import CostModel
from dresd.decoding.calibration import cached_cost_model, calibrate_cost
from tests_support import one_torch_thread


single_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def test_calibrate_cost_on_tiny_model(tiny_lm):
    cost = calibrate_cost(tiny_lm.model, context=16, positions=(1, 2, 4, 8), reps=1)
    assert cost.positions == [1, 2, 4, 8]
    assert len(cost.seconds) == 4 and all(t > 0 for t in cost.seconds)
    assert all(b >= a for a, b in zip(cost.seconds, cost.seconds[1:]))
    assert cost.context == 16
    assert "v272" in cost.key and "threads=1" in cost.key and "cpu" in cost.key
    assert cost.cost(3) >= cost.cost(2)


def fake_calibration(monkeypatch) -> list:
    calls = []

    def fake(model, *args, **kwargs):
        calls.append(model)
        return CostModel([1, 2], [0.1, 0.2 + len(calls)], 256, calibration._cost_key(model, model.device))

    monkeypatch.setattr(calibration, "calibrate_cost", fake)
    return calls


def test_cached_cost_model_measures_once(tiny_lm, tmp_path, monkeypatch):
    calls = fake_calibration(monkeypatch)
    first = cached_cost_model(tiny_lm.model, tmp_path)
    assert len(calls) == 1
    files = list((tmp_path / "cost").glob("*.json"))
    assert len(files) == 1
    assert json.loads(files[0].read_text())["key"] == first.key
    second = cached_cost_model(tiny_lm.model, tmp_path)
    assert len(calls) == 1  # read back, not measured again
    assert second == first
    # refresh=True measures again and rewrites the cache.
    third = cached_cost_model(tiny_lm.model, tmp_path, refresh=True)
    assert len(calls) == 2 and third.seconds != first.seconds
    assert cached_cost_model(tiny_lm.model, tmp_path) == third and len(calls) == 2
    # An unreadable cache file is measured again.
    files[0].write_text("{not json")
    cached_cost_model(tiny_lm.model, tmp_path)
    assert len(calls) == 3
    assert list((tmp_path / "cost").glob("*.tmp*")) == []  # no temp files left behind


def test_cached_cost_model_uses_env_dir_and_keys_threads(tiny_lm, tmp_path, monkeypatch):
    calls = fake_calibration(monkeypatch)
    monkeypatch.setenv("DRESD_CACHE_DIR", str(tmp_path))
    cached_cost_model(tiny_lm.model)
    cached_cost_model(tiny_lm.model)
    assert len(calls) == 1 and len(list((tmp_path / "cost").glob("*.json"))) == 1
    # Another thread count is another measurement (another file).
    torch.set_num_threads(2)
    try:
        other = cached_cost_model(tiny_lm.model)
    finally:
        torch.set_num_threads(1)
    assert len(calls) == 2 and "threads=2" in other.key
    assert len(list((tmp_path / "cost").glob("*.json"))) == 2


def test_batched_calibration_extends_the_single_curve(tiny_lm, tmp_path, monkeypatch):
    from dresd.decoding.calibration import cached_batch_cost_model, calibrate_batch_cost

    single = calibrate_cost(tiny_lm.model, context=16, positions=(1, 2, 4), reps=1)
    cost = calibrate_batch_cost(tiny_lm.model, single, context=16, batches=(2, 4), positions=(1, 2, 4), reps=1)
    assert cost.batches == [1, 2, 4] and cost.positions == [1, 2, 4]
    assert cost.seconds[0] == [single.cost(k) for k in (1, 2, 4)]
    for row, below in zip(cost.seconds[1:], cost.seconds):  # never cheaper with more rows or positions
        assert all(b >= a for a, b in zip(row, row[1:])) and all(t >= u for t, u in zip(row, below))
    # Cached beside the single curve, measured once.
    monkeypatch.setattr(calibration, "calibrate_cost", lambda model, *a, **k: single)
    calls = []
    monkeypatch.setattr(calibration, "calibrate_batch_cost", lambda model, s: calls.append(s) or cost)
    assert cached_batch_cost_model(tiny_lm.model, tmp_path) == cost
    assert cached_batch_cost_model(tiny_lm.model, tmp_path) == cost and len(calls) == 1
