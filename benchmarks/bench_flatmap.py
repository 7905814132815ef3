"""Flat maps of a run: fmri-data's cached sparse operator vs fmri-fm's pipeline as it is used.

Baseline (the reference as used): MedARC-AI/fmri-fm @ 6a2c3c6
``src/data/main_generate_hcp_flat.py`` builds one ``FlatResampler`` (``src/data/surface_utils.py``:
``fit`` precomputes the matplotlib trifinder mask and a scipy ``Delaunay`` of the patch) once,
then for each whole run: ``resample_timeseries`` (Chebyshev-I anti-aliasing when downsampling,
``scipy.interpolate.PchipInterpolator`` to TR 1.0 s; float64, as its series are) and
``transform(series, interpolation="linear")`` (``LinearNDInterpolator`` on the precomputed
Delaunay, evaluated on the grid, zeros outside the mask). Both are reproduced here line for
line on the same patch and grid.

Ours, as ``fmri_data.convert.outputs.flat`` runs it: ``resample_tr(..., "pchip", "cheby1",
grid="fmri_fm")`` on float32 (scipy in column blocks), then
``fmri_data.derive.flatmap.render_flat`` with the ``(pixels, vertices)`` operator built once
(cached on disk) and prepared once for the shared sparse kernel (numba on CPU, torch on CUDA).
The per-vertex z-score, identical on both sides, is done once before timing.

Printed per run: the one-time setup of each side, then the TR step, the mapping and their
sum, each with the ratio baseline / ours and the largest difference of the outputs. Then,
labelled as NOT the reference's use: rendering on the fly per 16-frame clip
(``FlatResampler.transform`` on a clip vs ``render_flat`` on a clip; fmri-fm does not do this,
it maps whole runs once when it writes its shards).

Two runs, fsLR-style grid (box [-336, 336] x [-122.8, 146] mm, 1.2 mm, gap 8 mm):
- the real fsaverage5 run of ../shared/data (2 x 10,242 vertices x 652 frames, TR 1.4 s);
- an fsLR-32k-sized run on the real fsLR surfaces: 64,984 vertices x 1,200 frames of
  synthetic values (random normal; the timing does not depend on the values), TR 0.72 s (HCP).

    python benchmarks/bench_flatmap.py [--frames 1200] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.interpolate
import scipy.signal
from matplotlib.tri import Triangulation
from scipy.spatial import Delaunay

from fmri_data.derive import flatmap as fm
from fmri_data.read.gifti import open_gifti_series
from fmri_data.reference.surfaces import load_family
from fmri_data.resample.operator import PreparedOperator, cuda_available
from fmri_data.resample.temporal import resample_tr

DATA = Path(__file__).resolve().parents[2] / "shared/data"
RUN = DATA / "bids/ds-real/derivatives/preproc/sub-010188/ses-02/func"
PARAMS = {"resolution_mm": 1.2, "bbox_mm": [-336, 336, -122.8, 146], "fit": "contain", "hemisphere_gap_mm": 8,
          "edge_threshold_mm": 16, "triangulation": "delaunay"}
NO_MASK = {"L": None, "R": None}
TR_OUT = 1.0
CLIP = 16


def timed(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


# ------------------------------------------------- fmri-fm 6a2c3c6 src/data/surface_utils.py, as used

def reference_fit(points: np.ndarray, faces: np.ndarray, grid_x: np.ndarray, grid_y: np.ndarray):
    """``FlatResampler.fit`` (linear path): trifinder mask of the grid (None when matplotlib
    refuses the triangulation: overlapping flat triangles) and the Delaunay triangulation."""
    try:
        mask = Triangulation(points[:, 0], points[:, 1], faces).get_trifinder()(grid_x, grid_y) >= 0
    except RuntimeError:  # "Triangulation is invalid"
        mask = None
    return Delaunay(points), mask


def reference_resample_timeseries(series: np.ndarray, tr: float, new_tr: float) -> np.ndarray:
    """``resample_timeseries``: series ``(T, V)`` float64 -> ``(int(tr * T / new_tr), V)``."""
    fs, new_fs = 1.0 / tr, 1.0 / new_tr
    if new_fs < fs:
        q = fs / new_fs
        sos = scipy.signal.cheby1(8, 0.05, 0.8 / q, output="sos")
        series = scipy.signal.sosfiltfilt(sos, series, axis=0, padtype="even")
    x = tr * np.arange(len(series))
    new_x = new_tr * np.arange(int(tr * len(series) / new_tr))
    return scipy.interpolate.PchipInterpolator(x, series, axis=0)(new_x)


def reference_transform(delaunay, grid_x, grid_y, mask, data: np.ndarray) -> np.ndarray:
    """``FlatResampler.transform(data (T, V), interpolation="linear")`` -> ``(T, H, W)``, 0 outside the mask."""
    interp = scipy.interpolate.LinearNDInterpolator(delaunay, data.reshape(-1, data.shape[-1]).T)
    flat = np.transpose(interp(grid_x, grid_y), (2, 0, 1))
    return np.where(mask, flat, 0)


# ------------------------------------------------- comparison

def compare(name: str, family, values: np.ndarray, tr_in: float, repeat: int) -> None:
    """values: (V_L + V_R, T) float32."""
    build_s, op = timed(lambda: fm.surface_flat_operator(family.flat, NO_MASK, PARAMS, cache=False))
    fm.surface_flat_operator(family.flat, NO_MASK, PARAMS)  # writes the cache
    cached_s, op = timed(lambda: fm.surface_flat_operator(family.flat, NO_MASK, PARAMS))  # reads it
    prepare_s, prepared = timed(lambda: PreparedOperator(op.matrix, "numba", "cpu"))
    fm.render_flat(prepared, op.mask, values[:, :2])  # compile / load the kernels from numba's cache
    bbox = tuple(PARAMS["bbox_mm"])
    placed = fm.layout(family.flat, NO_MASK, PARAMS["hemisphere_gap_mm"], PARAMS["edge_threshold_mm"], bbox, PARAMS["fit"])
    xy = fm.fitted_grid(placed.points, PARAMS["resolution_mm"], bbox).points()
    grid_x, grid_y = (xy[:, k].reshape(op.mask.shape) for k in (0, 1))
    fit_s, (delaunay, ref_mask) = timed(lambda: reference_fit(placed.points, placed.faces, grid_x, grid_y))
    mask = op.mask  # the same valid pixels on both sides, so the outputs can be compared
    t = values.shape[1]
    print(f"{name}: {values.shape[0]} vertices x {t} frames, TR {tr_in} s -> {TR_OUT} s,"
          f" {op.mask.shape[0]} x {op.mask.shape[1]} pixels ({int(mask.sum())} valid; reference trifinder mask: "
          + (f"{int(ref_mask.sum())})" if ref_mask is not None else "none, matplotlib refuses these overlapping flat triangles)"))
    print(f"  one-time setup: ours operator build {build_s:.2f} s (then cached: read {cached_s:.3f} s,"
          f" kernel prepare {prepare_s * 1e3:.1f} ms); reference FlatResampler.fit (trifinder + Delaunay) {fit_s:.2f} s")

    # the per-vertex z-score both pipelines apply first (population std), outside the timings
    mean, std = values.mean(axis=1, keepdims=True), values.std(axis=1, keepdims=True)
    z32 = ((values - mean) / np.where(std > 1e-6, std, 1.0)).astype(np.float32)  # (V, T): ours
    patch_tv = np.ascontiguousarray(z32[placed.vertex_index].T, dtype=np.float64)  # (T, V_patch) float64: reference

    ref_tr_s, ref_series = timed(lambda: reference_resample_timeseries(patch_tv, tr_in, TR_OUT), repeat)
    ours_tr_s, ours_series = timed(lambda: resample_tr(z32.T, tr_in, TR_OUT, "pchip", "cheby1", grid="fmri_fm"), repeat)
    tr_diff = float(np.abs(ours_series[:, placed.vertex_index] - ref_series).max())
    ref_map_s, ref_images = timed(lambda: reference_transform(delaunay, grid_x, grid_y, mask, ref_series), repeat)
    ours_map_s, ours_images = timed(lambda: fm.render_flat(prepared, mask, np.ascontiguousarray(ours_series.T)), repeat)
    map_diff = float(np.abs(ours_images - ref_images).max())
    ref_total, ours_total = ref_tr_s + ref_map_s, ours_tr_s + ours_map_s
    print("  whole run (baseline: fmri-fm resample_timeseries + FlatResampler.transform linear, Delaunay built once):")
    print(f"    TR step  (PCHIP, cheby1): reference {ref_tr_s:7.2f} s   ours {ours_tr_s:7.2f} s   ratio {ref_tr_s / ours_tr_s:5.1f}x"
          f"   max |diff| {tr_diff:.1e}")
    print(f"    mapping  (linear):        reference {ref_map_s:7.2f} s   ours {ours_map_s:7.2f} s   ratio {ref_map_s / ours_map_s:5.1f}x"
          f"   max |diff| {map_diff:.1e}")
    print(f"    TR step + mapping:        reference {ref_total:7.2f} s   ours {ours_total:7.2f} s   ratio {ref_total / ours_total:5.1f}x")

    # NOT the reference's use: on-the-fly rendering of 16-frame clips (10 clips spread over the run)
    t_out = ours_series.shape[0]
    starts = np.linspace(0, t_out - CLIP, 10).astype(int)
    ref_clips = [np.ascontiguousarray(ref_series[a : a + CLIP]) for a in starts]
    our_clips = [np.ascontiguousarray(ours_series[a : a + CLIP].T) for a in starts]
    ref_clip_s, _ = timed(lambda: [reference_transform(delaunay, grid_x, grid_y, mask, c) for c in ref_clips], repeat)
    ours_clip_s, _ = timed(lambda: [fm.render_flat(prepared, mask, c) for c in our_clips], repeat)
    print(f"  per 16-frame clip, rendered on the fly (not how fmri-fm uses it): FlatResampler.transform"
          f" {ref_clip_s / len(starts) * 1e3:.1f} ms, ours {ours_clip_s / len(starts) * 1e3:.2f} ms,"
          f" ratio {ref_clip_s / ours_clip_s:.1f}x")
    if cuda_available():
        import torch

        gpu_op = PreparedOperator(op.matrix, "torch", "cuda")
        fm.render_flat(gpu_op, mask, values[:, :2])
        torch.cuda.synchronize()
        gpu_s, gpu = timed(lambda: fm.render_flat(gpu_op, mask, np.ascontiguousarray(ours_series.T)), repeat)
        print(f"  mapping on torch CUDA (image back on the host): {gpu_s:.4f} s, ratio vs reference {ref_map_s / gpu_s:.1f}x;"
              f" max |diff| vs numba {float(np.abs(gpu - ours_images).max()):.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1200, help="frames of the fsLR-sized run")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("FMRI_DATA_CACHE", tempfile.mkdtemp(prefix="fmri-data-bench-"))

    fs5 = load_family("fsaverage5")
    real = np.vstack([open_gifti_series(next(RUN.glob(f"*hemi-{h}_*.func.gii"))).read() for h in ("L", "R")])
    tr = json.loads(next(RUN.glob("*hemi-L_*_bold.json")).read_text())["RepetitionTime"]  # 1.4 s
    compare("real fsaverage5 run (sub-010188)", fs5, real, float(tr), args.repeat)

    fslr = load_family("fsLR", str(DATA / "atlases"))
    synthetic = np.random.default_rng(0).standard_normal((sum(fslr.n_vertices.values()), args.frames)).astype(np.float32)
    compare("fsLR-32k-sized run (synthetic values)", fslr, synthetic, 0.72, args.repeat)


if __name__ == "__main__":
    main()
