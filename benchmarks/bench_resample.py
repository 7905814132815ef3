"""Spatial resampling speed and peak memory: the numba kernel against nilearn's ``resample_img``.

Two inputs, each resampled (trilinear) onto a template grid by every method in this one
process, on the same array:

(a) real: ``sub-me1`` preprocessed BOLD of ds-real (41 x 52 x 28 x 160, 3.5 mm) onto
    MNI152NLin6Asym 2 mm cropped to 96^3 (the NeuroSTORM grid);
(b) HCP-sized: a 91 x 109 x 91 source grid of 2 mm voxels, rotated (3, -2, 4 degrees)
    and shifted (1.3, -0.7, 0.9 mm) against MNI 2 mm, N frames (300 by default) of
    synthetic values (size matters here, not content), onto MNI152NLin6Asym 2 mm 91 x 109 x 91.

Methods: ``nilearn.image.resample_img(interpolation="linear")`` (the baseline), the
previous ``scipy.sparse`` operator (``method="sparse"``), the numba kernel
(``method="numba"``), torch on the CPU and, when CUDA is present, torch on the GPU.
Every timing includes computing the interpolation weights. Before timing, the numba
kernel is called once on a tiny input: that first call loads the compiled kernel from
numba's on-disk cache (or compiles it once, on the very first run), a cost paid once per
process, never per run; it is printed separately.

Peak memory of each call: the maximum resident set size above the level before the call,
sampled every 5 ms (psutil), and the peak of Python/numpy allocations (tracemalloc).
Numbers are medians of ``--repeat`` calls (nilearn: one call).

    python benchmarks/bench_resample.py            # both inputs, 300 frames for (b)
    python benchmarks/bench_resample.py --frames 1200 --skip-real
"""

from __future__ import annotations

import argparse
import threading
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import scipy.sparse as sp
from nilearn.image import resample_img

from fmri_data.reference.grids import template_grid
from fmri_data.read.nifti import open_volume
from fmri_data.resample import PreparedOperator, resample_volume
from fmri_data.resample.operator import cuda_available

REPO = Path(__file__).resolve().parents[1]
ME1 = REPO.parent / "shared/data/bids/ds-real/derivatives/preproc/sub-me1/func/sub-me1_task-visual_desc-preproc_bold.nii.gz"


class PeakRSS:
    """Maximum RSS above the starting level while the block runs (sampled in a thread)."""

    def __enter__(self):
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        tracemalloc.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.traced = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        self.rss = self.peak - self.start


def measure(fn, repeat: int) -> tuple[float, float, float, np.ndarray]:
    """Median seconds, peak RSS (GiB) and peak traced allocations (GiB) of ``fn()``; its result."""
    times, rss, traced, result = [], [], [], None
    for _ in range(repeat):
        result = None
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - t0)
        rss.append(mem.rss / 2**30)
        traced.append(mem.traced / 2**30)
    return float(np.median(times)), max(rss), max(traced), result


def case(label: str, frames: np.ndarray, affine: np.ndarray, grid, repeat: int) -> None:
    shape, target = grid.shape, grid.affine
    print(f"\n== {label}: source {frames.shape} {frames.dtype}, target {shape} x {frames.shape[3]} frames")
    methods = {
        "nilearn resample_img": (
            lambda: resample_img(nib.Nifti1Image(frames, affine), target_affine=target, target_shape=shape,
                                 interpolation="linear", force_resample=True, copy_header=True).get_fdata(dtype=np.float32),
            1,
        ),
        "scipy.sparse operator": (lambda: resample_volume(frames, affine, shape, target, method="sparse"), repeat),
        "numba kernel": (lambda: resample_volume(frames, affine, shape, target, method="numba"), repeat),
        "torch cpu": (lambda: resample_volume(frames, affine, shape, target, method="torch", device="cpu"), repeat),
    }
    if cuda_available():
        import torch

        methods[f"torch cuda ({torch.cuda.get_device_name()})"] = (
            lambda: resample_volume(frames, affine, shape, target, method="torch", device="cuda"), repeat
        )
    results = {}
    for name, (fn, n) in methods.items():
        results[name] = measure(fn, n)
    base = results["nilearn resample_img"]
    reference = base[3]
    print(f"{'method':34s} {'seconds':>9s} {'x nilearn':>10s} {'x sparse':>9s} {'peak RSS GiB':>13s} {'peak numpy GiB':>15s} {'max |diff|/range':>17s}")
    span = float(np.ptp(frames))
    for name, (sec, rss, traced, out) in results.items():
        diff = float(np.abs(out - reference).max()) / span
        print(f"{name:34s} {sec:9.3f} {base[0] / sec:10.1f} {results['scipy.sparse operator'][0] / sec:9.1f} {rss:13.2f} {traced:15.2f} {diff:17.1e}")
    del results
    # the conversion hot path applies weights computed once per run: time that part alone
    from fmri_data.resample import grid_indices, resampling_matrix

    matrix = resampling_matrix(frames.shape[:3], affine, grid_indices(shape), target)
    flat = frames.reshape(-1, frames.shape[3])
    numba_op = PreparedOperator(matrix, "numba", "cpu")
    sec, rss, _, _ = measure(lambda: numba_op(flat), repeat)
    scipy_sec = measure(lambda: matrix @ flat, repeat)[0]
    print(f"apply precomputed weights only: numba {sec:.3f} s, scipy.sparse {scipy_sec:.3f} s ({scipy_sec / sec:.1f}x); nilearn/numba-apply {base[0] / sec:.1f}x")


def hcp_sized(frames: int) -> tuple[np.ndarray, np.ndarray]:
    grid = template_grid("MNI152NLin6Asym", 2)
    a, b, c = np.deg2rad([3.0, -2.0, 4.0])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    affine = grid.affine.copy()
    affine[:3, :3] = rx @ ry @ rz @ grid.affine[:3, :3]
    affine[:3, 3] += [1.3, -0.7, 0.9]
    rng = np.random.default_rng(0)
    data = np.empty(grid.shape + (frames,), dtype=np.float32)
    mean = rng.uniform(500, 1500, size=grid.shape).astype(np.float32)
    for t in range(frames):  # synthetic values: only the size matters
        data[..., t] = mean + rng.standard_normal(grid.shape, dtype=np.float32) * 20
    return data, affine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=300, help="frames of the HCP-sized run (b)")
    parser.add_argument("--repeat", type=int, default=3, help="calls per fast method (median reported)")
    parser.add_argument("--skip-real", action="store_true")
    parser.add_argument("--skip-hcp", action="store_true")
    args = parser.parse_args()
    import numba

    t0 = time.perf_counter()
    PreparedOperator(sp.identity(4, format="csr"), "numba", "cpu")(np.ones((4, 2), dtype=np.float32))
    print(f"cores: {psutil.cpu_count()} (numba threads {numba.get_num_threads()}, layer {numba.threading_layer()}); "
          f"CUDA: {cuda_available()}; numba first call in this process (loads the cached kernel; compiles only without a cache): {time.perf_counter() - t0:.2f} s")
    if not args.skip_real:
        vol = open_volume(ME1)
        grid = template_grid("MNI152NLin6Asym", 2).crop_or_pad((96, 96, 96))
        case("(a) real run sub-me1 3.5 mm -> MNI 2 mm 96^3", vol.read(0, vol.n_frames), vol.affine, grid, args.repeat)
    if not args.skip_hcp:
        data, affine = hcp_sized(args.frames)
        case("(b) HCP-sized 2 mm oblique/shifted -> MNI 2 mm 91x109x91", data, affine, template_grid("MNI152NLin6Asym", 2), args.repeat)


if __name__ == "__main__":
    main()
