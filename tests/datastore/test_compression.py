"""Tests for dresd.datastore.compression: z-score + PCA + L2 key compression."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from dresd.datastore.compression import (
    Compressor,
    compress,
    fit_compressor,
    load_compressor,
    reconstruction_error,
    save_compressor,
)

D = 32  # raw hidden size
R = 6  # true rank of the synthetic signal


def low_rank(n: int, seed: int, basis_seed: int = 0, noise: float = 0.01) -> np.ndarray:
    """n samples of a rank-R signal in D dims (basis fixed by basis_seed), per-dim scales
    spanning 4 orders of magnitude, plus small isotropic noise (relative to each scale)."""
    basis_rng = np.random.default_rng(basis_seed)
    basis = basis_rng.normal(size=(R, D))
    scales = 10.0 ** basis_rng.uniform(-2, 2, size=D)
    offset = basis_rng.normal(size=D) * 5
    rng = np.random.default_rng(seed)
    coef = rng.normal(size=(n, R))
    x = coef @ basis + noise * rng.normal(size=(n, D))
    return (x * scales + offset).astype(np.float32)


def test_fit_shapes_dtypes_and_unit_norm_output():
    x = low_rank(2000, seed=1)
    comp = fit_compressor(x, dim=8)
    assert comp.in_dim == D and comp.out_dim == 8
    assert comp.components.shape == (D, 8)
    assert comp.mean.dtype == np.float32 and comp.components.dtype == np.float32
    y = compress(comp, x[:100])
    assert y.shape == (100, 8) and y.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
    # A single 1-D vector is accepted and returned as one row.
    one = compress(comp, x[0])
    assert one.shape == (1, 8)
    np.testing.assert_allclose(one[0], y[0], atol=1e-6)
    # Principal axes are orthonormal, explained variance sorted descending.
    np.testing.assert_allclose(comp.components.T @ comp.components, np.eye(8), atol=1e-4)
    evr = comp.explained_variance_ratio
    assert np.all(np.diff(evr) <= 1e-7)


def test_explained_variance_high_for_low_rank_data():
    x = low_rank(3000, seed=2)
    comp = fit_compressor(x, dim=R)
    assert comp.explained_variance_ratio.sum() > 0.99
    # Fewer components than the true rank cannot explain it all.
    assert fit_compressor(x, dim=R - 3).explained_variance_ratio.sum() < 0.9
    # Isotropic noise is not low rank: 6 of 32 dims explain far less.
    noise = np.random.default_rng(0).normal(size=(3000, D)).astype(np.float32)
    assert fit_compressor(noise, dim=R).explained_variance_ratio.sum() < 0.4


def test_zscore_makes_per_dim_scale_irrelevant():
    x = low_rank(2000, seed=3)
    comp = fit_compressor(x, dim=8)
    scaled = x.copy()
    scaled[:, 5] *= 1000.0
    comp_scaled = fit_compressor(scaled, dim=8)
    a = compress(comp, x[:200])
    b = compress(comp_scaled, scaled[:200])
    # Same up to rounding: z-scoring removes the factor, sign-fixing keeps axes aligned.
    np.testing.assert_allclose(a, b, atol=1e-3)
    # Without z-scoring, that dimension would dominate: the raw (unstandardised) PCA of
    # the scaled data puts almost all variance on one axis. The compressor does not.
    assert comp_scaled.explained_variance_ratio[0] < 0.6


def test_fit_is_deterministic():
    x = low_rank(1000, seed=4)
    a, b = fit_compressor(x, 8), fit_compressor(x.copy(), 8)
    np.testing.assert_array_equal(a.components, b.components)
    np.testing.assert_array_equal(compress(a, x[:10]), compress(b, x[:10]))


def test_constant_dimension_does_not_produce_nan():
    x = low_rank(500, seed=5)
    x[:, 0] = 3.0
    comp = fit_compressor(x, dim=4)
    assert comp.std[0] == 1.0
    y = compress(comp, x[:20])
    assert np.isfinite(y).all()


def test_save_load_round_trip(tmp_path):
    comp = fit_compressor(low_rank(1000, seed=6), dim=8)
    path = tmp_path / "comp.npz"
    save_compressor(comp, path)
    # Plain arrays only: loads with pickle disabled and holds no object arrays.
    with np.load(path, allow_pickle=False) as f:
        assert sorted(f.files) == ["components", "explained_variance_ratio", "mean", "std"]
        assert all(f[k].dtype != object for k in f.files)
    with zipfile.ZipFile(path) as zf:
        assert len(zf.namelist()) == 4
    back = load_compressor(path)
    assert isinstance(back, Compressor)
    for name in ("mean", "std", "components", "explained_variance_ratio"):
        np.testing.assert_array_equal(getattr(back, name), getattr(comp, name))
    x = low_rank(50, seed=7)
    np.testing.assert_array_equal(compress(back, x), compress(comp, x))


def test_reconstruction_error_flags_other_distribution():
    comp = fit_compressor(low_rank(3000, seed=8), dim=R)
    in_dist = reconstruction_error(comp, low_rank(500, seed=9))
    # Same scales/offset statistics family but another low-rank basis: poorly fitted.
    other = reconstruction_error(comp, low_rank(500, seed=10, basis_seed=123))
    assert 0.0 <= in_dist < 0.02
    assert other > 0.3
    assert other > 10 * in_dist


def test_bad_shapes_raise():
    x = low_rank(100, seed=11)
    with pytest.raises(ValueError, match="exceeds hidden size"):
        fit_compressor(x, dim=D + 1)
    with pytest.raises(ValueError, match="at least 2"):
        fit_compressor(x[:1], dim=4)
    with pytest.raises(ValueError, match="2-D"):
        fit_compressor(x[0], dim=4)
    comp = fit_compressor(x, dim=4)
    with pytest.raises(ValueError, match="does not match"):
        compress(comp, np.zeros((3, D + 1), dtype=np.float32))


def test_a_fit_from_parts_a_chunk_at_a_time_is_the_textbook_fit_of_the_whole(monkeypatch):
    """Builds hand the fit their sample by shard and it works a chunk at a time (a float64 copy
    of a 7B model's 200,000-key sample would be 6.6 GB): the same z-score and axes as
    z-scoring and decomposing the whole sample at once."""
    import dresd.datastore.compression as compression

    x = low_rank(1000, seed=12)
    monkeypatch.setattr(compression, "FIT_CHUNK", 64)  # many chunks, some parts shorter than one
    comp = fit_compressor([x[:10], x[10:500], x[500:]], dim=R)
    x64 = x.astype(np.float64)
    mean, std = x64.mean(0), x64.std(0)
    z = (x64 - mean) / std
    eigval, eigvec = np.linalg.eigh(z.T @ z / (len(x) - 1))
    np.testing.assert_allclose(comp.mean, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(comp.std, std, rtol=1e-5)
    top = eigvec[:, np.argsort(eigval)[::-1][:R]]
    np.testing.assert_allclose(np.abs(comp.components.T @ top), np.eye(R), atol=1e-4)  # the same axes
    assert reconstruction_error(comp, [x[:10], x[10:]]) == pytest.approx(reconstruction_error(comp, x), rel=1e-5)
    with pytest.raises(ValueError, match=r"rows \[507\]"):  # rows are counted across parts
        bad = x[500:].copy()
        bad[7, 3] = np.inf
        fit_compressor([x[:500], bad], dim=R)
