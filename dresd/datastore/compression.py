"""Key compression: z-score per dimension, PCA (no whitening), L2 normalisation.

Applied identically to datastore keys and decode-time queries, so inner product of two
compressed vectors is their cosine similarity in PCA space. Pure functions plus a small
frozen container saved as .npz (no pickle).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Dimensions whose sample std is below this are treated as constant (std := 1) so that
# z-scoring never divides by ~0.
_MIN_STD = 1e-6


@dataclass(frozen=True)
class Compressor:
    """Fitted z-score + PCA parameters."""

    mean: np.ndarray  # (D,) float32, per-dimension sample mean
    std: np.ndarray  # (D,) float32, per-dimension sample std (floored)
    components: np.ndarray  # (D, d) float32, top-d principal axes as columns
    explained_variance_ratio: np.ndarray  # (d,) share of z-scored variance per component

    @property
    def in_dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def out_dim(self) -> int:
        return int(self.components.shape[1])


def fit_compressor(sample: np.ndarray, dim: int) -> Compressor:
    """Fit z-score statistics and a `dim`-component PCA on a (n, D) sample of hidden states."""
    x = np.asarray(sample, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"sample must be 2-D (n, D), got shape {x.shape}")
    n, d_in = x.shape
    if dim > d_in:
        raise ValueError(f"PCA dim {dim} exceeds hidden size {d_in}")
    if n < 2:
        raise ValueError(f"need at least 2 sample vectors to fit the compressor, got {n}")
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if len(bad):
        # One NaN would turn every mean, axis and key into NaN: an index that finds nothing.
        raise ValueError(f"compressor fit sample: {len(bad)} of {n} rows hold NaN or infinite values "
                         f"(rows {bad[:5].tolist()}); the hidden states they came from are broken")
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std = np.where(std < _MIN_STD, 1.0, std)
    z = (x - mean) / std
    # PCA on the z-scored sample: eigen-decomposition of the covariance (D x D is small).
    cov = (z.T @ z) / max(n - 1, 1)
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1][:dim]
    total = float(eigval.clip(min=0).sum()) or 1.0
    comps = eigvec[:, order]
    # Fix each axis' sign so fits on the same data are bit-for-bit comparable.
    signs = np.sign(comps[np.abs(comps).argmax(axis=0), np.arange(dim)])
    comps = comps * np.where(signs == 0, 1.0, signs)
    return Compressor(
        mean=mean.astype(np.float32),
        std=std.astype(np.float32),
        components=comps.astype(np.float32),
        explained_variance_ratio=(eigval[order].clip(min=0) / total).astype(np.float32),
    )


def compress(comp: Compressor, hidden: np.ndarray) -> np.ndarray:
    """Map (n, D) hidden states to (n, d) unit-norm float32 keys."""
    h = np.asarray(hidden, dtype=np.float32)
    if h.ndim == 1:
        h = h[None, :]
    if h.shape[1] != comp.in_dim:
        raise ValueError(f"hidden size {h.shape[1]} does not match the compressor's {comp.in_dim}")
    y = ((h - comp.mean) / comp.std) @ comp.components
    norms = np.linalg.norm(y, axis=1, keepdims=True)
    return (y / np.maximum(norms, 1e-12)).astype(np.float32)


def reconstruction_error(comp: Compressor, hidden: np.ndarray) -> float:
    """Mean share of z-scored energy lost by the PCA projection (0 = perfect fit).

    Used as a drift signal: new data the compressor fits poorly loses more energy.
    """
    z = (np.asarray(hidden, dtype=np.float32) - comp.mean) / comp.std
    proj = z @ comp.components
    total = (z * z).sum(axis=1)
    kept = (proj * proj).sum(axis=1)
    return float(np.mean(1.0 - kept / np.maximum(total, 1e-12)))


def save_compressor(comp: Compressor, path: str | Path) -> None:
    """Write the compressor as an .npz of plain arrays."""
    np.savez(
        path,
        mean=comp.mean,
        std=comp.std,
        components=comp.components,
        explained_variance_ratio=comp.explained_variance_ratio,
    )


def load_compressor(path: str | Path) -> Compressor:
    """Read a compressor written by `save_compressor` (pickle disabled)."""
    with np.load(path, allow_pickle=False) as f:
        return Compressor(
            mean=f["mean"],
            std=f["std"],
            components=f["components"],
            explained_variance_ratio=f["explained_variance_ratio"],
        )
