"""Parcel (ROI) time series as one precomputed sparse operator per (source grid, atlas).

For volume BOLD, the parcel mean is the mean over the atlas voxels of each label of the
data trilinearly resampled onto the atlas grid — what ``nilearn.maskers.NiftiLabelsMasker
(resampling_target="labels", strategy="mean")`` computes. Resampling and averaging are
both linear, so they compose into one ``(R, source voxels)`` sparse matrix applied to all
frames at once. Atlas voxels outside the source field of view are left out of the mean
(nilearn would count them as zeros); a parcel with no voxel inside gets 0 and is listed
in ``missing``.

For dense CIFTI-2 series, cortical vertices take their label from the atlas' fsLR
``.dlabel.nii`` and subcortical voxels from the atlas volume, and the operator averages
grayordinates per parcel.

For GIFTI series on a template surface without a surface parcellation at hand
(e.g. fsaverage5), each vertex takes the most frequent non-zero label of the volume atlas
sampled at 7 depths from the white to the pial surface (nearest voxel) — the
``vol_to_surf`` "depth" sampling of nilearn applied to a label image.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
import scipy.sparse as sp

from ..reference.atlases import Atlas, VolumeAtlas
from ..errors import InputError, SettingError
from ..resample.spatial import nearest_index, resampling_matrix
from ..reference.surfaces import load_mesh
from .volume import normalize

#: Values of recipe ``roi.normalization`` (per run, per parcel; see :func:`normalize_parcels`).
PARCEL_NORMALIZATIONS = ("none", "zscore", "robust", "demean")


def normalize_parcels(x: np.ndarray, kind: str) -> tuple[np.ndarray, dict, dict[str, np.ndarray]]:
    """Per-run, per-parcel normalization of a parcel series (recipe ``roi.normalization``).

    Every statistic is taken over the frames of this one run, column by column:

    * ``none``: the parcel means as computed (float32).
    * ``zscore``: ``(x - mean_t x) / std_t x`` (population std).
    * ``robust``: ``(x - median_t x) / (Q75_t x - Q25_t x)`` (``np.percentile``, linear).
    * ``demean``: ``x - mean_t x`` — BrainLM (vandijklab/BrainLM @ b591d88,
      ``toolkit/BrainLM_Toolkit.py`` l.141-174): each parcel minus its mean over the run,
      never divided; the mean is accumulated in float64.

    A column with zero spread gets scale 1. Dataset-level statistics (fMRI-LM, Brain-JEPA,
    BrainLM's constant median/IQR) are applied at load time, not here.

    Args:
        x: ``(T, R)`` parcel series.
        kind: one of :data:`PARCEL_NORMALIZATIONS`.

    Returns:
        ``(y (T, R) float32, params, arrays)``: ``params`` ``{"kind": kind}``; ``arrays``
        ``center`` (and ``scale`` unless ``demean``), ``(R,)`` float32, so that
        ``x = y * scale + center``.

    Raises:
        SettingError: unknown ``kind``.
    """
    if kind == "demean":
        x = np.asarray(x, dtype=np.float32)
        center = x.mean(axis=0, dtype=np.float64)
        y = (x.astype(np.float64) - center).astype(np.float32)
        return y, {"kind": kind}, {"center": center.astype(np.float32)}
    if kind not in PARCEL_NORMALIZATIONS:
        raise SettingError(f"unknown ROI normalization {kind!r}; one of {', '.join(PARCEL_NORMALIZATIONS)}")
    return normalize(x, kind)


@dataclass
class ParcelOperator:
    """``matrix (R, N_source)`` averaging operator, with bookkeeping.

    Attributes:
        matrix: CSR float64; row ``r`` averages the source values of parcel ``r``.
        n_voxels: ``(R,)`` atlas voxels (or grayordinates) contributing to each parcel.
        missing: names of parcels with no contributing voxel (their series is 0).
    """

    matrix: sp.csr_matrix
    n_voxels: np.ndarray
    missing: list[str]


def _averaging(label_of_row: np.ndarray, values: np.ndarray, weights: sp.csr_matrix) -> tuple[sp.csr_matrix, np.ndarray]:
    """Rows of ``weights`` grouped by label value -> one mean row per value (order of ``values``)."""
    position = {int(v): i for i, v in enumerate(values)}
    rows = np.array([position.get(int(v), -1) for v in label_of_row], dtype=np.int64)
    keep = rows >= 0
    counts = np.bincount(rows[keep], minlength=len(values)).astype(np.float64)
    scale = np.divide(1.0, counts, out=np.zeros_like(counts), where=counts > 0)
    averaging = sp.csr_matrix(
        (scale[rows[keep]], (rows[keep], np.flatnonzero(keep))), shape=(len(values), len(label_of_row))
    )
    return (averaging @ weights).tocsr(), counts


def volume_parcel_operator(
    atlas: Atlas, source_shape: tuple[int, int, int], source_affine: np.ndarray
) -> ParcelOperator:
    """Operator from a flattened (C order) source volume to the atlas' parcel means.

    Args:
        atlas: loaded atlas (components concatenated in order).
        source_shape: ``(X, Y, Z)`` of the BOLD grid (RAS+).
        source_affine: 4x4 voxel -> world (mm) of the BOLD grid.

    Returns:
        :class:`ParcelOperator` with ``matrix`` of shape ``(R, X*Y*Z)``.
    """
    blocks, counts, missing = [], [], []
    for component in atlas.components:
        matrix, n = _component_operator(component, source_shape, source_affine)
        blocks.append(matrix)
        counts.append(n)
        missing += [name for name, c in zip(component.labels, n) if c == 0]
    return ParcelOperator(sp.vstack(blocks).tocsr(), np.concatenate(counts), missing)


def _component_operator(component: VolumeAtlas, source_shape, source_affine) -> tuple[sp.csr_matrix, np.ndarray]:
    labelled = np.isin(component.data, component.values)
    ijk = np.argwhere(labelled)
    weights = resampling_matrix(source_shape, source_affine, ijk, component.affine, order=1)
    inside = np.asarray(weights.sum(axis=1)).ravel() > 0.5
    labels = component.data[labelled].copy()
    labels[~inside] = 0  # out of the field of view: not part of any mean
    return _averaging(labels, component.values, weights)


def cifti_parcel_operator(atlas: Atlas, brain_models: nib.cifti2.BrainModelAxis, path: str) -> ParcelOperator:
    """Operator from dense CIFTI-2 grayordinates ``(G,)`` to parcel means.

    Cortical grayordinates are labelled from each component's fsLR ``.dlabel.nii``;
    subcortical voxels from the component's volume (which must share the CIFTI volume grid).

    Raises:
        InputError: a component has neither a surface parcellation nor a volume on the
            CIFTI volume grid, so its parcels cannot be computed from this file.
    """
    n_columns = len(brain_models)
    blocks, counts, missing = [], [], []
    for component in atlas.components:
        labels = np.zeros(n_columns, dtype=np.int64)
        covered = False
        if component.surface:
            labels += _surface_labels(component, brain_models)
            covered = True
        if brain_models.volume_mask.any() and brain_models.affine is not None:
            vox = brain_models.voxel[brain_models.volume_mask]
            if tuple(brain_models.volume_shape) == component.data.shape and np.allclose(
                brain_models.affine, component.affine, atol=1e-3
            ):
                labels[brain_models.volume_mask] = component.data[vox[:, 0], vox[:, 1], vox[:, 2]]
                covered = True
        if not covered:
            raise InputError(path, f"atlas '{component.name}' has no fsLR surface parcellation or matching volume for this CIFTI file")
        identity = sp.identity(n_columns, format="csr")
        matrix, n = _averaging(labels, component.values, identity)
        blocks.append(matrix)
        counts.append(n)
        missing += [name for name, c in zip(component.labels, n) if c == 0]
    return ParcelOperator(sp.vstack(blocks).tocsr(), np.concatenate(counts), missing)


def _surface_labels(component: VolumeAtlas, brain_models: nib.cifti2.BrainModelAxis) -> np.ndarray:
    dlabel = nib.load(component.surface)
    label_values = np.asarray(dlabel.dataobj, dtype=np.int64)[0]
    label_models = dlabel.header.get_axis(1)
    lookup: dict[tuple[str, int], int] = {}
    for name, slc, model in label_models.iter_structures():
        for vertex, value in zip(model.vertex, label_values[slc]):
            lookup[(str(name), int(vertex))] = int(value)
    out = np.zeros(len(brain_models), dtype=np.int64)
    for name, slc, model in brain_models.iter_structures():
        if model.volume_mask.any():
            continue
        start = slc.start or 0
        for k, vertex in enumerate(model.vertex):
            out[start + k] = lookup.get((str(name), int(vertex)), 0)
    return out


def project_volume_labels(component: VolumeAtlas, white: np.ndarray, pial: np.ndarray, n_depths: int = 7) -> np.ndarray:
    """Label of each vertex from a volume atlas, sampled across the cortical ribbon.

    Args:
        component: the volume atlas.
        white: ``(V, 3)`` white-matter surface coordinates (mm, same world space as the atlas).
        pial: ``(V, 3)`` pial surface coordinates.
        n_depths: sampling depths from white (0) to pial (1), inclusive.

    Returns:
        ``(V,)`` int64 labels; 0 where no sample hits a parcel. Ties go to the smaller label.
    """
    samples = []
    for depth in np.linspace(0.0, 1.0, n_depths):
        points = white + depth * (pial - white)
        world = np.c_[points, np.ones(len(points))]
        ijk = (np.linalg.inv(component.affine) @ world.T).T[:, :3]
        index = nearest_index(ijk, component.data.shape)
        flat = component.data.reshape(-1)
        samples.append(np.where(index >= 0, flat[np.maximum(index, 0)], 0))
    samples = np.stack(samples)  # (depths, V)
    out = np.zeros(samples.shape[1], dtype=np.int64)
    best = np.zeros(samples.shape[1], dtype=np.int64)
    for value in np.unique(samples[samples > 0]):
        count = (samples == value).sum(axis=0)
        better = count > best
        out[better], best[better] = value, count[better]
    return out


def surface_parcel_operator(atlas: Atlas, space: str, n_vertices: dict[str, int], path: str) -> ParcelOperator:
    """Operator from GIFTI vertices ``(V_L + V_R,)`` (left then right) to parcel means.

    Raises:
        InputError: the data's vertex count does not match the ``space`` meshes.
    """
    labels_by_hemi = {}
    for hemi in ("L", "R"):
        white, _ = load_mesh(space, "white_matter", hemi)
        pial, _ = load_mesh(space, "pial", hemi)
        if len(white) != n_vertices[hemi]:
            raise InputError(path, f"{n_vertices[hemi]} vertices in hemi-{hemi}, but {space} meshes have {len(white)}")
        labels_by_hemi[hemi] = [project_volume_labels(c, white, pial) for c in atlas.components]
    total = n_vertices["L"] + n_vertices["R"]
    identity = sp.identity(total, format="csr")
    blocks, counts, missing = [], [], []
    for k, component in enumerate(atlas.components):
        labels = np.concatenate([labels_by_hemi["L"][k], labels_by_hemi["R"][k]])
        matrix, n = _averaging(labels, component.values, identity)
        blocks.append(matrix)
        counts.append(n)
        missing += [name for name, c in zip(component.labels, n) if c == 0]
    return ParcelOperator(sp.vstack(blocks).tocsr(), np.concatenate(counts), missing)
