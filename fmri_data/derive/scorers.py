"""Training-free saliency scores of the windows of a run, and top-k selection.

SLIM-Brain (Wang et al. 2025, arXiv 2512.21881) ranks the windows of each run by saliency
with a lightweight temporal extractor and trains its 4D encoder on the top-k windows only.
Its extractor is not public; the scorers here are documented, training-free statistics of
a window (the learned scorer is in :mod:`fmri_data.derive.saliency_net`). Higher = more
salient. Scores are comparable between the windows of one run only.

Windows are those of :func:`fmri_data.derive.windows.window_starts`.

Every scorer takes ``x`` of shape ``(T, P)`` (time first; ``P`` channels: parcels of an
ROI series or brain voxels), ``starts (n,)`` and ``window`` ``W``, and returns ``(n,)``
float64 scores ``>= 0``. Sums are accumulated in float64. ``w`` below is one window,
``x_w`` its ``(W, P)`` frames:

``global_variance``
    ``Var_t(g(t))`` over the window, ``g(t) = mean_p x(t, p)`` the global signal
    (amplitude of the global signal as in Wong et al. 2013, NeuroImage 69:1-9, which
    uses its standard deviation).
``parcel_variance``
    ``mean_p Var_t(x_w(t, p))``: mean temporal variance of the channels (BOLD signal
    variability, Garrett et al. 2010, J Neurosci 30:4914).
``dvars``
    ``mean_{t=s+1..s+W-1} DVARS(t)``, ``DVARS(t) = sqrt(mean_p (x(t, p) - x(t-1, p))^2)``:
    the RMS over channels of the frame-to-frame change, averaged over the ``W - 1``
    transitions inside the window (Smyser et al. 2010, Cereb Cortex 20:2904; Power et
    al. 2012, NeuroImage 59:2142).
``dfc_distance``
    Sliding-window dynamic functional connectivity (Hutchison et al. 2013, NeuroImage
    80:360; Allen et al. 2014, Cereb Cortex 24:663): ``C_w`` the Pearson correlation
    matrix of the window (rectangular window; a channel constant in the window
    correlates 0 with every other), ``C_mean`` the mean of ``C_w`` over the run's
    windows, score = ``mean_{p<q} |C_w(p, q) - C_mean(p, q)|``, the L1 (Manhattan)
    distance of the upper triangles — the distance Allen et al. 2014 cluster windowed FC
    with — divided by the number of pairs. Memory ``O(P^2)`` (two passes over windows),
    so voxel data are first averaged in cubes (:func:`cube_means`).

Motion penalty (any scorer, ``<scorer>_motion_penalized``): see :mod:`fmri_data.derive.motion`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import scipy.sparse as sp

from ..errors import SettingError
from .motion import MOTION_SUFFIX



def _windows(x: np.ndarray, starts: np.ndarray, window: int):
    x = np.asarray(x)
    if x.ndim != 2:
        raise SettingError(f"series must be (T, P), got shape {x.shape}")
    if len(starts) and (starts.min() < 0 or starts.max() + window > x.shape[0]):
        raise SettingError(f"windows of {window} frames starting at {starts.min()}..{starts.max()} exceed {x.shape[0]} frames")
    for s in starts:
        yield np.asarray(x[s : s + window], dtype=np.float64)


def global_variance(x: np.ndarray, starts: np.ndarray, window: int) -> np.ndarray:
    """Temporal variance of the global signal in each window (see module docstring).

    Args:
        x: ``(T, P)`` series, time first.
        starts: ``(n,)`` window start frames; window: frames per window.

    Returns:
        ``(n,)`` float64, in squared units of ``x``.
    """
    return np.array([w.mean(axis=1).var() for w in _windows(x, starts, window)], dtype=np.float64)


def parcel_variance(x: np.ndarray, starts: np.ndarray, window: int) -> np.ndarray:
    """Mean over channels of the temporal variance in each window (see module docstring).

    Args:
        x: ``(T, P)`` series, time first.
        starts: ``(n,)`` window start frames; window: frames per window.

    Returns:
        ``(n,)`` float64, in squared units of ``x``.
    """
    return np.array([w.var(axis=0).mean() for w in _windows(x, starts, window)], dtype=np.float64)


def dvars_series(x: np.ndarray) -> np.ndarray:
    """DVARS of every frame: ``sqrt(mean_p (x(t) - x(t-1))^2)``, ``DVARS(0) = 0``.

    Source: Smyser et al. 2010; Power et al. 2012 (the RMS over voxels of the temporal
    derivative; here over whatever channels ``x`` has).

    Args:
        x: ``(T, P)`` series, time first.

    Returns:
        ``(T,)`` float64, in units of ``x``.
    """
    x = np.asarray(x)
    out = np.zeros(x.shape[0], dtype=np.float64)
    step = max(1, (64 * 2**20) // (8 * max(1, x.shape[1])))  # ~64 MiB of float64 differences at a time
    for a in range(1, x.shape[0], step):
        b = min(a + step, x.shape[0])
        d = np.asarray(x[a:b], dtype=np.float64) - np.asarray(x[a - 1 : b - 1], dtype=np.float64)
        out[a:b] = np.sqrt(np.mean(d * d, axis=1))
    return out


def dvars(x: np.ndarray, starts: np.ndarray, window: int) -> np.ndarray:
    """Mean DVARS over the ``W - 1`` frame transitions inside each window (see module docstring).

    Args:
        x: ``(T, P)`` series, time first.
        starts: ``(n,)`` window start frames; window: frames per window (>= 2).

    Returns:
        ``(n,)`` float64, in units of ``x``.
    """
    d = dvars_series(x)
    if len(starts) and (starts.min() < 0 or starts.max() + window > len(d)):
        raise SettingError(f"windows of {window} frames starting at {starts.min()}..{starts.max()} exceed {len(d)} frames")
    return np.array([d[s + 1 : s + window].mean() for s in starts], dtype=np.float64)


def correlation(w: np.ndarray) -> np.ndarray:
    """``(P, P)`` Pearson correlation of a ``(W, P)`` window; constant channels correlate 0."""
    centered = w - w.mean(axis=0)
    norm = np.sqrt((centered * centered).sum(axis=0))
    z = np.divide(centered, norm, out=np.zeros_like(centered), where=norm > 0)
    return z.T @ z


def dfc_distance(x: np.ndarray, starts: np.ndarray, window: int) -> np.ndarray:
    """L1 distance of each window's FC from the run's mean windowed FC (see module docstring).

    Args:
        x: ``(T, P)`` series, time first (``P`` up to a few thousand: memory ``O(P^2)``).
        starts: ``(n,)`` window start frames; window: frames per window.

    Returns:
        ``(n,)`` float64: mean absolute difference of Pearson r over the ``P(P-1)/2`` pairs
        (0 for a run with a single window).

    Raises:
        SettingError: fewer than 2 channels.
    """
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] < 2:
        raise SettingError(f"dynamic FC needs a (T, P) series with P >= 2, got shape {x.shape}")
    p = x.shape[1]
    if len(starts) == 0:
        return np.zeros(0, dtype=np.float64)
    mean = np.zeros((p, p), dtype=np.float64)
    for w in _windows(x, starts, window):
        mean += correlation(w)
    mean /= len(starts)
    out = []
    for w in _windows(x, starts, window):
        diff = np.abs(correlation(w) - mean)
        # off-diagonal pairs p < q: (sum of the symmetric matrix - its diagonal) / 2
        out.append((diff.sum() - np.trace(diff)) / 2 / (p * (p - 1) / 2))
    return np.array(out, dtype=np.float64)


def cube_means(x: np.ndarray, mask: np.ndarray, cube: int) -> np.ndarray:
    """Average brain-voxel series in non-overlapping cubes of ``cube^3`` voxels.

    Used to make voxel data tractable for :func:`dynamic FC <dfc_distance>` (the voxel
    FC of a 96^3 brain has ~10^10 entries): cube ``c`` holds the voxels with
    ``ijk // cube == c``; cubes without a brain voxel are dropped.

    Args:
        x: ``(T, N)`` series of the ``N`` voxels of ``mask`` in C order (``x[:, i]`` is
            voxel ``np.argwhere(mask)[i]``).
        mask: ``(X, Y, Z)`` bool brain mask.
        cube: cube edge in voxels (>= 1).

    Returns:
        ``(T, C)`` float32, cubes in C order of their grid position.
    """
    ijk = np.argwhere(mask) // int(cube)
    dims = np.array(mask.shape) // int(cube) + 1
    flat = np.ravel_multi_index(ijk.T, dims)
    labels, inverse = np.unique(flat, return_inverse=True)
    counts = np.bincount(inverse).astype(np.float64)
    op = sp.csr_matrix((1.0 / counts[inverse], (inverse, np.arange(len(flat)))), shape=(len(labels), len(flat)))
    return np.asarray((op @ np.asarray(x, dtype=np.float64).T).T, dtype=np.float32)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores, best first; ties go to the earlier window.

    Args:
        scores: ``(n,)`` finite scores.
        k: number wanted (``min(k, n)`` are returned).

    Returns:
        ``(min(k, n),)`` int64.

    Raises:
        SettingError: a score is NaN or infinite.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        raise SettingError("saliency scores must be finite")
    order = np.lexsort((np.arange(len(scores)), -scores))
    return order[: max(0, int(k))].astype(np.int64)


@dataclass(frozen=True)
class Scorer:
    """A training-free scorer: ``fn(x (T, P), starts, window) -> (n,)``, and what it computes."""

    name: str
    fn: Callable[[np.ndarray, np.ndarray, int], np.ndarray]
    description: str
    needs_cubes: bool = False  #: voxel input is averaged in cubes first (memory O(P^2))


BUILTIN: dict[str, Scorer] = {
    s.name: s
    for s in (
        Scorer(
            "global_variance", global_variance,
            "variance over the window of the global signal g(t) = mean over channels (global-signal amplitude, Wong et al. 2013)",
        ),
        Scorer(
            "parcel_variance", parcel_variance,
            "mean over channels of the temporal variance in the window (BOLD signal variability, Garrett et al. 2010)",
        ),
        Scorer(
            "dvars", dvars,
            "mean over the window's W-1 frame transitions of DVARS(t) = sqrt(mean over channels (x(t)-x(t-1))^2) "
            "(Smyser et al. 2010; Power et al. 2012)",
        ),
        Scorer(
            "dfc_distance", dfc_distance,
            "mean over channel pairs of |C_w - C_mean|: L1 distance of the window's Pearson FC from the mean windowed FC "
            "of the run (sliding-window dynamic FC, Hutchison et al. 2013; L1 as in Allen et al. 2014)",
            needs_cubes=True,
        ),
    )
}


def builtin_names() -> list[str]:
    """Every built-in scorer name, with its motion-penalised variant."""
    return [n for base in BUILTIN for n in (base, base + MOTION_SUFFIX)]


def finite_or_zero(scores: np.ndarray) -> np.ndarray:
    """Scores as float32 with non-finite values (degenerate windows) set to 0."""
    scores = np.asarray(scores, dtype=np.float64)
    return np.where(np.isfinite(scores), scores, 0.0).astype(np.float32)


def check_window(window: int, stride: int, k: int) -> None:
    """Raise SettingError for impossible window settings."""
    if window < 2 or stride < 1 or k < 1:
        raise SettingError(f"saliency needs window >= 2, stride >= 1 and k >= 1 (got {window}, {stride}, {k})")
