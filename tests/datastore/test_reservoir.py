"""Tests for dresd.datastore.reservoir: a uniform sample of fixed size from a stream of
vectors, the same whatever the batching, deterministic per seed."""

from __future__ import annotations

import numpy as np

from dresd.datastore.reservoir import Reservoir


def stream(n: int, dim: int = 3) -> np.ndarray:
    """Rows whose first column is their index in the stream."""
    rows = np.zeros((n, dim), np.float32)
    rows[:, 0] = np.arange(n)
    return rows


def test_keeps_every_row_until_full_then_a_subset_of_the_stream():
    res = Reservoir(size=5, dim=3, seed=0)
    assert res.sample.shape == (0, 3)
    res.add(stream(3))
    assert res.sample[:, 0].tolist() == [0, 1, 2] and res.seen == 3
    res.add(stream(40)[3:])
    assert res.seen == 40 and res.sample.shape == (5, 3)
    picked = res.sample[:, 0].astype(int).tolist()
    assert len(set(picked)) == 5 and all(0 <= i < 40 for i in picked)
    np.testing.assert_array_equal(res.sample, stream(40)[picked])  # whole rows, as given
    assert max(picked) >= 5  # later rows did replace some of the first ones


def test_the_sample_depends_on_the_seed_and_the_stream_not_on_the_batching():
    rows = stream(200)
    whole = Reservoir(10, 3, seed=4)
    whole.add(rows)
    pieces = Reservoir(10, 3, seed=4)
    for start in range(0, 200, 7):
        pieces.add(rows[start : start + 7])
    np.testing.assert_array_equal(whole.sample, pieces.sample)
    other = Reservoir(10, 3, seed=5)
    other.add(rows)
    assert not np.array_equal(whole.sample, other.sample)


def test_every_row_is_kept_with_the_same_probability():
    n, size, runs = 60, 6, 2000
    counts = np.zeros(n)
    rows = stream(n)
    for seed in range(runs):
        res = Reservoir(size, 3, seed=seed)
        for start in range(0, n, 25):
            res.add(rows[start : start + 25])
        counts[res.sample[:, 0].astype(int)] += 1
    # Each row is kept in size/n of the runs: 200 here, with a binomial sd of about 13.4.
    expected = runs * size / n
    assert np.abs(counts - expected).max() < 5 * np.sqrt(expected * (1 - size / n))
    # Chi-square over the 60 rows, p = 0.001 critical value for 59 degrees of freedom.
    assert ((counts - expected) ** 2 / expected).sum() < 98.324
