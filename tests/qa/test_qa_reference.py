"""The QA metrics against the reference implementations, on every real volume run of ds-real.

Each run's metrics come from :func:`fmri_data.convert.outputs.qa.compute_qa` (MRIQC
convention, the defaults); the reference values are computed here on the same source
image (the file as MRIQC reads it, on-disk voxel order) with the same brain mask (and, for
AQI, the same automask):

* tSNR, DVARS, FD, dummy volumes: nipype 1.11's own ``TSNR``, ``ComputeDVARS``,
  ``FramewiseDisplacement`` and ``NonSteadyStateDetector`` (the interfaces MRIQC 24.0.2 runs).
* EFC, FBER, GSR: MRIQC 24.0.2's ``mriqc.qc.anatomical.efc``/``fber`` and
  ``mriqc.qc.functional.gsr`` when the mriqc package is installed (its functions are taken
  from the installed source: ``import mriqc.qc`` needs MRIQC's whole environment), else the
  same formulas transcribed below; on the mean image with negatives set to 0, as MRIQC's
  ``FunctionalQC`` does.
* GCOR, AOR, AQI: AFNI's ``@compute_gcor`` (3dTnorm -polort 0, 3dmaskave, 3dTstat -sos),
  ``3dToutcount -fraction`` and ``3dTqual`` re-derived from their C/shell sources step by
  step (AFNI is not a Python dependency), AQI's Spearman rho by ``scipy.stats.spearmanr``.

Agreement is asserted within 1 % (relative) per metric, and exactly for the frame counts.
Where the definitions disagree on purpose the pair is not compared, and the test says so:
tSNR and ``dvars_nstd`` of demeaned data (this project reports tSNR as undefined and does
not scale such data to median 1000; nipype does both), and metrics that are undefined on
both sides (FBER/GSR of a zero background or a zero brain median). AFNI's automask itself
is not reproduced exactly (see :func:`fmri_data.derive.qa_metrics.automask`); the AQI check
uses the same mask on both sides.

The runs have no non-steady-state frames (nipype finds none), so the dummy-volume drop is
checked separately on a real run whose first frames are made brighter (stated there).
"""

from __future__ import annotations

import ast
import importlib.util
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import DS_REAL
from nibabel import orientations
from scipy import stats

os.environ.setdefault("NIPYPE_NO_ET", "1")  # no version check over the network (CI has none)
pytest.importorskip("nipype")

from nipype.algorithms.confounds import (
    TSNR,
    ComputeDVARS,
    FramewiseDisplacement,
    NonSteadyStateDetector,
)

from fmri_data.convert.outputs.base import Timing
from fmri_data.convert.outputs.qa import QAInputs, SourceFrames, compute_qa
from fmri_data.derive import qa_metrics as iqm
from fmri_data.discover import discover
from fmri_data.read.nifti import open_volume

RTOL = 0.01
MOTION = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]


# ------------------------------------------------------------------ MRIQC's own functions
def _mriqc_functions() -> tuple[dict, str]:
    """``efc``, ``fber``, ``gsr`` from the installed MRIQC source (without importing its config)."""
    spec = importlib.util.find_spec("mriqc")
    if spec is None or not spec.submodule_search_locations:
        return {}, "transcription of MRIQC 24.0.2 (mriqc not installed)"
    root = Path(next(iter(spec.submodule_search_locations)))
    namespace: dict = {"np": np, "op": __import__("os.path").path}
    for rel, names in (("qc/anatomical.py", {"efc", "fber"}), ("qc/functional.py", {"gsr", "RAS_AXIS_ORDER"})):
        tree = ast.parse((root / rel).read_text())
        keep = [node for node in tree.body if (isinstance(node, ast.FunctionDef) and node.name in names)
                or (isinstance(node, ast.Assign) and any(getattr(t, "id", None) in names for t in node.targets))]
        exec(compile(ast.Module(body=keep, type_ignores=[]), str(root / rel), "exec"), namespace)  # noqa: S102
    from importlib.metadata import version

    return {k: namespace[k] for k in ("efc", "fber", "gsr")}, f"mriqc {version('mriqc')} source"


def _efc(img):  # MRIQC 24.0.2 mriqc/qc/anatomical.py efc (framemask None)
    n_vox = img.size
    efc_max = 1.0 * n_vox * (1.0 / np.sqrt(n_vox)) * np.log(1.0 / np.sqrt(n_vox))
    b_max = np.sqrt((img**2).sum())
    return round(float((1.0 / efc_max) * np.sum((img / b_max) * np.log((img + 1e-16) / b_max))), 4)


def _fber(img, headmask):  # MRIQC 24.0.2 fber (rotmask None)
    fg_mu = np.median(np.abs(img[headmask > 0]) ** 2)
    bg_mu = np.median(np.abs(img[headmask == 0]) ** 2)
    return -1.0 if bg_mu < 1.0e-3 else round(float(fg_mu / bg_mu), 4)


def _gsr(epi_data, mask, direction):  # MRIQC 24.0.2 mriqc/qc/functional.py gsr
    axis = {"x": 0, "y": 1}[direction]
    n2_mask = np.roll(mask, mask.shape[axis] // 2, axis=axis)
    n2_mask = n2_mask * (1 - mask)
    n2_mask = n2_mask + 2 * (1 - n2_mask - mask)
    ghost = np.mean(epi_data[n2_mask == 1]) - np.mean(epi_data[n2_mask == 2])
    return float(ghost / np.median(epi_data[n2_mask == 0]))


MRIQC, MRIQC_SOURCE = _mriqc_functions()
EFC, FBER, GSR = MRIQC.get("efc", _efc), MRIQC.get("fber", _fber), MRIQC.get("gsr", _gsr)


# ------------------------------------------------------------------ AFNI, re-derived
def _afni_gcor(x: np.ndarray) -> float:
    """@compute_gcor: 3dTnorm -polort 0 (demean, unit L2 norm; a constant voxel stays 0),
    3dmaskave (mean over every mask voxel), 3dTstat -sos."""
    x = x.astype(np.float64)
    d = x - x.mean(axis=0)
    norm = np.sqrt((d * d).sum(axis=0))
    u = np.zeros_like(d)
    u[:, norm > 0] = d[:, norm > 0] / norm[norm > 0]
    g = u.mean(axis=1)
    return float((g * g).sum())


def _afni_toutcount(x: np.ndarray, qthr: float = 0.001) -> np.ndarray:
    """3dToutcount -fraction -polort 0 with a mask: per voxel, residual from the median,
    MAD; outlier where |resid| > Qinv(qthr/T) sqrt(pi/2) MAD and MAD > 0; count / voxels."""
    t = x.shape[0]
    alph = stats.norm.isf(qthr / t) * math.sqrt(0.5 * math.pi)
    count = np.zeros(t)
    for v in range(x.shape[1]):
        var = x[:, v] - np.median(x[:, v])
        fmad = np.median(np.abs(var))
        if fmad > 0:
            count += (var < -alph * fmad) | (var > alph * fmad)
    return count / x.shape[1]


def _afni_tqual(x: np.ndarray) -> np.ndarray:
    """3dTqual (Spearman): 1 - rho(frame, voxelwise median frame) over the mask."""
    ref = np.median(x, axis=0)
    return np.array([1.0 - stats.spearmanr(frame, ref).statistic for frame in x])


# ------------------------------------------------------------------ the runs
def _volume_specs():
    return [s for s in discover(str(DS_REAL)) if s.volume is not None]


def _disk(image: np.ndarray, path: str) -> np.ndarray:
    """A RAS+ image (the reader's order) back in the file's on-disk voxel order (via nibabel)."""
    ras = orientations.axcodes2ornt("RAS")
    return orientations.apply_orientation(image, orientations.ornt_transform(ras, orientations.io_orientation(nib.load(path).affine)))


def _confounds(spec) -> tuple[list[str], np.ndarray] | None:
    if not spec.confounds:
        return None
    table = pd.read_csv(spec.confounds, sep="\t")
    return list(table.columns), table.to_numpy(dtype=np.float32)


def _nipype(interface, cwd: Path):
    cwd.mkdir(parents=True, exist_ok=True)
    here = os.getcwd()
    os.chdir(cwd)
    try:
        return interface.run().outputs
    finally:
        os.chdir(here)


def _reference(spec, mask_ras: np.ndarray, auto_ras: np.ndarray, skip: int, tmp: Path) -> dict:
    """The reference values of one run (see the module docstring)."""
    path = spec.volume.path
    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32)[..., skip:]
    bold = tmp / "bold.nii.gz"
    header = img.header.copy()
    header.set_data_dtype(np.float32)  # the values as read, not re-quantised to int16
    nib.Nifti1Image(data, img.affine, header).to_filename(bold)
    mask = _disk(mask_ras, path)
    mask_file = tmp / "mask.nii.gz"
    nib.Nifti1Image(mask.astype(np.uint8), img.affine).to_filename(mask_file)
    ref: dict = {}
    # dummy volumes: nipype on the file as read (before any drop)
    ref["dummy_trs"] = int(_nipype(NonSteadyStateDetector(in_file=path), tmp / "nss").n_volumes_to_discard)
    # tSNR: nipype TSNR map, MRIQC's median over the mask
    tsnr_file = _nipype(TSNR(in_file=str(bold)), tmp / "tsnr").tsnr_file
    ref["tsnr"] = float(np.median(np.asarray(nib.load(tsnr_file).dataobj)[mask]))
    # DVARS: nipype ComputeDVARS as MRIQC runs it; MRIQC averages the out_all columns std, nstd, vstd
    out_all = _nipype(ComputeDVARS(in_file=str(bold), in_mask=str(mask_file), save_all=True, save_plot=False),
                      tmp / "dvars").out_all
    std, nstd, vstd = np.loadtxt(out_all, skiprows=1, usecols=[0, 1, 2]).mean(axis=0)
    ref.update(dvars_std=std, dvars_nstd=nstd, dvars_vstd=vstd)
    # FD: nipype FramewiseDisplacement on the fMRIPrep motion columns (FSL order: rotations first)
    confounds = _confounds(spec)
    if confounds is not None:
        columns, values = confounds
        motion = values[:, [columns.index(c) for c in ("rot_x", "rot_y", "rot_z", "trans_x", "trans_y", "trans_z")]]
        par = tmp / "motion.par"
        np.savetxt(par, motion[skip:])
        fd_out = _nipype(FramewiseDisplacement(in_file=str(par), parameter_source="FSL", radius=50.0), tmp / "fd")
        ref["fd_mean"] = float(fd_out.fd_average)
    # image metrics on the mean of the kept frames, negatives set to 0 (MRIQC FunctionalQC)
    epi = np.nan_to_num(data.mean(axis=3, dtype=np.float64).astype(np.float32))
    epi[epi < 0] = 0
    ref["efc"] = EFC(epi)
    fber = FBER(epi, mask.astype(np.uint8))
    ref["fber"] = None if fber == -1.0 else fber
    for axis in ("x", "y"):
        with np.errstate(all="ignore"):
            value = GSR(epi, mask.astype(np.uint8), direction=axis)
        ref[f"gsr_{axis}"] = value if math.isfinite(value) else None
    # AFNI, on the voxels of the mask in time-first order
    x = data[mask].T
    ref["gcor"] = _afni_gcor(x)
    ref["aor"] = float(_afni_toutcount(x).mean())
    ref["aqi"] = float(_afni_tqual(data[_disk(auto_ras, path)].T).mean())
    return ref


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    """run_id -> (this project's qa, the reference values)."""
    out = {}
    for spec in _volume_specs():
        vol = open_volume(spec.volume.path)
        tr = float(spec.metadata.get("RepetitionTime") or vol.header_tr_s)
        q = QAInputs(spec, {"qa": {}}, tr, confounds=_confounds(spec))
        frames = SourceFrames.read(q, vol)
        q = QAInputs(spec, {"qa": {}}, tr, confounds=q.confounds, source_frames=frames)
        warnings: list[str] = []
        qa = compute_qa(q, Timing(tr, tr, vol.n_frames, vol.n_frames), warnings)["qa"]
        assert not warnings, warnings
        skip = qa["dummy_dropped"]
        auto = iqm.automask(frames.abs_total / frames.n_frames) if skip == 0 else None
        assert auto is not None  # ds-real has no dummy frames (see test_dummy_volumes_are_dropped_as_mriqc)
        assert qa["aqi_channels"] == auto.sum()
        out[spec.run_id] = (qa, _reference(spec, frames.mask, auto, skip, tmp_path_factory.mktemp(spec.run_id)))
    return out


def _compare(pairs, metric: str, skip_if=lambda qa: False) -> dict[str, float]:
    """Relative difference per run; undefined must be undefined on both sides."""
    diffs, compared = {}, 0
    for run_id, (qa, ref) in pairs.items():
        ours, theirs = qa.get(metric), ref.get(metric)
        if skip_if(qa):
            continue
        if ours is None or theirs is None:
            assert ours is None and theirs is None, f"{run_id} {metric}: ours {ours}, reference {theirs}"
            continue
        compared += 1
        diffs[run_id] = abs(ours - theirs) / max(abs(theirs), 1e-12)
    assert compared, f"{metric}: no run compared"
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= RTOL, f"{metric}: {worst} differs by {100 * diffs[worst]:.3g} % ({pairs[worst][0][metric]} vs {pairs[worst][1][metric]})"
    return diffs


def _demeaned(qa) -> bool:
    return qa["dvars_intensity_normalization"] is None


def test_every_volume_run_of_ds_real_is_compared(pairs):
    assert len(pairs) == 13  # 12 Haxby runs and the me1 run
    for qa, _ in pairs.values():
        assert qa["reference"] == "mriqc-24.0.2"


def test_tsnr_matches_nipype(pairs):
    _compare(pairs, "tsnr", skip_if=_demeaned)  # demeaned data: tSNR undefined here by definition
    me1 = pairs["sub-me1_task-visual"][0]
    assert me1["tsnr"] is None and any(n.startswith("tSNR undefined") for n in me1["notes"])


@pytest.mark.parametrize("metric", ["dvars_std", "dvars_vstd", "dvars_nstd"])
def test_dvars_matches_nipype(pairs, metric):
    # dvars_nstd of demeaned data: nipype scales to median 1000 of a median ~0; not comparable
    _compare(pairs, metric, skip_if=_demeaned if metric == "dvars_nstd" else lambda qa: False)


def test_fd_matches_nipype(pairs):
    diffs = _compare(pairs, "fd_mean")
    assert len(diffs) == 12  # the Haxby runs have real motion estimates


def test_dummy_volumes_match_nipype_exactly(pairs):
    for qa, ref in pairs.values():
        assert qa["dummy_trs"] == ref["dummy_trs"]


@pytest.mark.parametrize("metric", ["efc", "fber", "gsr_x", "gsr_y"])
def test_image_metrics_match_mriqc(pairs, metric):
    _compare(pairs, metric)


def test_gsr_is_mriqc_gsr_y(pairs):
    for qa, _ in pairs.values():
        assert qa["gsr"] == qa["gsr_y"]


@pytest.mark.parametrize("metric", ["gcor", "aor", "aqi"])
def test_afni_metrics_match_their_c_sources(pairs, metric):
    _compare(pairs, metric)
