"""Flat-map projection: the cached sparse operator vs per-call LinearNDInterpolator.

Baselines, both producing ``(T, H, W)`` images with zeros outside the mask:
(B, the issue's named baseline) the flat-map MAE reference's per-call interpolation,
``scipy.interpolate.LinearNDInterpolator(points, values)``, which triangulates the patch
vertices again in every call, evaluated on the 224 x 560 grid; (A) the same on a Delaunay
triangulation precomputed once (a fairer, faster baseline). The reference renders per
sample, i.e. one call per 16-frame clip, so the headline ratio is per clip; whole-run
ratios are printed too. Ours: ``fmri_data.derive.flatmap.render_flat``, the operator
``(pixels, vertices)`` built once and cached on disk, prepared once for the shared sparse
kernel (``fmri_data.resample.operator.PreparedOperator``: numba on CPU, torch on CUDA),
applied per clip / per run and scattered into the image. Outputs are checked equal.

Two runs, fsLR-style grid (box [-336, 336] x [-122.8, 146] mm, 1.2 mm, gap 8 mm):
- the real fsaverage5 run of ../shared/data (2 x 10,242 vertices x 652 frames);
- an fsLR-32k-sized run on the real fsLR surfaces: 64,984 vertices x 1,200 frames of
  synthetic values (random normal; the timing does not depend on the values).

Per-clip timings use 10 clips spread over the run. The issue's target: >= 50x. The
operator build time (once per surface + grid, then read from the cache) is printed
separately. On a CUDA machine the torch backend is timed as well.

    python benchmarks/bench_flatmap.py [--frames 1200] [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.interpolate import LinearNDInterpolator
from scipy.spatial import Delaunay

from fmri_data.derive import flatmap as fm
from fmri_data.read.gifti import open_gifti_series
from fmri_data.resample.operator import PreparedOperator, cuda_available
from fmri_data.reference.surfaces import load_family

DATA = Path(__file__).resolve().parents[2] / "shared/data"
RUN = DATA / "bids/ds-real/derivatives/preproc/sub-010188/ses-02/func"
PARAMS = dict(resolution_mm=1.2, bbox_mm=[-336, 336, -122.8, 146], fit="contain", hemisphere_gap_mm=8,
              edge_threshold_mm=16, triangulation="delaunay")
NO_MASK = {"L": None, "R": None}


def timed(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def compare(name: str, family, values: np.ndarray, repeat: int) -> None:
    """values: (V_L + V_R, T) float32."""
    build_s, op = timed(lambda: fm.surface_flat_operator(family.flat, NO_MASK, PARAMS, cache=False))
    cached_s, op = timed(lambda: fm.surface_flat_operator(family.flat, NO_MASK, PARAMS))  # writes the cache
    cached_s, op = timed(lambda: fm.surface_flat_operator(family.flat, NO_MASK, PARAMS))  # reads it
    bbox = tuple(PARAMS["bbox_mm"])
    placed = fm.layout(family.flat, NO_MASK, PARAMS["hemisphere_gap_mm"], PARAMS["edge_threshold_mm"], bbox, PARAMS["fit"])
    grid = fm.fitted_grid(placed.points, PARAMS["resolution_mm"], bbox)
    xy = grid.points()
    delaunay = Delaunay(placed.points)  # precomputed once (baseline A)
    patch_values = values[placed.vertex_index]

    mask = op.mask.ravel()[:, None]

    def baseline(triangulation, patch) -> np.ndarray:
        image = LinearNDInterpolator(triangulation, patch)(xy[:, 0], xy[:, 1])  # (H*W, T)
        return np.where(mask, image, 0.0).T.reshape((-1,) + op.mask.shape)

    prepare_s, prepared = timed(lambda: PreparedOperator(op.matrix, "numba", "cpu"))
    fm.render_flat(prepared, op.mask, values[:, :2])  # compile / load the kernels from numba's cache
    ours_s, ours = timed(lambda: fm.render_flat(prepared, op.mask, values), repeat)
    base_s, base = timed(lambda: baseline(delaunay, patch_values), repeat)
    rebuild_s, _ = timed(lambda: baseline(placed.points, patch_values), 1)
    error = float(np.abs(ours - base).max())
    t = values.shape[1]
    print(f"{name}: {values.shape[0]} vertices x {t} frames -> {t} x {op.mask.shape[0]} x {op.mask.shape[1]}")
    print(f"  operator build {build_s:.2f} s once (cached read {cached_s:.3f} s, kernel prepare {prepare_s * 1e3:.1f} ms);"
          f" nnz {op.matrix.nnz}")
    print(f"  whole run: B LinearNDInterpolator(points, values), Delaunay rebuilt: {rebuild_s:.2f} s;"
          f" A on a precomputed Delaunay: {base_s:.2f} s")
    print(f"  whole run: operator (shared kernel, numba CPU) {ours_s:.3f} s   ratio vs B {rebuild_s / ours_s:.1f}x,"
          f" vs A {base_s / ours_s:.1f}x   max |diff| {error:.2e}")

    # one call per 16-frame clip, as the reference renders samples: 10 clips spread over the run
    starts = np.linspace(0, t - 16, 10).astype(int)
    clip_values = [np.ascontiguousarray(values[:, a : a + 16]) for a in starts]
    clip_patch = [np.ascontiguousarray(c[placed.vertex_index]) for c in clip_values]
    clip_rebuild_s, _ = timed(lambda: [baseline(placed.points, c) for c in clip_patch], repeat)
    clip_base_s, _ = timed(lambda: [baseline(delaunay, c) for c in clip_patch], repeat)
    clip_ours_s, clips = timed(lambda: [fm.render_flat(prepared, op.mask, c) for c in clip_values], repeat)
    clip_error = max(float(np.abs(c - baseline(delaunay, p)).max()) for c, p in zip(clips[:2], clip_patch[:2]))
    ms = lambda seconds: f"{seconds / len(starts) * 1e3:.1f} ms"  # noqa: E731
    print(f"  per 16-frame clip: B (the issue's baseline: Delaunay rebuilt per clip) {ms(clip_rebuild_s)},"
          f" A (precomputed Delaunay) {ms(clip_base_s)}, operator {clip_ours_s / len(starts) * 1e3:.2f} ms")
    print(f"  per 16-frame clip ratio: vs B {clip_rebuild_s / clip_ours_s:.1f}x (target >= 50x),"
          f" vs A {clip_base_s / clip_ours_s:.1f}x   max |diff| {clip_error:.2e}")
    if cuda_available():
        import torch

        gpu_op = PreparedOperator(op.matrix, "torch", "cuda")
        fm.render_flat(gpu_op, op.mask, values[:, :2])
        torch.cuda.synchronize()
        gpu_s, gpu = timed(lambda: fm.render_flat(gpu_op, op.mask, values), repeat)
        gpu_clip_s, _ = timed(lambda: [fm.render_flat(gpu_op, op.mask, c) for c in clip_values], repeat)
        print(f"  torch CUDA (image back on the host): whole run {gpu_s:.4f} s, ratio vs B {rebuild_s / gpu_s:.1f}x;"
              f" per clip {gpu_clip_s / len(starts) * 1e3:.2f} ms, ratio vs B {clip_rebuild_s / gpu_clip_s:.1f}x;"
              f" max |diff| vs numba {float(np.abs(gpu - ours).max()):.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1200, help="frames of the fsLR-sized run")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("FMRI_DATA_CACHE", tempfile.mkdtemp(prefix="fmri-data-bench-"))

    fs5 = load_family("fsaverage5")
    real = np.vstack([open_gifti_series(next(RUN.glob(f"*hemi-{h}_*.func.gii"))).read() for h in ("L", "R")])
    compare("real fsaverage5 run (sub-010188)", fs5, real, args.repeat)

    fslr = load_family("fsLR", str(DATA / "atlases"))
    synthetic = np.random.default_rng(0).standard_normal((sum(fslr.n_vertices.values()), args.frames)).astype(np.float32)
    compare("fsLR-32k-sized run (synthetic values)", fslr, synthetic, args.repeat)


if __name__ == "__main__":
    main()
