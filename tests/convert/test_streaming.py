"""The bounded-memory volume conversion: frame rows decoded ahead in the file's voxel order,
the row-wise operator kernel, the TR step applied as frames arrive, the spilled working
series, the slab- and block-wise normalization, the fused float16 cast, and the codec a
resumed store keeps.

Synthetic arrays and NIfTI files here are small and made where the answer must be exact
(the numpy definition, or nibabel's own read of the same file); conversions use ds-real.
"""

from __future__ import annotations

import gzip
import threading

import nibabel as nib
import numpy as np
import pytest
import scipy.sparse as sp
import zarr

from fmri_data.config.recipe import load_recipe, recipe_hash
from fmri_data.convert import convert, scratch
from fmri_data.derive.volume import VolumeNormalizer, float16_bits, global_zscore_elements
from fmri_data.convert.outputs import volume as volume_output
from fmri_data.errors import InputError, SettingError
from fmri_data.read.nifti import open_volume
from fmri_data.resample.operator import PreparedOperator, permute_columns
from fmri_data.resample.temporal import TemporalStream, resample_tr
from fmri_data.store.root import Store

from conftest import DS_REAL

RNG = np.random.default_rng(7)


def _nifti(path, data, affine, slope=None, inter=None, dtype=None):
    img = nib.Nifti1Image(data, affine)
    if dtype is not None:
        img.set_data_dtype(dtype)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nib.save(img, path)
    return path


AFFINES = {
    "RAS": np.diag([2.0, 2.0, 2.0, 1.0]),
    "LAS": np.array([[-2.0, 0, 0, 20], [0, 2, 0, -10], [0, 0, 2, 4], [0, 0, 0, 1]]),
    "oblique PIR": np.array([[0, 0, 3.0, 1], [-2.5, 0.2, 0, 5], [0, -2.0, 0, 7], [0, 0, 0, 1]]),
}


@pytest.mark.parametrize("orientation", sorted(AFFINES))
@pytest.mark.parametrize("kind", ["float32.nii.gz", "int16-scaled.nii.gz", "big-endian.nii", "uint8.nii"])
def test_frame_rows_equal_nibabel(tmp_path, orientation, kind):
    data = RNG.normal(100, 20, (5, 4, 3, 9)).astype(np.float32)
    path = tmp_path / f"bold_{kind}"
    if kind.startswith("int16"):
        _nifti(path, np.round(data * 10).astype(np.int16), AFFINES[orientation], slope=0.1, inter=-3.0)
    elif kind.startswith("big-endian"):
        _nifti(path, data.astype(">f4"), AFFINES[orientation])
    elif kind.startswith("uint8"):
        _nifti(path, np.clip(data, 0, 255).astype(np.uint8), AFFINES[orientation])
    else:
        _nifti(path, data, AFFINES[orientation])
    vol = open_volume(path)
    assert vol._raw
    seen = []
    for start, stop, rows in vol.iter_frame_rows(4):
        assert rows.dtype == np.float32 and rows.flags.c_contiguous and rows.shape == (stop - start, 60)
        expected = vol.read(start, stop)  # nibabel's array proxy, reoriented to RAS+
        np.testing.assert_array_equal(vol.ras_view(rows), expected)
        np.testing.assert_array_equal(rows[:, vol.frame_order()].T.reshape(expected.shape), expected)
        seen.append((start, stop))
    assert seen == [(0, 4), (4, 8), (8, 9)]
    mean = np.mean([vol.read(t, t + 1)[..., 0] for t in range(9)], axis=0)
    rows_mean = np.mean([r for _, _, r in vol.iter_frame_rows(9)][0], axis=0)
    np.testing.assert_allclose(vol.to_ras(rows_mean), mean, rtol=1e-6)


def test_truncated_stream_names_the_file(tmp_path):
    path = _nifti(tmp_path / "bold.nii.gz", RNG.normal(size=(6, 6, 6, 20)).astype(np.float32), np.eye(4))
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) * 2 // 3]))  # a whole gzip stream, short of data
    vol = open_volume(path)
    with pytest.raises(InputError, match="bold.nii.gz: truncated or corrupt image data"):
        for _ in vol.iter_frame_rows(3):
            pass


@pytest.mark.parametrize("method", ["numba", "torch", "sparse"])
def test_apply_rows_is_the_operator_on_frame_rows(method):
    n_out, n_in, frames = 300, 500, 13
    matrix = sp.random(n_out, n_in, density=0.02, random_state=3, format="csr")
    x = RNG.standard_normal((frames, n_in)).astype(np.float32)
    expected = (matrix @ x.T.astype(np.float64)).T
    op = PreparedOperator(matrix, method, "cpu")
    got = op.apply_rows(x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, op(np.ascontiguousarray(x.T)).T, rtol=1e-5, atol=1e-5)
    out = np.zeros((frames, n_out), dtype=np.float64)
    op.apply_rows(x, out=out)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    position = RNG.permutation(n_in)
    y = np.empty_like(x)
    y[:, position] = x  # the same frames with their inputs moved
    np.testing.assert_allclose(PreparedOperator(permute_columns(matrix, position), method, "cpu").apply_rows(y), got,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("held", [11, 5, 0])  # frames in memory: all, some, none
def test_series_reads_back_what_was_written(held):
    values = RNG.standard_normal((11, 37)).astype(np.float32)
    series = scratch.Series(11, 37, memory_bytes=held * 37 * 4)
    assert series.spilled is (held < 11)
    series.write(0, values[:5])
    series.write(5, values[5:])
    np.testing.assert_array_equal(series[:, 3:20], values[:, 3:20])
    np.testing.assert_array_equal(series[2:7], values[2:7])
    np.testing.assert_array_equal(series[4], values[4])
    np.testing.assert_array_equal(series[3:][1], values[4])
    np.testing.assert_array_equal(series[3:][:, 0:5], values[3:, 0:5])
    series.write_columns(30, -values[:, 30:])
    np.testing.assert_array_equal(series[:, 28:37], np.concatenate([values[:, 28:30], -values[:, 30:]], axis=1))
    head = series.head(4)  # a shorter result written over its input
    assert head.shape == (4, 37) and head.shares_data(series) and series[2:].shares_data(series)
    assert not scratch.Series(11, 37, memory_bytes=held * 37 * 4).shares_data(series)
    np.testing.assert_array_equal(series.columns(0, 3), series[:, 0:3])
    parts = series.column_parts(1, 4)
    assert [first for first, _ in parts] == ([0] if held else []) + ([held] if held < 11 else [])
    np.testing.assert_array_equal(np.concatenate([p for _, p in parts]), series[:, 1:4])
    assert (series.held(0, 2) is not None) is (held >= 2)
    head.write_columns(0, np.zeros((4, 2), dtype=np.float32))
    np.testing.assert_array_equal(head[:, 0:3], np.concatenate([np.zeros((4, 2)), values[:4, 2:3]], axis=1))
    past_head = np.concatenate([values[4:6, 25:30], -values[4:6, 30:35]], axis=1)
    np.testing.assert_array_equal(series[4:6][:, 25:35], past_head)  # frames past the head untouched
    series.close()
    assert scratch.column_slabs(1000, 1000, slab_bytes=4 * 1000 * 300) == [(0, 300), (300, 600), (600, 900), (900, 1000)]


def test_series_names_an_unusable_folder(tmp_path):
    with pytest.raises(scratch.ScratchError, match="cannot use the temporary folder .*missing.*FMRI_DATA_TMPDIR"):
        scratch.Series(10, 10, memory_bytes=0, directory=str(tmp_path / "missing"))


def _reference_normalize(x, kind, elementwise=False, negatives="keep", ddof=0, background="min"):
    """The numpy definition of each volume normalization (see derive/volume.py)."""
    brain = x != 0 if elementwise else np.ones(x.shape, dtype=bool)
    v = np.maximum(x, 0).astype(np.float64) if negatives == "zero" else x.astype(np.float64)
    if kind == "global_zscore":
        mean, std = v[brain].mean(), v[brain].std(ddof=ddof)
        z = (v - mean) / std
    elif kind == "voxel_zscore":
        z = (v - v.mean(axis=0)) / v.std(axis=0)
    elif kind == "robust":
        q25, q50, q75 = np.percentile(v.astype(np.float32), [25, 50, 75], axis=0)
        z = (v - q50) / (q75 - q25)
    else:
        z = v
    z = z.astype(np.float32)
    low = float(z[brain].min()) if background == "min" else 0.0
    z[~brain] = low
    return z, low


@pytest.mark.parametrize("kind, elementwise, negatives, ddof", [
    ("global_zscore", False, "keep", 0), ("global_zscore", True, "zero", 1), ("global_zscore", False, "zero", 1),
    ("voxel_zscore", False, "keep", 0), ("robust", False, "zero", 0), ("none", False, "keep", 0),
])
def test_normalizer_by_slabs_is_the_whole_run_definition(kind, elementwise, negatives, ddof):
    x = RNG.normal(50, 10, (40, 90)).astype(np.float32)
    x[RNG.random(x.shape) < 0.1] = 0.0  # element-wise background
    x[RNG.random(x.shape) < 0.1] *= -1  # negatives
    expected, low = _reference_normalize(x, kind, elementwise, negatives, ddof)
    norm = VolumeNormalizer(kind, 90, elementwise=elementwise, negatives=negatives, ddof=ddof)
    for a, b in [(60, 90), (0, 25), (25, 60)]:  # any order
        norm.fit(a, x[:, a:b])
    params, arrays = norm.finish()
    if norm.fits_frames:  # the same statistics from frame blocks, as the streamed TR step fits them
        by_frames = VolumeNormalizer(kind, 90, elementwise=elementwise, negatives=negatives, ddof=ddof)
        for a, b in [(0, 7), (7, 8), (8, 40)]:
            by_frames.fit(0, x[a:b])
        numbers = {k: v for k, v in params.items() if k != "kind"}
        assert {k: by_frames.finish()[0][k] for k in numbers} == pytest.approx(numbers, rel=1e-12)
    else:
        assert kind in ("voxel_zscore", "robust")
    assert params["background"] == pytest.approx(low, rel=1e-6)
    np.testing.assert_allclose(norm.apply(x), expected, rtol=1e-5, atol=1e-5)
    position = RNG.permutation(200)[:90]
    for dtype in (np.float16, np.float32):  # normalize, cast and scatter in one pass: bit for bit
        out = np.full((40, 200), 7.0, dtype=dtype)
        norm.apply_scattered(x, position, out)
        bits = np.dtype(f"u{np.dtype(dtype).itemsize}")
        np.testing.assert_array_equal(np.ascontiguousarray(out[:, position]).view(bits),
                                      norm.apply(x).astype(dtype).view(bits))
        assert (np.delete(out, position, axis=1) == 7.0).all()  # other columns untouched
    if kind == "global_zscore":
        z, whole = global_zscore_elements(x, elementwise=elementwise, negatives=negatives, ddof=ddof)
        assert whole["mean"] == pytest.approx(params["mean"], rel=1e-12)
        assert whole["std"] == pytest.approx(params["std"], rel=1e-12)
        np.testing.assert_allclose(z, expected, rtol=1e-5, atol=1e-5)
    else:
        assert ("center" in arrays) == (kind != "none")


def _bold(store: str) -> np.ndarray:
    runs = zarr.open_group(f"{store}/runs", mode="r")
    (run_id,) = list(runs.group_keys())
    return runs[run_id]["bold"][:]


@pytest.mark.parametrize("recipe, overrides", [("neurostorm", []), ("default", ["temporal.tr=1.5"])])
def test_spilled_conversion_equals_the_in_memory_one(tmp_path, atlas_dir, monkeypatch, recipe, overrides):
    options = dict(recipe=recipe, overrides=["qa.enabled=false", *overrides], participant_label=["me1"],
                   atlas_dir=atlas_dir, progress=False)
    assert convert(DS_REAL, str(tmp_path / "memory.zarr"), **options).count("complete") == 1
    monkeypatch.setattr(scratch, "SPILL_BYTES", 0)  # every working series in a temporary file
    monkeypatch.setattr(scratch, "SLAB_BYTES", 4 * 160 * 5000)  # and many column slabs
    spilled = []
    init = scratch.Series.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        spilled.append(self.spilled)

    monkeypatch.setattr(scratch.Series, "__init__", spy)
    assert convert(DS_REAL, str(tmp_path / "spilled.zarr"), **options).count("complete") == 1
    assert spilled and all(spilled)
    np.testing.assert_array_equal(_bold(str(tmp_path / "spilled.zarr")), _bold(str(tmp_path / "memory.zarr")))


def test_a_store_resumed_keeps_its_codec(tmp_path, atlas_dir):
    """A store made with another (lossless) codec, e.g. an earlier default, resumes with the
    default recipe and keeps its codec; any other difference is still refused."""
    out = str(tmp_path / "old.zarr")
    old = ["store.compression.cname=lz4hc", "store.compression.clevel=5", "qa.enabled=false"]
    first = convert(DS_REAL, out, overrides=old, participant_label=["me1"], atlas_dir=atlas_dir, progress=False)
    assert first.count("complete") == 1
    made = Store.open(out).attrs
    assert made["recipe_hash"] == recipe_hash(load_recipe("default", old))
    assert made["recipe_hash"] != recipe_hash(load_recipe("default", ["qa.enabled=false"]))
    report = convert(DS_REAL, out, overrides=["qa.enabled=false"], participant_label=["me1", "haxby1"],
                     task=["objectviewing"], atlas_dir=atlas_dir, progress=False)
    assert report.count("complete") >= 1, [r.error for r in report.failed]
    store = Store.open(out)
    assert store.attrs["recipe_hash"] == made["recipe_hash"]
    for run_id in store.run_ids():
        codecs = zarr.open_group(f"{out}/runs/{run_id}", mode="r")["bold"].metadata.codecs
        assert "lz4hc" in repr(codecs), run_id
    with pytest.raises(Exception, match="written with recipe"):
        convert(DS_REAL, out, overrides=["qa.enabled=false", "temporal.tr=1.5"], participant_label=["me1"],
                atlas_dir=atlas_dir, progress=False)


@pytest.mark.parametrize("n_frames, tr_in, tr_out, kind, antialias, grid, block", [
    (300, 0.72, 0.8, "linear", False, "neurostorm", 36),  # NeuroSTORM's step, HCP TR
    (100, 2.0, 0.8, "linear", False, "exact", 7),  # upsampling: several output frames per source frame
    (100, 0.72, 0.8, "cubic", False, "exact", 9),  # a wide band (the spline's decaying weights)
    (150, 0.72, 2.0, "linear", True, "exact", 10),  # windowed-sinc anti-aliasing
    (97, 2.0, 0.72, "cubic", True, "fmri_lm", 5),
    (53, 1.0, 1.0, "linear", True, "exact", 8),  # equal TRs: frames pass through
])
def test_temporal_stream_is_resample_tr(n_frames, tr_in, tr_out, kind, antialias, grid, block):
    """TR resampling applied to blocks of frames as they arrive equals the whole-series
    result bit for bit, holding the band's frames only (synthetic series)."""
    x = RNG.standard_normal((n_frames, 33)).astype(np.float32)
    expected = resample_tr(x, tr_in, tr_out, kind, antialias, device="cpu", grid=grid)
    stream = TemporalStream(n_frames, tr_in, tr_out, kind, antialias, grid, 33, block)
    got, seen = np.full_like(expected, np.nan), []
    for start in range(0, n_frames, block):
        stop = min(start + block, n_frames)
        stream.inputs(stop - start)[...] = x[start:stop]
        for j, rows in stream.push(stop - start):
            got[j:j + len(rows)] = rows
            seen.extend(range(j, j + len(rows)))
    assert seen == list(range(len(expected)))  # every output frame once, in order
    np.testing.assert_array_equal(got, expected)
    assert stream.carry <= 64 and stream._window.shape[0] <= block + stream.carry
    with pytest.raises(SettingError, match="does not fit"):
        stream.inputs(block + stream.carry + 1)


def test_float16_cast_kernel_is_numpy_cast():
    """Every float32 sign/exponent/top-10-mantissa pattern with the low bits that decide
    rounding (ties to even, carries into the exponent, subnormals, overflow, inf, NaN)."""
    high = np.arange(1 << 19, dtype=np.uint32) << 13
    low = np.array([0, 1, 0x7FF, 0x800, 0xFFF, 0x1000, 0x1001, 0x17FF, 0x1FFF], dtype=np.uint32)
    values = (high[:, None] | low[None, :]).reshape(-1).view(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = values.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(float16_bits(values), expected)


def test_read_ahead_stops_when_the_reader_stops(tmp_path):
    path = _nifti(tmp_path / "bold.nii.gz", RNG.normal(size=(6, 6, 6, 40)).astype(np.float32), np.eye(4))
    vol = open_volume(path)
    for _start, _stop, _rows in vol.iter_frame_rows(4):
        break
    names = [t.name for t in threading.enumerate()]
    assert "fmri-data-read-ahead" not in names  # the decoding thread ended with the iteration


def test_streamed_tr_step_equals_the_column_pass(tmp_path, atlas_dir, monkeypatch):
    """The TR step applied while decoding (banded operator) and the column pass over the
    whole spatially resampled series give the same stored volumes (real run, NeuroSTORM's
    TR 0.8 s step); the statistics differ only by the float64 rounding of their grouping."""
    options = dict(recipe="neurostorm", overrides=["qa.enabled=false", "temporal.tr=1.5"], participant_label=["me1"],
                   atlas_dir=atlas_dir, progress=False)
    streamed = []
    build = volume_output._temporal_stream

    def spy(*args, **kwargs):
        stream = build(*args, **kwargs)
        streamed.append(stream is not None)
        return stream

    monkeypatch.setattr(volume_output, "_temporal_stream", spy)
    assert convert(DS_REAL, str(tmp_path / "stream.zarr"), **options).count("complete") == 1
    monkeypatch.setattr(volume_output, "MAX_CARRY_FRAMES", -1)  # no band is narrow enough: column pass
    assert convert(DS_REAL, str(tmp_path / "columns.zarr"), **options).count("complete") == 1
    assert streamed == [True, False]
    a, b = _bold(str(tmp_path / "stream.zarr")).astype(np.float32), _bold(str(tmp_path / "columns.zarr")).astype(np.float32)
    assert a.shape == b.shape and np.mean(a == b) > 0.999
    np.testing.assert_allclose(a, b, rtol=2**-10, atol=2**-20)  # at most one float16 step apart


def test_check_finite_one_reduction_and_its_policies():
    """Synthetic blocks with a known answer: a block is passed through unchanged when every
    value is finite, even when its float32 sum overflows (the one-reduction check's fallback);
    NaN / inf are zeroed or refused with their count, naming the file."""
    from fmri_data.convert.context import check_finite

    huge = np.full((2, 3), 3e38, dtype=np.float32)  # finite; the float32 sum is inf
    for policy in ("zero", "error"):
        assert check_finite(huge, "run.nii.gz", 0, policy) is huge
    bad = np.arange(6, dtype=np.float32).reshape(2, 3)
    bad[0, 1], bad[1, 2] = np.nan, -np.inf
    zeroed = check_finite(bad, "run.nii.gz", 0, "zero")
    assert zeroed.dtype == np.float32 and zeroed.tolist() == [[0, 0, 2], [3, 4, 0]]
    with pytest.raises(InputError, match=r"run\.nii\.gz.*2 NaN/inf values in frames from 7"):
        check_finite(bad, "run.nii.gz", 7, "error")
