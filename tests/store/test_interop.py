"""The store in other tools (:mod:`fmri_data.store.export`): xarray opens a run with labelled
dimensions and coordinates, an xarray DataTree of the complete runs, and a run written back
as NIfTI, CIFTI or TSV.

Two small stores are converted from real data once: one Haxby run with the neurostorm recipe
(LAS voxel order, resampled from TR 2.5 s to 2.0 s on NeuroSTORM's time grid, so the stored
frame times are not ``j * tr_s`` and the confounds stay at the source's 121 frames; the grid
cropped to 48x56x48 and a Schaefer-400 ROI series added to keep it to seconds) and the HCP
parcellated CIFTI run of ds-real with the default recipe.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr
from conftest import DS_REAL, haxby_run, make_bids

from fmri_data.errors import SettingError, StoreError
from fmri_data.store.export import array_dimensions, export_run, open_datatree
from fmri_data.store.root import Store
from fmri_data.store.validate import validate_store

HAXBY = "sub-haxby1_task-objectviewing_run-01"
HCP = "sub-hcp1_task-rest"
HCP_SOURCE = (DS_REAL / "derivatives/preproc/sub-hcp1/func/"
              "sub-hcp1_task-rest_space-fsLR_seg-Schaefer400x17subcortex19_bold.ptseries.nii")


@pytest.fixture(scope="module")
def volume_store(tmp_path_factory, atlas_dir) -> str:
    from fmri_data.convert import convert

    root = tmp_path_factory.mktemp("bids")
    confounds = next((DS_REAL / "derivatives/preproc/sub-haxby1/func").glob("*_run-01_desc-confounds_timeseries.tsv"))
    make_bids(root, {
        f"sub-haxby1/func/{haxby_run(1).name}": haxby_run(1),
        "task-objectviewing_bold.json": DS_REAL / "task-objectviewing_bold.json",
        "derivatives/preproc/dataset_description.json":
            '{"Name": "p", "BIDSVersion": "1.9.0", "DatasetType": "derivative", "GeneratedBy": [{"Name": "x"}]}',
        f"derivatives/preproc/sub-haxby1/func/{confounds.name}": confounds,
    })
    out = str(tmp_path_factory.mktemp("interop") / "ns.zarr")
    overrides = ["temporal.tr=2.0", "volume.shape=[48,56,48]", "roi={atlases: [schaefer400_7n], normalization: none}"]
    report = convert(root, out, "neurostorm", overrides=overrides, atlas_dir=atlas_dir, progress=False)
    assert report.count("complete") == 1, [r.error for r in report.failed]
    return out


@pytest.fixture(scope="module")
def hcp_store(tmp_path_factory, atlas_dir) -> str:
    from fmri_data.convert import convert

    out = str(tmp_path_factory.mktemp("interop") / "hcp.zarr")
    report = convert(DS_REAL, out, "default", participant_label=["hcp1"], atlas_dir=atlas_dir, progress=False)
    assert report.count("complete") == 1, [r.error for r in report.failed]
    return out


def _run(url: str, run_id: str) -> tuple[zarr.Group, dict]:
    store = Store.open(url)
    return store.run(run_id), store.run_attrs(run_id)


# ----------------------------------------------------------------------------- xarray
def test_open_zarr_gives_labelled_dimensions_with_time_in_seconds(volume_store):
    group, attrs = _run(volume_store, HAXBY)
    ds = xr.open_zarr(volume_store, group=f"runs/{HAXBY}", consolidated=False)
    assert ds["bold"].dims == ("time", "x", "y", "z")
    assert ds["brain_mask"].dims == ("x", "y", "z")
    times = np.asarray(attrs["temporal"]["frame_times_s"])
    assert not np.allclose(times, np.arange(len(times)) * attrs["tr_s"])  # the NeuroSTORM grid, not j * TR
    np.testing.assert_array_equal(ds["time"].values, times)
    assert ds["time"].dtype == np.float64 and ds["time"].attrs["units"] == "s"
    # confounds stay at the source frames: their own time axis (one "time" would clash: 121 vs 151)
    assert ds["confounds"].dims == ("time_source", "confound") and ds.sizes["time_source"] == 121 != ds.sizes["time"]
    np.testing.assert_allclose(ds["time_source"].values, np.arange(121) * 2.5)
    assert list(ds["confound"].values) == list(group["confounds"].attrs["columns"])


def test_open_zarr_voxel_coordinates_are_the_stored_affine_in_mm(volume_store):
    group, attrs = _run(volume_store, HAXBY)
    affine = np.asarray(attrs["volume"]["affine"])
    ds = xr.open_zarr(volume_store, group=f"runs/{HAXBY}", consolidated=False)
    assert affine[0, 0] < 0 and np.all(np.diff(ds["x"].values) < 0)  # LAS: x decreases along the stored axis
    for axis, name in enumerate("xyz"):
        np.testing.assert_allclose(ds[name].values, affine[axis, axis] * np.arange(ds.sizes[name]) + affine[axis, 3])
        assert ds[name].attrs["units"] == "mm"
    # a voxel picked by its world coordinates is the voxel the affine maps there
    mask = group["brain_mask"][...]
    i, j, k = np.argwhere(mask)[len(np.argwhere(mask)) // 2]
    x, y, z, _ = affine @ [i, j, k, 1]
    frame = 7
    picked = ds["bold"].sel(time=ds["time"].values[frame], x=x, y=y, z=z).values
    assert picked == group["bold"][frame, i, j, k]


def test_open_zarr_roi_group_has_parcel_labels_and_time(volume_store, hcp_store):
    for url, run_id, key in [(volume_store, HAXBY, "schaefer400_7n"), (hcp_store, HCP, "Schaefer400x17subcortex19")]:
        group, attrs = _run(url, run_id)
        ds = xr.open_zarr(url, group=f"runs/{run_id}/roi", consolidated=False)
        assert ds[key].dims == ("time", "parcel")
        assert list(ds["parcel"].values) == list(group[f"roi/{key}"].attrs["labels"])
        np.testing.assert_array_equal(ds["time"].values, attrs["temporal"]["frame_times_s"])
        label = ds["parcel"].values[5]
        np.testing.assert_array_equal(ds[key].sel(parcel=label).values, group[f"roi/{key}"][:, 5])


def test_array_dimensions_separate_the_parcels_of_several_atlases():
    assert array_dimensions("roi/a", 2, ["a"]) == ("time", "parcel")
    assert array_dimensions("roi/a", 2, ["a", "b"]) == ("time", "parcel_a")
    assert array_dimensions("saliency/dvars/topk", 1, []) == ("rank",)
    assert array_dimensions("saliency/dvars/scores", 1, []) == ("window",)
    assert array_dimensions("flat", 3, []) == ("time", "row", "col")
    assert array_dimensions("bold", 3, []) is None  # not the documented rank: keep what was written


def test_coordinates_are_not_outputs_and_the_store_stays_valid(volume_store):
    group, attrs = _run(volume_store, HAXBY)
    assert attrs["outputs"] == ["bold", "brain_mask", "roi/schaefer400_7n", "confounds"]
    assert {"time", "x", "y", "z", "time_source", "confound", "roi/time", "roi/parcel"} <= {
        p for p, a in group.members(max_depth=None) if isinstance(a, zarr.Array)}
    assert group["time"].shards is None and group["time"].chunks == group["time"].shape
    assert validate_store(volume_store, deep=True) == []


def test_open_datatree_holds_the_complete_runs_only(volume_store, tmp_path):
    import shutil

    url = str(tmp_path / "copy.zarr")
    shutil.copytree(volume_store, url)
    store = Store.open(url)
    store.begin_run("sub-haxby1_task-objectviewing_run-02")  # a run being written: in _staging/
    store.claim("sub-haxby1_task-objectviewing_run-02")
    tree = open_datatree(url)
    assert sorted(tree.groups) == ["/", "/runs", f"/runs/{HAXBY}", f"/runs/{HAXBY}/roi"]
    assert tree.attrs["recipe"]["name"] == "neurostorm"
    run = tree[f"runs/{HAXBY}"]
    assert run["bold"].dims == ("time", "x", "y", "z") and run.attrs["run_id"] == HAXBY
    assert tree[f"runs/{HAXBY}/roi"]["schaefer400_7n"].dims == ("time", "parcel")


# ----------------------------------------------------------------------------- export
def test_export_nifti_round_trips_bold_with_the_store_affine_and_tr(volume_store, tmp_path):
    group, attrs = _run(volume_store, HAXBY)
    out = export_run(volume_store, HAXBY, "nifti", out=tmp_path / "bold.nii.gz")
    img = nib.load(out)
    bold = group["bold"][...]
    assert img.shape == (48, 56, 48, 151) and img.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.moveaxis(bold, 0, -1).astype(np.float32))
    np.testing.assert_allclose(img.affine, attrs["volume"]["affine"])
    assert img.header.get_zooms() == (2.0, 2.0, 2.0, attrs["tr_s"])
    assert img.header.get_xyzt_units() == ("mm", "sec")
    assert float(img.header["toffset"]) == attrs["temporal"]["frame_times_s"][0]
    assert int(img.header["sform_code"]) == 2  # resampled by world coordinates: "aligned", not "MNI152"
    mask = nib.load(export_run(volume_store, HAXBY, "nifti", array="brain_mask", out=tmp_path / "mask.nii"))
    np.testing.assert_array_equal(np.asarray(mask.dataobj).astype(bool), group["brain_mask"][...])


def test_export_tsv_header_is_the_parcel_labels(hcp_store, tmp_path):
    group, _ = _run(hcp_store, HCP)
    roi = group["roi/Schaefer400x17subcortex19"]
    out = export_run(hcp_store, HCP, "tsv", out=tmp_path / "roi.tsv")
    table = pd.read_csv(out, sep="\t")
    assert list(table.columns) == list(roi.attrs["labels"]) and len(table.columns) == 419
    np.testing.assert_array_equal(table.to_numpy(np.float32), roi[...])


def test_export_cifti_round_trips_the_parcellated_series(hcp_store, tmp_path):
    group, attrs = _run(hcp_store, HCP)
    out = export_run(hcp_store, HCP, "cifti", out=tmp_path / "roi.ptseries.nii")
    img, source = nib.load(out), nib.load(HCP_SOURCE)
    np.testing.assert_array_equal(img.get_fdata(dtype=np.float32), group["roi/Schaefer400x17subcortex19"][...])
    assert img.header.get_axis(1) == source.header.get_axis(1)
    series = img.header.get_axis(0)
    assert series.size == 1200 and series.step == pytest.approx(attrs["tr_s"]) and series.unit == "SECOND"
    assert img.nifti_header.get_intent()[0] == "ConnParcelSries"


def test_export_refuses_what_the_format_cannot_hold(volume_store, hcp_store, tmp_path):
    with pytest.raises(SettingError, match="CIFTI") as cifti:
        export_run(volume_store, HAXBY, "cifti", out=tmp_path / "x.ptseries.nii")
    with pytest.raises(SettingError, match="no array 'bold'") as nifti:
        export_run(hcp_store, HCP, "nifti", out=tmp_path / "x.nii.gz")
    assert "\n" not in str(cifti.value) + str(nifti.value)
    assert os.listdir(tmp_path) == []


def test_export_never_overwrites_unless_asked(hcp_store, tmp_path):
    out = tmp_path / "roi.tsv"
    out.write_text("mine\n")
    with pytest.raises(StoreError, match="exists"):
        export_run(hcp_store, HCP, "tsv", out=out)
    assert out.read_text() == "mine\n"
    export_run(hcp_store, HCP, "tsv", out=out, overwrite=True)
    assert out.read_text().startswith("17Networks_LH_VisCent_ExStr_1\t")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["roi.tsv"]  # no temporary file left


def test_export_command(hcp_store, tmp_path):
    from typer.testing import CliRunner

    from fmri_data.cli.main import app

    out = tmp_path / "hcp.tsv"
    runner = CliRunner()
    result = runner.invoke(app, ["export", hcp_store, HCP, "--to", "tsv", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert Path(out).is_file() and f"wrote {out}" in result.output
    again = runner.invoke(app, ["export", hcp_store, HCP, "--to", "nifti", "--out", str(tmp_path / "b.nii.gz")])
    assert again.exit_code == 2 and "no array 'bold'" in again.output


@pytest.mark.parametrize("n_frames", [1080, 1085, 7])  # whole shards, a padded last chunk, one partial shard
@pytest.mark.parametrize("dtype, cname, shuffle", [("float16", "lz4", "shuffle"), ("float32", "zstd", "bitshuffle")])
def test_shard_files_are_the_bytes_zarr_writes(tmp_path, n_frames, dtype, cname, shuffle):
    """The converter encodes shard files itself (ShardEncoder): byte for byte what Zarr writes
    for the same values (synthetic values; Zarr's own write is the reference)."""
    from fmri_data.store.direct import ShardEncoder
    from fmri_data.store.layout import compressors

    codec = {"cname": cname, "clevel": 5, "shuffle": shuffle}
    array = zarr.open_group(str(tmp_path / "s.zarr"), mode="w").create_array(
        "bold", shape=(n_frames, 6, 7, 5), chunks=(20, 6, 7, 5), shards=(100, 6, 7, 5), dtype=dtype,
        compressors=compressors(codec, np.dtype(dtype).itemsize), fill_value=0, config={"write_empty_chunks": True})
    values = np.random.default_rng(0).standard_normal((n_frames, 6, 7, 5)).astype(dtype)
    values[:, :3] = 0  # a compressible part
    array[...] = values
    encoder = ShardEncoder.of(array)
    for shard in range((n_frames + 99) // 100):
        written = (tmp_path / "s.zarr" / "bold" / encoder.key(shard)).read_bytes()
        chunks = [encoder.chunk(np.ascontiguousarray(values[a:min(a + 20, n_frames)]))
                  for a in range(shard * 100, min((shard + 1) * 100, n_frames), 20)]
        assert b"".join(encoder.pieces(chunks)) == written
    with pytest.raises(ValueError, match="chunk"):
        encoder.chunk(np.ascontiguousarray(values[:3, :2]))
