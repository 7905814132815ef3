"""Model-exact ROI recipes: what ``fmri_lm``, ``brain_jepa`` and ``brainlm`` store, checked
against known answers taken from each model's released preprocessing.

References (see the header of each ``pipelines/<name>.yaml``):

* fMRI-LM, yuxiangwei0808/fMRI-LM @ 037dcf9dd06b9c10e2ebc1a1018e1796650aa2b8
* Brain-JEPA, Eric-LRL/Brain-JEPA @ b1dfa93eb331d1e70476446b06fc8a1ac3c92345
* BrainLM, vandijklab/BrainLM @ b591d88d0efffc0f059c73dfca1f293554795af1

"Raw parcel means" are this project's parcel operator (checked against nilearn's
``NiftiLabelsMasker`` in ``tests/derive/test_roi.py``) applied to the source frames.
"""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from conftest import ATLASES, DS_REAL, HCP_PTSERIES, haxby_run, make_bids
from fmri_data.config.recipe import load_recipe
from fmri_data.convert import convert
from fmri_data.derive.roi import normalize_parcels, volume_parcel_operator
from fmri_data.errors import SettingError
from fmri_data.read.nifti import open_volume
from fmri_data.reference.atlases import load_atlas
from fmri_data.resample.temporal import n_output_frames
from fmri_data.store.root import Store

RUN = "sub-haxby1_task-objectviewing_run-01"
HAXBY_TR = 2.5
HAXBY_FRAMES = 121


@pytest.fixture(scope="module")
def haxby_ds(tmp_path_factory, atlas_dir):
    """One real Haxby run (121 frames, TR 2.5 s from the sidecar) in a small BIDS tree."""
    root = tmp_path_factory.mktemp("conformance") / "ds"
    return make_bids(
        root,
        {
            f"sub-haxby1/func/{RUN}_bold.nii.gz": haxby_run(1),
            "task-objectviewing_bold.json": json.dumps({"TaskName": "objectviewing", "RepetitionTime": HAXBY_TR}),
        },
    )


def _convert(ds, tmp_path_factory, recipe: str, atlas_dir, **kwargs) -> Store:
    out = str(tmp_path_factory.mktemp(recipe) / f"{recipe}.zarr")
    report = convert(ds, out, recipe, atlas_dir=atlas_dir, progress=False, **kwargs)
    assert not report.failed and report.count("complete") == 1, [r.error for r in report.failed]
    return Store.open(out)


@pytest.fixture(scope="module")
def jepa_store(haxby_ds, tmp_path_factory, atlas_dir):
    return _convert(haxby_ds, tmp_path_factory, "brain_jepa", atlas_dir)


@pytest.fixture(scope="module")
def lm_store(haxby_ds, tmp_path_factory, atlas_dir):
    return _convert(haxby_ds, tmp_path_factory, "fmri_lm", atlas_dir)


@pytest.fixture(scope="module")
def brainlm_store(haxby_ds, tmp_path_factory, atlas_dir):
    return _convert(haxby_ds, tmp_path_factory, "brainlm", atlas_dir)


def raw_parcel_means(atlas_name: str) -> np.ndarray:
    """``(121, R)`` float64 parcel means of Haxby run 1 at its own TR, un-normalized."""
    vol = open_volume(haxby_run(1))
    frames = vol.read().astype(np.float64)
    op = volume_parcel_operator(load_atlas(atlas_name, ATLASES), vol.shape[:3], vol.affine)
    return np.asarray(op.matrix @ frames.reshape(-1, frames.shape[3])).T


def tian_s3_names() -> list[str]:
    with open(ATLASES / "atlas-TianS3_dseg.tsv") as f:
        rows = sorted((int(r["index"]), r["label"]) for r in csv.DictReader(f, delimiter="\t"))
    return [name for index, name in rows if index != 0]


def schaefer_names(networks: int) -> list[str]:
    text = (ATLASES / f"atlas-Schaefer2018_desc-400Parcels{networks}Networks_labels.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------- recipes name their reference


@pytest.mark.parametrize(
    "name, commit",
    [
        ("fmri_lm", "yuxiangwei0808/fMRI-LM @ 037dcf9dd06b9c10e2ebc1a1018e1796650aa2b8"),
        ("brain_jepa", "Eric-LRL/Brain-JEPA @ b1dfa93eb331d1e70476446b06fc8a1ac3c92345"),
        ("brainlm", "vandijklab/BrainLM @ b591d88d0efffc0f059c73dfca1f293554795af1"),
    ],
)
def test_recipe_names_its_reference_and_deviations(name, commit):
    """Each model recipe's header names the reference repo + commit, lists deliberate
    deviations, and says which tool computes the dataset statistics."""
    from fmri_data.config.resources import pipelines_dir

    header = (pipelines_dir() / f"{name}.yaml").read_text().split("\nname:")[0]
    assert commit in header
    assert "Deliberate deviations" in header and "`fmri-data stats`" in header


def test_recipe_settings_are_the_references():
    """fMRI-LM: TR 2.0 on its linspace grid, linear, no anti-alias (temporal_resample.py
    l.143-182), Tian S3 + Schaefer-400 7N, raw values. Brain-JEPA: no TR resampling, Tian S3 +
    Schaefer-400 17N (ukbiobank_scale.py l.50-63), raw values. BrainLM: A424, no TR
    resampling, demeaned per parcel (BrainLM_Toolkit.py l.141-174), 200-frame chunks."""
    lm, jepa, blm = load_recipe("fmri_lm"), load_recipe("brain_jepa"), load_recipe("brainlm")
    assert lm["temporal"] == {"tr": 2.0, "grid": "fmri_lm", "interpolation": "linear", "antialias": False}
    assert lm["roi"] == {"atlases": ["tian_s3+schaefer400_7n"], "normalization": "none"}
    assert jepa["temporal"]["tr"] is None
    assert jepa["roi"] == {"atlases": ["tian_s3+schaefer400_17n"], "normalization": "none"}
    assert blm["temporal"]["tr"] is None
    assert blm["roi"] == {"atlases": ["a424"], "normalization": "demean"}
    assert blm["store"]["chunk_frames"] == 200
    assert lm["volume"] is None and jepa["volume"] is None and blm["volume"] is None


# ---------------------------------------------------------------- demean (pure)


def test_demean_is_the_run_mean_removed_per_parcel_and_never_divided():
    """BrainLM (BrainLM_Toolkit.py l.141-174): each parcel minus its mean over the run; the
    signal is not divided (a large-variance parcel keeps its scale)."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(50, 3)) * [1.0, 10.0, 100.0] + [5.0, -3.0, 1000.0]).astype(np.float32)
    y, params, arrays = normalize_parcels(x, "demean")
    assert y.dtype == np.float32 and params == {"kind": "demean"} and set(arrays) == {"center"}
    np.testing.assert_allclose(y, x.astype(np.float64) - x.astype(np.float64).mean(axis=0), atol=1e-4)
    np.testing.assert_allclose(y.std(axis=0), x.std(axis=0), rtol=1e-5)
    np.testing.assert_allclose(y + arrays["center"], x, rtol=1e-6)
    np.testing.assert_array_equal(normalize_parcels(x, "none")[0], x)
    with pytest.raises(SettingError, match="unknown ROI normalization 'mean'"):
        normalize_parcels(x, "mean")


# ---------------------------------------------------------------- Brain-JEPA


def test_brain_jepa_tian_s3_then_schaefer_17n_at_the_source_tr(jepa_store):
    """Brain-JEPA (ukbiobank_scale.py l.50-63): 450 ROIs = the 50 Tian S3 parcels (``index``
    order of atlas-TianS3_dseg.tsv) then Schaefer-400 in 17-network order (file order of
    the 400Parcels17Networks labels), no TR resampling (121 frames at 2.5 s), raw parcel means."""
    attrs = jepa_store.run_attrs(RUN)
    assert attrs["n_frames"] == HAXBY_FRAMES == attrs["n_frames_source"] and attrs["tr_s"] == HAXBY_TR
    roi = jepa_store.run(RUN)["roi/tian_s3-schaefer400_17n"]
    assert roi.shape == (HAXBY_FRAMES, 450)
    names = tian_s3_names() + schaefer_names(17)
    assert len(names) == 450 and roi.attrs["labels"] == names
    assert roi.attrs["labels"][50] != schaefer_names(7)[0]  # 17-network order, not 7
    assert roi.attrs["normalization"] == {"kind": "none"}
    np.testing.assert_allclose(roi[...], raw_parcel_means("tian_s3+schaefer400_17n"), rtol=1e-5, atol=1e-3)


# ---------------------------------------------------------------- fMRI-LM


def test_fmri_lm_stores_raw_parcel_means_on_its_grid(lm_store):
    """fMRI-LM: parcel means with standardize=False (raw), Tian S3 then Schaefer-400 7N, on
    the temporal_resample.py grid linspace(0, dur, round(dur / 2) + 1), linear interpolation,
    no anti-aliasing: Haxby 121 x 2.5 s -> 151 frames, each column np.interp of the raw means."""
    roi = lm_store.run(RUN)["roi/tian_s3-schaefer400_7n"]
    assert roi.attrs["labels"] == tian_s3_names() + schaefer_names(7)
    assert roi.attrs["normalization"] == {"kind": "none"}
    dur = HAXBY_TR * (HAXBY_FRAMES - 1)
    times = np.linspace(0.0, dur, int(round(dur / 2.0)) + 1)
    assert roi.shape == (151, 450) == (len(times), 450)
    raw = raw_parcel_means("tian_s3+schaefer400_7n")
    expected = np.stack([np.interp(times, np.arange(HAXBY_FRAMES) * HAXBY_TR, raw[:, r]) for r in range(450)], axis=1)
    stored = roi[...]
    np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-3)
    assert np.abs(stored.mean(axis=0)).max() > 10  # not z-scored: scanner units survive


def test_fmri_lm_hcp_ptseries_on_the_fmri_lm_grid(tmp_path_factory, atlas_dir):
    """fMRI-LM temporal_resample.py l.143-182 on real HCP data: 1200 frames at 0.72 s ->
    round(0.72 * 1199 / 2) + 1 = 433 frames at linspace(0, 0.72 * 1199, 433), each parcel
    np.interp of the source (no anti-aliasing), values un-normalized. A parcellated CIFTI
    keeps its own 419 parcels in its own order (recipe atlases apply to volume/dense inputs)."""
    store = _convert(DS_REAL, tmp_path_factory, "fmri_lm", atlas_dir, participant_label=["hcp1"])
    run = "sub-hcp1_task-rest"
    attrs = store.run_attrs(run)
    assert attrs["tr_s"] == 2.0 and attrs["source_tr_s"] == 0.72 and attrs["n_frames"] == 433
    img = nib.load(HCP_PTSERIES)
    source = np.asarray(img.dataobj, dtype=np.float64)  # (1200, 419)
    assert source.shape == (1200, 419) and n_output_frames(1200, 0.72, 2.0, "fmri_lm") == 433
    roi = store.run(run)["roi/Schaefer400x17subcortex19"]
    assert roi.shape == (433, 419)
    assert roi.attrs["labels"] == list(img.header.get_axis(1).name)
    assert roi.attrs["normalization"] == {"kind": "none"}
    times = np.linspace(0.0, 0.72 * 1199, 433)
    expected = np.stack([np.interp(times, np.arange(1200) * 0.72, source[:, r]) for r in range(419)], axis=1)
    np.testing.assert_allclose(roi[...], expected, rtol=1e-5, atol=1e-4 * np.abs(source).max())


# ---------------------------------------------------------------- BrainLM


def test_brainlm_stores_demeaned_a424_series(brainlm_store):
    """BrainLM (BrainLM_Toolkit.py l.141-174): A424 labels 1..424 averaged, no TR handling,
    each parcel demeaned over the run: stored = raw parcel means - their mean over time
    (mean ~0, spread unchanged); the mean removed is kept as attrs normalization.center."""
    attrs = brainlm_store.run_attrs(RUN)
    assert attrs["n_frames"] == HAXBY_FRAMES and attrs["tr_s"] == HAXBY_TR
    roi = brainlm_store.run(RUN)["roi/a424"]
    assert roi.shape == (HAXBY_FRAMES, 424)
    assert roi.attrs["labels"] == [f"A424_{v:03d}" for v in range(1, 425)]
    stored = roi[...]
    raw = raw_parcel_means("a424")
    present = raw.std(axis=0) > 0  # parcels outside Haxby's field of view are constant 0
    assert present.sum() > 100
    np.testing.assert_allclose(stored.mean(axis=0), 0, atol=1e-3)
    np.testing.assert_allclose(stored, raw - raw.mean(axis=0), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(stored[:, present].std(axis=0), raw[:, present].std(axis=0), rtol=1e-4)
    assert roi.attrs["normalization"]["kind"] == "demean"
    np.testing.assert_allclose(roi.attrs["normalization"]["center"], raw.mean(axis=0), rtol=1e-5, atol=1e-3)
