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
6 significant digits) in ``qa.series`` for the report's figures.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping

import nibabel as nib
import numpy as np
from nibabel import orientations

from ...derive import qa_metrics as iqm
from ...derive.motion import MOTION_COLUMNS
from ...derive.volume import epi_mask
from ...read.cifti import open_cifti
from ...read.gifti import open_gifti_series
from ...discover import RunSpec
from ...read.nifti import open_volume, read_image_3d
from ...reference.grids import Grid
from ...resample.spatial import resample_mask
from ..context import RunInputs, frames_per_block, temporal_mean
from .base import OutputKind, Produced, Timing

log = logging.getLogger(__name__)

DEFAULTS = {"enabled": True, "fd_threshold_mm": 0.5, "fd_radius_mm": 50.0}
AXES = "xyz"


def qa_settings(recipe: dict[str, Any]) -> dict[str, Any] | None:
    """The recipe's ``qa`` section with defaults; None when QA is disabled (``qa: null`` or ``enabled: false``)."""
    if "qa" in recipe and recipe["qa"] is None:
        return None
    cfg = {**DEFAULTS, **(recipe.get("qa") or {})}
    return cfg if cfg["enabled"] else None


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
    source_frames: "SourceFrames | None" = None


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


class SourceFrames:
    """What the volume metrics need from the source frames, gathered block by block.

    Fed by the converter's single streaming pass (:mod:`.volume`) when the mask is known
    before it, else by a pass of QA's own. Holds the brain voxels ``brain (T, N_brain)``
    float32 (non-finite values as 0), the voxelwise sum over time, which voxels were ever
    non-finite and the global signal (mean over all voxels per frame).

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
        self.brain = np.empty((n_frames, int(mask.sum())), dtype=np.float32)
        self.total = np.zeros(shape, dtype=np.float64)
        self.nonfinite = np.zeros(shape, dtype=bool)
        self.global_signal = np.empty(n_frames, dtype=np.float64)

    def add(self, start: int, stop: int, block: np.ndarray) -> None:
        """Source frames ``[start, stop)`` as ``(X, Y, Z, stop - start)`` (not modified)."""
        bad = ~np.isfinite(block)
        if bad.any():
            self.nonfinite |= bad.any(axis=3)
            block = np.where(bad, 0.0, block).astype(np.float32)
        self.total += block.sum(axis=3, dtype=np.float64)
        self.global_signal[start:stop] = block.mean(axis=(0, 1, 2), dtype=np.float64)
        self.brain[start:stop] = block[self.mask].T

    @classmethod
    def read(cls, q: "QAInputs", vol) -> "SourceFrames":
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


def _series_metrics(x: np.ndarray, out: dict[str, Any], series: dict[str, Any], notes: list[str], image_metrics: bool) -> None:
    """tSNR, DVARS, GCOR (and AOR, AQI for images) of ``x (T, N)``."""
    means = x.mean(axis=0, dtype=np.float64)
    stds = x.std(axis=0, dtype=np.float64)
    demeaned = bool(np.median(np.abs(means)) < 0.1 * np.median(stds))
    if demeaned:
        notes.append("series look demeaned (median |mean| < 0.1 median std): tSNR not defined, DVARS not intensity-normalised")
        out["tsnr"] = None
    else:
        out["tsnr"] = _g(iqm.tsnr(x))
    median = float(np.median(x))
    intensity = iqm.DVARS_INTENSITY if not demeaned and median > 0 else None
    out["dvars_intensity_normalization"] = intensity
    if x.shape[0] >= 2:
        d = iqm.dvars(x, intensity, median=median)
        for key in ("nstd", "std", "vstd"):
            out[f"dvars_{key}"] = _g(np.nanmean(d[key])) if np.isfinite(d[key]).any() else None
            series[f"dvars_{key}"] = _trace(d[key])
    out["gcor"] = _g(iqm.gcor(x))
    if image_metrics:
        temporal_median = np.median(x, axis=0)
        aor = iqm.outlier_fraction(x, median=temporal_median)
        aqi = iqm.quality_index(x, median=temporal_median)
        out["aor"], out["aqi"] = _g(aor.mean()), _g(aqi.mean())
        series["aor"], series["aqi"] = _trace(aor), _trace(aqi)


def _volume(q: QAInputs, out, series, notes) -> None:
    vol = open_volume(q.spec.volume.path)
    frames = q.source_frames if q.source_frames is not None else SourceFrames.read(q, vol)
    mask, brain, global_signal = frames.mask, frames.brain, frames.global_signal
    mean_image = frames.total / frames.n_frames
    axis, pe_source = phase_encoding_axis(q.spec.volume.path, q.spec.metadata)
    out.update(
        kind="volume",
        computed_on=f"source image {'x'.join(str(s) for s in vol.shape[:3])} voxels, TR {q.tr_in:g} s",
        mask=frames.mask_source,
        n_channels=int(mask.sum()),
        nan_fraction=_g(frames.nonfinite.mean()),
        constant_fraction=_g(np.mean(np.ptp(brain, axis=0) == 0)),
        dummy_trs=iqm.non_steady_state(global_signal),
        efc=_g(iqm.efc(mean_image)),
        fber=_g(iqm.fber(mean_image, mask)),
        gsr=_g(iqm.ghost_to_signal(mean_image, mask, axis)),
        gsr_axis=AXES[axis],
        gsr_axis_source=pe_source,
    )
    if out["fber"] is None:
        notes.append("FBER undefined: the background of the source image is ~0 (skull-stripped or masked input)")
    if out["gsr"] is None:
        notes.append("GSR undefined: the median brain intensity of the mean image is 0 (or a region is empty)")
    series["global_signal"] = _trace(global_signal)
    _series_metrics(brain, out, series, notes, image_metrics=True)


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


def _surface(q: QAInputs, out, series, notes) -> None:
    x, kind, what = _channels(q)
    finite = np.isfinite(x)
    nonfinite = ~finite.all(axis=0)
    x = np.where(finite, x, 0.0).astype(np.float32)
    varying = (np.ptp(x, axis=0) > 0) & ~nonfinite
    global_signal = x.mean(axis=1, dtype=np.float64)
    out.update(
        kind=kind,
        computed_on=f"source {what}, TR {q.tr_in:g} s",
        mask="channels that vary over time",
        n_channels=int(varying.sum()),
        nan_fraction=_g(nonfinite.mean()),
        constant_fraction=_g(1.0 - varying.mean()),
        dummy_trs=iqm.non_steady_state(global_signal),
    )
    series["global_signal"] = _trace(global_signal)
    if varying.any():
        _series_metrics(x[:, varying], out, series, notes, image_metrics=False)


def _motion(q: QAInputs, n_source: int, cfg: dict[str, Any], out, series, notes) -> None:
    if q.confounds is None:
        notes.append("no confounds file: FD not computed")
        return
    columns, values = q.confounds
    if not all(c in columns for c in MOTION_COLUMNS):
        notes.append("confounds have no trans_x..rot_z columns: FD not computed")
        return
    if n_source < 2:
        notes.append("a single frame: FD not computed")
        return
    if values.shape[0] != n_source:
        notes.append(f"confounds have {values.shape[0]} rows for {n_source} frames: FD not computed")
        return
    fd = iqm.framewise_displacement(columns, values, radius_mm=float(cfg["fd_radius_mm"]))
    out.update({k: _g(v) if isinstance(v, float) else v for k, v in iqm.fd_summary(fd, float(cfg["fd_threshold_mm"])).items()})
    series["fd"] = _trace(fd)


NULL_METRICS = (
    "tsnr", "dvars_nstd", "dvars_std", "dvars_vstd", "fd_mean", "fd_num", "fd_perc", "gcor", "aor", "aqi",
    "efc", "fber", "gsr",
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
            _volume(q, out, series, notes)
        else:
            _surface(q, out, series, notes)
        _motion(q, n_source, cfg, out, series, notes)
    except Exception as exc:  # noqa: BLE001 - QA must not lose a conversion; the cause is kept
        log.exception("QA of %s failed", q.spec.run_id)
        warnings.append(f"qa: not computed ({type(exc).__name__}: {exc})")
        return {}
    out["frames_dropped"] = iqm.frames_dropped(n_source, float(timing.source_tr_s), int(timing.n_frames), float(timing.tr_s))
    out["n_frames_source"] = n_source
    out["settings"] = {
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
