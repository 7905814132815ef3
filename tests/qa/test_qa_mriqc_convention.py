"""QA follows MRIQC 24.0.2 by default (issue 15): masks of already-masked data, GCOR and AOR
as AFNI computes them, dummy volumes dropped, AQI on the automask, GSR along MRIQC's axes,
each convention switchable in the recipe and named in ``qa.reference``; per-run notes for
every metric that is undefined or deviates.

Real runs of ds-real wherever the property can be shown on them; the small synthetic arrays
are worked examples whose answers are computed by hand (said at each).
"""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
from conftest import DS_REAL, haxby_run, make_bids

from fmri_data.convert.scratch import Series
from fmri_data.convert.outputs.base import Timing
from fmri_data.convert.outputs.qa import (
    QAInputs,
    compute_qa,
    qa_settings,
    reference_name,
)
from fmri_data.derive import qa_metrics as iqm
from fmri_data.derive.volume import epi_mask
from fmri_data.discover import discover
from fmri_data.errors import RecipeError, SettingError
from fmri_data.read.nifti import open_volume

CONFOUNDS = DS_REAL / "derivatives" / "preproc" / "sub-haxby1" / "func"


def _qa(root, qa: dict | None = None) -> dict:
    """compute_qa of the single volume run of the BIDS tree ``root`` (no stored mask: QA's own pass)."""
    (spec,) = [s for s in discover(str(root)) if s.volume is not None]
    vol = open_volume(spec.volume.path)
    warnings: list[str] = []
    out = compute_qa(QAInputs(spec, {"qa": qa or {}}, 2.5), Timing(2.5, 2.5, vol.n_frames, vol.n_frames), warnings)
    assert not warnings, warnings
    return out["qa"]


def _haxby_tree(tmp_path, data: np.ndarray, img) -> object:
    path = tmp_path / "bold.nii.gz"
    header = img.header.copy()
    header.set_data_dtype(np.float32)  # no int16 re-quantisation of the edited values
    nib.Nifti1Image(data, img.affine, header).to_filename(path)
    return make_bids(tmp_path / "ds", {"sub-01/func/sub-01_task-objectviewing_bold.nii.gz": path,
                                       "sub-01/func/sub-01_task-objectviewing_bold.json": '{"RepetitionTime": 2.5}'})


# ----------------------------------------------------------------------------- brain mask
def test_already_masked_run_gets_the_voxels_that_carry_signal(tmp_path):
    # real Haxby run 1 with everything outside a 3x4x4 box set to 0 (a run masked to a small region)
    img = nib.load(haxby_run(1))
    data = np.asarray(img.dataobj, dtype=np.float32)
    box = np.zeros(data.shape[:3], dtype=bool)
    box[1:4, 2:6, 2:6] = True
    masked = np.where(box[..., None], data, 0).astype(np.float32)
    vol = open_volume(haxby_run(1))
    ras_box = np.asarray(nib.Nifti1Image(box.astype(np.uint8), img.affine).as_reoriented(
        nib.orientations.io_orientation(img.affine)).dataobj, dtype=bool)
    mean = np.where(ras_box, vol.read().mean(axis=3), 0)
    np.testing.assert_array_equal(epi_mask(mean, vol.affine), ras_box & (mean != 0))
    qa = _qa(_haxby_tree(tmp_path, masked, img))
    assert qa["n_channels"] == box.sum()
    x = data[box].T.astype(np.float64)
    assert qa["tsnr"] == pytest.approx(np.median(x.mean(axis=0) / x.std(axis=0)), rel=1e-5)
    assert qa["tsnr"] > 10


def test_epi_mask_of_a_raw_run_is_unchanged():
    # a raw run (air non-zero) keeps nilearn's mask: the fallback must not fire
    vol = open_volume(haxby_run(1))
    mean = vol.read().mean(axis=3)
    mask = epi_mask(mean, vol.affine)
    assert 0.05 * mask.size < mask.sum() < 0.5 * mask.size


# ----------------------------------------------------------------------------- GCOR, AOR
def test_gcor_keeps_constant_voxels_as_zeros_like_compute_gcor():
    # worked example: two identical varying voxels and one constant voxel. @compute_gcor's
    # 3dTnorm gives u, u, 0; 3dmaskave averages the three: g = 2u/3, GCOR = |g|^2 = 4/9.
    t = np.arange(10.0)
    x = np.stack([np.sin(t), np.sin(t), np.full(10, 5.0)], axis=1)
    assert iqm.gcor(x) == pytest.approx(4 / 9)


def test_outlier_fraction_counts_only_voxels_with_mad_above_zero():
    # worked example: voxel 0 is flat except one frame (median 0, MAD 0): 3dToutcount skips it;
    # voxel 1 is 1..9, 100 (outlier at the last frame, see test_qa.py): fraction 1/2 there.
    x = np.stack([np.r_[np.zeros(9), 50.0], np.r_[np.arange(1.0, 10.0), 100.0]], axis=1)
    np.testing.assert_array_equal(iqm.outlier_fraction(x), [0] * 9 + [0.5])
    with pytest.raises(SettingError, match="at least 5 frames"):
        iqm.outlier_fraction(x[:4])


def test_short_run_has_no_aor_and_says_why(tmp_path):
    img = nib.load(haxby_run(1))
    data = np.asarray(img.dataobj, dtype=np.float32)[..., :4]  # the first 4 frames of a real run
    qa = _qa(_haxby_tree(tmp_path, data, img))
    assert qa["aor"] is None and qa["tsnr"] is not None
    assert any(n.startswith("AOR undefined: 4 frames") for n in qa["notes"])


# ----------------------------------------------------------------------------- dummy volumes
def test_dummy_volumes_are_dropped_as_mriqc(tmp_path):
    # real Haxby run 1 with its first 3 frames made 30 % brighter (how non-steady-state frames
    # look: T1 not yet at equilibrium); ds-real's runs have none of their own
    img = nib.load(haxby_run(1))
    data = np.asarray(img.dataobj, dtype=np.float32)
    data[..., :3] *= 1.3
    root = _haxby_tree(tmp_path, data, img)
    dropped, kept = _qa(root), _qa(root, {"dummy_volumes": "keep"})
    assert dropped["dummy_trs"] == kept["dummy_trs"] == 3
    assert dropped["dummy_dropped"] == 3 and kept["dummy_dropped"] == 0
    assert dropped["n_channels"] == kept["n_channels"]
    vol = open_volume(root / "sub-01/func/sub-01_task-objectviewing_bold.nii.gz")
    mask = epi_mask(vol.read().mean(axis=3), vol.affine)
    x = vol.read()[mask].T.astype(np.float64)[3:]
    assert dropped["tsnr"] == pytest.approx(np.median(x.mean(axis=0) / x.std(axis=0)), rel=1e-5)
    assert kept["tsnr"] < dropped["tsnr"]
    assert dropped["series"]["aor"][:3] == [None] * 3 and len(dropped["series"]["aor"]) == 121
    assert dropped["reference"] == "mriqc-24.0.2"
    assert kept["reference"] == "mriqc-24.0.2 except dummy_volumes=keep"
    assert any("qa.dummy_volumes=keep" in n for n in kept["notes"])


# ----------------------------------------------------------------------------- AQI, GSR, notes
def test_aqi_on_automask_by_default_and_brain_mask_on_request(tmp_path):
    img = nib.load(haxby_run(2))
    root = _haxby_tree(tmp_path, np.asarray(img.dataobj, dtype=np.float32), img)
    auto, brain = _qa(root), _qa(root, {"aqi_mask": "brain_mask"})
    vol = open_volume(root / "sub-01/func/sub-01_task-objectviewing_bold.nii.gz")
    data = vol.read()
    automask = iqm.automask(np.abs(data).mean(axis=3))
    assert auto["aqi_channels"] == automask.sum() != brain["n_channels"]
    assert auto["aqi"] == pytest.approx(iqm.quality_index(data[automask].T).mean(), rel=1e-5)
    assert brain["aqi"] != pytest.approx(auto["aqi"], rel=1e-3)
    assert any("qa.aqi_mask=brain_mask" in n for n in brain["notes"])


def test_clip_level_worked_example():
    # worked example, traced by hand through AFNI's loops: 300 voxels at 100 and 300 at 10 ->
    # bins round(10000 x / 100): 10000 (= nhist, which AFNI's loops never count) and 1000.
    # Start: ib = rint(0.5 sqrt(mean bin^2)) = 3553; walking down from 9999 to ib finds
    # nothing, so cut = 3552. Iterations: no value >= 3552 -> cut 1776 -> 888; then the 300
    # at bin 1000 are above it, half = 150 is reached one past bin 1000 -> cut 0.5 * 1001 = 500,
    # unchanged next time. Level = 500 / (10000 / 100) = 5.0.
    image = np.r_[np.full(300, 100.0), np.full(300, 10.0)]
    assert iqm.clip_level(image) == pytest.approx(5.0)
    assert iqm.clip_level(np.ones(200)) == 0.0  # 222 or fewer positive voxels: AFNI gives up


def test_gsr_follows_mriqc_axes_or_the_phase_encoding_direction(tmp_path):
    img = nib.load(haxby_run(3))
    root = _haxby_tree(tmp_path, np.asarray(img.dataobj, dtype=np.float32), img)
    sidecar = root / "sub-01/func/sub-01_task-objectviewing_bold.json"
    sidecar.write_text('{"RepetitionTime": 2.5, "PhaseEncodingDirection": "i"}')
    mriqc, pe = _qa(root), _qa(root, {"gsr_direction": "phase_encoding"})
    assert mriqc["gsr"] == mriqc["gsr_y"] and mriqc["gsr_axis_source"].startswith("MRIQC gsr_y")
    ornt = nib.orientations.io_orientation(img.affine)
    assert pe["gsr_axis"] == "xyz"[int(ornt[0, 0])] and pe["gsr_axis_source"] == "PhaseEncodingDirection i"
    assert pe["gsr"] != mriqc["gsr"]
    assert any("qa.gsr_direction=phase_encoding" in n for n in pe["notes"])


def test_demeaned_run_notes_name_every_undefined_or_deviating_metric():
    # sub-me1: percent signal change, detrended, zero outside the brain
    (spec,) = [s for s in discover(str(DS_REAL)) if s.run_id == "sub-me1_task-visual"]
    vol = open_volume(spec.volume.path)
    warnings: list[str] = []
    qa = compute_qa(QAInputs(spec, {}, 2.0), Timing(2.0, 2.0, vol.n_frames, vol.n_frames), warnings)["qa"]
    notes = " | ".join(qa["notes"])
    for metric in ("tSNR undefined", "FBER undefined", "GSR undefined", "EFC of a near-zero-mean image"):
        assert metric in notes
    assert qa["tsnr"] is None and qa["fber"] is None and qa["gsr"] is None and qa["efc"] is not None
    assert qa["settings"]["aqi_mask"] == "automask" and qa["reference"] == "mriqc-24.0.2"


def test_convention_keys_are_checked():
    assert reference_name(qa_settings({})) == "mriqc-24.0.2"
    changed = qa_settings({"qa": {"aqi_mask": "brain_mask", "gsr_direction": "phase_encoding"}})
    assert reference_name(changed) == "mriqc-24.0.2 except aqi_mask=brain_mask, gsr_direction=phase_encoding"
    with pytest.raises(RecipeError, match="qa.dummy_volumes"):
        qa_settings({"qa": {"dummy_volumes": "sometimes"}})
    assert math.isnan(iqm.gcor(np.ones((5, 3))))


# ----------------------------------------------------------------------------- bounded memory
def test_series_metrics_do_not_depend_on_the_column_slab_size(monkeypatch):
    # real Haxby run 4, all 600 voxels: slabs of 2 channels vs one slab give the same metrics,
    # and the two-pass histogram median is numpy's median exactly
    x = open_volume(haxby_run(4)).read().reshape(-1, 121).T.copy()
    whole = {"dvars": iqm.dvars(x), "gcor": iqm.gcor(x), "aor": iqm.outlier_fraction(x),
             "aqi": iqm.quality_index(x), "tsnr": iqm.tsnr_map(x), "median": iqm.global_median(x)}
    assert whole["median"] == float(np.median(x))
    monkeypatch.setattr(iqm, "SLAB_ELEMENTS", 2 * 121)
    assert len(list(iqm.column_slabs(x))) == 300
    for key in ("nstd", "std", "vstd"):
        np.testing.assert_allclose(iqm.dvars(x)[key], whole["dvars"][key], rtol=1e-12)
    assert iqm.gcor(x) == pytest.approx(whole["gcor"], rel=1e-12)
    np.testing.assert_array_equal(iqm.outlier_fraction(x), whole["aor"])
    np.testing.assert_array_equal(iqm.quality_index(x), whole["aqi"])
    np.testing.assert_array_equal(iqm.tsnr_map(x), whole["tsnr"])
    assert iqm.global_median(x) == whole["median"]
    assert iqm.global_median(-x[:, :7]) == float(np.median(-x[:, :7]))  # negative values, odd count


def test_spilled_brain_series_gives_the_same_qa(monkeypatch):
    # real run sub-me1 (24,304 brain voxels x 160 frames): the brain series kept in a
    # temporary file (as for HCP-sized runs) gives exactly the metrics of the in-memory one
    import fmri_data.convert.outputs.qa as qa_module

    (spec,) = [s for s in discover(str(DS_REAL)) if s.run_id == "sub-me1_task-visual"]
    vol = open_volume(spec.volume.path)

    def run() -> tuple:
        frames = qa_module.SourceFrames.read(QAInputs(spec, {}, 2.0), vol)
        qa = compute_qa(QAInputs(spec, {}, 2.0, source_frames=frames), Timing(2.0, 2.0, vol.n_frames, vol.n_frames), [])
        return frames, qa["qa"]

    in_memory, expected = run()
    assert isinstance(in_memory.brain, np.ndarray)
    monkeypatch.setattr(qa_module, "SPILL_BYTES", 0)
    monkeypatch.setattr(iqm, "SLAB_ELEMENTS", 160 * 1000)
    spilled, got = run()
    assert isinstance(spilled.brain, Series)
    np.testing.assert_array_equal(spilled.brain[:, 10:20], in_memory.brain[:, 10:20])
    np.testing.assert_array_equal(spilled.brain[3:][5, [1, 7]], in_memory.brain[8, [1, 7]])
    for key in ("gcor", "dvars_std", "dvars_vstd", "aor", "aqi", "efc", "constant_fraction", "n_channels"):
        assert got[key] == pytest.approx(expected[key], rel=1e-9), key
    assert got["notes"] == expected["notes"]
