"""Flat-map operators, volume-to-surface projection, the flat_mae conversion and its PNG preview.

Geometry is real (fsaverage5 flat surfaces from nilearn, fsLR 32k from ../shared/data,
pycortex's S1); vertex values are synthetic where a test needs a known answer (random
values compared against scipy, linear ramps, +1/-1 hemispheres).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.interpolate import LinearNDInterpolator

from fmri_data.derive import flatmap as fm
from fmri_data.resample.operator import PreparedOperator, cuda_available
from fmri_data.reference.surfaces import load_family

from conftest import ATLASES, DS_REAL

PARAMS = dict(resolution_mm=1.2, bbox_mm=[-336, 336, -122.8, 146], fit="contain", hemisphere_gap_mm=8,
              edge_threshold_mm=16, triangulation="delaunay")
NO_MASK = {"L": None, "R": None}
needs_cuda = pytest.mark.skipif(not cuda_available(), reason="no CUDA device")
BACKENDS = [  # the shared kernel's backends, each against LinearNDInterpolator (the reference)
    pytest.param(("numba", "cpu"), id="numba"),
    pytest.param(("torch", "cpu"), id="torch-cpu"),
    pytest.param(("reference", "cpu"), id="scipy"),
    pytest.param(("torch", "cuda"), id="torch-cuda", marks=needs_cuda),
]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FMRI_DATA_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def fsaverage5():
    return load_family("fsaverage5")


@pytest.fixture(scope="module")
def fs5_op(fsaverage5):
    """The reference-grid operator of fsaverage5 (built once for the module, not cached on disk)."""
    return fm.surface_flat_operator(fsaverage5.flat, NO_MASK, PARAMS, cache=False)


def _placed(family, params):
    bbox = tuple(params["bbox_mm"]) if params["bbox_mm"] else None
    placed = fm.layout(family.flat, NO_MASK, params["hemisphere_gap_mm"], params["edge_threshold_mm"], bbox, params["fit"])
    return placed, fm.fitted_grid(placed.points, params["resolution_mm"], bbox)


@pytest.mark.parametrize("backend", BACKENDS)
def test_operator_equals_linear_nd_interpolator(fsaverage5, fs5_op, backend):
    op = fs5_op
    placed, grid = _placed(fsaverage5, PARAMS)
    assert op.mask.shape == (224, 560) and grid.shape == (224, 560)
    assert 0.5 < op.mask.mean() < 0.7  # reference: ~62% of the image is cortex
    values = np.random.default_rng(0).standard_normal((placed.n_vertices, 3))
    ours = fm.render_flat(op.matrix, op.mask, values, method=backend[0], device=backend[1])  # (3, H, W)
    reference = LinearNDInterpolator(placed.points, values[placed.vertex_index])(grid.points())  # (H*W, 3)
    inside = op.mask.ravel()
    assert np.isfinite(reference[inside]).all()
    np.testing.assert_allclose(ours.reshape(3, -1)[:, inside], reference[inside].T, atol=1e-5)
    assert (ours[:, ~op.mask] == 0).all()


def test_prepared_operator_renders_blocks_with_fill(fs5_op):
    op = fs5_op
    values = np.random.default_rng(1).standard_normal((op.matrix.shape[1], 100)).astype(np.float32)
    whole = fm.render_flat(op.matrix, op.mask, values, method="reference")
    prepared = PreparedOperator(op.matrix, "numba", "cpu")  # once per run, as convert/flat.py does
    # a block of more than FRAMES_PER_STEP frames, and a strided (time-first) block
    blocks = [fm.render_flat(prepared, op.mask, values[:, :84], fill=np.nan),
              fm.render_flat(prepared, op.mask, values[:, 84:].T.copy().T, fill=np.nan)]
    image = np.concatenate(blocks)
    assert fm.FRAMES_PER_STEP < 84
    assert image.shape == (100, 224, 560) and np.isnan(image[:, ~op.mask]).all()
    np.testing.assert_allclose(image[:, op.mask], whole[:, op.mask], atol=1e-5)
    with pytest.raises(ValueError, match="rows"):
        fm.render_flat(prepared, op.mask, values[:-1])
    short = op.mask.copy()
    short.flat[np.flatnonzero(short)[0]] = False
    with pytest.raises(ValueError, match="valid pixels"):
        fm.render_flat(prepared, short, values)


@needs_cuda
def test_cuda_render_matches_cpu(fs5_op):
    op = fs5_op
    values = np.random.default_rng(2).standard_normal((op.matrix.shape[1], 64)).astype(np.float32)
    gpu = fm.render_flat(op.matrix, op.mask, values, method="torch", device="cuda")
    cpu = fm.render_flat(op.matrix, op.mask, values, method="numba", device="cpu")
    np.testing.assert_allclose(gpu, cpu, atol=1e-5)


@pytest.mark.parametrize("triangulation", ["delaunay", "mesh"])
def test_linear_ramp_maps_to_linear_ramp(fsaverage5, fs5_op, triangulation):
    params = dict(PARAMS, triangulation=triangulation)
    op = fs5_op if triangulation == "delaunay" else fm.surface_flat_operator(fsaverage5.flat, NO_MASK, params)
    placed, grid = _placed(fsaverage5, params)
    values = np.zeros(placed.n_vertices)
    values[placed.vertex_index] = 0.5 * placed.points[:, 0] - 2.0 * placed.points[:, 1] + 3.0
    image = fm.render_flat(op.matrix, op.mask, values)
    xy = grid.points().reshape(224, 560, 2)
    expected = 0.5 * xy[..., 0] - 2.0 * xy[..., 1] + 3.0
    np.testing.assert_allclose(image[op.mask], expected[op.mask], atol=1e-3)  # float32 output of ~1e3 values
    # row 0 is the top: the ramp in -y grows downwards
    rows = np.flatnonzero(op.mask[:, 280:].any(axis=1))
    assert image[rows[-1], 280:][op.mask[rows[-1], 280:]].mean() > image[rows[0], 280:][op.mask[rows[0], 280:]].mean()


def test_hemispheres_not_swapped(fsaverage5, fs5_op):
    op = fs5_op
    n = fsaverage5.n_vertices
    image = fm.render_flat(op.matrix, op.mask, np.r_[np.ones(n["L"]), -np.ones(n["R"])])
    x = fm.FlatGrid(-336, 336, -122.8, 146, 1.2).points()[:, 0].reshape(op.mask.shape)
    np.testing.assert_allclose(image[op.mask & (x < -8)], 1, atol=1e-6)
    np.testing.assert_allclose(image[op.mask & (x > 8)], -1, atol=1e-6)
    assert (op.mask & (x < -8)).sum() > 20000 and (op.mask & (x > 8)).sum() > 20000


def test_operator_cached_on_disk_by_content(fsaverage5, tmp_path):
    params = dict(PARAMS, triangulation="mesh")
    first = fm.surface_flat_operator(fsaverage5.flat, NO_MASK, params)
    path = fm.cache_dir() / f"{first.meta['key']}.npz"
    assert path.is_file()
    again = fm.surface_flat_operator(fsaverage5.flat, NO_MASK, params)
    assert (again.matrix != first.matrix).nnz == 0 and (again.mask == first.mask).all()
    other = fm.surface_flat_operator(fsaverage5.flat, NO_MASK, dict(params, resolution_mm=2.4))
    assert other.meta["key"] != first.meta["key"] and other.mask.shape == (112, 280)
    path.write_bytes(b"truncated")  # a corrupt cache file is rebuilt, not trusted
    rebuilt = fm.surface_flat_operator(fsaverage5.flat, NO_MASK, params)
    assert (rebuilt.matrix != first.matrix).nnz == 0


def test_fslr_family_atlas_cortex_and_fit():
    from fmri_data.reference.atlases import load_atlas
    from fmri_data.reference.surfaces import cortex_from_dlabel

    family = load_family("fsLR", str(ATLASES))
    dlabel = load_atlas("schaefer400_7n", ATLASES).components[0].surface
    cortex = cortex_from_dlabel(dlabel, family.n_vertices)
    assert 29000 < cortex["L"].sum() < 29700  # labelled cortex, medial wall excluded
    params = dict(PARAMS, resolution_mm=2.4, triangulation="mesh")  # coarse grid, no Delaunay: fast; same geometry
    op = fm.surface_flat_operator(family.flat, cortex, params)
    assert op.mask.shape == (112, 280) and op.meta["scale"] < 1  # HCP's S1200 flat maps are larger than the box
    medial = np.flatnonzero(~np.r_[cortex["L"], cortex["R"]])
    assert op.matrix[:, medial].nnz == 0
    cut = fm.surface_flat_operator(family.flat, cortex, dict(params, fit="none"))
    assert cut.meta["scale"] == 1 and cut.mask.mean() > op.mask.mean()  # cut at the box instead


def test_pycortex_subject_s1():
    pytest.importorskip("cortex")
    family = load_family("pycortex:S1")
    assert family.n_vertices["L"] > 100000
    params = dict(PARAMS, resolution_mm=4.0, bbox_mm=None, fit="none", edge_threshold_mm=None, triangulation="mesh")
    op = fm.surface_flat_operator(family.flat, NO_MASK, params)
    placed, grid = _placed(family, params)
    values = np.zeros(placed.n_vertices)
    values[placed.vertex_index] = placed.points[:, 0]
    image = fm.render_flat(op.matrix, op.mask, values)
    np.testing.assert_allclose(image[op.mask], grid.points()[op.mask.ravel(), 0], atol=1e-3)
    assert op.mask.mean() > 0.3


def test_pycortex_missing_filestore_falls_back_to_the_installed_database(tmp_path, monkeypatch):
    """pycortex pins the filestore of the environment that built it; a stale one must not
    break loading, and a missing database gives an error naming it."""
    import sys

    cortex = pytest.importorskip("cortex")
    from fmri_data.errors import InputError
    from fmri_data.reference.surfaces import _pycortex_database

    monkeypatch.setattr(cortex.db, "filestore", str(tmp_path / "gone"))
    db = _pycortex_database(cortex, "S1")
    assert db.filestore == f"{sys.prefix}/share/pycortex/db" and "S1" in db.subjects
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    with pytest.raises(InputError, match="gone"):
        _pycortex_database(cortex, "S1")


def test_projection_matches_nilearn_vol_to_surf(fsaverage5):
    import nibabel as nib
    from nilearn import surface

    from fmri_data.read.nifti import open_volume

    vol = open_volume(DS_REAL / "derivatives/preproc/sub-me1/func/sub-me1_task-visual_desc-preproc_bold.nii.gz")
    frame = vol.read(0, 1)[..., 0].astype(np.float64)
    pial, faces = fsaverage5.pial["L"]
    white, _ = fsaverage5.white["L"]
    matrix = fm.projection_matrix(pial, white, None, vol.affine, frame.shape, n_samples=10)
    img = nib.Nifti1Image(frame, vol.affine)
    expected = surface.vol_to_surf(img, surface.InMemoryMesh(pial, faces), inner_mesh=surface.InMemoryMesh(white, faces),
                                   n_samples=10, interpolation="linear", kind="depth")
    ours = matrix @ frame.ravel()
    finite = np.isfinite(expected)
    assert 1000 < finite.sum() < len(expected)  # native-space run: part of the cortex is outside the image
    np.testing.assert_allclose(ours[finite], expected[finite], rtol=1e-6, atol=1e-6)
    assert matrix[~finite].nnz == 0


def test_restrict_to_vertices_renormalizes():
    import scipy.sparse as sp

    matrix = sp.csr_matrix(np.array([[0.5, 0.25, 0.25], [0.0, 0.0, 1.0]]))
    mask = np.array([[True, False, True]])
    kept, new_mask = fm.restrict_to_vertices(matrix, np.array([True, True, False]), mask)
    np.testing.assert_allclose(kept.toarray(), [[2 / 3, 1 / 3, 0.0]])
    assert new_mask.tolist() == [[True, False, False]]


def test_png_preview_pure():
    from fmri_data.qa.preview import flat_png

    mask = np.zeros((20, 50), dtype=bool)
    mask[5:15, 5:20] = mask[5:15, 30:45] = True
    png = flat_png(np.random.default_rng(0).standard_normal((2, 20, 50)), mask)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        flat_png(np.zeros((20, 49)), mask)


@pytest.mark.slow
def test_convert_flat_mae_real(tmp_path, atlas_dir):
    from fmri_data import Store
    from fmri_data.convert import convert
    from fmri_data.cli.flat import write_preview
    from fmri_data.read.gifti import open_gifti_series
    from fmri_data.config.schema import validate

    out = tmp_path / "flat.zarr"
    report = convert(DS_REAL, str(out), "flat_mae", atlas_dir=atlas_dir, participant_label=["010188", "me1"], progress=False)
    assert not report.failed, [r.error for r in report.failed]
    store = Store.open(str(out))
    run_id = "sub-010188_ses-02_task-rest_acq-AP_run-01"
    attrs = store.run_attrs(run_id)
    validate(attrs, "run", run_id)
    video, mask = store.run(run_id)["flat"], store.run(run_id)["flat_mask"][:]
    assert attrs["n_frames_source"] == 652 and attrs["tr_s"] == 1.0
    assert video.shape == (attrs["n_frames"], 224, 560) == (912, 224, 560)  # 652 frames x 1.4 s at TR 1.0 s
    assert video.dtype == np.float16 and video.chunks == (16, 224, 560)
    assert attrs["flat"]["family"] == "fsaverage5" and attrs["flat"]["normalization"]["kind"] == "vertex_zscore"
    frame0 = video[0].astype(np.float32)
    # no_signal: keep (the reference): the run's constant (medial wall) vertices stay in the
    # mask as zeros, ~2% of it; the rest is signal
    assert attrs["flat"]["no_signal"] == "keep" and attrs["flat"]["fit"] == "none"
    assert (frame0[~mask] == 0).all() and 0.97 * mask.sum() < np.count_nonzero(frame0[mask]) < mask.sum()

    # left hemisphere on the left: frame 0 at x < 0 is the z-scored hemi-L data, interpolated
    # independently with scipy on the left patch (frame 0 is not changed by the TR resampling)
    src = DS_REAL / "derivatives/preproc/sub-010188/ses-02/func"
    family = load_family("fsaverage5")
    placed, grid = _placed(family, dict(PARAMS, fit="none"))  # flat_mae's default geometry
    x = grid.points()[:, 0].reshape(mask.shape)
    for hemi, side in (("L", x < 0), ("R", x > 0)):
        data = open_gifti_series(next(src.glob(f"*hemi-{hemi}_*.func.gii"))).read()
        std = data.std(axis=1)
        z0 = np.where(std > 1e-6, (data[:, 0] - data.mean(axis=1)) / np.where(std > 1e-6, std, 1), 0)
        offset = 0 if hemi == "L" else family.n_vertices["L"]
        own = (placed.vertex_index >= offset) & (placed.vertex_index < offset + family.n_vertices[hemi])
        interp = LinearNDInterpolator(placed.points[own], z0[placed.vertex_index[own] - offset])(grid.points())
        pick = (mask & side).ravel() & np.isfinite(interp)
        r = np.corrcoef(frame0.ravel()[pick], interp[pick])[0, 1]
        assert r > 0.95, (hemi, r)

    me1 = store.run_attrs("sub-me1_task-visual")
    assert me1["flat"]["source"] == "volume" and me1["flat"]["family"] == "fsLR"
    assert store.run("sub-me1_task-visual")["flat"].shape == (me1["n_frames"], 224, 560)
    assert any("world coordinates" in w for w in me1["warnings"])
    png = write_preview(str(out), run_id, [0, 100], str(tmp_path / "p.png"))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "p.png").stat().st_size == len(png)


def _cifti_flat(tmp_path, atlas_dir, left, right, overrides=()):
    """A synthetic dense CIFTI on the real fsLR cortex structures (every left vertex carries
    ``left``, every right vertex ``right``, TR 1 s) converted with flat_mae on a 2.4 mm grid."""
    import nibabel as nib

    from conftest import make_bids
    from fmri_data import Store
    from fmri_data.convert import convert

    models = nib.load(ATLASES / "tpl-fsLR_den-32k_atlas-Schaefer2018_desc-400Parcels7Networks_dseg.dlabel.nii").header.get_axis(1)
    cortex = [(name, slc) for name, slc, _ in models.iter_structures() if "CORTEX" in str(name)]
    assert len(cortex) == 2
    data = np.zeros((len(left), len(models)), dtype=np.float32)
    for name, slc in cortex:
        data[:, slc] = (left if "LEFT" in str(name) else right)[:, None]
    img = nib.Cifti2Image(data, header=(nib.cifti2.SeriesAxis(0, 1.0, len(left), unit="second"), models))
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "src.dtseries.nii"
    img.to_filename(path)
    root = make_bids(tmp_path / "bids", {"sub-01/func/sub-01_task-rest_space-fsLR_den-91k_bold.dtseries.nii": path,
                                          "sub-01/func/sub-01_task-rest_space-fsLR_den-91k_bold.json": '{"RepetitionTime": 1.0}'})
    out = tmp_path / "cifti.zarr"
    report = convert(root, str(out), "flat_mae", atlas_dir=atlas_dir,
                     overrides=["flat.resolution_mm=2.4", "flat.triangulation=mesh", *overrides], progress=False)
    assert not report.failed, [r.error for r in report.failed]
    return Store.open(str(out))


def test_no_signal_keep_and_drop(tmp_path, atlas_dir):
    """flat.no_signal: keep (flat_mae's default, the reference) interpolates a constant
    hemisphere as zeros inside the geometry's mask; drop takes its pixels out of flat_mask."""
    t = np.arange(20, dtype=np.float64)
    left, right = np.full(20, 5.0), np.cos(0.3 * t)
    kept = _cifti_flat(tmp_path / "keep", atlas_dir, left, right)
    dropped = _cifti_flat(tmp_path / "drop", atlas_dir, left, right, ["flat.no_signal=drop"])
    mask_k, mask_d = kept.run("sub-01_task-rest")["flat_mask"][:], dropped.run("sub-01_task-rest")["flat_mask"][:]
    video_k = kept.run("sub-01_task-rest")["flat"][:].astype(np.float32)
    assert kept.run_attrs("sub-01_task-rest")["flat"]["no_signal"] == "keep"
    assert dropped.run_attrs("sub-01_task-rest")["flat"]["no_signal"] == "drop"
    assert mask_k[:, :140].sum() > 1000 and (video_k[:, :, :140][:, mask_k[:, :140]] == 0).all()
    assert not mask_d[:, :140].any()
    assert (mask_d[:, 140:] == mask_k[:, 140:]).all()


def test_dense_cifti_to_flat(tmp_path, atlas_dir):
    """Synthetic dense CIFTI on the real fsLR cortex structures: every left vertex carries one
    series, every right vertex another, so each hemisphere's pixels must show its own z-scored series."""
    t = np.arange(20, dtype=np.float64)
    left, right = np.sin(0.5 * t) + 3.0, np.cos(0.3 * t) * 2.0 - 1.0
    store = _cifti_flat(tmp_path, atlas_dir, left, right)
    attrs = store.run_attrs("sub-01_task-rest")
    assert attrs["flat"]["source"] == "cifti_dense" and attrs["flat"]["family"] == "fsLR"
    video, mask = store.run("sub-01_task-rest")["flat"][:].astype(np.float32), store.run("sub-01_task-rest")["flat_mask"][:]
    assert video.shape == (20, 112, 280)
    for series, half in ((left, slice(0, 140)), (right, slice(140, 280))):
        z = (series - series.mean()) / series.std()
        pixels = video[:, :, half][:, mask[:, half]]
        assert pixels.shape[1] > 1000
        np.testing.assert_allclose(pixels, np.repeat(z[:, None], pixels.shape[1], axis=1), atol=5e-3)


def test_wrong_vertex_count_fails_clearly(tmp_path, atlas_dir):
    import nibabel as nib

    from conftest import make_bids
    from fmri_data.convert import convert

    files = {}
    for hemi in ("L", "R"):
        darrays = [nib.gifti.GiftiDataArray(np.random.default_rng(0).standard_normal(100).astype(np.float32),
                                            intent="NIFTI_INTENT_TIME_SERIES") for _ in range(5)]
        path = tmp_path / f"{hemi}.func.gii"
        nib.save(nib.GiftiImage(darrays=darrays), path)
        files[f"sub-01/func/sub-01_task-rest_hemi-{hemi}_space-fsaverage5_bold.func.gii"] = path
    files["sub-01/func/sub-01_task-rest_bold.json"] = '{"RepetitionTime": 2.0}'
    report = convert(make_bids(tmp_path / "bids", files), str(tmp_path / "bad.zarr"), "flat_mae", atlas_dir=atlas_dir,
                     progress=False)
    assert len(report.failed) == 1
    assert "hemi-L_space-fsaverage5_bold.func.gii: 100 vertices; fsaverage5 hemi-L has 10242" in report.failed[0].error
