"""Cost of the QA metrics during conversion: one HCP-sized run converted with and without `qa`.

Input: the synthetic HCP-geometry run of ``bench_convert.py`` (91 x 109 x 91, TR 0.72 s,
N frames, fMRIPrep-style derivative with its brain mask). Both conversions use the
``neurostorm`` recipe; the baseline sets ``qa.enabled=false`` (the recipe hash is the same,
so the stores hold identical arrays). Each runs in its own child process.

Before the timed runs, an untimed conversion of a 10-frame run with QA on fills numba's
on-disk cache (the QA kernels, like the resampling kernels, compile once per install and
are loaded from the cache afterwards), so that neither timing includes a compilation.
The two conversions then alternate ``--repeat`` times (baseline, QA, baseline, QA, ...);
each is reported by its fastest run (the least disturbed by other work on the machine).

Prints the wall seconds, CPU seconds (user + system, all threads) and peak RSS of each,
the ratios (with QA / without QA: time, CPU, peak memory), the peak memory QA adds (GiB)
and the 1-minute load average before each run: the timings are wall-clock, and a busy
machine inflates them (CPU seconds much less so).

    python benchmarks/bench_qa.py --frames 300
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import make_dataset


def run(cmd: list[str]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (GiB) of one child process.

    Raises:
        subprocess.CalledProcessError: the child failed (its stderr tail in ``stderr``).
    """
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    stderr = child.stderr.read() if child.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise subprocess.CalledProcessError(code, cmd, None, stderr[-2000:])
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each conversion, alternating (default 2)")
    args = parser.parse_args()
    cli = str(Path(sys.executable).with_name("fmri-data"))
    loads: list[str] = []
    runs: dict[str, list[tuple[float, float, float]]] = {"base": [], "qa": []}
    with tempfile.TemporaryDirectory() as tmp:
        warm = Path(tmp) / "warm"
        make_dataset(warm, 10)
        run([cli, "convert", str(warm), str(Path(tmp) / "warm.zarr"), "--recipe", "neurostorm", "--no-progress"])
        root = Path(tmp) / "bids"
        make_dataset(root, args.frames)
        for i in range(args.repeat):
            for name, extra in (("base", ["--set", "qa.enabled=false"]), ("qa", [])):
                loads.append(f"{os.getloadavg()[0]:.1f}")
                out = Path(tmp) / f"{name}{i}.zarr"
                runs[name].append(run([cli, "convert", str(root), str(out), "--recipe", "neurostorm", "--no-progress",
                                       *extra]))
                subprocess.run(["rm", "-rf", str(out)], check=True)
    (t_base, c_base, _), (t_qa, c_qa, _) = (min(runs[k]) for k in ("base", "qa"))
    m_base, m_qa = (max(r[2] for r in runs[k]) for k in ("base", "qa"))
    print(f"{args.frames} frames of 91x109x91, neurostorm recipe, best of {args.repeat} alternating runs each")
    print(f"without QA (baseline): {t_base:7.1f} s  CPU {c_base:6.1f} s  peak {m_base:5.2f} GiB")
    print(f"with QA:               {t_qa:7.1f} s  CPU {c_qa:6.1f} s  peak {m_qa:5.2f} GiB")
    print(f"ratio with/without QA: time {t_qa / t_base:4.2f}x  CPU {c_qa / c_base:4.2f}x  peak memory {m_qa / m_base:4.2f}x")
    print(f"peak memory added by QA: {m_qa - m_base:+5.2f} GiB (issue 15 target: time <= 1.25x, added peak <= 1 GiB)")
    print(f"all runs (wall s): baseline {' '.join(f'{r[0]:.1f}' for r in runs['base'])}; "
          f"QA {' '.join(f'{r[0]:.1f}' for r in runs['qa'])}")
    print(f"load average (1 min) before each run (base, QA, ...): {' / '.join(loads)} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
