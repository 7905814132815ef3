"""Brain masks and intensity normalization of volume series.

Normalizations (all computed over the brain mask, over the whole run):

* ``global_zscore``: one mean and standard deviation over every brain voxel and frame,
  ``(x - mean) / std`` — the NeuroSTORM / SwiFT convention (Kim et al. 2023, SwiFT,
  ``preprocessing.py``), whose background is then set to the minimum z-scored brain
  value (``background="min"``) or 0.
* ``voxel_zscore``: mean and standard deviation of each voxel's time series.
* ``none``: values as resampled.

Parameters are returned so that the normalization can be undone:
``x = z * std + mean``.
"""

from __future__ import annotations

from typing import Any

import nibabel as nib
import numba
import numpy as np

from ..errors import SettingError
from ..imports import load_module
from ..resample.operator import run_numba_parallel

#: :func:`epi_mask`: an EPI mask with more than this fraction of voxels whose mean is exactly
#: 0 is taken as the box of already-masked data (those voxels carry no signal).
MASKED_ZERO_FRACTION = 0.1


def epi_mask(mean_image: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Brain mask of an EPI run from its temporal mean image.

    Uses ``nilearn.masking.compute_epi_mask`` (lower-cutoff histogram threshold, then a
    morphological opening and the largest connected component). nilearn's opening is
    counted in voxels (2 by default, tuned for ~3 mm EPI); here it is scaled to about 6 mm
    (``round(6 / voxel size)``) so that coarse acquisitions keep their brain.

    Already-masked data (background exactly 0, e.g. a skull-stripped run, detrended
    percent signal change, or a run masked to a small region): the mask is the voxels that
    carry signal (mean non-zero) whenever nilearn's mask finds less than 1 % of the volume
    or more than :data:`MASKED_ZERO_FRACTION` of its voxels have a mean of exactly 0 (its
    histogram threshold then falls in the zero background and returns the box).

    Args:
        mean_image: ``(X, Y, Z)`` float temporal mean.
        affine: 4x4 voxel -> world (mm).

    Returns:
        ``(X, Y, Z)`` bool.
    """
    import warnings

    compute_epi_mask = load_module("nilearn.masking").compute_epi_mask
    finite = np.nan_to_num(mean_image.astype(np.float32))
    voxel_mm = float(np.mean(np.sqrt((affine[:3, :3] ** 2).sum(axis=0))))
    opening = round(6.0 / voxel_mm)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = compute_epi_mask(nib.Nifti1Image(finite, affine), opening=opening or False)
        mask = np.asarray(image.dataobj, dtype=bool)
    except Exception:  # noqa: BLE001 - nilearn raises on flat histograms (several exception types)
        mask = np.zeros(finite.shape, dtype=bool)
    carries = finite != 0
    n_mask = int(mask.sum())
    if n_mask < 0.01 * mask.size or int((mask & ~carries).sum()) > MASKED_ZERO_FRACTION * n_mask:
        mask = carries
    return mask


def _column_params(x: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-column ``(center, scale)`` float64 of ``x (T, N)`` for ``voxel_zscore``/``zscore``
    (mean, population std) or ``robust`` (median, interquartile range); zero spread -> 1."""
    if kind in ("voxel_zscore", "zscore"):
        center = x.mean(axis=0, dtype=np.float64)
        scale = x.std(axis=0, dtype=np.float64)
    elif kind == "robust":
        q25, center, q75 = np.percentile(x, [25, 50, 75], axis=0)
        scale = q75 - q25
    else:
        raise SettingError(f"unknown normalization {kind!r}")
    return center, np.where(scale > 0, scale, 1.0)


def normalize(x: np.ndarray, kind: str) -> tuple[np.ndarray, dict[str, Any], dict[str, np.ndarray]]:
    """Normalize a brain series in place-safe fashion.

    Args:
        x: ``(T, N)`` float32, brain voxels (or parcels) in columns.
        kind: ``"global_zscore"``, ``"voxel_zscore"``, ``"zscore"`` (alias of
            voxel_zscore for parcels), ``"robust"`` (per column median / interquartile
            range, as ``sklearn.preprocessing.RobustScaler``) or ``"none"``.

    Returns:
        ``(y (T, N) float32, params, arrays)``: scalar parameters for the attributes
        (``kind``, and ``mean``/``std`` for global z-score) and per-column arrays
        (``center``/``scale``, ``(N,)`` float32) for the per-column kinds. A column with
        zero spread gets scale 1.
    """
    x = np.asarray(x, dtype=np.float32)
    if kind == "none":
        return x, {"kind": "none"}, {}
    if kind == "global_zscore":
        mean = float(np.mean(x, dtype=np.float64))
        std = float(np.std(x, dtype=np.float64))
        std = std if std > 0 else 1.0
        return ((x - mean) / std).astype(np.float32), {"kind": kind, "mean": mean, "std": std}, {}
    center, scale = _column_params(x, kind)
    y = ((x - center) / scale).astype(np.float32)
    return y, {"kind": kind}, {"center": center.astype(np.float32), "scale": scale.astype(np.float32)}


@numba.njit(cache=True, nogil=True, inline="always")
def _brain_value(v, elementwise, zero_negatives):  # pragma: no cover - compiled
    """NeuroSTORM's background / negatives rules for one float32 element (see
    :class:`VolumeNormalizer`): ``(False, v)`` for an element-wise background element
    (exactly 0 under ``elementwise``), else ``(True, v)``, a negative ``v`` made 0 under
    ``zero_negatives``."""
    if elementwise and v == 0:
        return False, v
    if zero_negatives and v < 0:
        return True, np.float32(0)
    return True, v


@numba.njit(parallel=True, cache=True, nogil=True)
def _row_moments(values, elementwise, zero_negatives, count, mean, m2, low):  # pragma: no cover - compiled
    """Per row ``t`` of ``values (T, n)`` float32, its brain elements (:func:`_brain_value`):
    ``count[t]``, float64 ``mean[t]``, sum of squared deviations from it ``m2[t]`` (two
    passes over the row) and minimum ``low[t]`` (+inf when the row has no element). Rows are
    split over threads."""
    n_rows, n = values.shape
    for t in numba.prange(n_rows):
        row = values[t]
        c, total, smallest = 0, 0.0, np.inf
        for j in range(n):
            brain, v = _brain_value(row[j], elementwise, zero_negatives)
            if brain:
                c += 1
                total += v
                smallest = min(smallest, v)
        mu = total / c if c else 0.0
        squares = 0.0
        for j in range(n if c else 0):
            brain, v = _brain_value(row[j], elementwise, zero_negatives)
            if brain:
                squares += (v - mu) * (v - mu)
        count[t], mean[t], m2[t], low[t] = c, mu, squares, smallest


@numba.njit(cache=True, nogil=True)
def _combine(count, mean, m2, low, n, mu, squares, smallest):  # pragma: no cover - compiled
    """Chan, Golub & LeVeque (1979): ``(n, mu, squares, smallest)`` combined, in order, with
    each part ``(count[t], mean[t], m2[t], low[t])``."""
    for t in range(count.size):
        c = count[t]
        if c == 0:
            continue
        total = n + c
        delta = mean[t] - mu
        mu += delta * c / total
        squares += m2[t] + delta * delta * n * c / total
        n = total
        smallest = min(smallest, low[t])
    return n, mu, squares, smallest


@numba.njit(cache=True, nogil=True, inline="always")
def _half_bits(bits):  # pragma: no cover - compiled (numba has no float16 on the CPU)
    """IEEE 754 binary16 bits of the float32 whose bits are ``bits`` (uint32), rounded to
    nearest, ties to even (as ``numpy.float32.astype(numpy.float16)``): overflow gives inf,
    values below half the smallest subnormal give a signed zero, NaN stays NaN (same bits)."""
    sign = (bits >> 16) & 0x8000
    exponent = (bits >> 23) & 0xFF
    mantissa = bits & 0x7FFFFF
    if exponent == 0xFF:  # inf; NaN keeps its top payload bits and stays NaN, as numpy does
        return sign | 0x7C00 | (max(mantissa >> 13, 1) if mantissa else 0)
    e = np.int64(exponent) - 112  # the binary16 exponent field
    if e >= 31:
        return sign | 0x7C00
    if e <= 0:  # subnormal binary16 (or zero)
        if e < -10:
            return sign
        full = mantissa | 0x800000
        shift = 14 - e
        half = full >> shift
        rest = full & ((1 << shift) - 1)
        middle = 1 << (shift - 1)
        if rest > middle or (rest == middle and half & 1):
            half += 1
        return sign | half
    half = (e << 10) | (mantissa >> 13)
    rest = mantissa & 0x1FFF
    if rest > 0x1000 or (rest == 0x1000 and half & 1):
        half += 1  # a carry into the exponent is right (up to inf)
    return sign | half


def float16_bits(values: np.ndarray) -> np.ndarray:
    """``values.astype(float16).view(uint16)`` computed by the kernel the fused volume
    writer uses (:meth:`VolumeNormalizer.apply_scattered`); float32 in, uint16 out."""
    return _half_array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1).view(np.uint32)).reshape(np.shape(values))


@numba.njit(cache=True, nogil=True)
def _half_array(bits):  # pragma: no cover - compiled
    out = np.empty(bits.size, np.uint16)
    for i in range(bits.size):
        out[i] = _half_bits(bits[i])
    return out


@numba.njit(cache=True, nogil=True, inline="always")
def _normalize_row(row, center, scale, elementwise, zero_negatives, background, out):  # pragma: no cover - compiled
    """``out[n] = float32((x - center) / scale)`` (float64 arithmetic) for the brain element
    ``x`` of ``row[n]`` (:func:`_brain_value`); element-wise background elements get
    ``background``. ``center``/``scale`` hold one value (global) or one per column."""
    per_column = center.size > 1
    for j in range(row.size):
        brain, v = _brain_value(row[j], elementwise, zero_negatives)
        if not brain:
            out[j] = background
            continue
        k = j if per_column else 0
        out[j] = (np.float64(v) - center[k]) / scale[k]


@numba.njit(parallel=True, cache=True, nogil=True)
def _normalize_into(rows, center, scale, elementwise, zero_negatives, background, out):  # pragma: no cover
    """:func:`_normalize_row` for every frame of ``rows (t, N)`` into ``out (t, N)``; frames
    are split over threads."""
    for t in numba.prange(rows.shape[0]):
        _normalize_row(rows[t], center, scale, elementwise, zero_negatives, background, out[t])


@numba.njit(parallel=True, cache=True, nogil=True)
def _normalize_scatter(rows, center, scale, elementwise, zero_negatives, background, position, half, out):  # pragma: no cover
    """:func:`_normalize_row` and the scatter of frames onto the whole grid in one pass: the
    normalized float32 of ``rows[t, n]`` goes to ``out[t, position[n]]`` as its bits (``out``
    uint32 = float32) or, with ``half``, as float16 bits (``out`` uint16, :func:`_half_bits`)."""
    n_frames, n = rows.shape
    for t in numba.prange(n_frames):
        z = np.empty(n, np.float32)
        _normalize_row(rows[t], center, scale, elementwise, zero_negatives, background, z)
        bits = z.view(np.uint32)
        target = out[t]
        if half:
            for j in range(n):
                target[position[j]] = _half_bits(bits[j])
        else:
            for j in range(n):
                target[position[j]] = bits[j]


class VolumeNormalizer:
    """A volume series' normalization, fitted from column slabs (or, for the kinds with one
    center and scale, :attr:`fits_frames`, from frame blocks as they are resampled) and
    applied to frame blocks, so that a run of any length is normalized holding one slab or
    block at a time.

    Kinds (see the module): ``global_zscore`` in NeuroSTORM's order of operations
    (CUHK-AIM-Group/NeuroSTORM @ a8dc38f6, ``datasets/preprocessing_volume.py``):

    1. background: the voxels outside the 3D brain mask (not in the series at all) and,
       with ``elementwise``, every element exactly 0 (a voxel can be background at some
       frames only: the reference's ``data == 0`` in 4D when a dataset has no mask file);
    2. with ``negatives="zero"`` negative values become 0 after the background is decided
       (they stay brain and count as 0); this applies to every kind;
    3. one ``mean`` and ``std`` (``ddof`` 0, or 1: torch's unbiased default) over every brain
       element of the run, ``z = (x - mean) / std`` computed in float64, stored float32;
    4. background elements get ``background``: ``"min"`` -> the minimum z of the brain
       elements, ``"zero"`` -> 0.

    ``voxel_zscore``/``zscore`` and ``robust`` use per-column centers and scales
    (:func:`normalize`), ``none`` the values as they are; their background value follows
    the same rule over the normalized values.

    Statistics: per-row count, mean and sum of squared deviations (float64, rows of a slab
    or block in parallel) combined exactly (Chan, Golub & LeVeque 1979), so the result does
    not depend on the slabbing beyond float64 rounding.

    Use: :meth:`fit` every column slab once (any order; or every frame block once, when
    :attr:`fits_frames`), then :meth:`finish`, then :meth:`apply` (or
    :meth:`apply_scattered`) frame blocks.

    Raises:
        SettingError: unknown ``kind``, ``negatives`` or ``background``, ``ddof`` not 0 or 1,
            or ``elementwise`` with a kind other than ``global_zscore``.
    """

    KINDS = ("global_zscore", "voxel_zscore", "zscore", "robust", "none")

    def __init__(self, kind: str, n_columns: int, *, elementwise: bool = False, negatives: str = "keep",
                 ddof: int = 0, background: str = "min"):
        if kind not in self.KINDS:
            raise SettingError(f"unknown normalization {kind!r}")
        if negatives not in ("keep", "zero"):
            raise SettingError(f"unknown volume.negatives {negatives!r} (keep | zero)")
        if background not in ("min", "zero"):
            raise SettingError(f"unknown volume.background {background!r} (min | zero)")
        if ddof not in (0, 1):
            raise SettingError(f"volume.std_ddof must be 0 or 1, not {ddof!r}")
        if elementwise and kind != "global_zscore":
            raise SettingError(f"element-wise background needs normalization global_zscore, not {kind}")
        self.kind, self.elementwise, self.negatives, self.ddof, self.rule = kind, elementwise, negatives, ddof, background
        self.count, self.mean, self.m2 = 0, 0.0, 0.0
        self.low = np.inf
        self.center = np.zeros(n_columns) if kind in ("voxel_zscore", "zscore", "robust") else None
        self.scale = np.ones(n_columns) if self.center is not None else None
        self.std = 1.0
        self.background = 0.0

    @property
    def fits_frames(self) -> bool:
        """Whether :meth:`fit` also takes frame blocks ``(t, N)`` (the kinds whose statistics
        pool every element: ``global_zscore``, ``none``), not only whole-run column slabs."""
        return self.center is None

    def _prepared(self, values: np.ndarray) -> np.ndarray:
        """Values after the negatives rule (the per-column and ``none`` kinds)."""
        if self.negatives == "zero":
            values = np.maximum(values, np.float32(0))
        return np.asarray(values, dtype=np.float32)

    def fit(self, start: int, slab: np.ndarray) -> None:
        """Columns ``[start, start + slab.shape[1])`` of the whole run, ``slab (T, n)`` float32;
        with :attr:`fits_frames`, also any frames of the run ``(t, N)`` (``start`` 0)."""
        if self.kind == "global_zscore":
            values = np.ascontiguousarray(slab, dtype=np.float32)
            rows = values.shape[0]
            count, mean, m2, low = np.empty(rows, np.int64), np.empty(rows), np.empty(rows), np.empty(rows)
            run_numba_parallel(_row_moments, values, self.elementwise, self.negatives == "zero", count, mean, m2, low)
            n, mu, squares, smallest = _combine(count, mean, m2, low, self.count, self.mean, self.m2, self.low)
            self.count, self.mean, self.m2, self.low = int(n), float(mu), float(squares), float(smallest)
            return
        values = self._prepared(slab)
        if self.center is not None:
            center, scale = _column_params(values, self.kind)
            self.center[start:start + values.shape[1]] = center
            self.scale[start:start + values.shape[1]] = scale
            if values.size:
                self.low = min(self.low, float(((values - center) / scale).astype(np.float32).min()))
        elif values.size:
            self.low = min(self.low, float(values.min()))

    def finish(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """``(params, arrays)`` for the run attributes: ``kind``, ``mean``/``std``/
        ``n_brain_elements`` (global z-score), ``background``; per-column kinds also give
        ``center``/``scale`` ``(N,)`` float32 arrays."""
        params: dict[str, Any] = {"kind": self.kind}
        arrays: dict[str, np.ndarray] = {}
        if self.kind == "global_zscore":
            denominator = self.count - self.ddof
            std = float(np.sqrt(self.m2 / denominator)) if denominator > 0 and self.count else 0.0
            self.std = std if std > 0 else 1.0
            if not self.count:
                self.mean = 0.0
            low = float(np.float32((self.low - self.mean) / self.std)) if self.count else np.inf
            params.update(mean=float(self.mean), std=self.std, n_brain_elements=int(self.count))
        else:
            low = self.low
            if self.center is not None:
                arrays = {"center": self.center.astype(np.float32), "scale": self.scale.astype(np.float32)}
        self.background = float(low) if self.rule == "min" and np.isfinite(low) else 0.0
        params["background"] = self.background
        return params, arrays

    def apply(self, rows: np.ndarray) -> np.ndarray:
        """Frames ``rows (t, N)`` as resampled -> normalized ``(t, N)`` float32, element-wise
        background elements set to :attr:`background`."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        out = np.empty(rows.shape, dtype=np.float32)
        run_numba_parallel(_normalize_into, rows, *self._params(), out)
        return out

    def apply_scattered(self, rows: np.ndarray, position: np.ndarray, out: np.ndarray) -> np.ndarray:
        """:meth:`apply`, cast to ``out``'s dtype and placed at ``position`` in one pass:
        ``out[:, position] = apply(rows).astype(out.dtype)``, bit for bit (float16 rounded
        to nearest even, as numpy casts).

        Args:
            rows: ``(t, N)`` float32 frames as resampled.
            position: ``(N,)`` int64, distinct columns of ``out``.
            out: ``(t, V)`` float16 or float32, C-contiguous (whole frames; other columns
                are left as they are).

        Returns:
            ``out``.
        """
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        half = out.dtype == np.float16
        if not half and out.dtype != np.float32 or not out.flags.c_contiguous or out.shape[0] != rows.shape[0]:
            raise SettingError(f"apply_scattered writes C-contiguous float16/float32 frames, got {out.dtype} {out.shape}")
        bits = out.view(np.uint16 if half else np.uint32)
        run_numba_parallel(_normalize_scatter, rows, *self._params(), np.asarray(position, dtype=np.int64), half, bits)
        return out

    def _params(self) -> tuple:
        """``(center, scale, elementwise, zero_negatives, background)`` for the kernels."""
        if self.kind == "global_zscore":
            center, scale = np.array([self.mean]), np.array([self.std])
        elif self.center is not None:
            center, scale = self.center, self.scale
        else:
            center, scale = np.zeros(1), np.ones(1)
        return center, scale, self.elementwise, self.negatives == "zero", np.float32(self.background)


def footprint_mask(
    data: np.ndarray, source_affine: np.ndarray, target_shape: tuple[int, int, int], target_affine: np.ndarray
) -> np.ndarray:
    """Target voxels whose trilinear interpolation of ``data`` is non-zero.

    NeuroSTORM resamples the raw array (and its mask file) trilinearly and then calls
    background what is exactly 0; a target voxel is therefore "brain" when any of the (up
    to 8) source voxels it interpolates from is non-zero. This is that rule on a target grid
    given by affine (the voxels of a grid a resampled run could ever be non-zero at).

    Args:
        data: ``(X, Y, Z)`` bool or numbers; non-zero (``!= 0``) is inside.
        source_affine: 4x4 voxel -> world (mm) of ``data``.
        target_shape: ``(X', Y', Z')``.
        target_affine: 4x4 voxel -> world (mm) of the target grid.

    Returns:
        ``(X', Y', Z')`` bool; target voxels outside the source grid are False.
    """
    from ..resample.spatial import grid_indices, resampling_matrix

    op = resampling_matrix(np.shape(data), source_affine, grid_indices(target_shape), target_affine, order=1)
    inside = (np.nan_to_num(np.asarray(data, dtype=np.float64)).reshape(-1) != 0).astype(np.float64)
    return ((abs(op) @ inside) > 0).reshape(tuple(target_shape))


def global_zscore_elements(
    x: np.ndarray,
    *,
    elementwise: bool = False,
    negatives: str = "keep",
    ddof: int = 0,
    background: str = "min",
    block_frames: int = 64,
) -> tuple[np.ndarray, dict[str, Any]]:
    """NeuroSTORM's global z-score of a run, in its order of operations.

    Reference (CUHK-AIM-Group/NeuroSTORM @ a8dc38f6, ``datasets/preprocessing_volume.py``),
    applied to the brain voxels of the run after spatial and temporal resampling:

    1. background: the voxels outside the (3D) brain mask — not in ``x`` at all — and, with
       ``elementwise``, every element ``x[t, n] == 0`` (a voxel can be background at some
       frames only: the reference's ``data == 0`` in 4D when a dataset has no mask file);
    2. ``data[background] = 0``, then with ``negatives="zero"`` ``data[data < 0] = 0``:
       background is decided before, so zeroed negatives stay brain and count as 0;
    3. ``mean`` and ``std`` over every brain element of the whole 4D run (``ddof=1``: the
       unbiased torch default), ``z = (data - mean) / std``;
    4. background elements are set to the minimum z of the brain elements (``background``
       in the returned params; the caller writes the same value outside the 3D mask).

    Statistics are float64 (the reference runs on ``get_fdata()``'s float64); z is float32.
    This is :class:`VolumeNormalizer` fitted on the whole series and applied in blocks of
    ``block_frames`` frames, so no ``(T, N)`` temporary beyond the output is made.

    Args:
        x: ``(T, N)`` float, brain voxels of the 3D mask in columns (values as resampled).
        elementwise: treat exact zeros of ``x`` as background elements.
        negatives: ``"keep"`` or ``"zero"``.
        ddof: 0 (population std) or 1 (sample std, NeuroSTORM).
        background: ``"min"`` (NeuroSTORM) or ``"zero"``: the value of background elements.
        block_frames: frames per accumulation block.

    Returns:
        ``(z (T, N) float32, params)``: ``params`` has ``kind="global_zscore"``, ``mean``,
        ``std``, ``background`` (min brain z, 0.0 when there is no brain element) and
        ``n_brain_elements``.

    Raises:
        SettingError: unknown ``negatives`` or ``background``, or ``ddof`` not 0 or 1.
    """
    x = np.asarray(x, dtype=np.float32)
    norm = VolumeNormalizer("global_zscore", x.shape[1], elementwise=elementwise, negatives=negatives, ddof=ddof,
                            background=background)
    norm.fit(0, x)
    params, _ = norm.finish()
    z = np.empty_like(x)
    for a in range(0, x.shape[0], max(1, block_frames)):
        z[a:a + block_frames] = norm.apply(x[a:a + block_frames])
    return z, params
