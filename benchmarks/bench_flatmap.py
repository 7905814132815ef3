"""Flat-map projection: the cached sparse operator vs a per-call LinearNDInterpolator.

Baselines: (A) the flat-map MAE reference (fmri-fm ``FlatResampler.transform``): for
every run, build ``scipy.interpolate.LinearNDInterpolator(delaunay, values)`` on the patch
vertices (Delaunay triangulation precomputed once), evaluate it on the 224 x 560 grid and
zero the pixels outside the mask; (B) the same with ``LinearNDInterpolator(points,
values)``, which triangulates again in every call. All outputs are ``(T, H, W)`` float32. Ours: one sparse-dense product
``(pixels, vertices) @ (vertices, T)`` with the operator built once and cached on disk.
Both produce the same images (checked here, and in tests/test_flatmap.py).

Two runs, fsLR-style grid (box [-336, 336] x [-122.8, 146] mm, 1.2 mm, gap 8 mm):
- the real fsaverage5 run of ../shared/data (2 x 10,242 vertices x 652 frames);
- an fsLR-32k-sized run on the real fsLR surfaces: 64,984 vertices x 1,200 frames of
  synthetic values (random normal; the timing does not depend on the values).

Prints seconds and the ratio baseline / operator per run, and per 16-frame clip (one
call per clip, as a loader rendering clips on the fly would do); the issue's target: >= 50x.
The operator build time (once per surface + grid, then read from the cache) is printed
separately. On a CUDA machine the torch sparse product is timed as well.

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
from fmri_data.read import open_gifti_series
from fmri_data.surfaces import load_family

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
    delaunay = Delaunay(placed.points)  # precomputed once, as the reference does
    patch_values = values[placed.vertex_index]

    def baseline(triangulation) -> np.ndarray:
        image = LinearNDInterpolator(triangulation, patch_values)(xy[:, 0], xy[:, 1])  # (H*W, T)
        image = np.where(op.mask.ravel()[:, None], image, 0.0)
        return image.T.reshape((-1,) + op.mask.shape)

    fm.apply_operator(op.matrix, op.mask, values[:, :2])  # compile the kernel (cached by numba afterwards)
    ours_s, ours = timed(lambda: fm.apply_operator(op.matrix, op.mask, values), repeat)
    base_s, base = timed(lambda: baseline(delaunay), repeat)
    rebuild_s, _ = timed(lambda: baseline(placed.points), 1)
    error = float(np.abs(ours - base).max())
    t = values.shape[1]
    print(f"{name}: {values.shape[0]} vertices x {t} frames -> {t} x {op.mask.shape[0]} x {op.mask.shape[1]}")
    print(f"  operator build {build_s:.2f} s once (cached read {cached_s:.3f} s); nnz {op.matrix.nnz}")
    print(f"  baseline A, LinearNDInterpolator per run on a precomputed Delaunay (the reference): {base_s:.2f} s")
    print(f"  baseline B, LinearNDInterpolator(points, values) per run (Delaunay rebuilt):         {rebuild_s:.2f} s")
    print(f"  fmri-data sparse operator (scipy + numba, CPU): {ours_s:.3f} s   ratio vs A {base_s / ours_s:.1f}x, "
          f"vs B {rebuild_s / ours_s:.1f}x   max |diff| {error:.2e}")
    # one call per 16-frame clip (a loader rendering clips on the fly): 10 clips spread over the run
    starts = np.linspace(0, t - 16, 10).astype(int)
    clip_values = [np.ascontiguousarray(values[:, a : a + 16]) for a in starts]
    clip_patch = [np.ascontiguousarray(c[placed.vertex_index]) for c in clip_values]

    def baseline_clips():
        for c in clip_patch:
            image = LinearNDInterpolator(delaunay, c)(xy[:, 0], xy[:, 1])
            np.where(op.mask.ravel()[:, None], image, 0.0).T.reshape((-1,) + op.mask.shape)

    clip_base_s, _ = timed(baseline_clips, repeat)
    clip_ours_s, _ = timed(lambda: [fm.apply_operator(op.matrix, op.mask, c) for c in clip_values], repeat)
    print(f"  per 16-frame clip: baseline A {clip_base_s / 10 * 1e3:.1f} ms, operator {clip_ours_s / 10 * 1e3:.2f} ms"
          f"   ratio {clip_base_s / clip_ours_s:.1f}x")
    try:
        import torch

        if torch.cuda.is_available():
            fm.apply_operator_torch(op.matrix, op.mask, values[:, :2])
            torch.cuda.synchronize()

            def gpu():
                out = fm.apply_operator_torch(op.matrix, op.mask, values)
                torch.cuda.synchronize()
                return out

            gpu_s, _ = timed(gpu, repeat)
            print(f"  fmri-data sparse operator (torch, CUDA): {gpu_s:.4f} s   ratio {base_s / gpu_s:.1f}x")
    except ImportError:
        pass


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
