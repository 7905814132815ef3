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


def epi_mask(mean_image: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Brain mask of an EPI run from its temporal mean image.

    Uses ``nilearn.masking.compute_epi_mask`` (lower-cutoff histogram threshold, then a
    morphological opening and the largest connected component). nilearn's opening is
    counted in voxels (2 by default, tuned for ~3 mm EPI); here it is scaled to about 6 mm
    (``round(6 / voxel size)``) so that coarse acquisitions keep their brain. When the mean
    image carries no contrast (e.g. detrended percent signal change, mean ~0) the mask
    falls back to the voxels whose mean is non-zero.

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
    opening = int(round(6.0 / voxel_mm))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = compute_epi_mask(nib.Nifti1Image(finite, affine), opening=opening or False)
        mask = np.asarray(image.dataobj, dtype=bool)
    except Exception:  # nilearn raises on flat histograms
        mask = np.zeros(finite.shape, dtype=bool)
    if mask.sum() < 0.01 * mask.size:
        mask = finite != 0
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
