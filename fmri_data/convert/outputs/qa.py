"""Quality metrics of a run during conversion (recipe ``qa`` section) -> run attribute ``qa``.

Where the metrics are computed (the choice, and why):

* **Volume runs: on the source image** (the BOLD file as read, RAS+, its own grid and
  TR, before spatial/temporal resampling and normalisation), which is where MRIQC defines
  them: EFC, FBER and the ghost-to-signal ratio need the air background and the
  phase-encoding geometry of the acquisition, which resampling onto the template grid
  and masking remove; tSNR and DVARS on interpolated voxels would be inflated by the
  interpolation's smoothing. The brain mask is the run's stored mask taken back to the
  source grid (nearest neighbour), else the ``desc-brain_mask`` file, else an EPI mask of
  the source mean (ROI-only recipes). The converter gathers what the metrics need
  (:class:`SourceFrames`: the source brain voxels ``(T, N_brain)`` float32, the mean
  image, the global signal, the voxels outside the mask that AQI's automask may take) in
  its single streaming pass over the source; only when the mask needs the source mean
  first (or on ``recompute_qa``), or when the automask has a voxel that was not gathered,
  does QA read the source itself.
* **Surface, dense CIFTI and parcellated CIFTI runs: on the source vertices /
  grayordinates / parcels**; channels constant over time (the medial wall) are left out.
  tSNR, DVARS, GCOR, FD and the non-steady-state count apply; AOR, AQI, EFC, FBER and GSR
  are volume-image metrics and are null.

FD comes from the fMRIPrep confounds (``trans_*``, ``rot_*``) when present with one row
per source frame. QA never changes a stored array. Per-frame traces are kept (rounded to
6 significant digits) in ``qa.series`` for the report's figures, aligned to the source
frames (frames left out of a metric are null).

Convention (``qa.reference``): MRIQC 24.0.2's functional workflow by default
(``mriqc/workflows/functional/base.py``), each choice with a recipe key for the other:

* ``dummy_volumes: drop`` — the non-steady-state frames nipype's ``NonSteadyStateDetector``
  finds are left out of every metric (MRIQC's ``SanitizeImage(n_volumes_to_discard)``
  runs before motion correction, so all its IQMs see the run without them); ``keep``.
* ``aqi_mask: automask`` — AQI over the voxels of AFNI's automask of the run
  (``3dTqual -automask``, MRIQC has no ``-mask`` there); ``brain_mask``: over the brain mask.
* ``gsr_direction: mriqc`` — ``gsr`` along the second on-disk voxel axis (``j``, MRIQC's
  ``gsr_y``; MRIQC never reorients the BOLD run, so its ``x``/``y`` are the on-disk voxel
  axes ``i``/``j``), ``gsr_x``/``gsr_y`` as MRIQC; ``phase_encoding``: ``gsr`` along the
  sidecar's ``PhaseEncodingDirection`` (default y).

Known deviations from MRIQC, always: no head-motion correction (MRIQC computes tSNR,
DVARS, AOR, AQI, GCOR and the mean image on its ``3dvolreg`` output) and the brain mask
(MRIQC's comes from a template registration). Per-run ``notes`` name every metric that is
undefined or computed differently from MRIQC, with the reason.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numba
import numpy as np
from nibabel import orientations

from ...derive import qa_metrics as iqm
from ...derive.qa_metrics import order_key
from ...derive.motion import MOTION_COLUMNS
from ...derive.volume import epi_mask
from ...discover import RunSpec
from ...errors import RecipeError
from ...imports import load_module
from ...read.cifti import open_cifti
from ...read.gifti import open_gifti_series
from ...read.nifti import open_volume, read_image_3d
from ...reference.grids import Grid
from ...resample.spatial import resample_mask
from ..context import RunInputs, frames_per_block, temporal_mean
from ..scratch import Series
from .base import OutputKind, Produced, Timing

log = logging.getLogger(__name__)

DEFAULTS = {"enabled": True, "fd_threshold_mm": 0.5, "fd_radius_mm": 50.0, "dummy_volumes": "drop",
            "aqi_mask": "automask", "gsr_direction": "mriqc"}
#: The MRIQC defaults of the convention keys, and the other value each accepts.
CONVENTION = {"dummy_volumes": ("drop", "keep"), "aqi_mask": ("automask", "brain_mask"),
              "gsr_direction": ("mriqc", "phase_encoding")}
#: The reference implementation whose definitions the metrics follow (``qa.reference``).
MRIQC_REFERENCE = "mriqc-24.0.2"
AXES = "xyz"


def qa_settings(recipe: dict[str, Any]) -> dict[str, Any] | None:
    """The recipe's ``qa`` section with defaults; None when QA is disabled (``qa: null`` or ``enabled: false``)."""
    if "qa" in recipe and recipe["qa"] is None:
        return None
    cfg = {**DEFAULTS, **(recipe.get("qa") or {})}
    for key, allowed in CONVENTION.items():
        if cfg[key] not in allowed:
            raise RecipeError(f"recipe qa.{key} must be one of {' | '.join(allowed)}, not {cfg[key]!r}")
    return cfg if cfg["enabled"] else None


def reference_name(cfg: Mapping[str, Any]) -> str:
    """``qa.reference``: ``"mriqc-24.0.2"``, followed by the convention keys set otherwise."""
    changed = [f"{key}={cfg[key]}" for key, allowed in CONVENTION.items() if cfg[key] != allowed[0]]
    return MRIQC_REFERENCE + (f" except {', '.join(changed)}" if changed else "")


def _g(value: float) -> float | None:
    """A finite float rounded to 6 significant digits, else None."""
    value = float(value)
    return float(f"{value:.6g}") if math.isfinite(value) else None


def _trace(values: np.ndarray) -> list[float | None]:
    return [_g(v) for v in np.asarray(values, dtype=np.float64)]


@dataclass(frozen=True)
class QAInputs:
    """What the QA metrics read besides the source files.

    Attributes:
        spec: the run; recipe: resolved recipe; tr_in: source TR (s).
        mask: ``(X, Y, Z)`` bool brain mask on the target grid, ``grid`` that grid (None
            without volume output).
        confounds: ``(columns, (T_in, C) float32)`` or None.
        source_frames: :class:`SourceFrames` gathered in the converter's pass, or None (QA
            then reads the source itself).
    """

    spec: RunSpec
    recipe: dict[str, Any]
    tr_in: float
    mask: np.ndarray | None = None
    grid: Grid | None = None
    confounds: tuple[list[str], np.ndarray] | None = None
    source_frames: SourceFrames | None = None


def source_mask(mask_file: str | None, vol, grid_mask: np.ndarray | None, grid) -> tuple[np.ndarray, str] | None:
    """Brain mask on the source grid and where it came from: the run's target-grid mask
    taken back (nearest neighbour), else its ``desc-brain_mask`` file ``mask_file``; None when
    only an EPI mask of the source mean would do (that needs a pass over the source of its own)."""
    if grid_mask is not None and grid is not None:
        mask = resample_mask(grid_mask, grid.affine, vol.shape[:3], vol.affine)
        return mask, "stored brain_mask (nearest neighbour on the source grid)"
    if mask_file:
        data, affine = read_image_3d(mask_file)
        return resample_mask(data, affine, vol.shape[:3], vol.affine), "desc-brain_mask file"
    return None


#: Memory (bytes) a gathered series may hold: a series up to this size stays in memory; a
#: larger one keeps its first frames up to this size in memory and the rest in a temporary
#: file (:class:`Series`). At HCP size (1200 x 235,785 brain voxels, 1.05 GiB) about
#: half stays in memory, which halves the file traffic (issue 15: QA may add 1 GiB of peak).
SPILL_BYTES = 512 * 2**20


class JoinedColumns:
    """Columns of several ``(T, *)`` float32 series (arrays or :class:`Series`) side by
    side: ``parts`` (what :func:`~fmri_data.derive.qa_metrics.quality_index` reads, part by
    part), or ``rows(a, b)`` -> ``(b - a, M)``, ``s[t]`` -> a frame.

    Args:
        parts: ``[(series, columns)]``, ``columns`` int indices of each series.
    """

    dtype = np.dtype(np.float32)

    def __init__(self, parts: list[tuple[Any, np.ndarray]]):
        self.parts = parts
        self.shape = (parts[0][0].shape[0], sum(len(columns) for _, columns in parts))

    def rows(self, a: int, b: int, out: np.ndarray | None = None) -> np.ndarray:
        blocks = [(x[a:b] if isinstance(x, np.ndarray) else x.rows(a, b))[:, columns] for x, columns in self.parts]
        if out is None:
            return np.hstack(blocks).astype(np.float32, copy=False)
        np.concatenate(blocks, axis=1, out=out)
        return out

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self.rows(int(key), int(key) + 1)[0]
        raise TypeError(f"JoinedColumns does not support the index {key!r}")


@numba.njit(cache=True, nogil=True, fastmath={"reassoc"})
def _gather_frames(rows, bits, lo, hi, width, ras, brain_j, brain_k, total, abs_total, nonfinite,  # pragma: no cover - compiled
                   frame_sums, brain, hist):
    """One pass over the voxels ``[lo, hi)`` of frame rows ``rows (t, V)`` float32 (``bits``:
    the same as uint32), non-finite values taken as 0: adds each voxel's sums of ``x`` and
    ``|x|`` to ``total`` / ``abs_total`` and flags ``nonfinite`` at its flat RAS+ index
    ``ras[j]``; adds each frame's sum to ``frame_sums (t,)``; copies the brain voxels
    ``brain_j`` (ascending row positions) to ``brain[:, brain_k]`` and counts their value
    keys' high 16 bits in ``hist`` (:func:`fmri_data.derive.qa_metrics.value_histogram`).

    Voxels are taken in chunks of ``width`` whose float64 sums stay in cache while the
    frames go by, summed without checks (vectorised; float64 sums of float32 values do not
    overflow, so a sum is finite iff its values are): a voxel or a frame whose sum is not
    finite is summed again with the non-finite values as 0.
    """
    n_t = rows.shape[0]
    s = np.zeros(width)
    a = np.zeros(width)
    for c0 in range(lo, hi, width):
        c1 = min(c0 + width, hi)
        n = c1 - c0
        q0 = np.searchsorted(brain_j, c0)
        q1 = np.searchsorted(brain_j, c1)
        for j in range(n):
            s[j] = 0.0
            a[j] = 0.0
        for t in range(n_t):
            row = rows[t, c0:c1]
            acc = 0.0
            for j in range(n):
                v = np.float64(row[j])
                s[j] += v
                a[j] += abs(v)
                acc += v
            if not np.isfinite(acc):
                acc = 0.0
                for j in range(n):
                    if np.isfinite(row[j]):
                        acc += row[j]
            frame_sums[t] += acc
            full_row = rows[t]
            row_bits = bits[t]
            out = brain[t]
            for q in range(q0, q1):
                j = brain_j[q]
                v = full_row[j]
                key = order_key(row_bits[j])
                if not np.isfinite(v):
                    v = np.float32(0.0)
                    key = order_key(0)
                out[brain_k[q]] = v
                hist[key >> 16] += 1
        for j in range(n):
            r = ras[c0 + j]
            if not (np.isfinite(s[j]) and np.isfinite(a[j])):
                nonfinite[r] = True
                s[j] = 0.0
                a[j] = 0.0
                for t in range(n_t):
                    v = np.float64(rows[t, c0 + j])
                    if np.isfinite(v):
                        s[j] += v
                        a[j] += abs(v)
            total[r] += s[j]
            abs_total[r] += a[j]


#: Voxels per chunk of :func:`_gather_frames` (their float64 sums stay in the core's cache).
GATHER_WIDTH = 8192


def _row_axes(block: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The spatial axes of ``block (X, Y, Z, t)`` to flip (negative strides) and their order
    by decreasing stride: the voxel order of its memory."""
    flips = tuple(axis for axis in range(3) if block.strides[axis] < 0)
    order = tuple(sorted(range(3), key=lambda axis: -abs(block.strides[axis])))
    return flips, order


def frame_rows(block: np.ndarray, axes: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A block ``(X, Y, Z, t)`` as frame rows ``(t, V)`` without a copy where its memory
    allows (e.g. the RAS+ view of streamed frame rows: flipped and permuted axes), and the
    flat RAS+ C-order index of each of the ``V`` columns.

    Spatial axes with negative strides are flipped and ordered by decreasing stride
    (:func:`_row_axes`, or ``axes``), so that the voxels of a row follow the memory; a
    layout that no view can express is copied.
    """
    return _rows_view(block, axes), _ras_index(block.shape[:3], axes or _row_axes(block))


def _rows_view(block: np.ndarray, axes: tuple | None = None) -> np.ndarray:
    flips, order = axes or _row_axes(block)
    b = np.flip(block, flips) if flips else block
    moved = np.moveaxis(b.transpose(*order, 3), 3, 0)
    try:
        return moved.reshape(moved.shape[0], -1, copy=False)
    except ValueError:
        return np.ascontiguousarray(moved).reshape(moved.shape[0], -1)


def _ras_index(shape: tuple[int, ...], axes: tuple) -> np.ndarray:
    flips, order = axes
    ras = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    ras = np.flip(ras, flips) if flips else ras
    return ras.transpose(order).reshape(-1)


class SourceFrames:
    """What the volume metrics need from the source frames, gathered block by block.

    Fed by the converter's single streaming pass (:mod:`.volume`) when the mask is known
    before it, else by a pass of QA's own. Holds the brain voxels ``brain (T, N_brain)``
    float32 (non-finite values as 0; partly in a temporary file above :data:`SPILL_BYTES`,
    :class:`Series`),
    the voxelwise sums of ``x`` and ``|x|`` over time (the latter for AFNI's automask), which
    voxels were ever non-finite, the global signal (mean over all voxels per frame) and the
    histogram of the brain values' high key bits (the first pass of the exact global median,
    :func:`fmri_data.derive.qa_metrics.value_histogram`). One numba pass per block
    (:func:`_gather_frames`, voxels split over :data:`~fmri_data.derive.qa_metrics.QA_THREADS`
    threads) does it all.

    The brain columns are in the voxel order of the first block's memory (the source
    file's order for streamed frames: contiguous copies); ``voxels`` gives the flat RAS+
    C-order index of each column.

    AQI (MRIQC: ``3dTqual -automask``) needs the voxels of AFNI's automask of the whole
    run, which may reach outside the brain mask and is known only at the end. From the
    first block (``start == 0``) on, the voxels outside the mask that the automask could
    take are gathered as well (``extra (T, M)``, flat RAS+ indices ``extra_voxels``): the
    hole-filled voxels whose mean ``|x|`` over that block is at least half its AFNI clip
    level (:func:`~fmri_data.derive.qa_metrics.clip_level`), unless they outnumber the brain
    voxels. Only when the final automask still has a voxel outside both does QA read the
    source again.

    Args:
        shape: the source grid ``(X, Y, Z)``; n_frames: T; mask: ``(X, Y, Z)`` bool, not empty;
        mask_source: where the mask came from (recorded in ``qa.mask``).

    Raises:
        ValueError: the mask is empty.
    """

    def __init__(self, shape: tuple[int, int, int], n_frames: int, mask: np.ndarray, mask_source: str):
        if not mask.any():
            raise ValueError("brain mask is empty on the source grid")
        self.mask, self.mask_source, self.n_frames = mask, mask_source, n_frames
        n_brain = int(mask.sum())
        spill = n_frames * n_brain * 4 > SPILL_BYTES
        self.brain = Series(n_frames, n_brain, memory_bytes=SPILL_BYTES) if spill \
            else np.empty((n_frames, n_brain), dtype=np.float32)
        self.voxels = np.flatnonzero(mask)
        self.total = np.zeros(shape, dtype=np.float64)
        self.abs_total = np.zeros(shape, dtype=np.float64)
        self.nonfinite = np.zeros(shape, dtype=bool)
        self.global_signal = np.empty(n_frames, dtype=np.float64)
        self.high = np.zeros(iqm.HISTOGRAM_BINS, dtype=np.int64)
        self.extra_voxels = np.empty(0, dtype=np.int64)
        self.extra: np.ndarray | Series | None = None
        self._layouts: dict = {}
        self._extra_positions: dict = {}
        self._ordered = False
        self._buffer: np.ndarray | None = None

    def _layout(self, block: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Frame rows of ``block``, their RAS+ indices, the row positions of the brain voxels
        (ascending) and their brain columns."""
        axes = _row_axes(block)
        rows = _rows_view(block, axes)
        key = (block.shape[:3], axes)
        if key not in self._layouts:
            ras = _ras_index(block.shape[:3], axes)
            brain_j = np.flatnonzero(self.mask.reshape(-1)[ras])
            if not self._ordered:  # brain columns in this layout's voxel order
                self.voxels = ras[brain_j]
                self._ordered = True
            position = np.full(self.mask.size, -1, dtype=np.int64)
            position[self.voxels] = np.arange(self.voxels.size)
            self._layouts[key] = (ras, brain_j, position[ras[brain_j]])
        return (rows, *self._layouts[key])

    def _plan_extra(self, aveabs: np.ndarray) -> None:
        """Choose the voxels outside the mask to gather for the automask (see the class)."""
        ndimage = load_module("scipy.ndimage")

        level = iqm.clip_level(aveabs)
        near = ndimage.binary_fill_holes(aveabs >= 0.5 * level if level > 0 else aveabs > 0) & ~self.mask
        if 0 < int(near.sum()) <= self.voxels.size:
            self.extra_voxels = np.flatnonzero(near)
            n = self.extra_voxels.size
            spill = self.n_frames * n * 4 > SPILL_BYTES
            self.extra = Series(self.n_frames, n, memory_bytes=0) if spill else np.empty((self.n_frames, n), dtype=np.float32)

    def _gather_extra(self, start: int, rows: np.ndarray, ras: np.ndarray) -> None:
        if id(ras) not in self._extra_positions:
            inverse = np.empty(ras.size, dtype=np.int64)
            inverse[ras] = np.arange(ras.size)
            self._extra_positions[id(ras)] = inverse[self.extra_voxels]
        values = rows[:, self._extra_positions[id(ras)]]
        values = np.where(np.isfinite(values), values, np.float32(0.0))
        if isinstance(self.extra, Series):
            self.extra.write(start, values)
        else:
            self.extra[start:start + values.shape[0]] = values

    def add(self, start: int, stop: int, block: np.ndarray) -> None:
        """Source frames ``[start, stop)`` as ``(X, Y, Z, stop - start)`` (not modified)."""
        if block.dtype != np.float32:
            block = block.astype(np.float32)
        rows, ras, brain_j, brain_k = self._layout(block)
        n_t, n_vox = rows.shape
        held = self.brain.held(start, stop) if isinstance(self.brain, Series) else None
        spilled = isinstance(self.brain, Series) and held is None
        if held is not None:  # frames held in memory: written in place
            brain = held
        elif spilled:  # one buffer for every block (no fresh pages to fault in each time)
            if self._buffer is None or self._buffer.shape[0] < n_t:
                self._buffer = np.empty((n_t, self.voxels.size), dtype=np.float32)
            brain = self._buffer[:n_t]
        else:
            brain = self.brain[start:stop]
        total, abs_total, nonfinite = (a.reshape(-1) for a in (self.total, self.abs_total, self.nonfinite))
        parts = max(1, min(iqm.QA_THREADS, n_vox // 65536))
        bounds = np.linspace(0, n_vox, parts + 1).astype(np.int64)
        bits = rows.view(np.uint32)

        def work(k: int) -> tuple[np.ndarray, np.ndarray]:
            frame_sums, hist = np.zeros(n_t), np.zeros(iqm.HISTOGRAM_BINS, dtype=np.int64)
            _gather_frames(rows, bits, int(bounds[k]), int(bounds[k + 1]), GATHER_WIDTH, ras, brain_j, brain_k, total, abs_total,
                           nonfinite, frame_sums, brain, hist)
            return frame_sums, hist

        results = iqm.run_parallel(work, parts)
        self.global_signal[start:stop] = np.sum([r[0] for r in results], axis=0) / n_vox
        self.high += np.sum([r[1] for r in results], axis=0)
        if spilled:
            self.brain.write(start, brain)
        if start == 0 and self.extra is None:
            self._plan_extra(self.abs_total / n_t)
        if self.extra is not None:
            self._gather_extra(start, rows, ras)

    def release(self) -> None:
        """Free the block buffer of the streaming pass (kept between blocks)."""
        self._buffer = None

    def automask_series(self, auto: np.ndarray, skip: int = 0):
        """The automask ``auto (X, Y, Z)``'s voxels from frame ``skip`` on, from what was
        gathered: ``(JoinedColumns, brain columns, extra columns)``; None when a voxel of it
        was not gathered."""
        flat = auto.reshape(-1)
        outside = flat & ~self.mask.reshape(-1)
        gathered = np.zeros(flat.size, dtype=bool)
        gathered[self.extra_voxels] = True
        if (outside & ~gathered).any():
            return None
        brain_cols = np.flatnonzero(flat[self.voxels])
        extra_cols = np.flatnonzero(flat[self.extra_voxels]) if self.extra is not None else np.empty(0, np.int64)
        parts = [(self.brain[skip:], brain_cols)] + ([(self.extra[skip:], extra_cols)] if extra_cols.size else [])
        return JoinedColumns(parts), brain_cols, extra_cols

    def histogram(self, skip: int = 0) -> np.ndarray:
        """:func:`~fmri_data.derive.qa_metrics.value_histogram` of ``brain[skip:]``."""
        head = self.brain[:skip] if isinstance(self.brain, np.ndarray) else self.brain.rows(0, skip)
        return self.high - iqm.value_histogram(head) if skip else self.high.copy()

    @classmethod
    def read(cls, q: QAInputs, vol) -> SourceFrames:
        """QA's own pass over the source (when the converter's pass did not gather them)."""
        found = source_mask(q.spec.mask, vol, q.mask, q.grid)
        if found is None:
            found = epi_mask(temporal_mean(vol), vol.affine), "EPI mask of the source mean (nilearn compute_epi_mask)"
        frames = cls(vol.shape[:3], vol.n_frames, *found)
        for start, stop, block in vol.iter_frames(frames_per_block(vol.n_frames, np.prod(vol.shape[:3]))):
            frames.add(start, stop, block)
        return frames


def phase_encoding_axis(path: str, metadata: dict[str, Any]) -> tuple[int, str]:
    """RAS+ axis (0=x, 1=y, 2=z) of the sidecar's ``PhaseEncodingDirection`` and where it came from.

    BIDS ``i``/``j``/``k`` name the on-disk voxel axes; the reader reorients to RAS+, so the
    axis is mapped through the file's orientation. Without the field: y (as MRIQC).
    """
    pe = str(metadata.get("PhaseEncodingDirection") or "").strip()
    if pe[:1] in ("i", "j", "k"):
        disk_axis = "ijk".index(pe[0])
        ornt = orientations.io_orientation(nib.load(path).affine)
        return int(ornt[disk_axis, 0]), f"PhaseEncodingDirection {pe}"
    return 1, "default y (no PhaseEncodingDirection)"


def _pad(values: np.ndarray, skipped: int) -> list[float | None]:
    """A per-frame trace aligned to the source frames: ``skipped`` leading nulls, then ``values``."""
    return [None] * skipped + _trace(values)


def _series_metrics(x: np.ndarray, out: dict[str, Any], series: dict[str, Any], notes: list[str],
                    skipped: int, aqi: tuple[Any, np.ndarray | None, np.ndarray | None] | None = None,
                    statistics: iqm.SeriesStatistics | None = None) -> bool:
    """tSNR, DVARS, GCOR of ``x (T, N)`` (and for images AOR, and AQI on ``aqi = (series (T, M),
    columns of it or None, their temporal medians or None)`` when given), from one :func:`~fmri_data.derive.qa_metrics.series_statistics`
    pass over ``x`` (``statistics``, when already gathered) and, for AQI, one over its frames.

    ``skipped`` leading source frames are not in ``x`` (dropped non-steady-state frames).
    Returns whether the series look demeaned.
    """
    stats = iqm.series_statistics(x) if statistics is None else statistics
    means, stds = stats.mean, stats.std
    demeaned = bool(np.median(np.abs(means)) < 0.1 * np.median(stds))
    out["demeaned"] = demeaned  # the report compares demeaned runs only with each other
    if demeaned:
        notes.append("tSNR undefined: the series look demeaned (median |mean| < 0.1 median std); "
                     "DVARS not intensity-normalised (MRIQC scales to median 1000)")
        out["tsnr"] = None
    else:
        tsnr = np.divide(means, stds, out=np.zeros_like(means), where=stds > iqm.TSNR_STD_FLOOR)  # iqm.tsnr_map
        out["tsnr"] = _g(np.median(tsnr)) if tsnr.size else None
    median = stats.global_median
    intensity = iqm.DVARS_INTENSITY if not demeaned and median > 0 else None
    out["dvars_intensity_normalization"] = intensity
    if x.shape[0] >= 2:
        d = stats.dvars(x, intensity, median=median)
        for key in ("nstd", "std", "vstd"):
            out[f"dvars_{key}"] = _g(np.nanmean(d[key])) if np.isfinite(d[key]).any() else None
            series[f"dvars_{key}"] = _pad(d[key], skipped)
    else:
        notes.append("DVARS undefined: fewer than 2 frames")
    out["gcor"] = _g(stats.gcor())
    if out["gcor"] is None:
        notes.append("GCOR undefined: no channel varies over time")
    if aqi is None:
        return demeaned
    median = stats.median  # shared by AOR and (on the same voxels) AQI
    if x.shape[0] < iqm.AOR_MIN_FRAMES:
        notes.append(f"AOR undefined: {x.shape[0]} frames, AFNI 3dToutcount refuses runs under {iqm.AOR_MIN_FRAMES}")
    else:
        aor = stats.outlier_fraction()
        out["aor"], series["aor"] = _g(aor.mean()), _pad(aor, skipped)
    values, columns, reference = aqi
    if (values.shape[1] if columns is None else int(np.count_nonzero(columns))) < 2:
        notes.append("AQI undefined: its mask has fewer than 2 voxels")
    else:
        if reference is None and values is x:
            reference = median if columns is None else median[columns]
        quality = iqm.quality_index(values, median=reference, columns=columns)
        out["aqi"], series["aqi"] = _g(quality.mean()), _pad(quality, skipped)
    return demeaned


def _dummy_frames(global_signal: np.ndarray, cfg: Mapping[str, Any], notes: list[str]) -> tuple[int, int]:
    """``(dummy_trs, frames left out of the metrics)`` under ``qa.dummy_volumes``."""
    dummy = iqm.non_steady_state(global_signal)
    if cfg["dummy_volumes"] == "keep":
        if dummy:
            notes.append(f"{dummy} non-steady-state frames kept in every metric (qa.dummy_volumes=keep; MRIQC drops them)")
        return dummy, 0
    if dummy and global_signal.size - dummy < 2:
        notes.append(f"{dummy} non-steady-state frames of {global_signal.size} detected but kept: fewer than 2 would be left")
        return dummy, 0
    return dummy, dummy


def _to_disk(image: np.ndarray, path: str) -> np.ndarray:
    """A RAS+ ``(X, Y, Z)`` image in the voxel order of the file on disk (MRIQC's order)."""
    ornt = orientations.io_orientation(nib.load(path).affine)
    return orientations.apply_orientation(image, orientations.ornt_transform(orientations.axcodes2ornt("RAS"), ornt))


def _source_voxels(vol, start: int, voxels: np.ndarray) -> np.ndarray:
    """Source frames ``[start, T)`` of the voxels ``voxels (X, Y, Z)`` bool: ``(T - start, M)``
    float32, non-finite values as 0 (a pass over the source of its own)."""
    out = np.empty((vol.n_frames - start, int(voxels.sum())), dtype=np.float32)
    for a, b, block in vol.iter_frames(frames_per_block(vol.n_frames, np.prod(vol.shape[:3]))):
        if b <= start:
            continue
        lo = max(a, start)
        picked = block[voxels][:, lo - a:].T
        out[lo - start:b - start] = np.where(np.isfinite(picked), picked, 0.0)
    return out


def _volume(q: QAInputs, cfg: Mapping[str, Any], out, series, notes) -> None:
    vol = open_volume(q.spec.volume.path)
    frames = q.source_frames if q.source_frames is not None else SourceFrames.read(q, vol)
    frames.release()
    mask, global_signal = frames.mask, frames.global_signal
    dummy, skip = _dummy_frames(global_signal, cfg, notes)
    brain = frames.brain[skip:]
    total, abs_total = frames.total, frames.abs_total
    if skip:
        head = np.nan_to_num(vol.read(0, skip))
        total = total - head.sum(axis=3, dtype=np.float64)
        abs_total = abs_total - np.abs(head).sum(axis=3, dtype=np.float64)
    n_used = frames.n_frames - skip
    stats = iqm.series_statistics(brain, high=frames.histogram(skip))  # the one pass over the brain series
    # MRIQC's FunctionalQC: nan_to_num, negatives set to 0 before EFC, FBER and GSR
    mean_image = np.clip(total / n_used, 0.0, None)
    out.update(
        kind="volume",
        computed_on=f"source image {'x'.join(str(s) for s in vol.shape[:3])} voxels, TR {q.tr_in:g} s",
        mask=frames.mask_source,
        n_channels=int(mask.sum()),
        nan_fraction=_g(frames.nonfinite.mean()),
        constant_fraction=_g(stats.constant.mean()),
        dummy_trs=dummy,
        dummy_dropped=skip,
        efc=_g(iqm.efc(mean_image)),
        fber=_g(iqm.fber(mean_image, mask)),
    )
    _ghosts(q, cfg, mean_image, mask, out, notes)
    if out["efc"] is None:
        notes.append("EFC undefined: the temporal mean image is 0 everywhere (after MRIQC's negatives-to-0)")
    if out["fber"] is None:
        notes.append("FBER undefined: the background of the source image is ~0 (skull-stripped or masked input)")
    series["global_signal"] = _trace(global_signal)
    if cfg["aqi_mask"] == "brain_mask":
        notes.append("AQI over the brain mask (qa.aqi_mask=brain_mask; MRIQC runs 3dTqual -automask)")
        aqi = (brain, None, None)
    else:
        auto = iqm.automask(abs_total / n_used)
        out["aqi_channels"] = int(auto.sum())
        # the automask's voxels: columns of the brain series (and of the voxels gathered
        # outside the mask), else read again
        found = frames.automask_series(auto, skip)
        if found is None:
            aqi = (_source_voxels(vol, skip, auto), None, None)
        else:
            joined, brain_cols, extra_cols = found
            medians = [stats.median[brain_cols]]
            if extra_cols.size:
                medians.append(iqm.temporal_median(frames.extra[skip:])[extra_cols])
            aqi = (joined, None, np.concatenate(medians))
    if _series_metrics(brain, out, series, notes, skip, aqi=aqi, statistics=stats) and out["efc"] is not None:
        notes.append("EFC of a near-zero-mean image (the series look demeaned): it measures where the positive "
                     "residuals lie, not image sharpness")


def _ghosts(q: QAInputs, cfg: Mapping[str, Any], mean_image: np.ndarray, mask: np.ndarray, out, notes) -> None:
    """``gsr``, ``gsr_x``, ``gsr_y`` (MRIQC: on-disk voxel axes i, j) and where ``gsr`` is taken."""
    path = q.spec.volume.path
    disk_image, disk_mask = _to_disk(mean_image, path), _to_disk(mask, path)
    out["gsr_x"] = _g(iqm.ghost_to_signal(disk_image, disk_mask, 0))
    out["gsr_y"] = _g(iqm.ghost_to_signal(disk_image, disk_mask, 1))
    ornt = orientations.io_orientation(nib.load(path).affine)
    if cfg["gsr_direction"] == "mriqc":
        axis = int(ornt[1, 0])
        out.update(gsr=out["gsr_y"], gsr_axis=AXES[axis],
                   gsr_axis_source="MRIQC gsr_y: on-disk voxel axis j (MRIQC does not reorient the run)")
    else:
        axis, pe_source = phase_encoding_axis(path, q.spec.metadata)
        out.update(gsr=_g(iqm.ghost_to_signal(mean_image, mask, axis)), gsr_axis=AXES[axis], gsr_axis_source=pe_source)
        if axis != int(ornt[1, 0]) or int(ornt[1, 1]) != 1:
            notes.append(f"GSR along RAS {AXES[axis]} from {pe_source} (qa.gsr_direction=phase_encoding); "
                         "MRIQC's gsr_y is along on-disk voxel axis j")
    if out["gsr"] is None:
        notes.append("GSR undefined: the median brain intensity of the mean image is 0 (or a region is empty)")


def _channels(q: QAInputs) -> tuple[np.ndarray, str, str]:
    """``(T, C)`` source series of a surface / CIFTI run, its kind and a description."""
    spec = q.spec
    if spec.cifti_dense is not None:
        cifti = open_cifti(spec.cifti_dense.path)
        return cifti.read(), "cifti_dense", f"{cifti.n_columns} grayordinates"
    if spec.surface:
        parts = [open_gifti_series(spec.surface[h].path) for h in ("L", "R")]
        x = np.hstack([p.read(0, p.n_frames).T for p in parts]).astype(np.float32)
        return x, "gifti", f"{x.shape[1]} vertices (hemi-L + hemi-R)"
    cifti = open_cifti(spec.parcellated[0].path)
    return cifti.read(), "cifti_parcels", f"{cifti.n_columns} parcels"


def _surface(q: QAInputs, cfg: Mapping[str, Any], out, series, notes) -> None:
    x, kind, what = _channels(q)
    finite = np.isfinite(x)
    nonfinite = ~finite.all(axis=0)
    x = np.where(finite, x, 0.0).astype(np.float32)
    global_signal = x.mean(axis=1, dtype=np.float64)
    dummy, skip = _dummy_frames(global_signal, cfg, notes)
    x = x[skip:]
    varying = (np.ptp(x, axis=0) > 0) & ~nonfinite
    out.update(
        kind=kind,
        computed_on=f"source {what}, TR {q.tr_in:g} s",
        mask="channels that vary over time",
        n_channels=int(varying.sum()),
        nan_fraction=_g(nonfinite.mean()),
        constant_fraction=_g(1.0 - varying.mean()),
        dummy_trs=dummy,
        dummy_dropped=skip,
    )
    series["global_signal"] = _trace(global_signal)
    if varying.any():
        _series_metrics(x[:, varying], out, series, notes, skip)
    else:
        notes.append("tSNR, DVARS and GCOR undefined: no channel varies over time")


def _motion(q: QAInputs, n_source: int, skip: int, cfg: Mapping[str, Any], out, series, notes) -> None:
    """FD (Power et al. 2012) from the confounds; the summary over frames ``[skip, T)``, as
    MRIQC's FD of the run without its dropped non-steady-state frames."""
    if q.confounds is None:
        notes.append("no confounds file: FD not computed")
        return
    columns, values = q.confounds
    if not all(c in columns for c in MOTION_COLUMNS):
        notes.append("confounds have no trans_x..rot_z columns: FD not computed")
        return
    if n_source - skip < 2:
        notes.append("fewer than 2 frames: FD not computed")
        return
    if values.shape[0] != n_source:
        notes.append(f"confounds have {values.shape[0]} rows for {n_source} frames: FD not computed")
        return
    fd = iqm.framewise_displacement(columns, values, radius_mm=float(cfg["fd_radius_mm"]))
    kept = np.r_[0.0, fd[skip + 1:]]  # FD of the first kept frame is 0, as on a run that starts there
    summary = iqm.fd_summary(kept, float(cfg["fd_threshold_mm"]))
    out.update({k: _g(v) if isinstance(v, float) else v for k, v in summary.items()})
    series["fd"] = _trace(fd)


NULL_METRICS = (
    "tsnr", "dvars_nstd", "dvars_std", "dvars_vstd", "fd_mean", "fd_num", "fd_perc", "gcor", "aor", "aqi",
    "efc", "fber", "gsr", "gsr_x", "gsr_y",
)


def compute_qa(q: QAInputs, timing: Timing, warnings: list[str]) -> dict[str, Any]:
    """Run attributes ``{"qa": {...}}`` (``schemas/run.schema.json`` ``$defs/qa``), or ``{}`` when disabled.

    A metric that cannot be computed is null with a note; an unexpected error in QA is
    recorded in ``warnings`` and never fails the conversion (QA does not change the data).
    """
    cfg = qa_settings(q.recipe)
    if cfg is None:
        return {}
    out: dict[str, Any] = {name: None for name in NULL_METRICS}
    series: dict[str, Any] = {}
    notes: list[str] = []
    n_source = int(timing.n_frames_source)
    try:
        if q.spec.volume is not None:
            _volume(q, cfg, out, series, notes)
        else:
            _surface(q, cfg, out, series, notes)
        _motion(q, n_source, int(out.get("dummy_dropped") or 0), cfg, out, series, notes)
    except Exception as exc:
        log.exception("QA of %s failed", q.spec.run_id)
        warnings.append(f"qa: not computed ({type(exc).__name__}: {exc})")
        return {}
    out["frames_dropped"] = iqm.frames_dropped(n_source, float(timing.source_tr_s), int(timing.n_frames), float(timing.tr_s))
    out["n_frames_source"] = n_source
    out["reference"] = reference_name(cfg)
    out["settings"] = {
        "dummy_volumes": cfg["dummy_volumes"],
        "aqi_mask": cfg["aqi_mask"],
        "gsr_direction": cfg["gsr_direction"],
        "fd_threshold_mm": float(cfg["fd_threshold_mm"]),
        "fd_radius_mm": float(cfg["fd_radius_mm"]),
        "aor_q": iqm.OUTLIER_Q,
        "nss_threshold": iqm.NSS_THRESHOLD,
    }
    out["notes"] = notes
    out["series"] = series
    return {"qa": out}


def _qa_kind(run: RunInputs, inputs: Mapping[str, Any]) -> Produced:
    timing = inputs["timing"]
    q = QAInputs(run.spec, run.recipe, timing.source_tr_s, inputs["brain_mask"], inputs["grid"], inputs["confounds"],
                 inputs["source_frames"])
    return Produced(compute_qa(q, timing, run.warnings))


#: Quality metrics -> run attribute ``qa`` (recipe ``qa`` section), once the run has stored series.
KIND = OutputKind(
    name="qa",
    needs=("timing", "brain_mask", "grid", "source_frames", "confounds"),
    provides=(),
    applies=lambda run, inputs: True,
    run=_qa_kind,
    after_series=True,
)
