"""Cost of the QA metrics during conversion: one HCP-sized run converted with and without `qa`.

Input: the synthetic HCP-geometry run of ``bench_convert.py`` (91 x 109 x 91, TR 0.72 s,
N frames, fMRIPrep-style derivative with its brain mask). Both conversions use the
``neurostorm`` recipe; the baseline sets ``qa.enabled=false`` (the recipe hash is the same,
so the stores hold identical arrays). Each runs in its own child process.

Prints seconds and peak memory of each, the ratios (with QA / without QA) and the peak
memory QA adds (GiB).

    python benchmarks/bench_qa.py --frames 300
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import make_dataset, run_child


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300)
    args = parser.parse_args()
    cli = str(Path(sys.executable).with_name("fmri-data"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "bids"
        make_dataset(root, args.frames)
        common = [cli, "convert", str(root), "--recipe", "neurostorm", "--no-progress"]
        t_base, m_base = run_child(common + [str(Path(tmp) / "base.zarr"), "--set", "qa.enabled=false"])
        t_qa, m_qa = run_child(common + [str(Path(tmp) / "qa.zarr")])
    print(f"{args.frames} frames of 91x109x91, neurostorm recipe")
    print(f"without QA (baseline): {t_base:7.1f} s  peak {m_base:5.2f} GiB")
    print(f"with QA:               {t_qa:7.1f} s  peak {m_qa:5.2f} GiB")
    print(f"ratio with/without QA: time {t_qa / t_base:4.2f}x  peak memory {m_qa / m_base:4.2f}x")
    print(f"peak memory added by QA: {m_qa - m_base:+5.2f} GiB (issue 15 target: time <= 1.25x, added peak <= 1 GiB)")


if __name__ == "__main__":
    main()
