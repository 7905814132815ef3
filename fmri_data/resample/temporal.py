"""Temporal (TR) resampling of ``(T, N)`` series: voxels, vertices or parcels.

Method: output frame ``j`` sits at time ``j * tr_out`` (the first frame of the run is at
0 s in both grids). When the target TR is longer than the source TR the series is first
low-pass filtered with a zero-phase windowed-sinc FIR whose cutoff is the output Nyquist
frequency — the same filter design as ``scipy.signal.resample_poly`` (Kaiser window,
beta 5, half-length 10 x the decimation factor), applied once, with odd-reflection
padding at the ends (as ``scipy.signal.filtfilt`` pads) so that linear trends are kept.
The (filtered) series is then interpolated at the output times, linearly or with a
not-a-knot cubic spline (``scipy.interpolate.CubicSpline``).

Filtering and interpolation are both linear and act on every column alike, so the whole
resampling of a ``T``-frame series is one ``(T_out, T)`` matrix. The fast path builds
that matrix by running the scipy reference on the columns of the identity (once per
``T``, TRs and settings; cached), drops entries below ``1e-9`` (the cubic spline's
weights decay by ~0.27 per frame), and applies it to all voxels with the shared sparse
kernel of :mod:`fmri_data.resample.operator` (numba on CPU, torch on CUDA).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import scipy.sparse as sp
from scipy import interpolate, signal

from ..errors import SettingError
from .operator import PreparedOperator


def n_output_frames(n_frames: int, tr_in: float, tr_out: float) -> int:
    """Frames of the resampled series: every output time within the source span."""
    return int(math.floor((n_frames - 1) * tr_in / tr_out + 1e-9)) + 1


def antialias_filter(tr_in: float, tr_out: float) -> np.ndarray | None:
    """FIR taps (odd length, unit DC gain) for going from ``tr_in`` to ``tr_out`` seconds.

    Returns None when no filtering is needed (``tr_out <= tr_in``).
    """
    ratio = tr_out / tr_in
    if ratio <= 1.0 + 1e-9:
        return None
    half = 10 * int(math.ceil(ratio))
    taps = signal.firwin(2 * half + 1, 1.0 / ratio, window=("kaiser", 5.0))
    return taps / taps.sum()


def lowpass(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Zero-phase FIR filtering along axis 0 with odd-reflection padding; same shape as ``x``."""
    half = (len(taps) - 1) // 2
    padded = np.pad(x, [(half, half)] + [(0, 0)] * (x.ndim - 1), mode="reflect", reflect_type="odd")
    return signal.oaconvolve(padded, taps.reshape((-1,) + (1,) * (x.ndim - 1)), mode="valid", axes=0)


def resample_tr(
    x: np.ndarray,
    tr_in: float,
    tr_out: float,
    kind: str = "linear",
    antialias: bool = True,
    method: str = "auto",
    device: str = "auto",
) -> np.ndarray:
    """Resample a series from repetition time ``tr_in`` to ``tr_out`` (both seconds).

    Args:
        x: ``(T, N)`` (or ``(T,)``) series, time first.
        tr_in: source TR in seconds.
        tr_out: target TR in seconds.
        kind: ``"linear"`` or ``"cubic"`` (not-a-knot cubic spline).
        antialias: low-pass filter at the output Nyquist frequency when ``tr_out > tr_in``.
        method: ``"auto"`` / ``"numba"`` / ``"torch"`` / ``"sparse"`` apply the cached
            ``(T_out, T)`` operator (:func:`temporal_operator`) with that backend (see
            :func:`fmri_data.resample.operator.resolve_backend`); ``"reference"`` runs
            scipy on the series itself.
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.

    Returns:
        float32 ``(T_out, N)`` with ``T_out = n_output_frames(T, tr_in, tr_out)``; ``x``
        itself (as float32) when the TRs are equal.

    Raises:
        SettingError: non-positive TR, fewer than 2 frames, unknown ``kind``, ``method`` or
            ``device``.
    """
    _check(x, tr_in, tr_out, kind)
    if math.isclose(tr_in, tr_out, rel_tol=1e-9):
        return np.array(x, dtype=np.float32)  # a copy, as the resampled series would be
    if method == "reference":
        return resample_tr_reference(x, tr_in, tr_out, kind, antialias)
    series = np.asarray(x)
    matrix = temporal_operator(series.shape[0], float(tr_in), float(tr_out), kind, bool(antialias))
    out = PreparedOperator(matrix, method, device)(series.reshape(series.shape[0], -1))
    return out.reshape((matrix.shape[0],) + series.shape[1:])


def _check(x, tr_in: float, tr_out: float, kind: str) -> None:
    if tr_in <= 0 or tr_out <= 0:
        raise SettingError(f"TRs must be positive, got {tr_in} -> {tr_out}")
    if kind not in ("linear", "cubic"):
        raise SettingError(f"kind must be 'linear' or 'cubic', got {kind!r}")
    if np.shape(x)[0] < 2:
        raise SettingError("temporal resampling needs at least 2 frames")


@functools.lru_cache(maxsize=64)
def temporal_operator(n_frames: int, tr_in: float, tr_out: float, kind: str = "linear", antialias: bool = True) -> sp.csr_matrix:
    """``(T_out, T)`` CSR float64 matrix ``R`` with ``R @ x == resample_tr_reference(x, ...)``.

    Built by applying :func:`resample_tr_reference` (in float64) to the identity, 512
    columns at a time; entries with magnitude below 1e-9 are dropped. Cached per arguments.
    """
    blocks = []
    for c0 in range(0, n_frames, 512):
        eye = np.zeros((n_frames, min(512, n_frames - c0)))
        eye[np.arange(c0, c0 + eye.shape[1]), np.arange(eye.shape[1])] = 1.0
        block = _reference(eye, tr_in, tr_out, kind, antialias)
        block[np.abs(block) < 1e-9] = 0.0
        blocks.append(sp.csc_matrix(block))
    matrix = sp.hstack(blocks).tocsr()
    matrix.eliminate_zeros()
    return matrix


def resample_tr_reference(x: np.ndarray, tr_in: float, tr_out: float, kind: str = "linear", antialias: bool = True) -> np.ndarray:
    """The scipy implementation (``method="reference"`` of :func:`resample_tr`); float32 out."""
    _check(x, tr_in, tr_out, kind)
    series = np.asarray(x, dtype=np.float64)
    if math.isclose(tr_in, tr_out, rel_tol=1e-9):
        return series.astype(np.float32)
    return _reference(series, tr_in, tr_out, kind, antialias).astype(np.float32)


def _reference(series: np.ndarray, tr_in: float, tr_out: float, kind: str, antialias: bool) -> np.ndarray:
    taps = antialias_filter(tr_in, tr_out) if antialias else None
    if taps is not None:
        series = lowpass(series, taps)
    t_in = np.arange(series.shape[0]) * tr_in
    t_out = np.arange(n_output_frames(series.shape[0], tr_in, tr_out)) * tr_out
    t_out = np.minimum(t_out, t_in[-1])
    if kind == "linear":
        return interpolate.interp1d(t_in, series, axis=0, kind="linear", assume_sorted=True)(t_out)
    return interpolate.CubicSpline(t_in, series, axis=0, bc_type="not-a-knot")(t_out)
