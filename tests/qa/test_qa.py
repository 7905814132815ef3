"""BOLD quality metrics (fmri_data/derive/qa.py, convert/qa.py) and the HTML QA report."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import stats
from conftest import DS_REAL, HCP_PTSERIES, haxby_run, make_bids

from fmri_data.derive import qa_metrics as iqm
from fmri_data.qa.report import Thresholds, render_report, robust_z
from fmri_data.qa.table import METRICS, read_qa_table
from fmri_data.store.root import Store

CONFOUNDS = DS_REAL / "derivatives" / "preproc" / "sub-haxby1" / "func"
HAXBY_IDS = [f"sub-haxby1_task-objectviewing_run-{n:02d}" for n in range(1, 13)]


# ----------------------------------------------------------------------------- worked examples
# Small synthetic arrays whose answers are worked out by hand below (from MRIQC's / AFNI's /
# nipype's published definitions), so that a change of definition fails loudly.


def test_tsnr_worked_example():
    # channel 0: 1, 3, 5 -> mean 3, std sqrt(8/3) = 1.632993 -> 1.837117; channel 1 constant -> 0 (nipype)
    x = np.array([[1.0, 2.0], [3.0, 2.0], [5.0, 2.0]])
    np.testing.assert_allclose(iqm.tsnr_map(x), [3 / math.sqrt(8 / 3), 0.0])
    assert iqm.tsnr(x) == pytest.approx(1.837117 / 2, rel=1e-6)  # median of the two channels


def test_dvars_worked_example_nichols_2013():
    # v1 = 0 2 0 2, v2 = 1 1 3 3 (4 frames, 2 voxels), no intensity scaling.
    # Robust std ("lower" percentiles): IQR 2 - 0 = 2 and 3 - 1 = 2 -> s = 2 / 1.349 = 1.482580 for both.
    # AR(1): demeaned v1 -1 1 -1 1 -> (-1 -1 -1) / 4 = -0.75; demeaned v2 -1 -1 1 1 -> (1 - 1 + 1) / 4 = 0.25.
    # sigma_v = sqrt(2 (1 - r)) s: v1 sqrt(3.5) * 2 / 1.349, v2 sqrt(1.5) * 2 / 1.349; their mean
    # (sqrt(3.5) + sqrt(1.5)) / 1.349 = 2.294718.
    # Differences: v1 2 -2 2, v2 0 2 0 -> nstd = sqrt(mean D^2) = sqrt(2), 2, sqrt(2); std = nstd / 2.294718.
    # vstd(1) = sqrt((2 / sigma_1)^2 / 2) = 1.349 / sqrt(7) = 0.509874,
    # vstd(2) = sqrt(((2 / sigma_1)^2 + (2 / sigma_2)^2) / 2) = 1.349 sqrt((1 / 3.5 + 1 / 1.5) / 2) = 0.930898.
    x = np.array([[0.0, 1.0], [2.0, 1.0], [0.0, 3.0], [2.0, 3.0]])
    d = iqm.dvars(x, intensity=None)
    np.testing.assert_allclose(d["nstd"], [math.sqrt(2), 2.0, math.sqrt(2)], rtol=1e-6)
    np.testing.assert_allclose(d["std"], np.array([math.sqrt(2), 2.0, math.sqrt(2)]) / 2.294718, rtol=1e-6)
    np.testing.assert_allclose(d["vstd"], [0.509874, 0.930898, 0.509874], rtol=1e-5)
    # nipype scales to median 1000 first (median of 0 0 1 1 2 2 3 3 = 1.5): nstd scales, std/vstd do not.
    scaled = iqm.dvars(x)
    np.testing.assert_allclose(scaled["nstd"], d["nstd"] * 1000 / 1.5, rtol=1e-5)
    np.testing.assert_allclose(scaled["std"], d["std"], rtol=1e-5)
    np.testing.assert_allclose(scaled["vstd"], d["vstd"], rtol=1e-5)


def test_fd_power_worked_example_and_mriqc_summary():
    # t1: |0.1| + 50 * |0.001| = 0.15 mm; t2: |0.2| + 50 * |0.002| = 0.3 mm (Power et al. 2012)
    columns = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
    motion = np.array([[0, 0, 0, 0, 0, 0], [0.1, 0, 0, 0, 0, 0.001], [0.1, 0.2, 0, 0, 0.002, 0.001]])
    fd = iqm.framewise_displacement(columns, motion)
    np.testing.assert_allclose(fd, [0.0, 0.15, 0.3])
    # MRIQC: mean over the T-1 transitions, count above threshold, percent of T frames
    assert iqm.fd_summary(fd, 0.2) == pytest.approx({"fd_mean": 0.225, "fd_num": 1, "fd_perc": 100 / 3})


def test_gcor_is_the_mean_correlation():
    t = np.arange(20.0)
    assert iqm.gcor(np.stack([np.sin(t), 3 * np.sin(t) + 1], axis=1)) == pytest.approx(1.0)
    assert iqm.gcor(np.stack([np.sin(t), -np.sin(t)], axis=1)) == pytest.approx(0.0, abs=1e-12)
    x = np.random.default_rng(0).normal(size=(50, 7))
    assert iqm.gcor(x) == pytest.approx(np.corrcoef(x.T).mean())


def test_outlier_fraction_3dtoutcount_worked_example():
    # channel 0: 1..9, 100: median 5.5, MAD 2.5, alpha = Qinv(0.001 / 10) = 3.719016,
    # threshold 3.719016 * sqrt(pi / 2) * 2.5 = 11.6527 -> only |100 - 5.5| = 94.5 is an outlier.
    x = np.stack([np.r_[np.arange(1.0, 10.0), 100.0], np.zeros(10)], axis=1)
    assert 3.7190 < stats.norm.isf(1e-4) < 3.7191
    np.testing.assert_array_equal(iqm.outlier_fraction(x), [0] * 9 + [0.5])


def test_quality_index_3dtqual_worked_example():
    # median frame = 1 2 3 4; a frame ranked like it gives 1 - 1 = 0, the reversed ranking 1 - (-1) = 2
    x = np.array([[1.0, 2, 3, 4], [1.0, 2, 3, 4], [4.0, 3, 2, 1]])
    np.testing.assert_allclose(iqm.quality_index(x), [0, 0, 2], atol=1e-12)


def test_quality_index_is_one_minus_scipy_spearman_with_ties():
    x = np.random.default_rng(1).integers(0, 6, size=(5, 40)).astype(np.float32)  # many ties
    ref = np.median(x, axis=0)
    expected = [1 - stats.spearmanr(frame, ref).statistic for frame in x]
    np.testing.assert_allclose(iqm.quality_index(x), expected, rtol=1e-10)
    np.testing.assert_array_equal(iqm.average_ranks(x[0]), stats.rankdata(x[0]))


def test_spatial_metrics_worked_examples():
    # EFC: a uniform image reaches E_max (EFC = 1); all energy in one voxel gives 0
    assert iqm.efc(np.full((4, 4, 4), 7.0)) == pytest.approx(1.0)
    spike = np.zeros((4, 4, 4))
    spike[1, 2, 3] = 5.0
    assert iqm.efc(spike) == pytest.approx(0.0, abs=1e-12)
    # FBER: median energy 10^2 inside, 1^2 outside; a zero background is undefined
    image = np.ones((2, 4, 1))
    mask = np.zeros_like(image, dtype=bool)
    mask[0, :2] = True
    image[mask] = 10.0
    assert iqm.fber(image, mask) == pytest.approx(100.0)
    assert math.isnan(iqm.fber(np.where(mask, image, 0.0), mask))
    # GSR along y on a 1 x 8 x 1 line: brain y=1,2 (10), ghost y=5,6 (2), rest (1): (2 - 1) / 10
    line = np.array([1, 10, 10, 1, 1, 2, 2, 1], dtype=float).reshape(1, 8, 1)
    brain = (line == 10)
    assert iqm.ghost_to_signal(line, brain, axis=1) == pytest.approx(0.1)


def test_non_steady_state_worked_example():
    # median 1.05, MAD 0.15: z = 0.6745 * 3.95 / 0.15 = 17.8, 0.6745 * 1.95 / 0.15 = 8.8, then 0.22 -> 2 dummies
    g = np.array([5, 3, 1.1, 0.9, 1.2, 0.8, 1.0, 1.1, 0.9, 1.0])
    assert iqm.non_steady_state(g) == 2
    assert iqm.non_steady_state(np.ones(30)) == 0


def test_frames_dropped_and_robust_z():
    assert iqm.frames_dropped(10, 1.0, 4, 3.0) == 0  # last stored frame at 9 s = last source frame
    assert iqm.frames_dropped(10, 1.0, 3, 4.0) == 1  # last stored frame at 8 s: the frame at 9 s is lost
    # median 3, MAD 1 -> z = (x - 3) / 1.4826
    np.testing.assert_allclose(robust_z(np.array([1, 2, 3, 4, 5.0, np.nan]))[:5], (np.arange(1, 6) - 3) / 1.4826)
    assert np.isnan(robust_z(np.array([1.0, np.nan]))[1])
    # median 0, MAD 0 -> the mean absolute deviation (0.25) * 1.2533 is the scale
    np.testing.assert_allclose(robust_z(np.array([0, 0, 0, 1.0])), [0, 0, 0, 1 / (0.25 * 1.2533)], rtol=1e-6)


def test_robust_z_degenerate_spread_gives_no_z():
    """Synthetic values with known answers: a spread that is 0, below the metric's resolution
    or below 1 % of the median gives no z (NaN) and a reason, never an exploding z."""
    from fmri_data.qa.report import robust_scale

    # FD > thr (frames): 11 runs with none, one run with one frame. MAD = 0; the mean absolute
    # deviation 1/12 * 1.2533 = 0.104 (the old fallback gave z = +9.6) is below one frame.
    one_frame = np.r_[np.zeros(11), 1.0]
    assert np.isnan(robust_z(one_frame, resolution=1.0)).all()
    scale, why = robust_scale(one_frame, resolution=1.0)
    assert scale is None and "resolution" in why
    # 30 frames over the threshold is a real deviation: scale 1.2533 * 30 / 12, z = 12 / 1.2533
    thirty = np.r_[np.zeros(11), 30.0]
    assert robust_scale(thirty, resolution=1.0) == (pytest.approx(1.2533 * 2.5), "1.2533 mean absolute deviation")
    assert robust_z(thirty, resolution=1.0)[-1] == pytest.approx(12 / 1.2533)
    # EFC-like: runs agreeing to 0.1 %: 1.4826 MAD = 0.00044 < 1 % of the median (0.0045) -> no z
    efc = np.array([0.4500, 0.4503, 0.4497, 0.4501, 0.4499, 0.4480])
    assert np.isnan(robust_z(efc)).all() and "1 %" in robust_scale(efc)[1]
    # all equal: no z
    assert robust_scale(np.full(5, 2.0)) == (None, "every run has the same value")
    # a healthy spread is unchanged: median 10, MAD 1 -> 1.4826
    assert robust_scale(np.array([8.0, 9, 10, 11, 12])) == (pytest.approx(1.4826), "1.4826 MAD")


def test_qa_is_not_part_of_the_recipe_hash():
    from fmri_data.config.recipe import load_recipe, recipe_hash

    base = load_recipe("default")
    assert base["qa"]["exclude"]["tsnr_min"] == 30
    changed = load_recipe("default", ["qa.exclude.tsnr_min=50", "qa.fd_threshold_mm=0.2"])
    assert recipe_hash(changed) == recipe_hash(base)


# ----------------------------------------------------------------------------- real data


def _canonical(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.as_closest_canonical(nib.load(path))
    return np.asarray(img.get_fdata(), dtype=np.float64), img.affine


def _source_mask(store: Store, run_id: str, shape, affine) -> np.ndarray:
    """The stored brain mask taken back to the source grid by nearest neighbour (what QA documents)."""
    from fmri_data.resample.spatial import grid_indices, resampling_matrix

    attrs = store.run_attrs(run_id)
    mask = np.asarray(store.run(run_id)["brain_mask"][:])
    back = resampling_matrix(mask.shape, np.array(attrs["volume"]["affine"]), grid_indices(shape), affine, order=0)
    return ((back @ mask.reshape(-1).astype(float)) > 0.5).reshape(shape)


def test_every_run_of_ds_real_has_metrics(real_store):
    store = Store.open(real_store)
    runs = store.run_ids()
    assert len(runs) == 15
    table = read_qa_table(store)
    assert sorted(table["run_id"]) == runs
    for run_id in runs:
        qa = store.run_attrs(run_id)["qa"]
        assert qa["dvars_std"] is not None and qa["gcor"] is not None, run_id
        assert qa["n_frames_source"] == store.run_attrs(run_id)["n_frames_source"]
    by_id = table.set_index("run_id")
    volume = by_id.loc[HAXBY_IDS]
    for key in ("tsnr", "fd_mean", "dvars_std", "dvars_vstd", "gcor", "aor", "aqi", "efc", "fber", "gsr"):
        assert volume[key].notna().all(), key
    assert (volume["kind"] == "volume").all() and (volume["gsr_axis"] == "y").all()
    # surface / parcel runs: the metrics that apply, the image metrics null
    surface = by_id.loc["sub-010188_ses-02_task-rest_acq-AP_run-01"]
    assert surface["kind"] == "gifti" and np.isnan(surface["efc"]) and np.isnan(surface["aor"])
    assert np.isnan(surface["fd_mean"])  # its 29 confound columns are unnamed: no FD
    hcp = by_id.loc["sub-hcp1_task-rest"]
    assert hcp["kind"] == "cifti_parcels" and hcp["n_channels"] == 419 and hcp["tsnr"] > 30
    # me1 is percent signal change, detrended, zero outside the brain: tSNR and FBER undefined, said so
    me1 = store.run_attrs("sub-me1_task-visual")["qa"]
    assert me1["tsnr"] is None and me1["fber"] is None
    assert any("demeaned" in n for n in me1["notes"]) and any("FBER" in n for n in me1["notes"])


def test_tsnr_and_dvars_match_numpy_on_real_haxby(real_store):
    store = Store.open(real_store)
    for n in (1, 7):
        run_id = HAXBY_IDS[n - 1]
        qa = store.run_attrs(run_id)["qa"]
        data, affine = _canonical(haxby_run(n))
        mask = _source_mask(store, run_id, data.shape[:3], affine)
        assert qa["n_channels"] == mask.sum()
        x = data[mask].T  # (T, N)
        tsnr = np.median(x.mean(axis=0) / x.std(axis=0))
        assert qa["tsnr"] == pytest.approx(tsnr, rel=1e-5)
        # DVARS (Power 2012) on data scaled to median 1000, and its standardized forms (Nichols 2013)
        y = x * 1000 / np.median(x)
        diff = np.diff(y, axis=0)
        nstd = np.sqrt((diff**2).mean(axis=1))
        q25, q75 = np.percentile(y, [25, 75], axis=0, method="lower")
        sd = (q75 - q25) / 1.349
        keep = sd > 1e-7
        dm = y[:, keep] - y[:, keep].mean(axis=0)
        ar1 = (dm[1:] * dm[:-1]).sum(axis=0) / (dm * dm).sum(axis=0)
        sigma = np.sqrt(2 * (1 - ar1)) * sd[keep]
        assert keep.all()
        assert qa["dvars_nstd"] == pytest.approx(nstd.mean(), rel=1e-4)
        assert qa["dvars_std"] == pytest.approx((nstd / sigma.mean()).mean(), rel=1e-4)
        vstd = np.sqrt(((diff / sigma) ** 2).mean(axis=1))
        assert qa["dvars_vstd"] == pytest.approx(vstd.mean(), rel=1e-4)
        np.testing.assert_allclose(qa["series"]["dvars_nstd"], nstd, rtol=1e-5)
        # EFC / FBER on the temporal mean image, as MRIQC
        mean = data.mean(axis=3)
        b = np.sqrt((mean**2).sum())
        e_max = mean.size * mean.size**-0.5 * np.log(mean.size**-0.5)
        assert qa["efc"] == pytest.approx(((mean / b) * np.log((mean + 1e-16) / b)).sum() / e_max, rel=1e-5)
        assert qa["fber"] == pytest.approx(np.median(mean[mask] ** 2) / np.median(mean[~mask] ** 2), rel=1e-5)


def test_tsnr_matches_numpy_on_real_hcp_parcels(real_store):
    qa = Store.open(real_store).run_attrs("sub-hcp1_task-rest")["qa"]
    x = np.asarray(nib.load(HCP_PTSERIES).get_fdata(), dtype=np.float64)
    assert qa["tsnr"] == pytest.approx(np.median(x.mean(axis=0) / x.std(axis=0)), rel=1e-5)
    np.testing.assert_allclose(qa["series"]["global_signal"], x.mean(axis=1), rtol=1e-5)


def test_fd_matches_power_formula_on_real_haxby_confounds(real_store):
    store = Store.open(real_store)
    for n, run_id in enumerate(HAXBY_IDS, start=1):
        table = pd.read_csv(CONFOUNDS / f"{run_id}_desc-confounds_timeseries.tsv", sep="\t")
        trans = table[["trans_x", "trans_y", "trans_z"]].to_numpy()
        rot = table[["rot_x", "rot_y", "rot_z"]].to_numpy()
        fd = np.abs(np.diff(trans, axis=0)).sum(axis=1) + 50 * np.abs(np.diff(rot, axis=0)).sum(axis=1)
        qa = store.run_attrs(run_id)["qa"]
        np.testing.assert_allclose(qa["series"]["fd"], np.r_[0, fd], rtol=1e-5, atol=1e-7)
        assert qa["fd_mean"] == pytest.approx(fd.mean(), rel=1e-5)
        assert qa["fd_num"] == int((fd > 0.5).sum())
        assert qa["fd_perc"] == pytest.approx(100 * (fd > 0.5).sum() / len(table), rel=1e-5)


# ----------------------------------------------------------------------------- figures and report


def _image(uri: str):
    """A figure's ``data:`` URI (WebP or PNG) as a PIL image."""
    from PIL import Image

    header, encoded = uri.split(",", 1)
    assert header in ("data:image/webp;base64", "data:image/png;base64"), header
    return Image.open(io.BytesIO(base64.b64decode(encoded)))


def _png_size(uri: str) -> tuple[int, int]:
    width, height = _image(uri).size
    return height, width


def test_flat_map_frame_figure_from_the_flat_contract(tmp_path):
    """A run with ``flat (T, H, W)`` + ``flat_mask (H, W)`` gets a flat-map figure (synthetic
    store-like group: the arrays follow the contract the flat-map writer uses)."""
    import zarr

    from fmri_data.qa.figures import run_figures

    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    h, w = 40, 80
    yy, xx = np.mgrid[:h, :w]
    mask = ((yy - 20) ** 2 / 18**2 + (xx - 20) ** 2 / 18**2 < 1) | ((yy - 20) ** 2 / 18**2 + (xx - 60) ** 2 / 18**2 < 1)
    flat = np.sin(xx / 7.0 + np.arange(6)[:, None, None]).astype(np.float16) * mask
    group.create_array("flat", data=flat)
    group.create_array("flat_mask", data=mask)
    figs = run_figures(group, {"outputs": [], "tr_s": 2.0, "source_tr_s": 2.0})
    assert [f["title"] for f in figs] == ["Flat map, frame 3"]
    assert min(_png_size(figs[0]["src"])) > 100


@pytest.fixture(scope="module")
def report_html(real_store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qa") / "report.html"
    result = render_report(real_store, out)
    assert result.n_runs == 15
    return out


def test_report_content(report_html, real_store):
    html = report_html.read_text()
    assert html.count('<section class="run"') == 15
    for key, label, _ in METRICS:
        assert f"<th data-type=\"num\">{label.replace('>', '&gt;')}</th>" in html
    assert "src=\"http" not in html and "<link rel=\"stylesheet\"" not in html  # self-contained
    assert html.count('src="data:image/') >= 15 * 2


def test_report_has_no_degenerate_z_and_compares_runs_of_one_kind(real_store, tmp_path):
    """ds-real: run-09 has one frame over the FD threshold (the other Haxby runs none) and
    sub-me1 is demeaned percent signal change (AQI 0.97 and EFC 0.18 against ~0.002 and ~0.45
    of raw Haxby intensities); neither is a robust-z outlier (the report used to say
    +9.6, +3326.8 and -98.6)."""
    result = render_report(real_store, tmp_path / "r.html", with_figures=False)
    zs = [float(item.rsplit("z = ", 1)[1].rstrip(")")) for items in result.outliers.values() for item in items]
    assert zs and all(abs(z) < 20 for z in zs), result.outliers
    assert HAXBY_IDS[8] not in result.outliers and "sub-me1_task-visual" not in result.outliers
    html = (tmp_path / "r.html").read_text()
    section = html[html.index('id="run-sub-haxby1_task-objectviewing_run-09"'):]
    assert "n/a <span class=\"meta\">(the runs&#39; spread is below the metric&#39;s resolution (1)" in section
    section = html[html.index('id="run-sub-me1_task-visual"'):]
    assert "robust z (vs volume, demeaned)" in section and "fewer than 3 runs of this kind" in section


def test_report_figures_per_kind_outline_and_undefined_tsnr(report_html):
    html = report_html.read_text()
    # distributions: one figure per kind with enough runs, never pooled
    assert 'alt="metric distributions: volume: 12 runs"' in html
    assert html.count('alt="metric distributions: ') == 1
    assert "cifti_parcels: 1 run(s), fewer than 3" in html and "gifti, demeaned: 1 run(s)" in html
    # mosaics carry the template outline; demeaned me1 gets no tSNR map, and says why
    haxby = html[html.index('id="run-sub-haxby1_task-objectviewing_run-01"'):html.index('id="run-sub-haxby1_task-objectviewing_run-02"')]
    assert len(re.findall("<figcaption>[^<]*red: edge of the MNI152", haxby)) == 2 and "world-coordinates" in haxby
    me1 = html[html.index('id="run-sub-me1_task-visual"'):]
    assert 'alt="tSNR map' not in me1 and "No tSNR map: tSNR is undefined for this run" in me1
    # carpets ordered by tissue class / network; me1's empty parcels explained in the caption
    assert "brain voxels grouped by tissue class" in haxby and "400 parcels grouped by network" in haxby
    assert "266 parcels grouped by network" in me1 and "58 parcels have no voxel in the field of view" in me1
    assert "76 parcels have no signal" in me1


def test_report_size_budget(report_html):
    """The report of ds-real's 15 runs was 6.5 MB (base64 PNG at 90 dpi); compressed images
    (WebP for pixels, palette PNG for line art) must keep it well under half of that."""
    size = report_html.stat().st_size
    print(f"QA report of 15 runs: {size / 1e6:.2f} MB")
    assert size < 2_500_000
    html = report_html.read_text()
    assert html.count('src="data:image/webp;base64,') >= 14 * 2  # carpets


def test_template_outline_and_tissue_classes_on_the_stored_grid():
    """nilearn's bundled MNI152 brain mask and tissue maps on the default 96^3 2 mm grid:
    a brain of ~1.9 L, and known anatomy (white matter of the centrum semiovale, precentral
    grey matter, the lateral ventricle)."""
    from fmri_data.qa.figures import (
        OUTLINE_COLOUR,
        mosaic,
        template_outline,
        tissue_classes,
    )

    affine = np.array([[2.0, 0, 0, -96], [0, 2, 0, -114], [0, 0, 2, -78], [0, 0, 0, 1]])
    key = ((96, 96, 96), tuple(affine.ravel()))
    outline, what = template_outline(*key)
    assert "MNI152" in what and 1.5 < outline.sum() * 8e-6 < 2.2  # litres
    tissue = tissue_classes(*key)
    to_index = np.linalg.inv(affine)

    def at(mm):
        return tissue[tuple(np.round(to_index @ np.r_[mm, 1.0]).astype(int)[:3])]

    assert at((-28, -20, 28)) == at((28, -20, 28)) == 1  # white matter
    assert at((-40, -20, 50)) == 0  # precentral grey matter
    assert at((-4, 4, 14)) == 2  # lateral ventricle
    # the mosaic draws the outline in red: red pixels with it, none without
    rng = np.random.default_rng(0)
    volume = rng.normal(size=outline.shape)
    assert OUTLINE_COLOUR == "#ff3b30"

    def red_pixels(uri):  # clearly red: R exceeds G and B by 60 (the grey data has R = G = B; WebP blurs colour)
        rgb = np.asarray(_image(uri).convert("RGB"), dtype=int)
        return int((rgb[..., 0] - rgb[..., 1:].max(axis=-1) > 60).sum())

    assert red_pixels(mosaic(volume, outline, "x", outline=outline)) > 500
    assert red_pixels(mosaic(volume, outline, "x")) == 0


def test_template_outline_prefers_a_local_templateflow_copy(tmp_path, monkeypatch):
    """With ``TEMPLATEFLOW_HOME`` holding MNI152NLin6Asym's brain mask, the outline is that file
    (here a box on the template's own 2 mm grid, so the answer is known exactly)."""
    from fmri_data.qa.figures import template_outline
    from fmri_data.reference.grids import template_grid

    grid = template_grid("MNI152NLin6Asym", 2)
    box = np.zeros(grid.shape, dtype=np.uint8)
    box[20:60, 30:80, 25:65] = 1
    folder = tmp_path / "tpl-MNI152NLin6Asym"
    folder.mkdir()
    nib.save(nib.Nifti1Image(box, grid.affine), folder / "tpl-MNI152NLin6Asym_res-02_desc-brain_mask.nii.gz")
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path))
    template_outline.cache_clear()
    try:
        outline, what = template_outline(tuple(grid.shape), tuple(np.asarray(grid.affine).ravel()))
    finally:
        template_outline.cache_clear()
    assert "TemplateFlow" in what and "MNI152NLin6Asym" in what
    np.testing.assert_array_equal(outline, box.astype(bool))


def test_parcel_groups_follow_schaefer_networks():
    from fmri_data.qa.figures import parcel_groups

    labels = ["LH_Vis_1", "7Networks_RH_SomMot_3", "17Networks_LH_DefaultA_PFCm_1", "HIP-rh", "CIFTI_STRUCTURE_THALAMUS_LEFT"]
    assert parcel_groups(labels) == ["Vis", "SomMot", "DefaultA", "subcortex / other", "subcortex / other"]


def test_report_thresholds_suggest_exclusions(real_store, tmp_path):
    result = render_report(real_store, tmp_path / "r.html", thresholds=Thresholds(fd_mean_mm=0.12, fd_perc=None, tsnr_min=130),
                           with_figures=False)
    store = Store.open(real_store)
    expected = {r for r in HAXBY_IDS if store.run_attrs(r)["qa"]["fd_mean"] > 0.12 or store.run_attrs(r)["qa"]["tsnr"] < 130}
    assert set(result.excluded) == expected and expected
    assert "sub-hcp1_task-rest" not in result.excluded  # tSNR 270, no FD
    html = (tmp_path / "r.html").read_text()
    assert all(f'href="#run-{r}"' in html for r in expected)


def test_cli_qa_writes_report_and_table(real_store, tmp_path):
    from typer.testing import CliRunner

    from fmri_data.cli.main import app

    out = tmp_path / "cli.html"
    res = CliRunner().invoke(app, ["qa", real_store, "--report", str(out), "--no-figures", "--tsnr-min", "130"])
    assert res.exit_code == 0, res.output
    assert "15 runs" in res.output and "exclude?" in res.output and out.is_file()
    res = CliRunner().invoke(app, ["qa", str(tmp_path / "missing.zarr"), "--report", str(out)])
    assert res.exit_code == 2 and "missing.zarr: no such store (nothing at this path)" in res.output


# ----------------------------------------------------------------------------- browser

BROWSER_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1300,1600",
)


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("chromium / chromedriver not installed (Debian packages chromium and chromium-driver; .ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in BROWSER_FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="fmri-data-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _open(driver, path: Path) -> list[dict]:
    driver.get(path.resolve().as_uri())
    driver.execute_script("return document.readyState")
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]


def test_report_renders_in_headless_chromium(browser, report_html, tmp_path):
    errors = _open(browser, report_html)
    assert errors == []
    images = browser.execute_script("return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt])")
    assert len(images) >= 15 * 2
    assert all(complete and width > 0 for complete, width, _ in images), [alt for c, w, alt in images if not (c and w > 0)]
    rows = browser.execute_script("return document.querySelectorAll('#runs tbody tr').length")
    assert rows == 15
    # sorting: click the tSNR header twice -> ascending then descending numeric order (empty cells last)
    column = [m[0] for m in METRICS].index("tsnr") + 5  # run, outliers, kind, TR, frames
    read = f"return Array.from(document.querySelectorAll('#runs tbody tr')).map(r => r.cells[{column}].getAttribute('data-sort'))"
    header = browser.find_elements("css selector", "#runs thead th")[column]
    header.click()
    ascending = [float(v) for v in browser.execute_script(read) if v]
    assert ascending == sorted(ascending) and len(ascending) == 13
    header.click()
    descending = [float(v) for v in browser.execute_script(read) if v]
    assert descending == sorted(descending, reverse=True)
    # the runs table at 1300 px: run column sticky, every run's outliers listed in view
    sticky = browser.execute_script("return getComputedStyle(document.querySelector('#runs tbody td')).position")
    assert sticky == "sticky"
    outliers = browser.execute_script(
        "return Array.from(document.querySelectorAll('#runs td.outliers')).map(td => [td.textContent, "
        "td.getBoundingClientRect().right <= window.innerWidth, td.parentElement.querySelectorAll('td.flag').length])")
    assert all(in_view for _, in_view, _ in outliers)
    assert [text.count("z = ") for text, _, _ in outliers] == [n for _, _, n in outliers] and any(n for *_, n in outliers)
    shot = Path(os.environ.get("FMRI_DATA_TEST_ARTIFACTS", tmp_path)) / "qa_report.png"  # CI may keep it
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    assert _open(browser, report_html) == []


def test_sidecar_script_is_shown_as_text_not_run(browser, tmp_path, atlas_dir):
    from fmri_data.convert import convert

    payload = "<script>window.__xss = 1</script>"
    event = '<img src=x onerror="window.__xss_event = 1">'
    root = make_bids(tmp_path / "bids", {
        "sub-x/func/sub-x_task-t_bold.nii.gz": haxby_run(1),
        "sub-x/func/sub-x_task-t_bold.json": json.dumps({"RepetitionTime": 2.5, "TaskName": "t", "Instructions": payload}),
        "sub-x/func/sub-x_task-t_events.tsv": f"onset\tduration\ttrial_type\n0\t2.5\t{event}\n",
    })
    store_url = str(tmp_path / "x.zarr")
    report = convert(root, store_url, "default", overrides=["roi=null"], progress=False)
    assert not report.failed, [r.error for r in report.failed]
    # a run being written (not complete) must not be reported
    (Path(store_url) / "runs" / "sub-y_task-t").mkdir()
    (Path(store_url) / "runs" / "sub-y_task-t" / "zarr.json").write_text(
        json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"run_id": "sub-y_task-t"}}))
    out = tmp_path / "x.html"
    result = render_report(store_url, out, with_figures=False)
    assert result.n_runs == 1
    html = out.read_text()
    assert payload not in html and "&lt;script&gt;window.__xss = 1&lt;/script&gt;" in html
    assert event not in html and "sub-y_task-t" not in html
    assert _open(browser, out) == []
    assert browser.execute_script("return [typeof window.__xss, typeof window.__xss_event]") == ["undefined", "undefined"]
    cells = browser.execute_script("return Array.from(document.querySelectorAll('td.sidecar-value')).map(td => td.textContent)")
    assert payload in cells
    assert event in browser.execute_script("return document.body.textContent")


def test_recompute_without_reconversion_matches_conversion(real_store, tmp_path):
    """A store converted with QA off gets, from ``fmri-data qa --recompute``, the metrics a
    conversion computes (same source file and brain mask as real_store's run 1); arrays untouched."""
    from typer.testing import CliRunner

    from fmri_data.cli.main import app
    from fmri_data.convert import convert

    root = make_bids(tmp_path / "bids", {
        "sub-haxby1/func/sub-haxby1_task-objectviewing_run-01_bold.nii.gz": haxby_run(1),
        "sub-haxby1/func/sub-haxby1_task-objectviewing_run-01_bold.json": json.dumps({"RepetitionTime": 2.5}),
    })
    url = str(tmp_path / "noqa.zarr")
    report = convert(root, url, "default", overrides=["roi=null", "qa.enabled=false"], progress=False)
    assert not report.failed, [r.error for r in report.failed]
    store = Store.open(url)
    run_id = HAXBY_IDS[0]
    assert "qa" not in store.run_attrs(run_id) and read_qa_table(store)["tsnr"].isna().all()
    before = store.run_attrs(run_id)["checksums"]
    res = CliRunner().invoke(app, ["qa", url, "--recompute", "--report", str(tmp_path / "r.html"), "--no-figures"])
    assert res.exit_code == 0, res.output
    assert "recomputed for 1 of 1 runs" in res.output
    qa = store.run_attrs(run_id)["qa"]
    reference = Store.open(real_store).run_attrs(run_id)["qa"]
    motion = {"fd_mean", "fd_num", "fd_perc", "notes", "series"}
    assert {k: v for k, v in qa.items() if k not in motion} == {k: v for k, v in reference.items() if k not in motion}
    assert qa["series"]["dvars_std"] == reference["series"]["dvars_std"]
    assert store.run_attrs(run_id)["checksums"] == before
    assert read_qa_table(store).set_index("run_id").loc[run_id, "tsnr"] == pytest.approx(reference["tsnr"])
    # a changed source file is refused, not measured
    (root / "sub-haxby1/func/sub-haxby1_task-objectviewing_run-01_bold.nii.gz").write_bytes(haxby_run(2).read_bytes())
    res = CliRunner().invoke(app, ["qa", url, "--recompute", "--report", str(tmp_path / "r.html"), "--no-figures"])
    assert res.exit_code == 0 and "sources differ" in res.output and "recomputed for 0 of 1" in res.output


def test_conversion_gathers_qa_frames_in_its_single_pass(real_store, tmp_path, monkeypatch):
    """The converter's streaming pass feeds the volume metrics: QA does not read the source
    again (its own pass is made to fail here), and the metrics equal real_store's."""
    from fmri_data.convert import convert
    from fmri_data.convert.outputs.qa import SourceFrames

    def no_second_pass(*args, **kwargs):
        raise AssertionError("QA read the source a second time")

    monkeypatch.setattr(SourceFrames, "read", classmethod(no_second_pass))
    root = make_bids(tmp_path / "bids", {
        "sub-haxby1/func/sub-haxby1_task-objectviewing_run-01_bold.nii.gz": haxby_run(1),
        "sub-haxby1/func/sub-haxby1_task-objectviewing_run-01_bold.json": json.dumps({"RepetitionTime": 2.5}),
    })
    url = str(tmp_path / "one.zarr")
    report = convert(root, url, "default", overrides=["roi=null"], progress=False)
    assert not report.failed, [r.error for r in report.failed]
    attrs = Store.open(url).run_attrs(HAXBY_IDS[0])
    assert not [w for w in attrs["warnings"] if w.startswith("qa:")], attrs["warnings"]
    reference = Store.open(real_store).run_attrs(HAXBY_IDS[0])["qa"]
    for key in ("tsnr", "dvars_std", "gcor", "aor", "aqi", "efc", "fber", "gsr", "mask", "n_channels"):
        assert attrs["qa"][key] == reference[key], key
