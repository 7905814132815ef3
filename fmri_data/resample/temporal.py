"""Temporal (TR) resampling of ``(T, N)`` series: voxels, vertices or parcels.

Source frame ``k`` sits at ``k * tr_in`` seconds. Where the output frames sit is the
*grid* (:func:`output_times`); each model's released preprocessing has its own:

``exact`` (this project's)
    frame ``j`` at ``j * tr_out``, every output time within the source span:
    ``floor((T - 1) * tr_in / tr_out) + 1`` frames.
``neurostorm``
    ``T_out = max(round(T * tr_in / tr_out), 1)`` frames (``np.round``: halves to even),
    sampled as ``torch.nn.functional.interpolate(mode="linear", align_corners=False)``
    does: frame ``j`` at source position ``(j + 0.5) * T / T_out - 0.5`` clamped to
    ``[0, T - 1]`` (CUHK-AIM-Group/NeuroSTORM ``datasets/preprocessing_volume.py``
    l.61-76 at a8dc38f).
``fmri_lm``
    ``dur = (T - 1) * tr_in``, ``round(dur / tr_out) + 1`` frames evenly spaced over
    ``[0, dur]`` (``np.linspace``), so the spacing is only close to ``tr_out``
    (yuxiangwei0808/fMRI-LM ``nbs_data/temporal_resample.py`` l.143-182 at 037dcf9).
``fmri_fm``
    ``int(T * tr_in / tr_out)`` frames at ``j * tr_out`` (the last may lie past the
    source span: extrapolated) (MedARC-AI/fmri-fm ``src/data/surface_utils.py``
    ``resample_timeseries`` l.379-417 at 6a2c3c6).

Anti-aliasing when the target TR is longer than the source TR (``antialias``):

``True`` (this project's)
    a zero-phase windowed-sinc FIR whose cutoff is the output Nyquist frequency — the
    filter design of ``scipy.signal.resample_poly`` (Kaiser window, beta 5, half-length
    10 x the decimation factor), applied once with odd-reflection padding (as
    ``scipy.signal.filtfilt`` pads) so that linear trends are kept.
``"cheby1"`` (fmri-fm's)
    ``scipy.signal.cheby1(8, 0.05, 0.8 / q, output="sos")`` with ``q = tr_out / tr_in``,
    applied forward and backward (``sosfiltfilt``, ``padtype="even"``).
``False``
    none (NeuroSTORM, fMRI-LM).

The (filtered) series is then interpolated at the output times: ``linear``
(``interp1d``), ``cubic`` (not-a-knot ``CubicSpline``) or ``pchip``
(``PchipInterpolator``, extrapolating; fmri-fm's).

Every combination but ``pchip`` is linear and acts on every column alike, so the whole
resampling of a ``T``-frame series is one ``(T_out, T)`` matrix. The fast path builds
that matrix by running the scipy reference on the columns of the identity (once per
``T``, TRs and settings; cached), drops entries below ``1e-9`` (the cubic spline's
weights decay by ~0.27 per frame), and applies it to all voxels with the shared sparse
kernel of :mod:`fmri_data.resample.operator` (numba on CPU, torch on CUDA). PCHIP's
slopes depend on the data, so ``pchip`` always runs the scipy reference, in blocks of
columns.

That matrix is banded: output frame ``j`` reads a few neighbouring source frames (2 for
``linear``, about 20 for the cubic spline, the filter's length with anti-aliasing), so
:class:`TemporalStream` applies it to frames as they are decoded, in time order, holding
only the frames the band still needs: a conversion then never transposes a run to
per-voxel series.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import scipy.sparse as sp

from ..errors import SettingError
from ..imports import load_module
from .operator import PreparedOperator


GRIDS = ("exact", "neurostorm", "fmri_lm", "fmri_fm")
KINDS = ("linear", "cubic", "pchip")
ANTIALIAS = (True, False, "cheby1")
#: Columns per block of the ``pchip`` path (bounds its float64 working memory).
PCHIP_BLOCK = 8192
#: Source frames a :class:`TemporalStream` may hold besides one block (a wider band: not streamed).
MAX_CARRY_FRAMES = 256


def n_output_frames(n_frames: int, tr_in: float, tr_out: float, grid: str = "exact") -> int:
    """Frames of the resampled series on ``grid`` (see the module docstring).

    Raises:
        SettingError: unknown ``grid``.
    """
    if grid == "exact":
        return int(math.floor((n_frames - 1) * tr_in / tr_out + 1e-9)) + 1
    if grid == "neurostorm":
        return max(int(np.round(n_frames * tr_in / tr_out)), 1)
    if grid == "fmri_lm":
        return int(np.round((n_frames - 1) * tr_in / tr_out)) + 1
    if grid == "fmri_fm":
        return int(n_frames * tr_in / tr_out)
    raise SettingError(f"unknown temporal grid {grid!r}; one of {', '.join(GRIDS)}")


def output_times(n_frames: int, tr_in: float, tr_out: float, grid: str = "exact") -> np.ndarray:
    """Times in seconds of the output frames, source frame ``k`` at ``k * tr_in``.

    Returns:
        float64 ``(T_out,)``, ``T_out = n_output_frames(n_frames, tr_in, tr_out, grid)``.

    Raises:
        SettingError: unknown ``grid``.
    """
    n = n_output_frames(n_frames, tr_in, tr_out, grid)
    if grid == "exact":
        return np.minimum(np.arange(n) * tr_out, (n_frames - 1) * tr_in)
    if grid == "neurostorm":
        position = (np.arange(n) + 0.5) * (n_frames / n) - 0.5
        return np.clip(position, 0.0, n_frames - 1) * tr_in
    if grid == "fmri_lm":
        return np.linspace(0.0, (n_frames - 1) * tr_in, n)
    return np.arange(n) * tr_out


def antialias_filter(tr_in: float, tr_out: float) -> np.ndarray | None:
    """FIR taps (odd length, unit DC gain) for going from ``tr_in`` to ``tr_out`` seconds.

    Returns None when no filtering is needed (``tr_out <= tr_in``).
    """
    ratio = tr_out / tr_in
    if ratio <= 1.0 + 1e-9:
        return None
    half = 10 * int(math.ceil(ratio))
    signal = load_module("scipy.signal")  # imported when used: 0.4 s of every conversion's start-up otherwise

    taps = signal.firwin(2 * half + 1, 1.0 / ratio, window=("kaiser", 5.0))
    return taps / taps.sum()


def lowpass(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Zero-phase FIR filtering along axis 0 with odd-reflection padding; same shape as ``x``."""
    half = (len(taps) - 1) // 2
    padded = np.pad(x, [(half, half)] + [(0, 0)] * (x.ndim - 1), mode="reflect", reflect_type="odd")
    signal = load_module("scipy.signal")

    return signal.oaconvolve(padded, taps.reshape((-1,) + (1,) * (x.ndim - 1)), mode="valid", axes=0)


def resample_tr(
    x: np.ndarray,
    tr_in: float,
    tr_out: float,
    kind: str = "linear",
    antialias: bool | str = True,
    method: str = "auto",
    device: str = "auto",
    grid: str = "exact",
) -> np.ndarray:
    """Resample a series from repetition time ``tr_in`` to ``tr_out`` (both seconds).

    Args:
        x: ``(T, N)`` (or ``(T,)``) series, time first.
        tr_in: source TR in seconds.
        tr_out: target TR in seconds.
        kind: ``"linear"``, ``"cubic"`` (not-a-knot cubic spline) or ``"pchip"``.
        antialias: ``True`` (windowed-sinc FIR), ``"cheby1"`` (fmri-fm's Chebyshev I) or
            ``False``; filters only when ``tr_out > tr_in``.
        method: ``"auto"`` / ``"numba"`` / ``"torch"`` / ``"sparse"`` apply the cached
            ``(T_out, T)`` operator (:func:`temporal_operator`) with that backend (see
            :func:`fmri_data.resample.operator.resolve_backend`); ``"reference"`` runs
            scipy on the series itself (always so for ``pchip``).
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
        grid: where the output frames sit (:func:`output_times`).

    Returns:
        float32 ``(T_out, N)`` with ``T_out = n_output_frames(T, tr_in, tr_out, grid)``;
        ``x`` itself (as float32) when the TRs are equal.

    Raises:
        SettingError: non-positive TR, fewer than 2 frames, unknown ``kind``,
            ``antialias``, ``grid``, ``method`` or ``device``.
    """
    _check(x, tr_in, tr_out, kind, antialias, grid)
    if math.isclose(tr_in, tr_out, rel_tol=1e-9):
        return np.array(x, dtype=np.float32)  # a copy, as the resampled series would be
    if method == "reference" or kind == "pchip":
        return resample_tr_reference(x, tr_in, tr_out, kind, antialias, grid)
    series = np.asarray(x)
    matrix = temporal_operator(series.shape[0], float(tr_in), float(tr_out), kind, antialias, grid)
    out = PreparedOperator(matrix, method, device)(series.reshape(series.shape[0], -1))
    return out.reshape((matrix.shape[0],) + series.shape[1:])


def _check(x, tr_in: float, tr_out: float, kind: str, antialias: bool | str = True, grid: str = "exact") -> None:
    if tr_in <= 0 or tr_out <= 0:
        raise SettingError(f"TRs must be positive, got {tr_in} -> {tr_out}")
    if kind not in KINDS:
        raise SettingError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not any(antialias is a or (isinstance(a, str) and antialias == a) for a in ANTIALIAS):
        raise SettingError(f"antialias must be true, false or 'cheby1', got {antialias!r}")
    if grid not in GRIDS:
        raise SettingError(f"unknown temporal grid {grid!r}; one of {', '.join(GRIDS)}")
    if np.shape(x)[0] < 2:
        raise SettingError("temporal resampling needs at least 2 frames")


@functools.lru_cache(maxsize=64)
def temporal_operator(n_frames: int, tr_in: float, tr_out: float, kind: str = "linear", antialias: bool | str = True,
                      grid: str = "exact") -> sp.csr_matrix:
    """``(T_out, T)`` CSR float64 matrix ``R`` with ``R @ x == resample_tr_reference(x, ...)``.

    Built by applying :func:`resample_tr_reference` (in float64) to the identity, 512
    columns at a time; entries with magnitude below 1e-9 are dropped. Cached per arguments.

    Raises:
        SettingError: ``kind="pchip"`` (not linear: no matrix), or an unknown setting.
    """
    _check(np.zeros(n_frames), tr_in, tr_out, kind, antialias, grid)
    if kind == "pchip":
        raise SettingError("pchip interpolation depends on the data: it has no operator matrix")
    blocks = []
    for c0 in range(0, n_frames, 512):
        eye = np.zeros((n_frames, min(512, n_frames - c0)))
        eye[np.arange(c0, c0 + eye.shape[1]), np.arange(eye.shape[1])] = 1.0
        block = _reference(eye, tr_in, tr_out, kind, antialias, grid)
        block[np.abs(block) < 1e-9] = 0.0
        blocks.append(sp.csc_matrix(block))
    matrix = sp.hstack(blocks).tocsr()
    matrix.eliminate_zeros()
    return matrix


def resample_tr_reference(x: np.ndarray, tr_in: float, tr_out: float, kind: str = "linear",
                          antialias: bool | str = True, grid: str = "exact") -> np.ndarray:
    """The scipy implementation (``method="reference"`` of :func:`resample_tr`); float32 out.

    Columns are processed in blocks of :data:`PCHIP_BLOCK` (each column is independent).
    """
    _check(x, tr_in, tr_out, kind, antialias, grid)
    series = np.asarray(x)
    if math.isclose(tr_in, tr_out, rel_tol=1e-9):
        return series.astype(np.float32)
    flat = series.reshape(series.shape[0], -1)
    out = np.empty((n_output_frames(flat.shape[0], tr_in, tr_out, grid), flat.shape[1]), dtype=np.float32)
    for c0 in range(0, flat.shape[1], PCHIP_BLOCK):
        block = np.asarray(flat[:, c0:c0 + PCHIP_BLOCK], dtype=np.float64)
        out[:, c0:c0 + PCHIP_BLOCK] = _reference(block, tr_in, tr_out, kind, antialias, grid)
    return out.reshape(out.shape[:1] + series.shape[1:])


def _reference(series: np.ndarray, tr_in: float, tr_out: float, kind: str, antialias: bool | str,
               grid: str = "exact") -> np.ndarray:
    if antialias == "cheby1":
        q = tr_out / tr_in
        if q > 1.0 + 1e-9:
            signal = load_module("scipy.signal")

            sos = signal.cheby1(8, 0.05, 0.8 / q, output="sos")
            series = signal.sosfiltfilt(sos, series, axis=0, padtype="even")
    elif antialias:
        taps = antialias_filter(tr_in, tr_out)
        if taps is not None:
            series = lowpass(series, taps)
    interpolate = load_module("scipy.interpolate")  # when used (with scipy.optimize: 0.2 s of start-up otherwise)

    t_in = np.arange(series.shape[0]) * tr_in
    t_out = output_times(series.shape[0], tr_in, tr_out, grid)
    if kind == "linear":
        return interpolate.interp1d(t_in, series, axis=0, kind="linear", assume_sorted=True,
                                    fill_value="extrapolate")(t_out)
    if kind == "cubic":
        return interpolate.CubicSpline(t_in, series, axis=0, bc_type="not-a-knot")(t_out)
    return interpolate.PchipInterpolator(t_in, series, axis=0, extrapolate=True)(t_out)


class TemporalStream:
    """:func:`resample_tr` (numba backend) applied to a ``(T, N)`` series that arrives in
    time order, a block of frames at a time, holding only the source frames that output
    frames still to come read (the operator's band), never the whole series.

    Each output frame equals ``resample_tr(x, ...)``'s bit for bit: the same float32
    operator and kernel (:meth:`~fmri_data.resample.operator.PreparedOperator.apply_band`),
    on a window of frames instead of all of them. Equal TRs pass frames through unchanged.

    Use: write the next ``n`` source frames into :meth:`inputs` ``(n)``, then iterate
    :meth:`push` ``(n)`` for the output frames that became complete, as ``(first frame,
    (k, N) float32)`` (a buffer reused by the next step: copy what must outlive it). Blocks
    must be ``block_frames`` frames, the last one possibly shorter.

    Args:
        n_frames: T, source frames; tr_in, tr_out: seconds; kind, antialias, grid: as
            :func:`resample_tr`.
        n_columns: N, series per frame (voxels).
        block_frames: frames per block pushed.

    Raises:
        SettingError: ``kind="pchip"`` (not linear) or a setting :func:`resample_tr` refuses.
    """

    def __init__(self, n_frames: int, tr_in: float, tr_out: float, kind: str, antialias: bool | str, grid: str,
                 n_columns: int, block_frames: int):
        _check(np.zeros(n_frames), tr_in, tr_out, kind, antialias, grid)
        self.n_frames, self.block_frames = int(n_frames), max(1, int(block_frames))
        self._base = self._count = self._next = 0  # window = source frames [base, base + count)
        if math.isclose(tr_in, tr_out, rel_tol=1e-9):
            self._op = None
            capacity = self.block_frames
        else:
            matrix = temporal_operator(self.n_frames, float(tr_in), float(tr_out), kind, antialias, grid)
            self._op = PreparedOperator(matrix, "numba", "cpu")
            self._ready, self._needed = _band(matrix)
            capacity = self.block_frames + self.carry
            self._out = np.empty((self.block_frames, int(n_columns)), dtype=np.float32)
        self._window = np.empty((min(capacity, self.n_frames), int(n_columns)), dtype=np.float32)

    @functools.cached_property
    def carry(self) -> int:
        """Most source frames held from one block to the next (0 with equal TRs); the window
        holds ``block_frames + carry`` frames (allocated, not touched, until used)."""
        if self._op is None:
            return 0
        carry = 0
        for start in range(0, self.n_frames, self.block_frames):
            have = min(start + self.block_frames, self.n_frames)
            next_row = int(np.searchsorted(self._ready, have - 1, side="right"))
            carry = max(carry, have - min(int(self._needed[next_row]), have))
        return carry

    def inputs(self, n: int) -> np.ndarray:
        """``(n, N)`` float32 view where the caller writes the next ``n`` source frames."""
        if self._count + n > self._window.shape[0]:
            raise SettingError(f"a block of {n} frames does not fit the stream's window ({self._window.shape[0]} frames, "
                               f"{self._count} held): blocks must be at most {self.block_frames} frames")
        return self._window[self._count:self._count + n]

    def push(self, n: int):
        """After ``n`` frames were written into :meth:`inputs`: yield ``(j, rows)``, output
        frames ``[j, j + len(rows))`` as ``(k, N)`` float32, every one now complete."""
        self._count += n
        have = self._base + self._count
        if self._op is None:
            self._count = 0
            self._base = have
            yield have - n, self._window[:n]
            return
        stop = int(np.searchsorted(self._ready, have - 1, side="right"))
        held = self._window[:self._count]
        for j in range(self._next, stop, self._out.shape[0]):
            k = min(j + self._out.shape[0], stop)
            yield j, self._op.apply_band((j, k), held, self._base, self._out[:k - j])
        self._next = stop
        base = min(int(self._needed[stop]), have)
        drop = base - self._base
        if drop > 0:
            kept = self._count - drop
            self._window[:kept] = self._window[drop:self._count]  # numpy copies overlapping ranges safely
            self._base, self._count = base, kept


def _band(matrix: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """For a ``(T_out, T)`` CSR operator with sorted indices: ``ready (T_out,)``, the last
    source frame read by output frames ``0..j`` (output frames complete in order), and
    ``needed (T_out + 1,)``, the first source frame read by output frames ``j..`` (``T`` past
    the end); empty rows read nothing."""
    matrix = matrix.sorted_indices()
    counts = np.diff(matrix.indptr)
    filled = counts > 0
    first = np.full(matrix.shape[0], matrix.shape[1], dtype=np.int64)
    last = np.full(matrix.shape[0], -1, dtype=np.int64)
    first[filled] = matrix.indices[matrix.indptr[:-1][filled]]
    last[filled] = matrix.indices[matrix.indptr[1:][filled] - 1]
    ready = np.maximum.accumulate(last)
    needed = np.append(np.minimum.accumulate(first[::-1])[::-1], matrix.shape[1])
    return ready, needed
