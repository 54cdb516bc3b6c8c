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


# Rows of a sample converted to float64 at a time: the fit's working memory is a few such
# chunks, not float64 copies of the whole sample (200,000 x 4,096 floats would be 6.6 GB each).
FIT_CHUNK = 8192


def _parts(sample: np.ndarray | list[np.ndarray]) -> list[np.ndarray]:
    """A sample given whole or as parts, as a list of parts."""
    return [np.asarray(p) for p in sample] if isinstance(sample, (list, tuple)) else [np.asarray(sample)]


def _chunks(parts: list[np.ndarray], dtype=np.float64):
    """(first row, rows as `dtype`) of the parts in order, FIT_CHUNK rows at a time."""
    first = 0
    for part in parts:
        for a in range(0, len(part), FIT_CHUNK):
            yield first + a, np.asarray(part[a : a + FIT_CHUNK], dtype=dtype)
        first += len(part)


def fit_compressor(sample: np.ndarray | list[np.ndarray], dim: int) -> Compressor:
    """Fit z-score statistics and a `dim`-component PCA on a (n, D) sample of hidden states,
    given whole or as parts (the rows of the parts in order: a sample is never concatenated)."""
    parts = _parts(sample)
    if any(p.ndim != 2 for p in parts) or len({p.shape[1] for p in parts}) > 1:
        raise ValueError(f"sample must be 2-D (n, D), got shape(s) {sorted({p.shape for p in parts})}")
    n, d_in = sum(len(p) for p in parts), parts[0].shape[1]
    if dim > d_in:
        raise ValueError(f"PCA dim {dim} exceeds hidden size {d_in}")
    if n < 2:
        raise ValueError(f"need at least 2 sample vectors to fit the compressor, got {n}")
    # Two passes over the chunks: the mean (and the rows that are not finite), then the
    # centred sums of squares and products.
    sums, bad = np.zeros(d_in), []
    for first, x in _chunks(parts):
        bad.append(first + np.flatnonzero(~np.isfinite(x).all(axis=1)))
        sums += x.sum(axis=0)
    bad = np.concatenate(bad)
    if len(bad):
        # One NaN would turn every mean, axis and key into NaN: an index that finds nothing.
        raise ValueError(f"compressor fit sample: {len(bad)} of {n} rows hold NaN or infinite values "
                         f"(rows {bad[:5].tolist()}); the hidden states they came from are broken")
    mean = sums / n
    gram = np.zeros((d_in, d_in))
    for _, x in _chunks(parts):
        c = x - mean
        gram += c.T @ c
    std = np.sqrt(np.diag(gram) / n)
    std = np.where(std < _MIN_STD, 1.0, std)
    # PCA on the z-scored sample: eigen-decomposition of its covariance (D x D is small),
    # which is the centred one scaled by the stds.
    cov = gram / np.outer(std, std) / max(n - 1, 1)
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


def reconstruction_error(comp: Compressor, hidden: np.ndarray | list[np.ndarray]) -> float:
    """Mean share of z-scored energy lost by the PCA projection (0 = perfect fit), over the
    rows of `hidden` (whole or as parts, a chunk at a time).

    Used as a drift signal: new data the compressor fits poorly loses more energy.
    """
    lost, n = 0.0, 0
    for _, x in _chunks(_parts(hidden), np.float32):
        z = (x - comp.mean) / comp.std
        proj = z @ comp.components
        total = (z * z).sum(axis=1)
        kept = (proj * proj).sum(axis=1)
        lost += float((1.0 - kept / np.maximum(total, 1e-12)).sum(dtype=np.float64))
        n += len(z)
    return lost / n if n else float("nan")


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
