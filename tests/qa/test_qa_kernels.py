"""The fast QA kernels against the plain numpy definitions they replace (issue 15, speed).

Every test here runs on **small synthetic arrays** (random values made to hit the awkward
cases: ties, constant channels, a flat channel with one spike, negative values, -0.0,
odd and even frame counts, non-finite source values, channels DVARS must leave out after
its intensity scaling) and compares the numba/sort-based code of
:mod:`fmri_data.derive.qa_metrics` and :class:`fmri_data.convert.outputs.qa.SourceFrames`
with a straightforward numpy transcription of each definition, written out below (the
code the kernels replaced). Order statistics, counts and ranks must be identical; sums
agree to float64 rounding; DVARS to float32 rounding (its scaling is applied after the
per-channel steps, documented in :meth:`SeriesStatistics.dvars`).

The real-data checks against nipype / MRIQC / AFNI are in ``test_qa_reference.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

import fmri_data.convert.outputs.qa as qa_module
from fmri_data.convert.scratch import Series
from fmri_data.derive import qa_metrics as iqm


# ----------------------------------------------------------------------------- numpy definitions
def np_outlier_counts(x: np.ndarray, q: float = iqm.OUTLIER_Q) -> np.ndarray:
    """AFNI 3dToutcount counts per frame, numpy (median, MAD, threshold in x's dtype)."""
    t = x.shape[0]
    alpha = float(stats.norm.isf(q / t))
    median = np.median(x, axis=0)
    dev = np.abs(x - median)
    mad = np.median(dev, axis=0)
    return ((dev > (alpha * math.sqrt(math.pi / 2.0)) * mad) & (mad > 0)).sum(axis=1)


def np_gcor(x: np.ndarray) -> float:
    d = x - x.mean(axis=0, dtype=np.float64)
    norm = np.sqrt((d * d).sum(axis=0))
    if not (norm > 0).any():
        return math.nan
    u = np.zeros_like(d)
    u[:, norm > 0] = d[:, norm > 0] / norm[norm > 0]
    g = u.mean(axis=1)
    return float(g @ g)


def np_dvars(x: np.ndarray, intensity: float | None = iqm.DVARS_INTENSITY) -> dict[str, np.ndarray]:
    """nipype compute_dvars, transcribed on the whole array in float32 as it runs."""
    y = np.asarray(x, dtype=np.float32)
    if intensity is not None:
        y = y * np.float32(intensity / float(np.median(y)))
    q25, q75 = np.percentile(y, [25, 75], axis=0, method="lower")
    sd = (q75 - q25).astype(np.float64) / iqm.IQR_TO_SD
    keep = sd > iqm.DVARS_VARIANCE_TOL
    y, sd = y[:, keep], sd[keep]
    d = (y - y.mean(axis=0, dtype=np.float64)).astype(np.float64)
    ar1 = (d[1:] * d[:-1]).sum(axis=0) / (d * d).sum(axis=0)
    diff_sd = np.sqrt(2.0 * (1.0 - ar1)) * sd
    diff = np.diff(y, axis=0).astype(np.float64)
    nstd = np.sqrt((diff**2).mean(axis=1))
    return {"nstd": nstd, "std": nstd / diff_sd.mean(), "vstd": np.sqrt(((diff / diff_sd) ** 2).mean(axis=1))}


def np_quality(x: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
    """3dTqual: 1 - Spearman rho (scipy's average ranks) of each frame with the median frame."""
    x = x if columns is None else x[:, columns]
    ref = np.median(x, axis=0)
    return np.array([1.0 - stats.pearsonr(stats.rankdata(f), stats.rankdata(ref)).statistic for f in x])


def awkward_series(t: int, n: int, dtype=np.float32, seed: int = 0) -> np.ndarray:
    """Synthetic ``(t, n)`` series with ties, constant channels, a spike on a flat channel,
    negative values and signed zeros."""
    rng = np.random.default_rng(seed)
    x = rng.normal(1000.0, 30.0, size=(t, n))
    x[:, 1::7] = np.round(x[:, 1::7] / 10.0)  # many ties
    x[:, 2] = 5.0  # constant
    x[:, 3] = 7.0
    x[t // 2, 3] = 50.0  # flat channel, one spike: MAD 0, never an outlier
    x[:, 4] = -np.abs(x[:, 4])  # negative values
    x[:, 5] = 0.0
    x[::3, 5] = -0.0  # signed zeros
    x[t // 3, 6] += 400.0  # an outlier
    return x.astype(dtype)


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request, monkeypatch):
    monkeypatch.setattr(iqm, "QA_THREADS", request.param)
    monkeypatch.setattr(iqm, "SLAB_ELEMENTS", 2000)  # many slabs and frame blocks, dealt to the threads
    return request.param


# ----------------------------------------------------------------------------- series statistics
@pytest.mark.parametrize("t", [5, 6, 7, 40, 121])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_series_statistics_equal_numpy(t, dtype, threads):
    x = awkward_series(t, 61, dtype, seed=t)
    s = iqm.series_statistics(x)
    # order statistics: numpy's exactly
    np.testing.assert_array_equal(s.median, np.median(x, axis=0))
    np.testing.assert_array_equal(s.mad, np.median(np.abs(x - np.median(x, axis=0)), axis=0))
    q25, q75 = np.percentile(x, [25, 75], axis=0, method="lower")
    np.testing.assert_array_equal(s.q25, q25)
    np.testing.assert_array_equal(s.q75, q75)
    np.testing.assert_array_equal(s.constant, x.max(axis=0) == x.min(axis=0))
    assert s.constant[2] and s.constant[3] is not True and not s.constant[3]
    # counts: exactly
    np.testing.assert_array_equal(s.outliers, np_outlier_counts(x))
    assert s.outliers[t // 3] >= 1 and s.mad[3] == 0
    np.testing.assert_array_equal(iqm.outlier_fraction(x), np_outlier_counts(x) / x.shape[1])
    # sums: float64 rounding
    np.testing.assert_allclose(s.mean, x.mean(axis=0, dtype=np.float64), rtol=1e-13)
    np.testing.assert_allclose(s.std, x.std(axis=0, dtype=np.float64), rtol=1e-10, atol=1e-12)
    assert s.gcor() == pytest.approx(np_gcor(x), rel=1e-9)
    np.testing.assert_allclose(s.tsnr_map(), iqm.tsnr_map(x), rtol=1e-10)
    # the global median from the histograms: numpy's exactly (float32 values)
    assert s.global_median == float(np.median(x.astype(np.float32)))


def test_global_median_of_mostly_zero_series(threads):
    # synthetic: most values +0.0 / -0.0 (an already-masked run), so that the median's key
    # bins are those of the signed zeros (counted over the slab, not by binary search)
    rng = np.random.default_rng(13)
    for signs in ([0.0], [0.0, -0.0], [-0.0]):
        x = rng.normal(0.0, 1.0, size=(20, 30)).astype(np.float32)
        zero = rng.random(x.shape) < 0.7
        x[zero] = np.array(signs, dtype=np.float32)[rng.integers(0, len(signs), size=int(zero.sum()))]
        assert iqm.series_statistics(x).global_median == float(np.median(x)) == 0.0


@pytest.mark.parametrize("intensity", [iqm.DVARS_INTENSITY, None])
def test_dvars_equals_nipype_transcription(intensity, threads):
    x = awkward_series(50, 40, seed=3)
    x[:, 4] = np.abs(x[:, 4])  # a positive median for the scaling
    got, expected = iqm.dvars(x, intensity), np_dvars(x, intensity)
    for key in ("nstd", "std", "vstd"):
        np.testing.assert_allclose(got[key], expected[key], rtol=2e-6)


def test_dvars_leaves_out_channels_its_scaled_quartiles_drop(threads):
    # Channels near 1e-3 varying by a few float32 ulps: their IQR is > 0 (candidates of the
    # unscaled pass) but IQR / 1.349 <= 1e-7, so nipype leaves them out; the pass added them
    # to its per-frame sums and must take them out again (their D / sigma is O(1), so vstd
    # and the channel count would change if it did not).
    rng = np.random.default_rng(4)
    x = rng.normal(1000.0, 20.0, size=(60, 30)).astype(np.float32)
    tiny = np.float32(1e-3)
    ulp = np.spacing(tiny)
    x[:, :5] = tiny + ulp * rng.integers(0, 4, size=(60, 5)).astype(np.float32)
    s = iqm.series_statistics(x)
    assert s.candidate[:5].all()
    for intensity in (iqm.DVARS_INTENSITY, None):
        got, expected = s.dvars(x, intensity), np_dvars(x, intensity)
        for key in ("nstd", "std", "vstd"):
            np.testing.assert_allclose(got[key], expected[key], rtol=2e-6)
    # without the correction the tiny channels would count: vstd would differ by far more
    naive = np.sqrt(s.diff_std_sq / s.candidate.sum())
    assert not np.allclose(naive, np_dvars(x)["vstd"], rtol=1e-2)


def test_dvars_all_channels_flat_is_nan():
    d = iqm.dvars(np.ones((6, 4), dtype=np.float32), intensity=None)
    assert all(np.isnan(v).all() for v in d.values())


def test_global_median_and_histograms_equal_numpy(threads):
    rng = np.random.default_rng(5)
    for x in (awkward_series(9, 31, seed=5), -awkward_series(8, 13, seed=6), rng.normal(size=(7, 3)).astype(np.float32),
              np.full((3, 5), 2.5, dtype=np.float32), np.array([[0.0, -0.0], [1.0, -1.0]], dtype=np.float32)):
        assert iqm.global_median(x) == float(np.median(x))
        high = iqm.value_histogram(x)
        assert high.sum() == x.size
        assert iqm.global_median(x, high=high) == float(np.median(x))
    assert math.isnan(iqm.global_median(np.empty((0, 3), np.float32)))


# ----------------------------------------------------------------------------- AQI ranks
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_quality_index_equals_scipy_ranks(dtype, threads):
    rng = np.random.default_rng(7)
    x = awkward_series(23, 90, dtype, seed=7)
    x[:, 10:30] = rng.integers(0, 4, size=(23, 20))  # heavy ties
    np.testing.assert_allclose(iqm.quality_index(x), np_quality(x), rtol=1e-10, atol=1e-13)
    columns = rng.random(90) < 0.5
    np.testing.assert_allclose(iqm.quality_index(x, columns=columns), np_quality(x, columns), rtol=1e-10, atol=1e-13)
    # the median given (as the volume QA passes it) gives the same
    reference = np.median(x, axis=0)[columns]
    np.testing.assert_array_equal(iqm.quality_index(x, median=reference, columns=np.flatnonzero(columns)),
                                  iqm.quality_index(x, columns=columns))


def test_quality_index_ties_of_signed_zeros():
    # -0.0 == +0.0: one tie group for the ranks (as scipy), though their bits differ
    x = np.array([[0.0, -0.0, 1.0, 2.0], [-0.0, 0.0, 2.0, 1.0], [1.0, 2.0, -0.0, 0.0]], dtype=np.float32)
    np.testing.assert_allclose(iqm.quality_index(x), np_quality(x), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("values", ["spread", "one-high-digit", "signed-zeros-and-ties"])
def test_radix_sort_rows_equals_numpy_sort(values):
    # synthetic packed keys: values spanning both 16-bit digits, values sharing the high
    # digit (its pass skipped), and heavy ties with -0.0 (equal keys keep channel order)
    rng = np.random.default_rng(21)
    x = {"spread": rng.normal(0.0, 1e3, size=(5, 3000)),
         "one-high-digit": 1000.0 + rng.integers(0, 50, size=(5, 3000)) / 64.0,
         "signed-zeros-and-ties": rng.choice([-0.0, 0.0, 1.0, -2.5], size=(5, 3000))}[values].astype(np.float32)
    keys = np.empty(x.shape, dtype=np.uint64)
    iqm._pack_keys(x.view(np.uint32), np.arange(x.shape[1], dtype=np.int64), keys, 0)
    expected = np.sort(keys, axis=1)
    iqm._radix_sort_rows(keys, np.empty_like(keys), np.empty((2, 1 << 16), dtype=np.int64))
    np.testing.assert_array_equal(keys, expected)


def test_quality_index_radix_path_equals_the_sort_path(monkeypatch, threads):
    # synthetic: the same AQI, bit for bit, whether frames are ranked by the radix sort or numpy's
    x = awkward_series(19, 300, seed=22)
    x[:, :40] = np.random.default_rng(22).integers(0, 3, size=(19, 40))
    by_sort = iqm.quality_index(x)
    monkeypatch.setattr(iqm, "RADIX_MIN_CHANNELS", 2)
    np.testing.assert_array_equal(iqm.quality_index(x), by_sort)
    np.testing.assert_allclose(by_sort, np_quality(x), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("held", [0, 11, 30], ids=["all-in-file", "11-frames-held", "all-held"])
def test_spilled_series_and_the_metrics_reading_it(tmp_path, held, threads):
    # a synthetic series written in blocks that straddle the held/file boundary, read back
    # by frames, blocks and column slabs as numpy would index it, and the metrics on it
    x = awkward_series(30, 50, seed=8)
    spilled = Series(*x.shape, directory=str(tmp_path), memory_bytes=held * 50 * 4)
    for a in range(0, 30, 7):
        spilled.write(a, x[a:a + 7])
    assert spilled.held(0, 5) is not None if held >= 5 else spilled.held(0, 5) is None
    for a, b in ((0, 30), (4, 9), (9, 14), (25, 30)):
        np.testing.assert_array_equal(spilled.rows(a, b), x[a:b])
        np.testing.assert_array_equal(spilled.rows(a, b, np.empty((b - a, 50), np.float32)), x[a:b])
    np.testing.assert_array_equal(spilled[3:].rows(1, 12), x[4:15])
    np.testing.assert_array_equal(spilled[12], x[12])
    np.testing.assert_array_equal(spilled[3:][9, [1, 7]], x[12, [1, 7]])
    np.testing.assert_array_equal(spilled[:, 10:20], x[:, 10:20])
    np.testing.assert_array_equal(spilled[5:][:, 10:20], x[5:, 10:20])
    np.testing.assert_array_equal(iqm.quality_index(spilled), iqm.quality_index(x))
    np.testing.assert_array_equal(iqm.quality_index(spilled[2:]), iqm.quality_index(x[2:]))
    s_spilled, s_memory = iqm.series_statistics(spilled[1:]), iqm.series_statistics(x[1:])
    np.testing.assert_array_equal(s_spilled.median, s_memory.median)
    np.testing.assert_array_equal(s_spilled.outliers, s_memory.outliers)
    assert s_spilled.global_median == s_memory.global_median
    spilled.close()


def test_quality_index_of_joined_columns_equals_the_stacked_array(threads):
    # synthetic: two float32 series side by side (as the brain series and the voxels gathered
    # outside the mask) give the AQI of the array of their columns
    a, b = awkward_series(17, 40, seed=11), awkward_series(17, 9, seed=12)
    ca, cb = np.arange(0, 40, 3), np.array([0, 4, 8])
    joined = qa_module.JoinedColumns([(a, ca), (b, cb)])
    stacked = np.hstack([a[:, ca], b[:, cb]])
    np.testing.assert_array_equal(joined.rows(2, 6), stacked[2:6])
    np.testing.assert_allclose(iqm.quality_index(joined), np_quality(stacked), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(iqm.quality_index(joined, median=np.median(stacked, axis=0)), np_quality(stacked),
                               rtol=1e-10, atol=1e-13)


# ----------------------------------------------------------------------------- the converter's pass
def _source(t: int = 11, seed: int = 9) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    data = rng.normal(500.0, 50.0, size=(6, 7, 5, t)).astype(np.float32)
    data[0, 0, 0, 3] = np.nan
    data[1, 2, 3, 5] = np.inf  # inside the mask
    data[2, 2, 2, :] = -np.inf
    data[5, 6, 4, 0] = -0.0
    mask = rng.random(data.shape[:3]) < 0.4
    mask[1, 2, 3] = mask[2, 2, 2] = True
    return data, mask


def _layouts(data: np.ndarray):
    """The same frames in the block layouts the converter and QA's own pass hand over."""
    t = data.shape[3]
    # frame rows of a file stored LAS (x flipped), read as (t, X*Y*Z) rows, viewed RAS+
    disk = np.flip(data, 0)
    rows = np.ascontiguousarray(disk.reshape(-1, t, order="F").T)
    yield "RAS view of frame rows", lambda a, b: np.flip(rows[a:b].T.reshape(data.shape[:3] + (b - a,), order="F"), 0)
    yield "C-contiguous block", lambda a, b: np.ascontiguousarray(data[..., a:b])
    yield "F-contiguous block", lambda a, b: np.asfortranarray(data[..., a:b])


@pytest.mark.parametrize("held", [None, 0, 6], ids=["in-memory", "spilled", "6-frames-held"])
def test_source_frames_gather_equals_numpy(held, threads, monkeypatch):
    data, mask = _source()
    t = data.shape[3]
    spill = held is not None
    monkeypatch.setattr(qa_module, "SPILL_BYTES", 1 << 40 if held is None else held * int(mask.sum()) * 4)
    monkeypatch.setattr(qa_module, "GATHER_WIDTH", 16)  # several voxel chunks
    clean = np.where(np.isfinite(data), data, np.float32(0.0))
    for name, block in _layouts(data):
        frames = qa_module.SourceFrames(data.shape[:3], t, mask, "test")
        for a in range(0, t, 4):
            frames.add(a, min(a + 4, t), block(a, min(a + 4, t)))
        np.testing.assert_allclose(frames.total, clean.sum(axis=3, dtype=np.float64), rtol=1e-12, err_msg=name)
        np.testing.assert_allclose(frames.abs_total, np.abs(clean).sum(axis=3, dtype=np.float64), rtol=1e-12)
        np.testing.assert_array_equal(frames.nonfinite, ~np.isfinite(data).all(axis=3))
        np.testing.assert_allclose(frames.global_signal, clean.mean(axis=(0, 1, 2), dtype=np.float64), rtol=1e-12)
        # brain columns: the voxels named by frames.voxels (flat RAS+ indices), every one of the mask
        assert sorted(frames.voxels) == list(np.flatnonzero(mask))
        brain = frames.brain if isinstance(frames.brain, np.ndarray) else frames.brain.rows(0, t)
        assert isinstance(frames.brain, Series) == spill
        np.testing.assert_array_equal(brain, clean.reshape(-1, t)[frames.voxels].T, err_msg=name)
        np.testing.assert_array_equal(frames.histogram(), iqm.value_histogram(brain))
        np.testing.assert_array_equal(frames.histogram(3), iqm.value_histogram(brain[3:]))


def test_frame_rows_are_a_view_of_streamed_rows():
    data, _ = _source()
    _, block = next(_layouts(data))
    view = block(0, data.shape[3])
    rows, ras = qa_module.frame_rows(view)
    assert np.shares_memory(rows, view)  # no copy of the decoded frames
    np.testing.assert_array_equal(rows, data.reshape(-1, data.shape[3])[ras].T)


def test_source_frames_gather_the_voxels_the_automask_may_take(threads, monkeypatch):
    # synthetic: a bright ellipsoid (500) on a dim background (5), the brain mask the
    # ellipsoid less its outer layer; the voxels outside the mask that the automask could
    # take (the outer layer) are gathered from the first block on
    from scipy import ndimage

    monkeypatch.setattr(qa_module, "GATHER_WIDTH", 64)
    rng = np.random.default_rng(10)
    t = 11
    ijk = np.indices((14, 12, 10)).reshape(3, -1).T
    blob = ((((ijk - [7, 6, 5]) / np.array([5.5, 4.5, 3.5])) ** 2).sum(axis=1) <= 1.0).reshape(14, 12, 10)
    data = np.where(blob[..., None], 500.0, 5.0) + rng.normal(0, 2.0, size=(14, 12, 10, t))
    data = data.astype(np.float32)
    data[3, 4, 5, 2] = np.nan
    mask = ndimage.binary_erosion(blob)
    clean = np.where(np.isfinite(data), data, np.float32(0.0))
    for name, block in _layouts(data):
        frames = qa_module.SourceFrames(data.shape[:3], t, mask, "test")
        for a in range(0, t, 4):
            frames.add(a, min(a + 4, t), block(a, min(a + 4, t)))
        assert not mask.reshape(-1)[frames.extra_voxels].any()
        np.testing.assert_array_equal(np.sort(frames.extra_voxels), np.flatnonzero(blob & ~mask))
        np.testing.assert_array_equal(frames.extra, clean.reshape(-1, t)[frames.extra_voxels].T, err_msg=name)
        auto = np.zeros(mask.shape, dtype=bool)
        auto.reshape(-1)[frames.extra_voxels[::2]] = True
        auto |= mask
        joined, brain_cols, extra_cols = frames.automask_series(auto, skip=2)
        got = joined.rows(0, t - 2)
        assert got.shape == (t - 2, auto.sum())
        ras = np.concatenate([frames.voxels[brain_cols], frames.extra_voxels[extra_cols]])
        assert sorted(ras) == list(np.flatnonzero(auto))
        np.testing.assert_array_equal(got, clean.reshape(-1, t)[ras].T[2:])
        np.testing.assert_array_equal(joined[3], got[3])
        outside = auto.copy()
        outside.reshape(-1)[np.setdiff1d(np.flatnonzero(~mask), frames.extra_voxels)[0]] = True
        assert frames.automask_series(outside) is None  # a voxel not gathered: QA reads the source again


def test_aqi_over_an_automask_wider_than_the_brain_mask_needs_no_second_read(monkeypatch, tmp_path):
    # real Haxby run 2 with a brain mask that misses one sagittal plane (x = 2) of its EPI mask:
    # its automask reaches outside the mask; AQI comes from the voxels gathered in the pass,
    # equal to the direct computation and to the second read it replaces
    from conftest import haxby_run, make_bids

    from fmri_data.convert.outputs.base import Timing
    from fmri_data.derive.volume import epi_mask
    from fmri_data.discover import discover
    from fmri_data.read.nifti import open_volume

    root = make_bids(tmp_path / "ds", {"sub-01/func/sub-01_task-objectviewing_bold.nii.gz": haxby_run(2),
                                       "sub-01/func/sub-01_task-objectviewing_bold.json": '{"RepetitionTime": 2.5}'})
    (spec,) = [s for s in discover(str(root)) if s.volume is not None]
    vol = open_volume(spec.volume.path)
    data = vol.read()
    mask = epi_mask(data.mean(axis=3), vol.affine) & (np.arange(data.shape[0]) != 2)[:, None, None]
    auto = iqm.automask(np.abs(np.nan_to_num(data)).mean(axis=3))
    assert (auto & ~mask).sum() > 10

    def qa(gather: bool) -> dict:
        frames = qa_module.SourceFrames(vol.shape[:3], vol.n_frames, mask, "eroded EPI mask")
        if not gather:
            frames._plan_extra = lambda aveabs: None
        for a, b, block in vol.iter_frames(50):
            frames.add(a, b, block)
        q = qa_module.QAInputs(spec, {"qa": {}}, 2.5, source_frames=frames)
        warnings: list[str] = []
        out = qa_module.compute_qa(q, Timing(2.5, 2.5, vol.n_frames, vol.n_frames), warnings)["qa"]
        assert not warnings, warnings
        return out

    second_read = qa(gather=False)
    monkeypatch.setattr(qa_module, "_source_voxels", lambda *a: pytest.fail("QA read the source a second time"))
    gathered = qa(gather=True)
    assert gathered["aqi_channels"] == auto.sum()
    assert gathered["aqi"] == pytest.approx(second_read["aqi"], rel=1e-9)
    assert gathered["aqi"] == pytest.approx(float(np.mean(np_quality(np.nan_to_num(data[auto].T)))), rel=1e-5)
