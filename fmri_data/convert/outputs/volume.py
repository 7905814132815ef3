"""Volume BOLD -> ``bold`` on the template grid (+ brain mask) and volume-atlas ROI series."""

from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np

from ...derive.volume import VolumeNormalizer, epi_mask, footprint_mask
from ...discover import NATIVE
from ...errors import InputError, RecipeError
from ...reference.grids import Grid, stored_affine, template_grid, to_orientation
from ...read.nifti import VolumeSeries, open_volume, read_image_3d
from ...read.common import resolve_tr
from ...resample.operator import PreparedOperator, permute_columns
from ...resample.spatial import grid_indices, inside_source, resample_mask, resampling_matrix, source_coordinates
from ...resample.temporal import MAX_CARRY_FRAMES, TemporalStream, n_output_frames, resample_tr
from ...store.layout import roi_key
from ..context import (
    RunInputs, cached_atlas, cached_parcel_operator, check_finite, frames_per_block, resample_device,
    temporal_mean, write_roi,
)
from ..scratch import Series, column_slabs
from .base import OutputKind, Produced, Timing
from .qa import SourceFrames, qa_settings, source_mask

log = logging.getLogger(__name__)


def _target_grid(volume_cfg: dict[str, Any]) -> Grid:
    """The (RAS+) target grid; its crop/pad offsets follow the stored orientation."""
    grid = template_grid(volume_cfg["space"], volume_cfg["resolution"])
    orientation = volume_cfg.get("orientation", "RAS")
    return grid.crop_or_pad(tuple(volume_cfg["shape"]), orientation) if volume_cfg.get("shape") else grid


def _nonzero_any(vol: VolumeSeries) -> np.ndarray:
    """``(X, Y, Z)`` bool: source voxels non-zero in any frame (one streaming pass)."""
    found = np.zeros(int(np.prod(vol.shape[:3])), dtype=bool)
    for _, _, rows in vol.iter_frame_rows(frames_per_block(vol.n_frames, np.prod(vol.shape[:3]))):
        found |= (np.nan_to_num(rows) != 0).any(axis=0)
    return vol.to_ras(found)


def _source_mask(run: RunInputs, vol: VolumeSeries, mode: str, grid: Grid) -> tuple[np.ndarray, str]:
    """Brain mask resampled (nearest) onto the target grid, and how it was obtained."""
    spec = run.spec
    if mode == "auto":
        mode = "file" if spec.mask else "epi"
    if mode == "file_or_nonzero":
        # NeuroSTORM: the trilinearly resampled mask file's non-zero voxels when there is one,
        # else the element-wise non-zero data (3D here: voxels non-zero in any frame; the
        # zero elements of the resampled series are background per frame in _write_volume)
        if spec.mask:
            data, affine = read_image_3d(spec.mask)
            run.add_source(spec.mask, "mask", spec.volume.space if spec.volume else None, True)
            return footprint_mask(data, affine, grid.shape, grid.affine), "file"
        return footprint_mask(_nonzero_any(vol), vol.affine, grid.shape, grid.affine), "nonzero_elementwise"
    if mode == "file":
        if not spec.mask:
            raise InputError(vol.path, "recipe volume.mask=file but the run has no desc-brain_mask file")
        data, affine = read_image_3d(spec.mask)
        run.add_source(spec.mask, "mask", spec.volume.space if spec.volume else None, True)
    elif mode == "epi":
        data, affine = epi_mask(temporal_mean(vol), vol.affine), vol.affine
    elif mode == "nonzero":
        data, affine = np.nan_to_num(vol.read(0, 1)[..., 0]) != 0, vol.affine
    else:  # none
        data, affine = np.ones(vol.shape[:3], dtype=bool), vol.affine
    return resample_mask(data, affine, grid.shape, grid.affine), mode


def _qa_frames(run: RunInputs, vol: VolumeSeries, grid_mask: np.ndarray | None, grid: Grid | None) -> SourceFrames | None:
    """What QA needs from the source frames, to gather in the streaming pass; None when QA is
    off, when its mask needs the source mean first, or when it cannot be set up (QA then
    reads the source itself and reports the cause: QA never fails a conversion)."""
    if qa_settings(run.recipe) is None:
        return None
    try:
        found = source_mask(run.spec.mask, vol, grid_mask, grid)
        return SourceFrames(vol.shape[:3], vol.n_frames, *found) if found is not None else None
    except Exception as exc:  # noqa: BLE001
        log.debug("%s: QA gathers nothing in the conversion pass (%s)", vol.path, exc)
        return None


def volume_outputs(run: RunInputs, inputs: Mapping[str, Any]) -> Produced:
    """Volume source -> ``bold`` (+ mask) and volume-atlas ROI series.

    Returns:
        run attributes (``volume``, timing) and values ``timing``, ``roi_series``,
        ``atlas_parcels``, ``brain_mask``, ``grid``, ``source_frames`` (see :mod:`.base`);
        nothing when the recipe has neither volume output nor atlases for this run.

    Raises:
        InputError: native-space volume under ``inputs.native_space=error``, an empty brain
            mask on the target grid, non-finite values (``inputs.nan_policy=error``), or no signal.
    """
    spec, recipe = run.spec, run.recipe
    src = spec.volume
    vol = open_volume(src.path)
    tr_in, tr_warnings = resolve_tr(vol.path, spec.metadata, vol.header_tr_s, vol.header_time_unit)
    run.warnings.extend(vol.warnings + tr_warnings)
    run.add_source(src.path, "volume", src.space, src.derivative)
    tr_out = recipe["temporal"]["tr"] or tr_in
    t_out = n_output_frames(vol.n_frames, tr_in, tr_out, recipe["temporal"]["grid"])

    volume_cfg = recipe["volume"]
    attrs: dict[str, Any] = {}
    if volume_cfg is not None and src.space == NATIVE:
        policy = recipe["inputs"]["native_space"]
        if policy == "error":
            raise InputError(vol.path, f"volume is in native space, not {volume_cfg['space']} (recipe inputs.native_space=error)")
        if policy == "skip":
            run.warnings.append("native-space volume: no volume output (recipe inputs.native_space=skip)")
            volume_cfg = None
    atlases = [cached_atlas(name, run.atlas_dir) for name in (recipe["roi"] or {}).get("atlases", [])]
    if volume_cfg is None and not atlases:
        return Produced()

    order = 0 if volume_cfg and volume_cfg["interpolation"] == "nearest" else 1
    op = mask = grid = None  # without volume output: no grid, no target-grid mask
    if volume_cfg is not None:
        grid = _target_grid(volume_cfg)
        mask, mask_mode = _source_mask(run, vol, volume_cfg["mask"], grid)
        ijk_all = grid_indices(grid.shape)
        fov = inside_source(source_coordinates(vol.affine, grid.affine, ijk_all), vol.shape[:3]).reshape(grid.shape)
        mask &= fov & grid.box_mask()
        if not mask.any():
            raise InputError(vol.path, "brain mask is empty on the target grid (does the run overlap the template box?)")
        op = resampling_matrix(vol.shape[:3], vol.affine, np.argwhere(mask), grid.affine, order)
    parcel_ops = [cached_parcel_operator(a, run.atlas_dir, vol.shape[:3], vol.affine) for a in atlases]
    if src.space != NATIVE and atlases and any(c.space not in (None, src.space) for a in atlases for c in a.components):
        run.warnings.append(f"atlas space differs from the run's space {src.space}; parcels applied by world coordinates")

    # One streaming pass over the source: every block of frames, decoded in the file's own
    # voxel order (frame rows; operators' columns permuted to it), goes through every spatial
    # operator (numba on CPU, torch on CUDA; recipe compute.device), then through the TR
    # step as frames arrive (TemporalStream: the operator is banded) while the normalization
    # is fitted; the resampled brain series is kept (spilled to a temporary file when large:
    # memory does not grow with the run) for the pass that normalizes and writes it. A TR
    # step that cannot stream (pchip, a very wide band) or a per-voxel normalization takes a
    # column pass over the spatially resampled series instead (_retime_brain).
    device = resample_device(recipe)
    temporal = recipe["temporal"]
    order_on_disk = vol.frame_order()
    n_brain = op.shape[0] if op is not None else 0
    parcels = [np.empty((vol.n_frames, p.matrix.shape[0]), dtype=np.float32) for p in parcel_ops]
    apply_brain = PreparedOperator(permute_columns(op, order_on_disk), device=device) if op is not None else None
    apply_parcels = [PreparedOperator(permute_columns(p.matrix, order_on_disk), device=device, dtype=np.float64)
                     for p in parcel_ops]
    policy = recipe["inputs"]["nan_policy"]
    qa_frames = _qa_frames(run, vol, mask, grid)
    # blocks bounded by the source frames and by what the operators make of them (a small
    # native-space source can map onto hundreds of thousands of template voxels)
    per_frame = max(int(np.prod(vol.shape[:3])), n_brain + sum(p.shape[1] for p in parcels))
    block_frames = frames_per_block(vol.n_frames, per_frame)
    norm = _normalizer(volume_cfg, mask_mode, n_brain) if op is not None else None
    stream = _temporal_stream(vol.n_frames, tr_in, tr_out, temporal, n_brain, block_frames, norm)
    brain = Series(t_out if stream else vol.n_frames, n_brain) if op is not None else None
    brain_rows = np.empty((block_frames, n_brain), dtype=np.float32) if op is not None and not stream else None
    resampled, first, signal = None, None, False
    try:
        for start, stop, rows in vol.iter_frame_rows(block_frames):
            if qa_frames is not None:
                qa_frames.add(start, stop, vol.ras_view(rows))
            rows = check_finite(rows, vol.path, start, policy)
            for out, apply in zip(parcels, apply_parcels):
                apply.apply_rows(rows, out=out[start:stop])
            if apply_brain is None:
                continue
            target = stream.inputs(stop - start) if stream else brain_rows[:stop - start]
            apply_brain.apply_rows(rows, out=target)
            if not signal:  # a voxel that changes in time (almost always seen in the first block)
                first = target[0].copy() if first is None else first
                signal = bool((target != first).any())
            if stream is None:
                brain.write(start, target)
                continue
            for j, retimed_rows in stream.push(stop - start):
                norm.fit(0, retimed_rows)
                brain.write(j, retimed_rows)
        streamed, rows, brain_rows, stream = stream is not None, None, None, None  # the block buffers go

        def retimed(series: np.ndarray) -> np.ndarray:
            return resample_tr(series, tr_in, tr_out, temporal["interpolation"], temporal["antialias"], device=device,
                               grid=temporal["grid"])

        signal = signal or any(np.ptp(x, axis=0).max() > 0 for x in parcels if x.size)
        if not signal:
            raise InputError(vol.path, "no BOLD signal: every voxel is constant over time")
        if op is not None:
            resampled = brain if streamed else _retime_brain(brain, t_out, retimed, norm)
            if not resampled.shares_data(brain):
                brain.close()  # a longer result lives in a series of its own
            attrs["volume"] = _write_volume(run, resampled, norm, mask, grid, mask_mode, src.space, volume_cfg)
    finally:
        for series in (brain, resampled):
            if series is not None:
                series.close()
    roi_series: dict[str, np.ndarray] = {}
    for atlas, p, series in zip(atlases, parcel_ops, parcels):
        series = retimed(series)
        key = roi_key(atlas.name)
        roi_series[key] = write_roi(run, key, series, atlas.labels, atlas.provenance(), "volume", p.missing, p.n_voxels)
    timing = Timing(tr_s=tr_out, source_tr_s=tr_in, n_frames=t_out, n_frames_source=vol.n_frames)
    attrs.update(tr_s=tr_out, source_tr_s=tr_in, n_frames=t_out, n_frames_source=vol.n_frames)
    values = {
        "timing": timing, "roi_series": roi_series, "atlas_parcels": bool(roi_series),
        "brain_mask": mask, "grid": grid, "source_frames": qa_frames,
    }
    return Produced(attrs, values)


def _normalizer(cfg: dict[str, Any], mask_mode: str, n_brain: int) -> VolumeNormalizer:
    """The recipe's volume normalization (:class:`~fmri_data.derive.volume.VolumeNormalizer`).

    Raises:
        RecipeError: ``mask=file_or_nonzero`` fell back to element-wise non-zero with a
            normalization other than ``global_zscore``.
    """
    elementwise = mask_mode == "nonzero_elementwise"
    if elementwise and cfg["normalization"] != "global_zscore":
        raise RecipeError(f"volume.mask=file_or_nonzero without a mask file needs normalization global_zscore, "
                          f"not {cfg['normalization']}")
    return VolumeNormalizer(cfg["normalization"], n_brain, elementwise=elementwise,
                            negatives=cfg.get("negatives", "keep"), ddof=int(cfg.get("std_ddof", 0)),
                            background=cfg["background"])


def _temporal_stream(n_frames: int, tr_in: float, tr_out: float, temporal: dict[str, Any], n_brain: int,
                     block_frames: int, norm: VolumeNormalizer | None) -> TemporalStream | None:
    """The TR step applied as frames are decoded (:class:`~fmri_data.resample.temporal.TemporalStream`),
    or None when it cannot be: no brain series, a normalization fitted per voxel (it needs
    whole columns), ``pchip`` (not linear) or a band wider than
    :data:`~fmri_data.resample.temporal.MAX_CARRY_FRAMES` (an IIR filter over a short run)."""
    if norm is None or not norm.fits_frames or temporal["interpolation"] == "pchip" or n_frames < 2:
        return None
    stream = TemporalStream(n_frames, tr_in, tr_out, temporal["interpolation"], temporal["antialias"],
                            temporal["grid"], n_brain, block_frames)
    return stream if stream.carry <= MAX_CARRY_FRAMES else None


def _retime_brain(brain: Series, t_out: int, retimed, norm: VolumeNormalizer) -> Series:
    """Temporal resampling of the brain series ``(T_in, N)`` column slab by column slab into
    a ``(T_out, N)`` :class:`~fmri_data.convert.scratch.Series` (on ``brain``'s data when the
    result is not longer: written over it), fitting ``norm`` on the way."""
    out = None
    for a, b in column_slabs(brain.shape[0], brain.shape[1]):
        slab = retimed(brain[:, a:b])
        if out is None:  # not longer: in place (slabs are disjoint, each read before it is written)
            out = brain.head(t_out) if t_out <= brain.shape[0] else Series(t_out, brain.shape[1])
        norm.fit(a, slab)
        out.write_columns(a, slab)
    return out


def _write_volume(run: RunInputs, series: Series, norm: VolumeNormalizer, mask, grid, mask_mode, source_space,
                  cfg) -> dict[str, Any]:
    """Normalize the brain series and write ``bold`` ``(T, X, Y, Z)``, ``brain_mask`` and the
    ``norm_*`` maps; returns run attribute ``volume``.

    ``series`` is the resampled brain series ``(T_out, N)``, ``norm`` fitted on it.
    ``mask``/``grid`` are RAS+ (what later output kinds get); the stored arrays are in
    ``volume.orientation`` order (``LAS``: x reversed) and the stored affine maps stored
    indices to mm. With ``mask_mode="nonzero_elementwise"`` the stored ``brain_mask`` is the
    voxels whose trilinear footprint is non-zero in some source frame (a superset of those
    non-zero in any resampled frame); elements that are exactly 0 after resampling are
    background at that frame and hold ``normalization.background``.
    """
    store_cfg, writer = run.recipe["store"], run.writer
    orientation = cfg.get("orientation", "RAS")
    params, arrays = norm.finish()
    background = params["background"]
    # stored position of each brain voxel (mask order = RAS C order), so frames are scattered
    # straight into the stored orientation
    stored_position = np.ascontiguousarray(to_orientation(np.arange(grid.n_voxels).reshape(grid.shape), orientation))
    inverse = np.empty(grid.n_voxels, dtype=np.int64)
    inverse[stored_position.reshape(-1)] = np.arange(grid.n_voxels)
    position = inverse[np.flatnonzero(mask.reshape(-1))]
    sub = max(1, int(store_cfg["chunk_frames"]))
    # two chunks in the stored dtype (the writer encodes one while the next is made), filled
    # with the background once: every block overwrites the brain positions only
    chunks = [np.full((sub, grid.n_voxels), background, dtype=cfg["dtype"]) for _ in range(2)]
    rows = np.empty((sub, series.shape[1]), dtype=np.float32)

    def block(start: int, stop: int) -> np.ndarray:
        chunk = chunks[(start // sub) % 2][:stop - start]
        norm.apply_scattered(series.rows(start, stop, out=rows[:stop - start]), position, chunk)
        return chunk.reshape((stop - start,) + grid.shape)

    writer.write_series(
        "bold", series.shape[0], grid.shape, cfg["dtype"], store_cfg["chunk_frames"], store_cfg["shard_chunks"],
        store_cfg["compression"], block, dimension_names=("time", "x", "y", "z"),
    )
    writer.write_array("brain_mask", np.ascontiguousarray(to_orientation(mask, orientation)), store_cfg["compression"],
                       dimension_names=("x", "y", "z"))
    for name, values in arrays.items():
        volume = np.zeros(grid.n_voxels, dtype=np.float32)
        volume[position] = values
        writer.write_array(f"norm_{name}", volume.reshape(grid.shape), store_cfg["compression"],
                           dimension_names=("x", "y", "z"))
    aligned = source_space == cfg["space"]
    if not aligned:
        run.warnings.append(
            f"source space '{source_space}' is not {cfg['space']}: resampled by world coordinates, without registration"
        )
    return {
        "space": cfg["space"],
        "resolution": cfg["resolution"],
        "shape": list(grid.shape),
        "affine": stored_affine(grid.affine, grid.shape, orientation).tolist(),
        "orientation": orientation,
        "negatives": cfg.get("negatives", "keep"),
        "std_ddof": int(cfg.get("std_ddof", 0)),
        "voxel_size_mm": list(grid.voxel_size),
        "source_space": source_space,
        "alignment": "template" if aligned else "world-coordinates",
        "interpolation": cfg["interpolation"],
        "mask": mask_mode,
        "n_brain_voxels": int(mask.sum()),
        "normalization": params,
        "dtype": cfg["dtype"],
    }


#: Volume BOLD -> ``bold``, ``brain_mask`` and volume-atlas ``roi/*``.
KIND = OutputKind(
    name="volume",
    needs=(),
    provides=("timing", "roi_series", "atlas_parcels", "brain_mask", "grid", "source_frames"),
    applies=lambda run, inputs: run.spec.volume is not None,
    run=volume_outputs,
)
