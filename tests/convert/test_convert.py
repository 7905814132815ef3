"""End-to-end conversion of the real dataset, resumption, and bad input."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
import zarr

from conftest import DS_REAL, HCP_PTSERIES, haxby_run, make_bids
from fmri_data.convert import convert
from fmri_data.errors import InputError, StoreError
from fmri_data.store.inspect import summarize
from fmri_data.read.nifti import open_volume
from fmri_data.read.tables import read_events
from fmri_data.resample import resample_volume
from fmri_data.store.root import Store
from fmri_data.store.validate import validate_store


def test_every_run_of_ds_real_converts_with_its_tr(real_store):
    store = Store.open(real_store)
    runs = {r["run_id"]: r for r in summarize(store)["runs"]}
    assert len(runs) == 15 and not validate_store(real_store)
    for i in range(1, 13):
        run = runs[f"sub-haxby1_task-objectviewing_run-{i:02d}"]
        assert run["tr_s"] == 2.5 and run["n_frames"] == 121
        assert run["arrays"]["bold"] == {"shape": [121, 96, 96, 96], "dtype": "float16"}
        assert run["arrays"]["roi/schaefer400_7n"]["shape"] == [121, 400]
    assert runs["sub-me1_task-visual"]["tr_s"] == 2.0 and runs["sub-me1_task-visual"]["n_frames"] == 160
    surface = runs["sub-010188_ses-02_task-rest_acq-AP_run-01"]
    assert surface["tr_s"] == 1.4 and surface["arrays"]["roi/schaefer400_7n"]["shape"] == [652, 400]
    hcp = runs["sub-hcp1_task-rest"]
    assert hcp["tr_s"] == 0.72 and hcp["arrays"]["roi/Schaefer400x17subcortex19"]["shape"] == [1200, 419]


def test_run_attributes_and_layout(real_store):
    store = Store.open(real_store)
    attrs = store.run_attrs("sub-me1_task-visual")
    assert attrs["entities"] == {"sub": "me1", "task": "visual"}
    assert attrs["volume"]["mask"] == "file" and attrs["volume"]["shape"] == [96, 96, 96]
    (volume_source,) = [s for s in attrs["sources"] if s["kind"] == "volume"]
    assert volume_source["path"].endswith("desc-preproc_bold.nii.gz") and len(volume_source["sha256"]) == 64
    bold = store.run("sub-me1_task-visual")["bold"]
    assert bold.chunks == (20, 96, 96, 96) and bold.shards == (100, 96, 96, 96)
    haxby = store.run_attrs("sub-haxby1_task-objectviewing_run-02")
    assert haxby["events"] == read_events(DS_REAL / "sub-haxby1/func/sub-haxby1_task-objectviewing_run-02_events.tsv")
    assert len(haxby["events"]) == 8 and haxby["participant"]["site"] == "princeton"
    assert store.run("sub-haxby1_task-objectviewing_run-02")["confounds"].shape == (121, 6)
    assert "native" in haxby["volume"]["source_space"] and haxby["volume"]["alignment"] == "world-coordinates"
    roi = store.run("sub-hcp1_task-rest")["roi/Schaefer400x17subcortex19"]
    assert roi.attrs["labels"][0] == "17Networks_LH_VisCent_ExStr_1" and roi.attrs["source"] == "cifti_parcels"
    root = store.attrs
    assert root["schema_version"] == "1.0.0" and root["recipe"]["name"] == "default" and root["software"]["fmri_data"]


def test_stored_volume_undoes_to_the_resampled_run(real_store):
    store = Store.open(real_store)
    run_id = "sub-haxby1_task-objectviewing_run-06"
    attrs = store.run_attrs(run_id)
    group = store.run(run_id)
    norm = attrs["volume"]["normalization"]
    mask = group["brain_mask"][...]
    stored = group["bold"][30:33].astype(np.float32)
    restored = stored[:, mask] * norm["std"] + norm["mean"]
    vol = open_volume(haxby_run(6))
    reference = resample_volume(vol.read(30, 33), vol.affine, (96, 96, 96), np.array(attrs["volume"]["affine"]), method="reference")
    expected = np.moveaxis(reference, -1, 0)[:, mask]
    # float16 storage of z-scores: ~3 significant digits
    assert np.abs(restored - expected).max() < 2e-3 * norm["std"] * np.abs(stored[:, mask]).max() + 1e-3 * np.ptp(expected)
    assert np.all(stored[:, ~mask] == np.float16(norm["background"]))
    roi = group["roi/schaefer400_7n"]
    assert roi.attrs["normalization"] == {"kind": "none"}


def test_las_and_ras_copies_give_the_same_store(tmp_path, atlas_dir):
    img = nib.load(haxby_run(3))
    data = np.asarray(img.dataobj)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = data.shape[0] - 1
    ras = tmp_path / "ras.nii.gz"
    nib.save(nib.Nifti1Image(data[::-1], img.affine @ flip, img.header), ras)
    sidecar = json.dumps({"RepetitionTime": 2.5})
    root = make_bids(
        tmp_path / "ds",
        {
            "sub-las/func/sub-las_task-a_bold.nii.gz": haxby_run(3),
            "sub-las/func/sub-las_task-a_bold.json": sidecar,
            "sub-ras/func/sub-ras_task-a_bold.nii.gz": ras,
            "sub-ras/func/sub-ras_task-a_bold.json": sidecar,
        },
    )
    report = convert(root, str(tmp_path / "out.zarr"), atlas_dir=atlas_dir, progress=False)
    assert report.count("complete") == 2
    store = Store.open(str(tmp_path / "out.zarr"))
    a, b = store.run("sub-las_task-a"), store.run("sub-ras_task-a")
    np.testing.assert_array_equal(a["brain_mask"][...], b["brain_mask"][...])
    np.testing.assert_allclose(a["bold"][...].astype(np.float32), b["bold"][...].astype(np.float32), atol=2e-3)
    np.testing.assert_allclose(a["roi/schaefer400_7n"][...], b["roi/schaefer400_7n"][...], rtol=1e-5, atol=1e-3)


def test_rerun_skips_finished_runs_and_resumes_interrupted_ones(tmp_path, atlas_dir):
    out = str(tmp_path / "out.zarr")
    kwargs = dict(participant_label=["haxby1", "hcp1"], task=["objectviewing", "rest"], atlas_dir=atlas_dir, progress=False)
    first = convert(DS_REAL, out, **kwargs, overrides=None)
    assert first.count("complete") == 13
    store = Store.open(out)
    stamp = os.stat(f"{out}/runs/sub-hcp1_task-rest/zarr.json").st_mtime_ns
    # simulate a conversion killed mid-run: a half-written staging group and an
    # incomplete run group left behind for run-05
    group = zarr.open_group(f"{out}/_staging/sub-haxby1_task-objectviewing_run-05.dead", mode="w", attributes={"status": "writing"})
    group.create_array("bold", shape=(5, 2), dtype="f4")
    store.fs.rm(f"{out}/runs/sub-haxby1_task-objectviewing_run-05", recursive=True)
    zarr.open_group(f"{out}/runs/sub-haxby1_task-objectviewing_run-05", mode="w", attributes={"status": "writing"})
    assert "sub-haxby1_task-objectviewing_run-05" not in store.run_ids()

    second = convert(DS_REAL, out, **kwargs)
    statuses = {r.run_id: r.status for r in second.results}
    assert statuses.pop("sub-haxby1_task-objectviewing_run-05") == "complete"
    assert set(statuses.values()) == {"exists"}
    assert os.stat(f"{out}/runs/sub-hcp1_task-rest/zarr.json").st_mtime_ns == stamp
    assert set(os.listdir(f"{out}/_staging")) <= {"zarr.json"}
    assert not validate_store(out) and len(Store.open(out).run_ids()) == 13
    with pytest.raises(StoreError, match="written with recipe 'default'.*--overwrite"):
        convert(DS_REAL, out, "neurostorm", **kwargs)


def _save(path, data, affine, tr=None):
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = 0 if tr is None else tr
    nib.save(img, path)
    return path


def test_bad_inputs_fail_their_run_only(tmp_path, atlas_dir):
    good = haxby_run(8)
    affine = nib.load(good).affine
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[:40000])
    vol = np.asarray(nib.load(good).dataobj).astype(np.float32)
    with_nan = vol.copy()
    with_nan[2, 4, 4, 50] = np.nan
    tr = json.dumps({"RepetitionTime": 2.5})
    root = make_bids(
        tmp_path / "ds",
        {
            "sub-good/func/sub-good_task-a_bold.nii.gz": good,
            "sub-good/func/sub-good_task-a_bold.json": tr,
            "sub-trunc/func/sub-trunc_task-a_bold.nii.gz": truncated,
            "sub-trunc/func/sub-trunc_task-a_bold.json": tr,
            "sub-threed/func/sub-threed_task-a_bold.nii.gz": _save(tmp_path / "3d.nii.gz", vol[..., 0], affine),
            "sub-threed/func/sub-threed_task-a_bold.json": tr,
            # no sidecar and pixdim[4] = 0: no TR anywhere
            "sub-notr/func/sub-notr_task-a_bold.nii.gz": _save(tmp_path / "notr.nii.gz", vol, affine),
            "sub-nan/func/sub-nan_task-a_bold.nii.gz": _save(tmp_path / "nan.nii.gz", with_nan, affine, 2.5),
            "sub-nan/func/sub-nan_task-a_bold.json": tr,
            # a sidecar in milliseconds
            "sub-msec/func/sub-msec_task-a_bold.nii.gz": good,
            "sub-msec/func/sub-msec_task-a_bold.json": json.dumps({"RepetitionTime": 2500}),
        },
    )

    out = str(tmp_path / "out.zarr")
    report = convert(root, out, atlas_dir=atlas_dir, progress=False)
    results = {r.run_id: r for r in report.results}
    assert results["sub-good_task-a"].status == "complete"
    expected = {
        "sub-trunc_task-a": "sub-trunc_task-a_bold.nii.gz: truncated or corrupt image data",
        "sub-threed_task-a": "sub-threed_task-a_bold.nii.gz: 3D image",
        "sub-notr_task-a": "sub-notr_task-a_bold.nii.gz: no repetition time",
        "sub-nan_task-a": "sub-nan_task-a_bold.nii.gz: 1 NaN/inf values",
        "sub-msec_task-a": "sub-msec_task-a_bold.nii.gz: sidecar RepetitionTime 2500 s is outside",
    }
    import re

    for run_id, pattern in expected.items():
        result = results[run_id]
        assert result.status == "failed", run_id
        assert "\n" not in result.error and re.search(pattern, result.error), result.error
    store = Store.open(out)
    assert store.run_ids() == ["sub-good_task-a"] and not validate_store(out)
    assert set(os.listdir(f"{out}/_staging")) <= {"zarr.json"}
    index = store.read_index().set_index("run_id")
    assert index.loc["sub-nan_task-a", "status"] == "failed" and "NaN" in index.loc["sub-nan_task-a", "error"]
    # the same NaN run converts when the recipe says to zero them
    again = convert(root, str(tmp_path / "zero.zarr"), overrides=["inputs.nan_policy=zero"], participant_label=["nan"], atlas_dir=atlas_dir, progress=False)
    assert again.results[0].status == "complete"


def test_off_grid_atlas_and_unwritable_output_fail_up_front(tmp_path, atlas_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError, match="a-file/out.zarr: cannot create store"):
        convert(DS_REAL, str(blocker / "out.zarr"), participant_label=["hcp1"], atlas_dir=atlas_dir, progress=False)
    with pytest.raises(InputError, match="atlas file not found"):
        convert(DS_REAL, str(tmp_path / "x.zarr"), participant_label=["hcp1"], atlas_dir=str(tmp_path), progress=False)
    assert not (tmp_path / "x.zarr").exists()


def test_roi_recipe_with_tr_change(tmp_path, atlas_dir):
    out = str(tmp_path / "lm.zarr")
    report = convert(DS_REAL, out, "fmri_lm", participant_label=["hcp1", "me1"], atlas_dir=atlas_dir, progress=False)
    assert report.count("complete") == 2
    store = Store.open(out)
    me1 = store.run("sub-me1_task-visual")["roi/tian_s3-schaefer400_7n"]
    assert me1.shape == (int(159 * 2.0 / 2.0) + 1, 450) and me1.attrs["labels"][0] == "HIP-head-m-rh"
    hcp = store.run_attrs("sub-hcp1_task-rest")
    # fMRI-LM's grid: round(dur / 2) + 1 frames over dur = 0.72 * 1199 s (tests/convert/test_conformance_roi.py)
    assert hcp["tr_s"] == 2.0 and hcp["source_tr_s"] == 0.72 and hcp["n_frames"] == round(1199 * 0.72 / 2.0) + 1
    roi = store.run("sub-hcp1_task-rest")["roi/Schaefer400x17subcortex19"]
    assert roi.shape == (433, 419) and roi.attrs["normalization"] == {"kind": "none"}  # raw parcel means
    assert "bold" not in store.run("sub-me1_task-visual")
    assert HCP_PTSERIES.exists()
