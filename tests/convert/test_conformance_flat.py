"""Model-exact flat-map recipe: what ``flat_mae`` stores, checked against the released
preprocessing of the flat-map MAE.

Reference: MedARC-AI/fmri-fm @ 6a2c3c6cf8995a534ee0d728779f6a247f167874
(``src/data/surface_utils.py``: ``stack_surfaces``, ``extract_valid_flat``,
``FlatResampler``, ``fit_grid``, ``resample_timeseries``; ``main_generate_hcp_flat.py``:
``preprocess_series``), see the header of ``pipelines/flat_mae.yaml``.

The reference is recomputed here independently of ``fmri_data.derive.flatmap`` and
``fmri_data.resample.temporal``: numpy, matplotlib's ``Triangulation`` / ``TriFinder`` and
scipy's ``Delaunay``, ``LinearNDInterpolator``, ``cheby1`` and ``PchipInterpolator``, on the
same flat surfaces the recipe uses for this run (nilearn's fsaverage5 flat meshes; the
pycortex "32k_fs_LR" database surfaces of the reference are a listed deviation).

Cortex labels: for fsaverage5 runs the recipe's ``medial_wall: auto`` has no parcellation
(``schaefer400_7n`` ships on fsLR only), so the recipe's vertex mask, and the one used
here, is the in-plane test alone; the reference intersects it with Schaefer-1000 > 0.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from matplotlib.tri import Triangulation
from scipy import interpolate, signal
from scipy.spatial import Delaunay

from conftest import DS_REAL
from fmri_data.store.root import Store

RUN = "sub-010188_ses-02_task-rest_acq-AP_run-01"
SRC = DS_REAL / "derivatives/preproc/sub-010188/ses-02/func"
TR_IN, TR_OUT, N_SOURCE = 1.4, 1.0, 652
PIXEL, BBOX, PADDING, EDGE = 1.2, (-336.0, 336.0, -122.8, 146.0), 8.0, 16.0
FRAMES = [0, 1, 455, 910, 911]  # first, interior, last (PCHIP end slopes)


@pytest.fixture(scope="module")
def reference_patch():
    """The reference geometry (``load_flat`` + ``extract_valid_flat`` + ``FlatResampler.fit``)
    rebuilt from nilearn's fsaverage5 flat surfaces.

    Returns ``(vertex_mask (V_L + V_R,), points (n, 2), polys (F, 3), grid (2, H, W), mask (H, W))``.
    """
    from nilearn import datasets

    flat = datasets.load_fsaverage("fsaverage5")["flat"]
    lh, rh = (flat.parts[h] for h in ("left", "right"))
    points_lh = np.array(lh.coordinates, dtype=np.float64)
    points_rh = np.array(rh.coordinates, dtype=np.float64)
    # stack_surfaces: shift only (no scaling), on the whole surfaces, before any masking
    points_lh[:, 0] = points_lh[:, 0] - points_lh[:, 0].max() - PADDING
    points_rh[:, 0] = points_rh[:, 0] - points_rh[:, 0].min() + PADDING
    points = np.concatenate([points_lh, points_rh])
    polys = np.concatenate([np.asarray(lh.faces), len(points_lh) + np.asarray(rh.faces)])
    # extract_valid_flat: in-plane vertices (& cortex labels > 0: none for fsaverage5, see above)
    vertex_mask = np.abs(points[:, 2]) < 1e-5
    index = np.cumsum(vertex_mask) - 1
    polys = index[polys[vertex_mask[polys].all(axis=1)]]
    points = points[vertex_mask, :2]
    a, b, c = (points[polys[:, k]] for k in range(3))
    longest = np.maximum.reduce([np.linalg.norm(b - a, axis=1), np.linalg.norm(c - b, axis=1),
                                 np.linalg.norm(a - c, axis=1)])
    polys = polys[longest < EDGE]
    # fit_grid with rect = bbox: corner-aligned sample points, upper origin
    xmin, xmax, ymin, ymax = BBOX
    w, h = round((xmax - xmin) / PIXEL), round((ymax - ymin) / PIXEL)
    grid = np.stack(np.meshgrid(xmin + PIXEL * np.arange(w), ymax - PIXEL * np.arange(h)))
    trifinder = Triangulation(points[:, 0], points[:, 1], polys).get_trifinder()
    mask = trifinder(grid[0], grid[1]) >= 0
    return vertex_mask, points, polys, grid, mask


def test_flat_mae_frame_count_is_the_references(flat_store):
    """Reference ``resample_timeseries``: ``int(tr * T / new_tr)`` frames at TR 1.0 s, so the
    652-frame, TR-1.4 s fsaverage5 run has int(652 * 1.4) = 912 frames (224 x 560, float16),
    made by the reference's resampling (the store's recipe: grid fmri_fm, PCHIP, cheby1)."""
    store = Store.open(flat_store)
    temporal = store.recipe["temporal"]
    assert (temporal["grid"], temporal["interpolation"], temporal["antialias"]) == ("fmri_fm", "pchip", "cheby1")
    attrs = store.run_attrs(RUN)
    assert attrs["n_frames_source"] == N_SOURCE and attrs["source_tr_s"] == pytest.approx(TR_IN)
    assert attrs["tr_s"] == TR_OUT and attrs["n_frames"] == int(TR_IN * N_SOURCE / TR_OUT) == 912
    video = store.run(RUN)["flat"]
    assert video.shape == (912, 224, 560) and video.dtype == np.float16


def test_flat_mae_geometry_defaults_are_the_references(flat_store):
    """Reference ``stack_surfaces`` + ``FlatResampler(rect=bbox)``: hemispheres shifted, not
    scaled (``fit: none``, scale 1), box used as is, vertices without signal kept."""
    flat = Store.open(flat_store).run_attrs(RUN)["flat"]
    assert flat["fit"] == "none" and flat["scale"] == 1.0
    assert flat["bbox_mm"] == list(BBOX) and flat["resolution_mm"] == PIXEL and flat["shape"] == [224, 560]
    assert flat["hemisphere_gap_mm"] == PADDING and flat["edge_threshold_mm"] == EDGE
    assert flat["no_signal"] == "keep" and flat["triangulation"] == "delaunay"
    assert flat["family"] == "fsaverage5" and flat["medial_wall"] == "flat"


def test_flat_mask_is_the_reference_valid_pixel_mask(flat_store, reference_patch):
    """Reference ``FlatResampler.fit``: valid pixels = sample points inside a kept triangle
    (``Triangulation(...).get_trifinder() >= 0``), kept triangles = all corners in the vertex
    mask and longest side < 16 mm, on the shifted (unscaled) surfaces, box cut as is."""
    _, _, _, _, mask = reference_patch
    stored = Store.open(flat_store).run(RUN)["flat_mask"][:]
    assert stored.shape == mask.shape == (224, 560)
    assert 0.5 < mask.mean() < 0.7
    diff = np.flatnonzero((stored != mask).ravel())
    assert len(diff) == 0, f"{len(diff)} pixels differ from the reference mask (first: {diff[:10]})"


def _reference_scale(series: np.ndarray) -> np.ndarray:
    """``sklearn.preprocessing.scale`` over time (axis 0): mean 0, population std (ddof 0),
    a constant column divided by 1 (its ``_handle_zeros_in_scale``), so it becomes 0."""
    mean = series.mean(axis=0)
    std = series.std(axis=0)
    std = np.where(std < 10 * np.finfo(np.float64).eps, 1.0, std)
    return (series - mean) / std


def _reference_resample(series: np.ndarray, frames: list[int]) -> np.ndarray:
    """``resample_timeseries`` at the output frames ``frames``: Chebyshev-I anti-alias only
    when downsampling (not here: 1.4 s -> 1.0 s), then PCHIP at ``new_tr * arange(int(tr * T / new_tr))``."""
    if TR_OUT > TR_IN:
        sos = signal.cheby1(8, 0.05, 0.8 / (TR_OUT / TR_IN), output="sos")
        series = signal.sosfiltfilt(sos, series, axis=0, padtype="even")
    x = TR_IN * np.arange(len(series))
    new_x = TR_OUT * np.arange(int(TR_IN * len(series) / TR_OUT))
    return interpolate.PchipInterpolator(x, series, axis=0)(new_x[frames])


def test_flat_frames_equal_the_reference_pipeline(flat_store, reference_patch):
    """Reference ``preprocess_series``: vertex mask -> z-score per vertex over the run (ddof 0)
    -> TR resampling (cheby1 + PCHIP) -> ``LinearNDInterpolator`` over the Delaunay
    triangulation of all masked vertices -> ``np.where(mask, data, 0)``; a few frames match
    the stored float16 frames to float16 precision."""
    vertex_mask, points, _, grid, mask = reference_patch
    hemis = [nib.load(next(SRC.glob(f"*hemi-{h}_space-fsaverage5_bold.func.gii"))) for h in ("L", "R")]
    series = np.concatenate([np.stack([d.data for d in img.darrays], axis=0) for img in hemis], axis=1)  # (T, V)
    assert series.shape == (N_SOURCE, 20484)
    series = _reference_scale(series[:, vertex_mask].astype(np.float64))
    series = _reference_resample(series, FRAMES)  # (len(FRAMES), n)
    interp = interpolate.LinearNDInterpolator(Delaunay(points), series.T)
    expected = np.where(mask, np.moveaxis(interp(grid[0], grid[1]), -1, 0), 0)  # (K, H, W)
    assert np.isfinite(expected).all()
    video = Store.open(flat_store).run(RUN)["flat"]
    stored = np.stack([video[f] for f in FRAMES]).astype(np.float64)
    np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=2e-3)
    assert np.abs(expected[:, mask]).mean() > 0.3  # z-scored values, not a trivial match of zeros
