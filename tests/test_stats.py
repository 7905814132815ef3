"""Dataset statistics (:mod:`fmri_data.stats`, ``fmri-data stats``) and their use by the loader,
plus the reference window cuts (``build_index(window="first" | "evenly")``).

The stores are written through the store API with known ROI series (no conversion): runs of
different lengths (shorter and longer than fMRI-LM's 160 and BrainLM's 200 frames), each ROI
with its own offset and scale so a parameter applied to the wrong ROI shows. Every expected
value is computed here with numpy from the arrays that were written, following the references'
formulas, independently of fmri_data.stats.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fmri_data.cli.main import app
from fmri_data.errors import StoreError
from fmri_data.load import WindowDataset, build_index
from fmri_data.load.index import evenly_frames, first_frames
from fmri_data.stats import KINDS, compute_stats, read_stats
from fmri_data.store.root import Store

ROI = "roi/tian_s3-schaefer400_7n"
R = 6
LENGTHS = {"sub-01_task-rest": 120, "sub-02_task-rest": 250, "sub-03_task-rest": 310}


def _series(run_id: str, n_frames: int) -> np.ndarray:
    rng = np.random.default_rng(sum(map(ord, run_id)))
    offset = np.linspace(-3.0, 5.0, R) + 0.1 * int(run_id[5])
    scale = np.linspace(0.5, 4.0, R)
    return (offset + scale * rng.standard_normal((n_frames, R))).astype(np.float32)


def _add_run(store: Store, run_id: str, values: np.ndarray) -> None:
    from fmri_data.store.layout import now, software_versions

    recipe = store.recipe
    writer = store.begin_run(run_id)
    writer.write_series(ROI, len(values), (R,), "float32", 16, 2, recipe["store"]["compression"],
                        lambda a, b: values[a:b], dimension_names=("time", "roi"))
    sub = run_id.split("_")[0][4:]
    writer.commit({
        "run_id": run_id, "entities": {"sub": sub, "task": "rest"}, "tr_s": 2.0, "source_tr_s": 2.0,
        "n_frames": len(values), "n_frames_source": len(values),
        "sources": [{"path": f"/nowhere/{run_id}_bold.nii.gz", "kind": "volume", "space": None, "derivative": True,
                     "sha256": "0" * 64}],
        "recipe_hash": store.attrs["recipe_hash"], "software": software_versions(), "created": now(), "warnings": [],
    })


def _make_store(path: Path, recipe_name: str = "fmri_lm", runs: dict[str, int] = LENGTHS) -> tuple[str, dict[str, np.ndarray]]:
    from fmri_data.config.recipe import load_recipe, recipe_hash

    recipe = load_recipe(recipe_name)
    store = Store.create(str(path), recipe, recipe_hash(recipe))
    data = {}
    for run_id, n in runs.items():
        data[run_id] = _series(run_id, n)
        _add_run(store, run_id, data[run_id])
    return str(path), data


# ---------------------------------------------------------------------------- numpy references
def _numpy_stats(kind: str, runs: list[np.ndarray]) -> dict[str, np.ndarray]:
    runs = [r.astype(np.float64) for r in runs]
    if kind == "median_iqr_scalar":  # fMRI-LM compute_norm.py: per-run ROI means, two scalars
        all_ = np.stack([r.mean(axis=0) for r in runs])
        return {"median": np.median(all_), "iqr": np.percentile(all_, 75) - np.percentile(all_, 25)}
    if kind == "median_iqr_roi":  # Brain-JEPA: per ROI across runs
        all_ = np.stack([r.mean(axis=0) for r in runs])
        return {"median": np.median(all_, axis=0), "iqr": np.percentile(all_, 75, axis=0) - np.percentile(all_, 25, axis=0)}
    if kind == "brainlm":  # BrainLM_Toolkit.py: demeaned, first 200 TRs, zeros as NaN for the IQR
        all_ = np.concatenate([(r - r.mean(axis=0))[:200] for r in runs])
        nan = all_.copy()
        nan[nan == 0] = np.nan
        return {"median": np.median(all_, axis=0), "iqr": np.nanpercentile(nan, 75, axis=0) - np.nanpercentile(nan, 25, axis=0)}
    if kind == "mean_std":
        all_ = np.concatenate([r.ravel() for r in runs])
        return {"mean": all_.mean(), "std": all_.std()}
    raise AssertionError(kind)


def _numpy_apply(kind: str, x: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
    """``x`` (L, R) -> normalized as the reference does."""
    if kind in ("median_iqr_scalar", "median_iqr_roi"):
        return (x - p["median"]) / p["iqr"]
    if kind == "brainlm":
        return x - p["median"] / p["iqr"]  # BrainLM subtracts median/IQR (never divides)
    return (x - p["mean"]) / p["std"]


@pytest.fixture(scope="module")
def stats_store(tmp_path_factory) -> tuple[str, dict[str, np.ndarray]]:
    return _make_store(tmp_path_factory.mktemp("stats") / "fmri_lm.zarr")


# ---------------------------------------------------------------------------- tests
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("layout", ["roi", "time_first"])
def test_cli_stats_then_a_dataset_normalized_batch_equals_numpy(stats_store, tmp_path, kind, layout):
    import shutil

    url = str(tmp_path / "copy.zarr")
    shutil.copytree(stats_store[0], url)
    data = stats_store[1]
    result = CliRunner().invoke(app, ["stats", url, "--kind", kind])
    assert result.exit_code == 0, result.output
    record = json.loads(Path(url, "stats", ROI + ".json").read_text())
    assert record["kind"] == kind and record["array"] == ROI and record["run_ids"] == sorted(data)
    assert record["recipe_hash"] == Store.open(url).attrs["recipe_hash"]
    expected_params = _numpy_stats(kind, [data[r] for r in sorted(data)])
    for name, value in expected_params.items():
        np.testing.assert_allclose(np.asarray(record["params"][name]), value, rtol=1e-10, atol=1e-12)

    index = build_index(url, length=40, stride=30, array="roi")
    ds = WindowDataset(index, batch_size=len(index), shuffle=False, layout=layout)
    batch = ds.to_device(next(iter(ds)), "cpu", normalize="dataset")
    got = batch["data"].numpy()
    assert got.dtype == np.float32
    expected = np.stack([
        _numpy_apply(kind, data[run_id][start:start + 40].astype(np.float64), expected_params)
        for run_id, start in zip(batch["run_id"], batch["start"].tolist())
    ])
    if layout == "roi":
        expected = expected.transpose(0, 2, 1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # the statistics are not a per-window z-score: windows do not all have mean 0
    assert np.abs(got.mean(axis=(1, 2))).max() > 1e-2


def test_stale_statistics_are_refused_until_recomputed(tmp_path):
    url, data = _make_store(tmp_path / "s.zarr", runs=dict(list(LENGTHS.items())[:2]))
    compute_stats(url, "median_iqr_roi")
    assert read_stats(url, "roi")["n_runs"] == 2
    _add_run(Store.open(url), "sub-04_task-rest", _series("sub-04_task-rest", 90))
    with pytest.raises(StoreError, match=r"statistics are stale: 1 runs added since; rerun fmri-data stats"):
        read_stats(url, "roi")
    ds = WindowDataset(build_index(url, length=40, array="roi"), batch_size=2, shuffle=False, layout="roi")
    with pytest.raises(StoreError, match="statistics are stale"):
        ds.to_device(next(iter(ds)), "cpu", normalize="dataset")
    result = CliRunner().invoke(app, ["stats", url])  # defaults from the recipe? fmri_lm: median_iqr_scalar
    assert result.exit_code == 0, result.output
    assert read_stats(url, "roi")["run_ids"] == sorted([*data, "sub-04_task-rest"])


def test_stats_default_to_the_recipe_and_need_one(tmp_path):
    url, _ = _make_store(tmp_path / "lm.zarr", runs={"sub-01_task-rest": 50})
    assert CliRunner().invoke(app, ["stats", url]).exit_code == 0
    assert read_stats(url, "roi")["kind"] == "median_iqr_scalar"  # pipelines/fmri_lm.yaml stats.kind
    url, _ = _make_store(tmp_path / "default.zarr", "default", runs={"sub-01_task-rest": 50})
    result = CliRunner().invoke(app, ["stats", url])
    assert result.exit_code == 2 and "asks for no statistics" in result.output
    with pytest.raises(StoreError, match="no statistics of"):
        read_stats(url, "roi")


def test_first_window_is_fmri_lm_first_160_with_nearest_upsampling():
    import torch.nn.functional as F

    i = np.arange(160)
    np.testing.assert_array_equal(first_frames(100, 160), (i * 100) // 160)  # floor(i*T/160)
    np.testing.assert_array_equal(first_frames(400, 160), i)
    for n in (1, 7, 100, 137, 159, 160):
        ref = F.interpolate(torch.arange(n, dtype=torch.float64)[None, None], size=160, mode="nearest")[0, 0]
        np.testing.assert_array_equal(first_frames(n, 160), ref.long().numpy() if n < 160 else i)


def test_evenly_window_is_brain_jepa_linspace_truncation():
    ref = torch.linspace(0, 479, 160).long().numpy()
    np.testing.assert_array_equal(evenly_frames(600, 160, 480, keep=490), ref)
    assert ref[1] == 3 and ref[-1] == 479  # step 479/159, truncated
    for start, n in ((5.3, 600), (9.99, 490), (2.5, 300)):
        ncols = min(n, 490)
        ref = torch.linspace(start, start + 479, 160).clamp(0, ncols - 1).long().numpy()
        np.testing.assert_array_equal(evenly_frames(n, 160, 480, keep=490, start=start), ref)


def test_window_options_give_the_reference_frames_in_loader_batches(stats_store):
    url, data = stats_store
    index = build_index(url, length=160, array="roi", window="first")
    assert len(index) == len(data)  # one window per run
    ds = WindowDataset(index, batch_size=len(index), shuffle=False, layout="time_first")
    batch = ds.to_device(next(iter(ds)), "cpu")
    for k, run_id in enumerate(batch["run_id"]):
        x = data[run_id]
        expected = x[(np.arange(160) * len(x)) // 160] if len(x) < 160 else x[:160]
        np.testing.assert_array_equal(batch["data"][k].numpy(), expected)

    a = build_index(url, length=160, array="roi", window="evenly", clip=240, keep=245, seed=3)
    b = build_index(url, length=160, array="roi", window="evenly", clip=240, keep=245, seed=3)
    c = build_index(url, length=160, array="roi", window="evenly", clip=240, keep=245, seed=4)
    np.testing.assert_array_equal(a.frames, b.frames)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    ds = WindowDataset(a, batch_size=len(a), shuffle=False, layout="roi")
    batch = next(iter(ds))
    for k, run_id in enumerate(batch["run_id"]):
        x, frames = data[run_id], a.frames[k]
        ncols = min(len(x), 245)
        start = frames[0]
        assert 0 <= start < 245 - 240 + 1 and frames.max() <= ncols - 1
        np.testing.assert_array_equal(batch["data"][k].numpy(), x[frames].T)
    zero = build_index(url, length=160, array="roi", window="evenly", clip=240, keep=245)
    assert (zero.frames[:, 0] == 0).all()
    with pytest.raises(ValueError, match="source='sliding'"):
        build_index(url, length=4, array="roi", source="events", window="first")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_dataset_normalization_on_the_gpu_equals_the_cpu(stats_store, tmp_path):  # pragma: no cover - needs a GPU
    import shutil

    url = str(tmp_path / "gpu.zarr")
    shutil.copytree(stats_store[0], url)
    compute_stats(url, "median_iqr_roi")
    ds = WindowDataset(build_index(url, length=40, array="roi"), batch_size=4, shuffle=False, layout="roi")
    batch = next(iter(ds))
    gpu = ds.to_device(batch, "cuda", normalize="dataset")["data"]
    assert gpu.is_cuda and gpu.dtype == torch.float32
    torch.testing.assert_close(gpu.cpu(), ds.to_device(batch, "cpu", normalize="dataset")["data"])


def test_convert_with_stats_on_real_data_then_a_normalized_batch_equals_numpy(tmp_path, atlas_dir):
    """ds-real's me1 run converted with the fmri_lm recipe and ``--stats``: the stored statistics
    and a loader batch normalized with them equal numpy over the stored series."""
    from conftest import DS_REAL

    url = str(tmp_path / "lm.zarr")
    result = CliRunner().invoke(app, ["convert", str(DS_REAL), url, "-r", "fmri_lm", "--participant-label", "me1",
                                      "--atlas-dir", atlas_dir, "--stats", "--no-progress"])
    assert result.exit_code == 0, result.output
    record = read_stats(url, "roi")
    store = Store.open(url)
    runs = {r: np.asarray(store.run(r)[record["array"]][...]) for r in store.run_ids()}
    assert record["kind"] == "median_iqr_scalar" and record["run_ids"] == sorted(runs) and len(runs) >= 1
    expected = _numpy_stats("median_iqr_scalar", list(runs.values()))
    np.testing.assert_allclose([record["params"]["median"], record["params"]["iqr"]], [expected["median"], expected["iqr"]], rtol=1e-10)
    index = build_index(url, length=160, array="roi", window="first")
    ds = WindowDataset(index, batch_size=len(index), shuffle=False, layout="roi")
    batch = ds.to_device(next(iter(ds)), "cpu", normalize="dataset")
    for k, run_id in enumerate(batch["run_id"]):
        x = runs[run_id].astype(np.float64)
        window = x[(np.arange(160) * len(x)) // 160] if len(x) < 160 else x[:160]
        np.testing.assert_allclose(batch["data"][k].numpy(), _numpy_apply("median_iqr_scalar", window, expected).T, rtol=1e-5, atol=1e-5)
