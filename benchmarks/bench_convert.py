"""Conversion speed and peak memory for an HCP-sized run, against a NeuroSTORM-style baseline.

Input: one synthetic run with real geometry — MNI152NLin6Asym 2 mm (91 x 109 x 91),
TR 0.72 s, N frames (1,200 by default, an HCP resting-state run), values inside a
brain-shaped ellipsoid and 0 outside (as HCP minimally preprocessed volumes are), laid out
as an fMRIPrep derivative with its brain mask. Target: the `neurostorm` recipe
(96^3, TR 0.8 s, global z-score, float16).

Baseline ("NeuroSTORM-style", written here): load the whole run as float64, interpolate
to TR 0.8 s with scipy along time, crop/pad to 96^3, z-score over the non-zero voxels,
write one float16 `.pt` file per frame.

Each side runs in its own child process; peak memory is that child's maximum RSS.
Prints runs/min, peak memory, and the ratios (targets: >= 3x faster, <= 1/4 of the memory).

    python benchmarks/bench_convert.py --frames 1200
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]


def make_dataset(root: Path, frames: int) -> Path:
    """An fMRIPrep-style derivative dataset with one HCP-sized run (synthetic values)."""
    func = root / "sub-01" / "func"
    func.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "bench", "BIDSVersion": "1.9.0", "DatasetType": "derivative"}))
    affine = np.array([[-2.0, 0, 0, 90], [0, 2, 0, -126], [0, 0, 2, -72], [0, 0, 0, 1]])  # TemplateFlow LAS
    shape = (91, 109, 91)
    ijk = np.indices(shape).reshape(3, -1).T
    centre = np.array([45, 60, 40])
    brain = (((ijk - centre) / np.array([36, 46, 34])) ** 2).sum(axis=1) <= 1.0
    brain = brain.reshape(shape)
    base = "sub-01_task-rest_space-MNI152NLin6Asym_res-2"
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), func / f"{base}_desc-brain_mask.nii.gz")
    rng = np.random.default_rng(0)
    data = np.zeros(shape + (frames,), dtype=np.float32)
    mean = 1000 + 200 * rng.standard_normal(int(brain.sum())).astype(np.float32)
    for t in range(frames):
        data[brain, t] = mean + 20 * rng.standard_normal(mean.size).astype(np.float32)
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = 0.72
    nib.save(img, func / f"{base}_desc-preproc_bold.nii.gz")
    (func / f"{base}_desc-preproc_bold.json").write_text(json.dumps({"RepetitionTime": 0.72, "TaskName": "rest"}))
    return func / f"{base}_desc-preproc_bold.nii.gz"


BASELINE = textwrap.dedent(
    """
    import sys, numpy as np, nibabel as nib, torch
    from pathlib import Path
    from scipy.interpolate import interp1d
    path, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    img = nib.as_closest_canonical(nib.load(path))
    data = img.get_fdata()                                   # whole run, float64
    t_in = np.arange(data.shape[3]) * 0.72
    t_out = np.arange(int((data.shape[3] - 1) * 0.72 / 0.8) + 1) * 0.8
    data = interp1d(t_in, data, axis=3)(t_out)               # TR 0.72 -> 0.8
    padded = np.zeros((96, 96, 96, data.shape[3]))
    padded[3:94, :, 3:94] = data[:, 6:102]                   # crop/pad to 96^3
    brain = padded != 0
    padded[brain] = (padded[brain] - padded[brain].mean()) / padded[brain].std()
    for i in range(padded.shape[3]):                          # one file per frame
        torch.save(torch.from_numpy(padded[..., i]).half(), out / f"frame_{i}.pt")
    """
)


def run_child(cmd: list[str]) -> tuple[float, float]:
    """Seconds and peak RSS (GiB) of a child process."""
    code = (
        "import resource, subprocess, sys, time\n"
        f"start = time.perf_counter(); subprocess.run({cmd!r}, check=True, stdout=subprocess.DEVNULL)\n"
        "print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds, kib = done.stdout.split()
    return float(seconds), int(kib) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=1200)
    parser.add_argument("--workdir", default=None, help="folder for the synthetic run and outputs (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        bold = make_dataset(tmp / "ds", args.frames)
        print(f"synthetic HCP-sized run: 91x109x91x{args.frames} float32 ({bold.stat().st_size / 2**30:.2f} GiB gz), written in {time.perf_counter() - start:.0f} s")

        ours_cmd = [
            sys.executable, "-m", "fmri_data", "convert", str(tmp / "ds"), str(tmp / "out.zarr"),
            "--recipe", "neurostorm", "--scheduler", "synchronous", "--no-progress",
        ]
        base_cmd = [sys.executable, "-c", BASELINE, str(bold), str(tmp / "frames")]
        t_ours, m_ours = run_child(ours_cmd)
        t_base, m_base = run_child(base_cmd)
        print(f"fmri-data (neurostorm recipe): {60 / t_ours:6.2f} runs/min  ({t_ours:7.1f} s)  peak {m_ours:5.2f} GiB")
        print(f"NeuroSTORM-style baseline:     {60 / t_base:6.2f} runs/min  ({t_base:7.1f} s)  peak {m_base:5.2f} GiB")
        print(f"speed ratio fmri-data / baseline: {t_base / t_ours:.2f}x   memory ratio: {m_ours / m_base:.2f} (target >= 3x and <= 0.25)")


if __name__ == "__main__":
    main()
