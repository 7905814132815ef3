"""Spatial resampling of volumes onto a target grid, as a precomputed linear operator.

The mapping from a source grid to a target grid does not change over a run, so the
source coordinates and interpolation weights of every target voxel are computed once and
applied to all frames. Trilinear interpolation becomes a sparse matrix with at most 8
non-zeros per row; nearest-neighbour one with at most 1.

Boundary semantics match ``scipy.ndimage.map_coordinates(order=1, mode="constant",
cval=0)`` and therefore ``nilearn.image.resample_img``: a target voxel whose source
coordinate lies outside ``[0, n - 1]`` on any axis gets 0. Nearest neighbour rounds half
up (``floor(c + 0.5)``), as scipy does.

The operator is applied by the shared sparse kernel of :mod:`fmri_data.resample.operator`
(numba on CPU, torch on CUDA); ``method="reference"`` runs
``scipy.ndimage.map_coordinates`` frame by frame instead.
"""

from __future__ import annotations

import numba
import numpy as np
import scipy.sparse as sp

from ..errors import SettingError
from ..imports import load_module
from .operator import CHUNK_BYTES, PreparedOperator


def source_coordinates(
    source_affine: np.ndarray, target_affine: np.ndarray, target_ijk: np.ndarray
) -> np.ndarray:
    """Source voxel coordinates of target voxels.

    Args:
        source_affine: 4x4 voxel -> world (mm) of the source grid.
        target_affine: 4x4 voxel -> world (mm) of the target grid.
        target_ijk: ``(N, 3)`` integer voxel indices on the target grid.

    Returns:
        ``(N, 3)`` float64 continuous voxel coordinates on the source grid.
    """
    transform = np.linalg.inv(np.asarray(source_affine, dtype=np.float64)) @ np.asarray(target_affine, dtype=np.float64)
    ijk = np.asarray(target_ijk)
    i, j, k = (ijk[:, a].astype(np.float64) for a in range(3))
    out = np.empty((len(ijk), 3), dtype=np.float64)
    for a in range(3):  # elementwise, not a BLAS product: same rounding everywhere, no BLAS threads
        out[:, a] = transform[a, 0] * i + transform[a, 1] * j + transform[a, 2] * k + transform[a, 3]
    return out


def grid_indices(shape: tuple[int, int, int], mask: np.ndarray | None = None) -> np.ndarray:
    """``(N, 3)`` int64 voxel indices of a grid in C order, restricted to ``mask`` if given."""
    if mask is not None:
        return np.argwhere(mask).astype(np.int64)
    return np.indices(shape, dtype=np.int64).reshape(3, -1).T


def inside_source(coords: np.ndarray, source_shape: tuple[int, int, int]) -> np.ndarray:
    """``(N,)`` bool: coordinates within ``[0, n - 1]`` on every axis (scipy's constant mode)."""
    upper = np.asarray(source_shape, dtype=np.float64) - 1.0
    return np.all((coords >= 0.0) & (coords <= upper), axis=1)


def trilinear_weights(
    coords: np.ndarray, source_shape: tuple[int, int, int], method: str = "numba"
) -> tuple[np.ndarray, np.ndarray]:
    """Corner indices and weights of trilinear interpolation.

    Args:
        coords: ``(N, 3)`` float64 source voxel coordinates.
        source_shape: ``(X, Y, Z)`` of the source grid.
        method: ``"numba"`` (parallel kernel) or ``"numpy"`` (vectorized; same numbers).

    Returns:
        ``index (N, 8)`` int64 flat C-order source voxel indices and ``weight (N, 8)``
        float64; rows of coordinates outside the source are all-zero weights (index 0).
        Corner ``k`` is offset ``((k >> 2) & 1, (k >> 1) & 1, k & 1)`` from the cell's origin.
    """
    shape = np.asarray(source_shape, dtype=np.int64)
    coords = np.ascontiguousarray(coords, dtype=np.float64)
    if method == "numba":
        index = np.empty((len(coords), 8), dtype=np.int64)
        weight = np.empty((len(coords), 8), dtype=np.float64)
        _trilinear_kernel(coords, shape, index, weight)
        return index, weight
    if method != "numpy":
        raise SettingError(f"method must be 'numba' or 'numpy', got {method!r}")
    valid = inside_source(coords, source_shape)
    c = np.where(valid[:, None], coords, 0.0)
    base = np.floor(c).astype(np.int64)
    base = np.minimum(base, np.maximum(shape - 2, 0))  # c == n-1 uses the last cell with weight 1
    frac = c - base
    index = np.empty((len(c), 8), dtype=np.int64)
    weight = np.empty((len(c), 8), dtype=np.float64)
    for corner in range(8):
        offs = np.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1], dtype=np.int64)
        idx = np.minimum(base + offs, shape - 1)
        w = np.prod(np.where(offs == 1, frac, 1.0 - frac), axis=1)
        index[:, corner] = (idx[:, 0] * shape[1] + idx[:, 1]) * shape[2] + idx[:, 2]
        weight[:, corner] = w
    weight[~valid] = 0.0
    index[~valid] = 0
    return index, weight


@numba.njit(parallel=True, cache=True, nogil=True)
def _trilinear_kernel(coords, shape, index, weight):  # pragma: no cover - compiled
    """The numba form of :func:`trilinear_weights` (the same operations, row by row)."""
    for r in numba.prange(coords.shape[0]):
        inside = True
        for a in range(3):
            if not (coords[r, a] >= 0.0 and coords[r, a] <= shape[a] - 1.0):
                inside = False
        if not inside:
            for corner in range(8):
                index[r, corner] = 0
                weight[r, corner] = 0.0
            continue
        b0 = min(np.int64(np.floor(coords[r, 0])), max(shape[0] - 2, 0))
        b1 = min(np.int64(np.floor(coords[r, 1])), max(shape[1] - 2, 0))
        b2 = min(np.int64(np.floor(coords[r, 2])), max(shape[2] - 2, 0))
        f0, f1, f2 = coords[r, 0] - b0, coords[r, 1] - b1, coords[r, 2] - b2
        for corner in range(8):
            o0, o1, o2 = (corner >> 2) & 1, (corner >> 1) & 1, corner & 1
            w = (f0 if o0 else 1.0 - f0) * (f1 if o1 else 1.0 - f1) * (f2 if o2 else 1.0 - f2)
            i0 = min(b0 + o0, shape[0] - 1)
            i1 = min(b1 + o1, shape[1] - 1)
            i2 = min(b2 + o2, shape[2] - 1)
            index[r, corner] = (i0 * shape[1] + i1) * shape[2] + i2
            weight[r, corner] = w


def nearest_index(coords: np.ndarray, source_shape: tuple[int, int, int]) -> np.ndarray:
    """``(N,)`` int64 flat C-order index of the nearest source voxel, -1 outside the source."""
    shape = np.asarray(source_shape, dtype=np.int64)
    valid = inside_source(coords, source_shape)
    idx = np.minimum(np.floor(coords + 0.5).astype(np.int64), shape - 1)
    idx = np.maximum(idx, 0)
    flat = (idx[:, 0] * shape[1] + idx[:, 1]) * shape[2] + idx[:, 2]
    return np.where(valid, flat, -1)


def resampling_matrix(
    source_shape: tuple[int, int, int],
    source_affine: np.ndarray,
    target_ijk: np.ndarray,
    target_affine: np.ndarray,
    order: int = 1,
    weights: str = "numba",
) -> sp.csr_matrix:
    """Sparse operator taking flattened source volumes to target voxels.

    ``M @ x`` with ``x`` of shape ``(X*Y*Z, T)`` (source voxels in C order, frames in
    columns) gives the interpolated values ``(N, T)`` at ``target_ijk``.

    Args:
        source_shape: source grid shape ``(X, Y, Z)``.
        source_affine: 4x4 voxel -> world (mm) of the source.
        target_ijk: ``(N, 3)`` target voxel indices.
        target_affine: 4x4 voxel -> world (mm) of the target.
        order: 1 = trilinear, 0 = nearest neighbour.
        weights: how trilinear weights are computed, ``"numba"`` or ``"numpy"``
            (:func:`trilinear_weights`).

    Returns:
        ``scipy.sparse.csr_matrix`` of shape ``(N, X*Y*Z)``, float64, sorted indices, no
        explicit zeros.

    Raises:
        SettingError: ``order`` is not 0 or 1.
    """
    coords = source_coordinates(source_affine, target_affine, target_ijk)
    n_source = int(np.prod(source_shape))
    if order == 1:
        index, weight = trilinear_weights(coords, source_shape, weights)
    elif order == 0:
        flat = nearest_index(coords, source_shape)
        index, weight = np.maximum(flat, 0)[:, None], (flat >= 0).astype(np.float64)[:, None]
    else:
        raise SettingError(f"order must be 0 (nearest) or 1 (trilinear), got {order}")
    # corners are in increasing flat index within a row; zero weights (cells on the
    # source's last plane, coordinates outside it) are dropped
    keep = weight != 0.0
    indptr = np.concatenate([[0], np.cumsum(keep.sum(axis=1))])
    return sp.csr_matrix((weight[keep], index[keep], indptr), shape=(len(coords), n_source))


def resample_mask(
    mask: np.ndarray, source_affine: np.ndarray, target_shape: tuple[int, int, int], target_affine: np.ndarray
) -> np.ndarray:
    """Nearest-neighbour resampling of a mask onto a target grid.

    Args:
        mask: ``(X, Y, Z)`` bool, or numbers (``> 0.5`` is inside).
        source_affine: 4x4 voxel -> world (mm) of ``mask``.
        target_shape: ``(X', Y', Z')``.
        target_affine: 4x4 voxel -> world (mm) of the target grid.

    Returns:
        ``(X', Y', Z')`` bool; target voxels outside the source grid are False.
    """
    nearest = resampling_matrix(np.shape(mask), source_affine, grid_indices(target_shape), target_affine, order=0)
    inside = (np.asarray(mask).reshape(-1) > 0.5).astype(np.float64)
    return ((nearest @ inside) > 0.5).reshape(tuple(target_shape))


def resample_volume(
    data: np.ndarray,
    source_affine: np.ndarray,
    target_shape: tuple[int, int, int],
    target_affine: np.ndarray,
    order: int = 1,
    method: str = "auto",
    device: str = "auto",
    chunk_bytes: int = CHUNK_BYTES,
) -> np.ndarray:
    """Resample a 3D or 4D volume onto a target grid.

    The weights are computed once (:func:`resampling_matrix`) and applied to all frames,
    ``chunk_bytes`` of source frames at a time.

    Args:
        data: ``(X, Y, Z)`` or ``(X, Y, Z, T)`` source values (RAS+ or any orientation; the
            affine says which).
        source_affine: 4x4 voxel -> world (mm) of ``data``.
        target_shape: ``(X', Y', Z')``.
        target_affine: 4x4 voxel -> world (mm) of the target grid.
        order: 1 = trilinear, 0 = nearest.
        method: ``"auto"`` (torch on CUDA when present and ``device`` allows, else numba),
            ``"numba"``, ``"torch"``, ``"sparse"`` (numpy weights, scipy.sparse product) or
            ``"reference"`` (``scipy.ndimage.map_coordinates`` frame by frame).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        chunk_bytes: bytes of source frames converted / sent to the device at a time.

    Returns:
        float32 array ``(X', Y', Z')`` or ``(X', Y', Z', T)``.

    Raises:
        SettingError: unknown ``order``, ``method`` or ``device``; CUDA asked for but absent.
    """
    volume = np.asarray(data)
    frames = volume.reshape(volume.shape[:3] + (-1,))
    target_ijk = grid_indices(target_shape)
    if method == "reference":
        ndimage = load_module("scipy.ndimage")  # when used: 0.15 s of every conversion's start-up otherwise

        coords = source_coordinates(source_affine, target_affine, target_ijk).T
        out = np.stack(
            [
                ndimage.map_coordinates(frames[..., t].astype(np.float64), coords, order=order, mode="constant", cval=0.0)
                for t in range(frames.shape[3])
            ],
            axis=1,
        )
    else:
        weights = "numpy" if method == "sparse" else "numba"  # "sparse": the scipy-only path
        matrix = resampling_matrix(volume.shape[:3], source_affine, target_ijk, target_affine, order, weights)
        operator = PreparedOperator(matrix, method, device, chunk_bytes=chunk_bytes)
        out = operator(frames.reshape(-1, frames.shape[3]))
    out = out.astype(np.float32, copy=False).reshape(tuple(target_shape) + (frames.shape[3],))
    return out if volume.ndim == 4 else out[..., 0]
