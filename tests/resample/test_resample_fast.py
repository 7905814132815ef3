"""The fast resampling backends (numba, torch on CPU, torch on CUDA when present) agree with
scipy.ndimage.map_coordinates, nilearn.image.resample_img and scipy's TR resampling on real data."""

import nibabel as nib
import numpy as np
import pytest
import scipy.sparse as sp
from nilearn.image import resample_img

import fmri_data.resample.operator as operator_module
from conftest import DS_REAL, HCP_PTSERIES, ME1_PREPROC
from fmri_data.convert import convert
from fmri_data.read.cifti import open_cifti
from fmri_data.read.nifti import open_volume
from fmri_data.resample import (
    PreparedOperator, apply_operator, resample_tr, resample_tr_reference, resample_volume, resolve_backend,
    temporal_operator,
)
from fmri_data.resample.operator import cuda_available
from fmri_data.store.root import Store
from test_resample import TARGET, _oblique_affines

needs_cuda = pytest.mark.skipif(not cuda_available(), reason="no CUDA device")
BACKENDS = [
    pytest.param(("numba", "cpu"), id="numba"),
    pytest.param(("torch", "cpu"), id="torch-cpu"),
    pytest.param(("torch", "cuda"), id="torch-cuda", marks=needs_cuda),
]
# ds-real has two acquisition grids (the 12 Haxby runs share one, sub-me1 raw and
# preprocessed the other): one Haxby run and both sub-me1 runs cover them, with different data.
REAL_RUNS = sorted(DS_REAL.rglob("sub-haxby1_*run-01_bold.nii.gz")) + sorted(DS_REAL.rglob("sub-me1_*_bold.nii.gz"))
ME1 = ME1_PREPROC / "sub-me1_task-visual_desc-preproc_bold.nii.gz"


def _tolerance(data):
    return 1e-4 * float(np.ptp(data))


def _nilearn(frames, affine, order=1):
    img = nib.Nifti1Image(frames, affine)
    interpolation = "linear" if order == 1 else "nearest"
    out = resample_img(img, target_affine=TARGET.affine, target_shape=TARGET.shape, interpolation=interpolation, force_resample=True, copy_header=True)
    return out.get_fdata()


@pytest.fixture(scope="module")
def real_references():
    """Per real run: 4 frames, and their map_coordinates and nilearn resamplings onto MNI 2 mm 96^3."""
    out = {}
    for path in REAL_RUNS:
        vol = open_volume(path)
        frames = vol.read(0, 4)
        reference = resample_volume(frames, vol.affine, TARGET.shape, TARGET.affine, method="reference")
        out[path.name] = (frames, vol.affine, reference, _nilearn(frames, vol.affine))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_match_scipy_and_nilearn_on_the_real_runs(backend, real_references):
    method, device = backend
    assert len(real_references) == 3
    for name, (frames, affine, reference, nilearn) in real_references.items():
        ours = resample_volume(frames, affine, TARGET.shape, TARGET.affine, method=method, device=device)
        assert ours.dtype == np.float32 and ours.shape == reference.shape
        tol = _tolerance(frames)
        assert np.abs(ours - reference).max() <= tol, name
        assert np.abs(ours - nilearn).max() <= tol, name
        assert np.count_nonzero(ours) > 0.05 * ours.size, name


@pytest.fixture(scope="module")
def me1_frames():
    return open_volume(ME1).read(0, 3)


OBLIQUE = dict(zip(["rotated", "rotated-las-aniso", "rotated-flipped-aniso"], _oblique_affines()))


@pytest.fixture(scope="module")
def oblique_references(me1_frames):
    """map_coordinates (order 0 and 1) and nilearn (linear) of real frames on oblique source grids."""
    out = {}
    for name, affine in OBLIQUE.items():
        for order in (0, 1):
            out[name, order] = resample_volume(me1_frames, affine, TARGET.shape, TARGET.affine, order=order, method="reference")
        out[name, "nilearn"] = _nilearn(me1_frames, affine)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OBLIQUE))
def test_backends_on_oblique_anisotropic_and_flipped_affines(backend, name, me1_frames, oblique_references):
    # real voxel values from a real run, placed on rotated / LAS / anisotropic grids
    method, device = backend
    tol = _tolerance(me1_frames)
    for order in (0, 1):
        ours = resample_volume(me1_frames, OBLIQUE[name], TARGET.shape, TARGET.affine, order=order, method=method, device=device)
        mismatch = np.abs(ours - oblique_references[name, order]) > tol
        # nearest neighbour may round exact .5 ties differently only through float noise
        assert mismatch.mean() < (1e-5 if order == 0 else 1e-12)
        assert np.count_nonzero(ours[..., 0]) > 1000
    assert np.abs(ours - oblique_references[name, "nilearn"]).max() <= tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunking_dtypes_and_output_layout_do_not_change_the_result(backend, me1_frames):
    method, device = backend
    rng = np.random.default_rng(3)
    matrix = sp.random(700, 500, density=0.01, format="csr", random_state=4)
    x = rng.standard_normal((500, 37))
    expected = matrix @ x
    tiny = PreparedOperator(matrix, method, device, chunk_bytes=4 * 500 * 5)  # 5 columns per chunk
    whole = PreparedOperator(matrix, method, device)
    for given in (x, x.astype(np.float32), np.asfortranarray(x), (100 * x).astype(np.int16)):
        want = matrix @ given.astype(np.float64)
        for op in (tiny, whole):
            np.testing.assert_allclose(op(given), want, rtol=0, atol=1e-5 * np.ptp(want))
    out = np.zeros((37, 700), dtype=np.float32)  # written through a transposed view
    tiny(x, out=out.T)
    np.testing.assert_allclose(out.T, expected, rtol=0, atol=1e-5 * np.ptp(expected))
    # rows without weights are 0, not left over from a previous call
    empty = PreparedOperator(sp.csr_matrix((3, 500)), method, device)
    np.testing.assert_array_equal(empty(x, out=np.full((3, 37), 7.0, dtype=np.float32)), 0.0)
    with pytest.raises(ValueError, match="input"):
        whole(x[:10])
    # the 4D path chunks over frames: a chunk of 1 frame gives the same run. The numba and
    # torch-CPU kernels sum each output's (<= 8) weights in CSR order whatever the chunk, so
    # they are bitwise equal; cuSPARSE picks its summation order (and algorithm) by the
    # dense operand's width, so on CUDA only float32 rounding may differ: a few ulp of the
    # largest weighted sum, i.e. 8 terms * 2**-23 relative to the data range.
    one = resample_volume(me1_frames, open_volume(ME1).affine, TARGET.shape, TARGET.affine, method=method, device=device, chunk_bytes=1)
    all_ = resample_volume(me1_frames, open_volume(ME1).affine, TARGET.shape, TARGET.affine, method=method, device=device)
    if device == "cuda":
        np.testing.assert_allclose(one, all_, rtol=0, atol=8 * 2.0**-23 * float(np.abs(me1_frames).max()))
    else:
        np.testing.assert_array_equal(one, all_)


@pytest.fixture(scope="module")
def hcp():
    return open_cifti(HCP_PTSERIES).read()  # (1200, 419) real HCP parcel series, TR 0.72 s


@pytest.mark.parametrize("backend", BACKENDS + [pytest.param(("sparse", "cpu"), id="scipy-sparse")])
@pytest.mark.parametrize(
    "tr_out, kind, antialias",
    [(0.5, "linear", True), (0.5, "cubic", True), (2.0, "linear", True), (2.0, "cubic", True), (1.44, "linear", True), (0.8, "cubic", False)],
)
def test_temporal_backends_match_scipy_on_the_real_hcp_series(backend, tr_out, kind, antialias, hcp):
    method, device = backend
    ours = resample_tr(hcp, 0.72, tr_out, kind, antialias, method=method, device=device)
    reference = resample_tr_reference(hcp, 0.72, tr_out, kind, antialias)
    assert ours.dtype == np.float32 and ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-4 * np.ptp(hcp))
    # one series (1D) goes through the same operator
    np.testing.assert_allclose(resample_tr(hcp[:, 5], 0.72, tr_out, kind, antialias, method=method, device=device), ours[:, 5], atol=1e-5 * np.ptp(hcp))


def test_temporal_operator_is_banded_and_cached():
    linear = temporal_operator(1200, 0.72, 0.5, "linear", True)  # upsampling: 2 weights per frame
    assert linear.shape == (1727, 1200) and linear.getnnz(axis=1).max() <= 2
    decimate = temporal_operator(1200, 0.72, 1.44, "linear", True)  # 41-tap low-pass folded in
    assert decimate.getnnz(axis=1).max() <= 41
    np.testing.assert_allclose(np.asarray(decimate.sum(axis=1)).ravel(), 1.0, atol=1e-6)
    cubic = temporal_operator(1200, 0.72, 2.0, "cubic", True)
    assert cubic.getnnz(axis=1).max() < 200  # spline weights decay: far from dense (1200)
    assert temporal_operator(1200, 0.72, 2.0, "cubic", True) is cubic


def test_backend_dispatch(monkeypatch):
    assert resolve_backend("numba", "cpu") == ("numba", "cpu")
    assert resolve_backend("torch", "cpu") == ("torch", "cpu")
    assert resolve_backend("reference", "auto") == ("sparse", "cpu")
    assert resolve_backend("auto", "cpu") == ("numba", "cpu")
    with pytest.raises(ValueError, match="unknown resampling method"):
        resolve_backend("fast", "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_backend("auto", "tpu")
    with pytest.raises(ValueError, match="CPU only"):
        monkeypatch.setattr(operator_module, "cuda_available", lambda: True)
        resolve_backend("numba", "cuda")
    # auto: torch on CUDA when torch sees a device and it measured faster than numba here
    monkeypatch.setattr(operator_module, "cuda_is_faster", lambda: True)
    assert resolve_backend("auto", "auto") == ("torch", "cuda")
    monkeypatch.setattr(operator_module, "cuda_is_faster", lambda: False)
    assert resolve_backend("auto", "auto") == ("numba", "cpu")
    assert resolve_backend("torch", "auto") == ("torch", "cuda")  # an explicit backend is not second-guessed
    assert resolve_backend("auto", "cuda") == ("torch", "cuda")    # nor an explicit device
    assert resolve_backend("auto", "cpu") == ("numba", "cpu")
    monkeypatch.setattr(operator_module, "cuda_available", lambda: False)
    assert resolve_backend("auto", "auto") == ("numba", "cpu")
    assert resolve_backend("torch", "auto") == ("torch", "cpu")
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_backend("auto", "cuda")


def test_fastest_is_the_quickest_call_after_a_warm_up():
    import time

    calls = {"slow": 0, "quick": 0}

    def slow():
        calls["slow"] += 1
        time.sleep(0.05 if calls["slow"] > 1 else 0.0)  # the warm-up call is not timed

    def quick():
        calls["quick"] += 1
        time.sleep(0.2 if calls["quick"] == 1 else 0.0)  # e.g. compilation or device start-up

    assert operator_module.fastest({"slow": slow, "quick": quick}, repeats=3) == "quick"
    assert calls == {"slow": 4, "quick": 4}


def test_measured_choice_runs_both_backends_once_per_process(monkeypatch):
    # torch on the CPU stands in for the CUDA device: the measurement path is the same
    real = operator_module.PreparedOperator
    built = []

    def prepared(matrix, method="auto", device="auto", *args, **kwargs):
        built.append((method, device))
        return real(matrix, method, "cpu" if device == "cuda" else device, *args, **kwargs)

    monkeypatch.setattr(operator_module, "PreparedOperator", prepared)
    operator_module.cuda_is_faster.cache_clear()
    try:
        assert operator_module.cuda_is_faster() in (True, False)
        operator_module.cuda_is_faster()
    finally:
        operator_module.cuda_is_faster.cache_clear()
    assert built == [("torch", "cuda"), ("numba", "cpu")]


@needs_cuda
def test_cuda_matches_numba(me1_frames):
    affine = open_volume(ME1).affine
    a = resample_volume(me1_frames, affine, TARGET.shape, TARGET.affine, method="numba")
    b = resample_volume(me1_frames, affine, TARGET.shape, TARGET.affine, method="auto", device="auto")
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.ptp(me1_frames))


def test_conversion_uses_the_numba_kernel_by_default(tmp_path, atlas_dir, monkeypatch):
    monkeypatch.setattr(operator_module, "cuda_available", lambda: False)
    calls, row_calls = [], []
    run_kernel = operator_module._run_kernel

    def spy(indptr, indices, data, x, out, kernel=operator_module._csr_times_dense):
        (row_calls if kernel is operator_module._csr_times_rows else calls).append(out.shape)
        return run_kernel(indptr, indices, data, x, out, kernel)

    monkeypatch.setattr(operator_module, "_run_kernel", spy)
    out = str(tmp_path / "a.zarr")
    report = convert(DS_REAL, out, overrides=["temporal.tr=1.5"], participant_label=["me1"], atlas_dir=atlas_dir, progress=False)
    assert report.count("complete") == 1, [r.error for r in report.failed]
    attrs = Store.open(out).run_attrs(report.results[0].run_id)
    n_brain, n_source = attrs["volume"]["n_brain_voxels"], attrs["n_frames_source"]
    # spatial, on frame rows: (frames, brain voxels) blocks covering every source frame once
    assert sum(r for r, c in row_calls if c == n_brain) == n_source
    # TR 2.0 -> 1.5 s: the brain streamed in bands of output frames (each frame once), the
    # parcels as one (output frames, parcels) call
    assert sum(r for r, c in calls if c == n_brain) == attrs["n_frames"]
    assert (attrs["n_frames"], 400) in calls
    assert attrs["n_frames"] == 213
    # a CUDA request without a device fails the run with a clear message
    if not cuda_available():
        report = convert(DS_REAL, str(tmp_path / "b.zarr"), overrides=["compute.device=cuda"], participant_label=["me1"], atlas_dir=atlas_dir, progress=False)
        assert report.failed and all("no CUDA device" in r.error for r in report.failed)


def test_apply_operator_is_matrix_times_frames():
    matrix = sp.csr_matrix(np.array([[0.5, 0.5, 0.0], [0.0, 0.0, 2.0]]))
    frames = np.arange(6, dtype=np.float32).reshape(3, 2)  # synthetic: a known product
    np.testing.assert_array_equal(apply_operator(matrix, frames, "numba", "cpu"), [[1.0, 2.0], [8.0, 10.0]])


def test_numba_weights_equal_the_numpy_weights_bitwise():
    # real oblique geometry plus synthetic coordinates on the edges of the source grid
    # (exactly 0 and n - 1, just outside, a 1-voxel-thick axis) where the clipping rules act
    from fmri_data.resample import grid_indices, source_coordinates, trilinear_weights

    coords = source_coordinates(OBLIQUE["rotated-las-aniso"], TARGET.affine, grid_indices(TARGET.shape))
    edges = np.array([[0.0, 0.0, 0.0], [40.0, 51.0, 27.0], [40.0 + 1e-12, 3.0, 3.0], [-1e-12, 2.5, 1.0], [20.25, 51.0, 0.5]])
    for shape, extra in (((41, 52, 28), edges), ((41, 52, 1), np.array([[3.5, 2.25, 0.0], [3.5, 2.25, 1e-9]]))):
        c = np.vstack([coords, extra])
        fast, slow = trilinear_weights(c, shape, "numba"), trilinear_weights(c, shape, "numpy")
        np.testing.assert_array_equal(fast[0], slow[0])
        np.testing.assert_array_equal(fast[1], slow[1])
    assert fast[1][-2].sum() == 1.0 and fast[1][-1].sum() == 0.0  # on the single plane / off it


def test_unit_gather_rows_equal_the_sum_kernel():
    # synthetic: an operator whose rows copy one input (weight exactly 1) or none, the
    # grid-shift case, on frames holding -0.0: the gather kernel gives the summing kernel's
    # values bit for bit; a weight other than 1 or a second weight in a row is not a gather
    rng = np.random.default_rng(3)
    n_out, n_in = 500, 700
    source = rng.integers(0, n_in, n_out)
    source[::7] = -1  # rows outside the source field of view
    rows = np.flatnonzero(source >= 0)
    matrix = sp.csr_matrix((np.ones(rows.size), (rows, source[rows])), shape=(n_out, n_in))
    frames = rng.normal(size=(9, n_in)).astype(np.float32)
    frames[:, ::5] = -0.0
    op = PreparedOperator(matrix, "numba", "cpu")
    np.testing.assert_array_equal(op._gather, source)
    fast = op.apply_rows(frames)
    slow = np.empty_like(fast)
    operator_module._csr_times_rows(op._indptr, op._indices, op._data, frames, slow)
    np.testing.assert_array_equal(fast.view(np.uint32), slow.view(np.uint32))
    assert PreparedOperator(matrix * 0.5, "numba", "cpu")._gather is None
    assert PreparedOperator(matrix + sp.eye(n_out, n_in, format="csr"), "numba", "cpu")._gather is None
