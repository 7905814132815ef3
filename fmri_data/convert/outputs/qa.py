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
  image, the global signal) in its single streaming pass over the source; only when the
  mask needs the source mean first (or on ``recompute_qa``) does QA read the source itself.
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
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
from nibabel import orientations

from ...derive import qa_metrics as iqm
from ...derive.motion import MOTION_COLUMNS
from ...derive.volume import epi_mask
from ...discover import RunSpec
from ...errors import RecipeError
from ...read.cifti import open_cifti
from ...read.gifti import open_gifti_series
from ...read.nifti import open_volume, read_image_3d
from ...reference.grids import Grid
from ...resample.spatial import resample_mask
from ..context import RunInputs, frames_per_block, temporal_mean
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


#: Brain series larger than this (bytes) are kept in a temporary file, not in memory.
SPILL_BYTES = 256 * 2**20


class SpilledSeries:
    """A ``(T, N)`` float32 series in an unnamed temporary file (deleted when closed or
    collected), written frame block by frame block and read back as column slabs or frames,
    so that the QA metrics (slab-wise, :func:`fmri_data.derive.qa_metrics.column_slabs`)
    hold about one slab in memory instead of the whole run.

    Indexing as numpy for what the metrics use: ``s[:, a:b]`` -> ``(T, b - a)`` array,
    ``s[t]`` / ``s[t, columns]`` -> a frame, ``s[k:]`` -> the series from frame ``k`` (a view
    on the same file). Rows are stored contiguously (row-major).

    Args:
        n_frames: T; n_columns: N; directory: where the file lives (default: ``tempfile``'s).
    """

    dtype = np.dtype(np.float32)

    def __init__(self, n_frames: int, n_columns: int, directory: str | None = None, *, _file=None, _first: int = 0):
        self._file = _file if _file is not None else tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 - lives with the series
        if _file is None:
            self._file.truncate(n_frames * n_columns * 4)
        self._first = _first
        self.shape = (n_frames - _first, n_columns)

    def _offset(self, row: int, column: int = 0) -> int:
        return ((self._first + row) * self.shape[1] + column) * 4

    def write(self, start: int, rows: np.ndarray) -> None:
        """Frames ``[start, start + len(rows))`` (``rows (k, N)``)."""
        data = np.ascontiguousarray(rows, dtype=np.float32)
        view, offset = memoryview(data).cast("B"), self._offset(start)
        while view.nbytes:
            written = os.pwrite(self._file.fileno(), view, offset)
            view, offset = view[written:], offset + written

    def _read(self, out: np.ndarray, offset: int) -> None:
        view = memoryview(out).cast("B")
        while view.nbytes:
            got = os.preadv(self._file.fileno(), [view], offset)
            if got <= 0:
                raise OSError(f"QA temporary file ended early at byte {offset}")
            view, offset = view[got:], offset + got

    def __getitem__(self, key):
        rows, columns = key if isinstance(key, tuple) else (key, None)
        if isinstance(rows, (int, np.integer)):
            frame = np.empty(self.shape[1], dtype=np.float32)
            self._read(frame, self._offset(int(rows)))
            return frame if columns is None else frame[columns]
        if isinstance(rows, slice) and rows.step in (None, 1) and rows.stop is None:
            if columns is None:
                return SpilledSeries(self._first + self.shape[0], self.shape[1], _file=self._file,
                                     _first=self._first + (rows.start or 0))
            if rows.start in (None, 0) and isinstance(columns, slice) and columns.step in (None, 1):
                a, b, _ = columns.indices(self.shape[1])
                out = np.empty((self.shape[0], b - a), dtype=np.float32)
                for t in range(self.shape[0]):
                    self._read(out[t], self._offset(t, a))
                return out
        raise TypeError(f"SpilledSeries does not support the index {key!r}")

    def close(self) -> None:
        self._file.close()


class SourceFrames:
    """What the volume metrics need from the source frames, gathered block by block.

    Fed by the converter's single streaming pass (:mod:`.volume`) when the mask is known
    before it, else by a pass of QA's own. Holds the brain voxels ``brain (T, N_brain)``
    float32 (non-finite values as 0; in a :class:`SpilledSeries` above :data:`SPILL_BYTES`), the voxelwise sums of ``x`` and ``|x|`` over time (the
    latter for AFNI's automask), which voxels were ever non-finite and the global signal
    (mean over all voxels per frame).

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
        self.brain = SpilledSeries(n_frames, n_brain) if spill else np.empty((n_frames, n_brain), dtype=np.float32)
        self.total = np.zeros(shape, dtype=np.float64)
        self.abs_total = np.zeros(shape, dtype=np.float64)
        self.nonfinite = np.zeros(shape, dtype=bool)
        self.global_signal = np.empty(n_frames, dtype=np.float64)

    def add(self, start: int, stop: int, block: np.ndarray) -> None:
        """Source frames ``[start, stop)`` as ``(X, Y, Z, stop - start)`` (not modified)."""
        bad = ~np.isfinite(block)
        if bad.any():
            self.nonfinite |= bad.any(axis=3)
            block = np.where(bad, 0.0, block).astype(np.float32)
        self.total += block.sum(axis=3, dtype=np.float64)
        self.abs_total += np.abs(block).sum(axis=3, dtype=np.float64)
        self.global_signal[start:stop] = block.mean(axis=(0, 1, 2), dtype=np.float64)
        if isinstance(self.brain, SpilledSeries):
            self.brain.write(start, block[self.mask].T)
        else:
            self.brain[start:stop] = block[self.mask].T

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
                    skipped: int, aqi: tuple[np.ndarray, np.ndarray | None] | None = None) -> bool:
    """tSNR, DVARS, GCOR of ``x (T, N)`` (and for images AOR, and AQI on ``aqi = (series (T, M),
    columns of it or None)`` when given).

    ``skipped`` leading source frames are not in ``x`` (dropped non-steady-state frames).
    Returns whether the series look demeaned.
    """
    means, stds = iqm.temporal_moments(x)
    demeaned = bool(np.median(np.abs(means)) < 0.1 * np.median(stds))
    out["demeaned"] = demeaned  # the report compares demeaned runs only with each other
    if demeaned:
        notes.append("tSNR undefined: the series look demeaned (median |mean| < 0.1 median std); "
                     "DVARS not intensity-normalised (MRIQC scales to median 1000)")
        out["tsnr"] = None
    else:
        tsnr = np.divide(means, stds, out=np.zeros_like(means), where=stds > iqm.TSNR_STD_FLOOR)  # iqm.tsnr_map
        out["tsnr"] = _g(np.median(tsnr)) if tsnr.size else None
    median = iqm.global_median(x)
    intensity = iqm.DVARS_INTENSITY if not demeaned and median > 0 else None
    out["dvars_intensity_normalization"] = intensity
    if x.shape[0] >= 2:
        d = iqm.dvars(x, intensity, median=median)
        for key in ("nstd", "std", "vstd"):
            out[f"dvars_{key}"] = _g(np.nanmean(d[key])) if np.isfinite(d[key]).any() else None
            series[f"dvars_{key}"] = _pad(d[key], skipped)
    else:
        notes.append("DVARS undefined: fewer than 2 frames")
    out["gcor"] = _g(iqm.gcor(x))
    if out["gcor"] is None:
        notes.append("GCOR undefined: no channel varies over time")
    if aqi is None:
        return demeaned
    median = iqm.temporal_median(x)  # shared by AOR and (on the same voxels) AQI
    if x.shape[0] < iqm.AOR_MIN_FRAMES:
        notes.append(f"AOR undefined: {x.shape[0]} frames, AFNI 3dToutcount refuses runs under {iqm.AOR_MIN_FRAMES}")
    else:
        aor = iqm.outlier_fraction(x, median=median)
        out["aor"], series["aor"] = _g(aor.mean()), _pad(aor, skipped)
    values, columns = aqi
    if (values.shape[1] if columns is None else int(np.count_nonzero(columns))) < 2:
        notes.append("AQI undefined: its mask has fewer than 2 voxels")
    else:
        same = values is x
        reference = (median if columns is None else median[columns]) if same else None
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


def _constant_fraction(x) -> float:
    """Fraction of the columns of ``x (T, N)`` (array or :class:`SpilledSeries`) constant over time."""
    constant = 0
    for a, b in iqm.column_slabs(x):
        slab = x[:, a:b]
        constant += int(np.count_nonzero(slab.max(axis=0) == slab.min(axis=0)))
    return constant / x.shape[1]


def _volume(q: QAInputs, cfg: Mapping[str, Any], out, series, notes) -> None:
    vol = open_volume(q.spec.volume.path)
    frames = q.source_frames if q.source_frames is not None else SourceFrames.read(q, vol)
    mask, global_signal = frames.mask, frames.global_signal
    dummy, skip = _dummy_frames(global_signal, cfg, notes)
    brain = frames.brain[skip:]
    total, abs_total = frames.total, frames.abs_total
    if skip:
        head = np.nan_to_num(vol.read(0, skip))
        total = total - head.sum(axis=3, dtype=np.float64)
        abs_total = abs_total - np.abs(head).sum(axis=3, dtype=np.float64)
    n_used = frames.n_frames - skip
    # MRIQC's FunctionalQC: nan_to_num, negatives set to 0 before EFC, FBER and GSR
    mean_image = np.clip(total / n_used, 0.0, None)
    out.update(
        kind="volume",
        computed_on=f"source image {'x'.join(str(s) for s in vol.shape[:3])} voxels, TR {q.tr_in:g} s",
        mask=frames.mask_source,
        n_channels=int(mask.sum()),
        nan_fraction=_g(frames.nonfinite.mean()),
        constant_fraction=_g(_constant_fraction(brain)),
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
        aqi = (brain, None)
    else:
        auto = iqm.automask(abs_total / n_used)
        out["aqi_channels"] = int(auto.sum())
        # the automask's voxels: columns of the brain series when inside the mask, else read again
        aqi = (brain, auto[mask]) if not (auto & ~mask).any() else (_source_voxels(vol, skip, auto), None)
    if _series_metrics(brain, out, series, notes, skip, aqi=aqi) and out["efc"] is not None:
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
