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
import numpy as np

from ..errors import SettingError

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

    from nilearn.masking import compute_epi_mask

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
    if kind in ("voxel_zscore", "zscore"):
        center = x.mean(axis=0, dtype=np.float64)
        scale = x.std(axis=0, dtype=np.float64)
    elif kind == "robust":
        q25, center, q75 = np.percentile(x, [25, 50, 75], axis=0)
        scale = q75 - q25
    else:
        raise SettingError(f"unknown normalization {kind!r}")
    scale = np.where(scale > 0, scale, 1.0)
    y = ((x - center) / scale).astype(np.float32)
    return y, {"kind": kind}, {"center": center.astype(np.float32), "scale": scale.astype(np.float32)}


def background_value(normalized: np.ndarray, rule: str) -> float:
    """Value written outside the brain: ``"min"`` of the normalized brain values, or ``"zero"``."""
    if rule == "zero" or normalized.size == 0:
        return 0.0
    return float(normalized.min())


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


def zero_negatives(x: np.ndarray) -> np.ndarray:
    """``np.maximum(x, 0)`` as float32 (NeuroSTORM ``data[data < 0] = 0``); a new array."""
    return np.maximum(np.asarray(x, dtype=np.float32), np.float32(0))


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

    Sums are accumulated over blocks of ``block_frames`` frames (float64, two passes), so
    no ``(T, N)`` temporary beyond the output is made.

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
    if negatives not in ("keep", "zero"):
        raise SettingError(f"unknown volume.negatives {negatives!r} (keep | zero)")
    if background not in ("min", "zero"):
        raise SettingError(f"unknown volume.background {background!r} (min | zero)")
    if ddof not in (0, 1):
        raise SettingError(f"volume.std_ddof must be 0 or 1, not {ddof!r}")
    x = np.asarray(x, dtype=np.float32)
    n_frames = x.shape[0]
    blocks = [(a, min(a + block_frames, n_frames)) for a in range(0, n_frames, max(1, block_frames))]

    def prepared(a: int, b: int) -> tuple[np.ndarray, np.ndarray | None]:
        values = x[a:b]
        brain = values != 0 if elementwise else None
        if negatives == "zero":
            values = np.maximum(values, np.float32(0))
        return values, brain

    count, total = 0, 0.0
    for a, b in blocks:
        values, brain = prepared(a, b)
        picked = values if brain is None else values[brain]
        count += picked.size
        total += float(picked.sum(dtype=np.float64))
    if count == 0:
        return np.zeros_like(x), {"kind": "global_zscore", "mean": 0.0, "std": 1.0, "background": 0.0,
                                  "n_brain_elements": 0}
    mean = total / count
    squares = 0.0
    for a, b in blocks:
        values, brain = prepared(a, b)
        picked = values if brain is None else values[brain]
        squares += float(np.square(picked.astype(np.float64) - mean).sum())
    denominator = count - ddof
    std = float(np.sqrt(squares / denominator)) if denominator > 0 else 0.0
    std = std if std > 0 else 1.0
    z = np.empty_like(x)
    low = np.inf
    for a, b in blocks:
        values, brain = prepared(a, b)
        z[a:b] = (values.astype(np.float64) - mean) / std
        if brain is None:
            low = min(low, float(z[a:b].min()) if z[a:b].size else np.inf)
        elif brain.any():
            low = min(low, float(z[a:b][brain].min()))
    background = float(low) if background == "min" else 0.0
    if elementwise:
        for a, b in blocks:
            z[a:b][x[a:b] == 0] = background
    params = {"kind": "global_zscore", "mean": float(mean), "std": std, "background": background,
              "n_brain_elements": int(count)}
    return z, params
