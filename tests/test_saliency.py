"""Saliency-window indices: scorer numerics, conversion hook, rescoring, learned scorer, CLI.

Real data throughout (ds-real runs, the HCP ROI series, Haxby head-motion estimates);
synthetic values only where a test needs a known answer, said at each place.
"""

import json
import shutil

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from conftest import DS_REAL, HCP_PTSERIES, haxby_run, make_bids
from fmri_data.cli.main import app
from fmri_data.convert import convert
from fmri_data.derive.scorers import (
    builtin_names, cube_means, dfc_distance, dvars, global_variance, parcel_variance, top_k,
)
from fmri_data.derive.motion import censored_frames, framewise_displacement, window_source_frames
from fmri_data.derive.windows import window_starts
from fmri_data.derive import saliency_net as net
from fmri_data.errors import StoreError
from fmri_data.store.inspect import summarize
from fmri_data.read.cifti import open_cifti
from fmri_data.read.tables import read_confounds
from fmri_data.config.recipe import load_recipe
from fmri_data.saliency import RunData, SaliencySettings, read_run_saliency, score_run, score_store
from fmri_data.config.schema import load_schema
from fmri_data.store.root import Store
from fmri_data.store.validate import validate_store

CONFOUNDS = DS_REAL / "derivatives/preproc/sub-haxby1/func"
HCP_RUN = "sub-hcp1_task-rest"
HAXBY1 = "sub-haxby1_task-objectviewing_run-01"
SURFACE_RUN = "sub-010188_ses-02_task-rest_acq-AP_run-01"
SLIM_SCORERS = ["dfc_distance", "dfc_distance_motion_penalized", "dvars", "global_variance"]


def haxby_confounds(n: int):
    return read_confounds(CONFOUNDS / f"sub-haxby1_task-objectviewing_run-{n:02d}_desc-confounds_timeseries.tsv")


@pytest.fixture(scope="module")
def hcp_series() -> np.ndarray:
    return open_cifti(HCP_PTSERIES).read()


@pytest.fixture(scope="module")
def slim_roi_store(tmp_path_factory, atlas_dir) -> str:
    """ds-real with the slim_brain recipe, volume output off (ROI series only: fast)."""
    out = str(tmp_path_factory.mktemp("saliency") / "slim.zarr")
    report = convert(DS_REAL, out, "slim_brain", overrides=["volume=null"], atlas_dir=atlas_dir, progress=False)
    assert not report.failed, [r.error for r in report.failed]
    return out


def _arrays(store: Store, run_id: str) -> dict:
    scored, _ = read_run_saliency(store.run(run_id))
    return {name: (s["scores"], s["starts"], s["topk"]) for name, s in scored.items()}


# ----------------------------------------------------------------------------- numerics
def test_windows_and_top_k():
    np.testing.assert_array_equal(window_starts(121, 40, 40), [0, 40, 80])
    np.testing.assert_array_equal(window_starts(121, 40, 20), [0, 20, 40, 60, 80])
    assert window_starts(39, 40, 10).shape == (0,)
    with pytest.raises(ValueError, match="window must be >= 2"):
        window_starts(100, 1, 1)
    # ties go to the earlier window; k larger than n gives every window
    np.testing.assert_array_equal(top_k(np.array([1.0, 3.0, 3.0, 2.0]), 3), [1, 2, 3])
    np.testing.assert_array_equal(top_k(np.array([1.0, 3.0]), 5), [1, 0])
    with pytest.raises(ValueError, match="finite"):
        top_k(np.array([1.0, np.nan]), 1)


def test_scorers_follow_their_formulas_on_hcp(hcp_series):
    x = hcp_series[:200, :60]
    w = 40
    starts = window_starts(200, w, 20)
    windows = [x[s : s + w].astype(np.float64) for s in starts]
    np.testing.assert_allclose(global_variance(x, starts, w), [np.var(v.mean(axis=1)) for v in windows], rtol=1e-10)
    np.testing.assert_allclose(parcel_variance(x, starts, w), [np.var(v, axis=0).mean() for v in windows], rtol=1e-10)
    dv = [np.sqrt(np.mean(np.diff(v, axis=0) ** 2, axis=1)).mean() for v in windows]
    np.testing.assert_allclose(dvars(x, starts, w), dv, rtol=1e-10)
    iu = np.triu_indices(x.shape[1], 1)
    fcs = [np.corrcoef(v.T)[iu] for v in windows]
    mean = np.mean(fcs, axis=0)
    np.testing.assert_allclose(dfc_distance(x, starts, w), [np.abs(f - mean).mean() for f in fcs], rtol=1e-9)


def test_cube_means_known_answer():
    # synthetic: a 4x4x4 mask and series whose cube means are known by construction
    mask = np.zeros((4, 4, 4), dtype=bool)
    mask[0:2, 0:2, 0:2] = True  # cube (0,0,0): 8 voxels
    mask[3, 3, 3] = True  # cube (1,1,1): 1 voxel
    ijk = np.argwhere(mask)
    x = np.array([[i + 10 * j for i in range(len(ijk))] for j in range(3)], dtype=np.float32)
    out = cube_means(x, mask, 2)
    np.testing.assert_allclose(out, [[3.5 + 10 * j, 8 + 10 * j] for j in range(3)])


def test_framewise_displacement_on_real_haxby_motion():
    columns, values = haxby_confounds(1)
    fd = framewise_displacement(columns, values)
    c = {name: values[:, i].astype(np.float64) for i, name in enumerate(columns)}
    for t in (1, 50, 120):
        expected = sum(abs(c[f"trans_{a}"][t] - c[f"trans_{a}"][t - 1]) for a in "xyz")
        expected += 50 * sum(abs(c[f"rot_{a}"][t] - c[f"rot_{a}"][t - 1]) for a in "xyz")
        assert fd[t] == pytest.approx(expected, rel=1e-12)
    assert fd[0] == 0 and fd.shape == (121,) and 0 < np.median(fd) < 1
    # sub-010188's 29 unnamed columns never yield FD
    columns, values = read_confounds(
        DS_REAL / "derivatives/preproc/sub-010188/ses-02/func/sub-010188_ses-02_task-rest_acq-AP_run-01_desc-confounds_timeseries.tsv"
    )
    with pytest.raises(ValueError, match="no trans_x"):
        framewise_displacement(columns, values)
    flags = censored_frames(np.array([0, 0, 0, 0.9, 0, 0, 0, 0]), 0.5)
    np.testing.assert_array_equal(np.flatnonzero(flags), [2, 3, 4, 5])  # 1 before, 2 after (Power 2012)


def test_windows_map_to_source_frames_across_trs():
    same = window_source_frames(np.array([0, 40]), 40, 2.5, 2.5, 121)
    np.testing.assert_array_equal(same, [[0, 40], [40, 80]])
    # stored at 2.0 s from a 0.72 s source: window [10, 20) spans 20.0..38.0 s -> source frames 28..52
    np.testing.assert_array_equal(window_source_frames(np.array([10]), 10, 2.0, 0.72, 1200), [[28, 53]])


def test_motion_penalised_scorer_demotes_injected_fd_spikes(slim_roi_store):
    """Real Haxby ROI series and motion; FD spikes are injected synthetically into one window."""
    store = Store.open(slim_roi_store)
    attrs = store.run_attrs(HAXBY1)
    base = RunData.from_group(store.run(HAXBY1), attrs)
    settings = SaliencySettings(scorers=("dvars", "dvars_motion_penalized"), window=20, stride=20, k=3)
    results = {r.scorer: r for r in score_run(base, settings)[0]}
    clean = results["dvars_motion_penalized"]
    best = int(clean.topk[0])
    start = int(clean.starts[best])
    columns, values = base.confounds
    spiked = values.copy()
    # synthetic injection: a 1.5 mm jump in trans_x at start+5 and back at start+12 (two FD spikes)
    spiked[start + 5 : start + 12, columns.index("trans_x")] += 1.5
    injected = RunData(**{**base.__dict__, "confounds": (columns, spiked), "_cache": {}})
    after = {r.scorer: r for r in score_run(injected, settings)[0]}
    penalised = after["dvars_motion_penalized"]
    rank_before = list(clean.topk).index(best)
    order_after = list(top_k(penalised.scores, len(penalised.scores)))
    assert order_after.index(best) > rank_before
    assert best not in penalised.topk and order_after[-1] == best
    assert penalised.censored[best] >= 8 and penalised.scores[best] < clean.scores[best] / 8
    # the other windows and the unpenalised scorer are untouched
    others = np.arange(len(clean.scores)) != best
    np.testing.assert_array_equal(penalised.scores[others], clean.scores[others])
    np.testing.assert_array_equal(after["dvars"].scores, results["dvars"].scores)


# ----------------------------------------------------------------------------- the store
def test_conversion_stores_valid_deterministic_indices(slim_roi_store, hcp_series, tmp_path):
    store = Store.open(slim_roi_store)
    assert validate_store(slim_roi_store) == []
    for run_id in store.run_ids():
        attrs = store.run_attrs(run_id)
        scored, skipped = read_run_saliency(store.run(run_id))
        assert set(scored) | set(skipped) == set(SLIM_SCORERS), run_id
        for name, s in scored.items():
            n = len(s["starts"])
            assert s["window"] == 40 and s["stride"] == 40 and s["k"] == min(4, n) and s["n_windows"] == n
            assert s["scores"].dtype == np.float32 and s["starts"].dtype == np.int64 and s["topk"].dtype == np.int64
            assert s["starts"].min() >= 0 and s["starts"].max() + 40 <= attrs["n_frames"]
            assert len(set(s["topk"])) == len(s["topk"]) and s["topk"].max() < n
            assert np.all(np.diff(s["scores"][s["topk"]]) <= 0)
            assert s["source"].removeprefix("roi/") in [o.removeprefix("roi/") for o in attrs["outputs"]]
    # FD exists only for the Haxby runs (fMRIPrep motion columns); the reasons are recorded
    _, skipped = read_run_saliency(store.run(SURFACE_RUN))
    assert "trans_x" in skipped["dfc_distance_motion_penalized"] and "undocumented" in skipped["dfc_distance_motion_penalized"]
    assert any("saliency/dfc_distance_motion_penalized: not scored" in w for w in store.run_attrs(SURFACE_RUN)["warnings"])
    assert "dfc_distance_motion_penalized" in read_run_saliency(store.run(HAXBY1))[0]
    hcp = read_run_saliency(store.run(HCP_RUN))[0]["dvars"]
    assert hcp["source"] == "roi/Schaefer400x17subcortex19" and hcp["n_windows"] == 30 and len(hcp["topk"]) == 4

    # the HCP ROI series from ../shared/data/roi give the same indices as the converted run
    data = RunData(1200, 0.72, 1200, 0.72, ["hcp"], lambda key: hcp_series, None, None)
    settings = SaliencySettings(scorers=("dvars", "dfc_distance", "global_variance"), window=40, stride=40, k=4)
    direct = {r.scorer: r for r in score_run(data, settings)[0]}
    stored = _arrays(store, HCP_RUN)
    for name, r in direct.items():
        np.testing.assert_array_equal(r.scores, stored[name][0])
        np.testing.assert_array_equal(r.topk, stored[name][2])
    again = {r.scorer: r for r in score_run(data, settings)[0]}
    assert all(np.array_equal(again[n].scores, direct[n].scores) for n in direct)

    # rescoring a copy of the store without reconverting reproduces the conversion exactly
    copy = str(tmp_path / "copy.zarr")
    shutil.copytree(slim_roi_store, copy)
    before = {run_id: _arrays(store, run_id) for run_id in store.run_ids()}
    reports = score_store(copy)
    assert {r.run_id for r in reports} == set(before)
    rescored = Store.open(copy)
    for run_id, arrays in before.items():
        after = _arrays(rescored, run_id)
        assert after.keys() == arrays.keys()
        for name in arrays:
            for a, b in zip(arrays[name], after[name]):
                np.testing.assert_array_equal(a, b)
    assert validate_store(copy) == []
    assert sorted(p.name for p in (tmp_path / "copy.zarr" / "_staging").iterdir()) == ["zarr.json"]


def test_failed_rescoring_keeps_the_previous_group(slim_roi_store, tmp_path, monkeypatch):
    import fmri_data.saliency as saliency_module

    copy = str(tmp_path / "keep.zarr")
    shutil.copytree(slim_roi_store, copy)
    before = _arrays(Store.open(copy), HCP_RUN)["dvars"]
    real_write = saliency_module.write_scores

    def write_then_fail(group, result, compression):
        real_write(group, result, compression)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(saliency_module, "write_scores", write_then_fail)
    with pytest.raises(OSError, match="simulated"):
        score_store(copy, ["dvars"], window=20, run_ids=[HCP_RUN])
    kept = _arrays(Store.open(copy), HCP_RUN)["dvars"]
    for a, b in zip(before, kept):
        np.testing.assert_array_equal(a, b)
    assert sorted(p.name for p in (tmp_path / "keep.zarr" / "_staging").iterdir()) == ["zarr.json"]
    assert validate_store(copy) == []


def test_schemas_document_the_contract():
    run_schema = load_schema("run")
    assert "saliency/<scorer>/" in run_schema["description"] and "topk" in run_schema["description"]
    required = set(run_schema["$defs"]["saliency_attrs"]["required"])
    assert {"scorer", "source", "window", "stride", "k", "description"} <= required
    recipe_enum = load_schema("recipe")["properties"]["saliency"]["properties"]["scorers"]["items"]["enum"]
    assert sorted(recipe_enum) == sorted(builtin_names())
    assert "saliency_models" in load_schema("store")["properties"]
    recipe = load_recipe("slim_brain")
    assert recipe["store"]["chunk_frames"] == 40 and recipe["saliency"]["window"] == 40 and recipe["volume"]["shape"] == [96, 96, 96]


def test_validate_catches_broken_indices(slim_roi_store, tmp_path):
    copy = tmp_path / "broken.zarr"
    shutil.copytree(slim_roi_store, copy)
    group = zarr.open_group(str(copy / "runs" / HCP_RUN / "saliency" / "dvars"), mode="r+")
    group["topk"][...] = group["topk"][...][::-1]
    starts = zarr.open_group(str(copy / "runs" / HAXBY1 / "saliency" / "dvars"), mode="r+")["starts"]
    starts[...] = starts[...] + 5
    problems = validate_store(str(copy))
    assert any(HCP_RUN in p and "not the 4 highest scores" in p for p in problems), problems
    assert any(HAXBY1 in p and "starts: not the windows" in p for p in problems), problems


def test_bold_fallback_scores_the_stored_volume(tmp_path, atlas_dir):
    """One real Haxby run with its real motion estimates; no ROI series, so windows are scored on bold."""
    confounds = CONFOUNDS / "sub-haxby1_task-objectviewing_run-01_desc-confounds_timeseries.tsv"
    root = make_bids(
        tmp_path / "ds",
        {
            "sub-01/func/sub-01_task-a_bold.nii.gz": haxby_run(1),
            "sub-01/func/sub-01_task-a_bold.json": json.dumps({"RepetitionTime": 2.5}),
            "derivatives/preproc/dataset_description.json": json.dumps(
                {"Name": "preproc", "BIDSVersion": "1.9.0", "DatasetType": "derivative"}
            ),
            "derivatives/preproc/sub-01/func/sub-01_task-a_desc-confounds_timeseries.tsv": confounds,
        },
    )
    out = str(tmp_path / "vol.zarr")
    report = convert(root, out, "slim_brain", overrides=["roi=null", "saliency.k=2"], atlas_dir=atlas_dir, progress=False)
    assert report.count("complete") == 1, [r.error for r in report.results]
    store = Store.open(out)
    (run_id,) = store.run_ids()
    scored, skipped = read_run_saliency(store.run(run_id))
    assert not skipped and set(scored) == set(SLIM_SCORERS)
    dfc = scored["dfc_distance"]
    assert dfc["source"] == "bold" and dfc["params"]["cube_voxels"] == 6 and dfc["params"]["n_cubes"] > 10
    assert dfc["n_windows"] == 3 and list(dfc["starts"]) == [0, 40, 80] and len(dfc["topk"]) == 2
    assert validate_store(out) == []
    before = _arrays(store, run_id)
    score_store(out)
    after = _arrays(Store.open(out), run_id)
    for name in before:
        for a, b in zip(before[name], after[name]):
            np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- learned scorer
def test_learned_scorer_trains_on_real_hcp_series(hcp_series):
    result = net.fit([hcp_series], 40, steps=100, batch=8, seed=0)
    losses = np.array(result.losses)
    assert losses.shape == (100,) and np.all(np.isfinite(losses))
    assert losses[-10:].mean() < 0.9 * losses[:10].mean()
    starts = window_starts(1200, 40, 40)
    scores = net.reconstruction_error(result.net, result.config, hcp_series, starts, 40)
    assert scores.shape == (30,) and np.all(scores > 0)
    # deterministic: serialising and reloading, or fitting again with the same seed, changes nothing
    reloaded, config, meta = net.from_bytes(net.to_bytes(result))
    np.testing.assert_array_equal(net.reconstruction_error(reloaded, config, hcp_series, starts, 40), scores)
    short_a = net.fit([hcp_series], 40, steps=5, batch=4, seed=3)
    short_b = net.fit([hcp_series], 40, steps=5, batch=4, seed=3)
    assert short_a.losses == short_b.losses
    with pytest.raises(ValueError, match="network models 419 parcels"):
        net.reconstruction_error(result.net, result.config, hcp_series[:, :400], starts, 40)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA device")
def test_learned_scorer_cuda_matches_cpu(hcp_series):  # pragma: no cover - needs a GPU
    result = net.fit([hcp_series], 40, steps=5, batch=4, seed=0)
    starts = window_starts(1200, 40, 40)
    cpu = net.reconstruction_error(result.net, result.config, hcp_series, starts, 40, device="cpu")
    gpu = net.reconstruction_error(result.net, result.config, hcp_series, starts, 40, device="cuda")
    np.testing.assert_allclose(gpu, cpu, rtol=1e-4)
    assert net.fit([hcp_series], 40, steps=5, batch=4, seed=0, device="cuda").losses[0] > 0


def test_cli_fit_score_inspect(slim_roi_store, tmp_path):
    runner = CliRunner()
    out = str(tmp_path / "cli.zarr")
    shutil.copytree(slim_roi_store, out)
    fitted = runner.invoke(app, ["saliency", "fit", out, "--roi", "Schaefer400x17subcortex19", "--steps", "30", "--batch", "8"])
    assert fitted.exit_code == 0, fitted.output
    assert "fitted 'masked_conv'" in fitted.output
    record = Store.open(out).attrs["saliency_models"]["masked_conv"]
    model_file = tmp_path / "cli.zarr" / record["path"]
    assert model_file.is_file() and net.sha256(model_file.read_bytes()) == record["sha256"]
    assert record["roi"] == "roi/Schaefer400x17subcortex19" and record["training"]["loss_last"] < record["training"]["loss_first"]

    scored = runner.invoke(
        app, ["saliency", "score", out, "--scorer", "masked_conv", "--scorer", "dvars", "--k", "2", "--run", HCP_RUN, "--run", HAXBY1]
    )
    assert scored.exit_code == 0, scored.output
    assert "2 runs scored, 3 scorer groups written" in scored.output and f"skipped {HAXBY1} masked_conv" in scored.output
    store = Store.open(out)
    learned = read_run_saliency(store.run(HCP_RUN))[0]["masked_conv"]
    assert learned["model"]["sha256"] == record["sha256"] and len(learned["topk"]) == 2
    assert "masked_conv" in read_run_saliency(store.run(HAXBY1))[1]  # no such ROI series in that run
    assert validate_store(out) == []

    shown = runner.invoke(app, ["inspect", out])
    assert shown.exit_code == 0 and "top-k windows" in shown.output
    summary = summarize(store)
    hcp = next(r for r in summary["runs"] if r["run_id"] == HCP_RUN)["saliency"]
    starts = hcp["masked_conv"]["topk_starts"]
    assert f"{starts[0]} ({starts[0] * 0.72:g} s)" in shown.output
    assert hcp["dvars"]["topk_times_s"] == [round(s * 0.72, 3) for s in hcp["dvars"]["topk_starts"]]
    as_json = json.loads(runner.invoke(app, ["inspect", out, "--json"]).output)
    assert next(r for r in as_json["runs"] if r["run_id"] == HCP_RUN)["saliency"]["dvars"]["k"] == 2

    # a changed network file is caught, by validate and before scoring
    model_file.write_bytes(model_file.read_bytes()[:-4] + b"\0\0\0\0")
    assert any("changed since scoring" in p for p in validate_store(out))
    with pytest.raises(StoreError, match="sha256 differs"):
        score_store(out, ["masked_conv"])
    bad = runner.invoke(app, ["saliency", "score", out, "--scorer", "nonsense"])
    assert bad.exit_code == 2 and "unknown saliency scorer" in bad.output
    zero = runner.invoke(app, ["saliency", "score", out, "--scorer", "dvars", "--k", "0"])
    assert zero.exit_code == 2 and "k >= 1" in zero.output
