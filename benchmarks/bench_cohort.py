"""Cohort conversion throughput: runs/hour, peak memory per worker, and scaling from 1 to 2 workers.

What it measures: the wall time of ``fmri-data convert`` (the command a user runs, Python
start-up, discovery and the Dask cluster's start included) converting a whole cohort with
the ``neurostorm`` recipe (96^3, TR 0.8 s, global z-score, float16; QA off unless ``--qa``:
QA is measured by ``bench_qa.py``), resampling on the CPU (``--device cpu``), for two
cohorts:

- **synthetic HCP-sized runs**: ``--runs`` subjects, each one run of ``bench_convert.py``'s
  ``make_dataset`` (MNI152NLin6Asym 2 mm, 91 x 109 x 91, TR 0.72 s, ``--frames`` frames,
  fMRIPrep-style derivative with its brain mask, gzip level 1). The run is written once and
  linked under each subject (same bytes, distinct runs for the converter: each is decoded,
  resampled and written on its own; the sources stay in the page cache either way);
- **the real ds-real** (``../shared/data/bids/ds-real``: 12 Haxby runs and the sub-me1 run
  become 96^3 volumes; its fsaverage5 run is skipped by this recipe, its parcellated HCP run
  is converted too: 14 runs).

each with (a) the threaded scheduler (``--scheduler threads --workers W``, W = the largest of
``--workers``: runs share one process) and (b) a local Dask cluster of single-threaded worker
processes (``--scheduler processes --workers 1``, then ``2``; ``distributed.LocalCluster``).
Printed per case: runs converted, wall time, runs/hour, CPU seconds per run (user + system
of every process of the command), peak memory of the command's main process and of each
worker process (``VmHWM``, the kernel's resident-set high-water mark, sampled every 50 ms
from ``/proc/<pid>/status`` of every process of the command's tree), and, for the cluster,
the scaling from 1 to 2 workers (runs/hour with 2 / with 1; 2.0 is linear). The baseline is
the 1-worker cluster. The last line estimates a 16-core node from the 1-worker figures (its
runs/hour, and its CPU seconds per run, times 16; memory 16 x the worker's peak): an
estimate assuming linear scaling, not a measurement.

Default size (``--runs 4 --frames 300``, then ds-real) took about 7 minutes on the 2-core
development machine (shared with other work, load 3-8). ``--frames 1200`` is the HCP-sized
invocation (each run 0.95 GiB of ``.nii.gz``, 1,080 output frames); with ``--no-real`` it took
about 5 minutes there, ds-real adds about 6.

    python benchmarks/bench_cohort.py                           # default size
    python benchmarks/bench_cohort.py --frames 1200 --no-real   # HCP-sized runs
    python benchmarks/bench_cohort.py --qa                      # with QA
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import link_subjects, make_dataset  # the synthetic HCP-sized run, one definition

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SAMPLE_S = 0.05
REPORT = re.compile(r"(\d+) converted, (\d+) already present, (\d+) claimed by another converter, (\d+) skipped, (\d+) failed")


def make_cohort(root: Path, runs: int, frames: int) -> Path:
    """A derivatives dataset of ``runs`` subjects, each with the same synthetic HCP-sized run
    (written once by ``make_dataset``, linked under every subject)."""
    return link_subjects(make_dataset(root / "source", frames).parent, root / "cohort", runs)


@dataclass
class Watch:
    """Peak resident memory (``VmHWM``, bytes) of every process of a command's tree, by pid."""

    root: int
    peak: dict[int, int] = field(default_factory=dict)
    role: dict[int, str] = field(default_factory=dict)

    def sample(self) -> None:
        try:
            procs = [psutil.Process(self.root)]
            procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                with open(f"/proc/{p.pid}/status") as fh:
                    hwm = next((int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:")), 0)
                if p.pid not in self.role:
                    self.role[p.pid] = self._role(p)
            except (OSError, psutil.Error):
                continue
            self.peak[p.pid] = max(self.peak.get(p.pid, 0), hwm)

    def _role(self, p: psutil.Process) -> str:
        if p.pid == self.root:
            return "main"
        cmd = " ".join(p.cmdline())
        if "resource_tracker" in cmd or "forkserver" in cmd or "semaphore_tracker" in cmd:
            return "helper"
        return "worker"  # distributed's worker processes (multiprocessing spawn_main)

    def of(self, role: str) -> list[int]:
        return [self.peak[pid] for pid in sorted(self.peak) if self.role.get(pid) == role]


@dataclass
class Result:
    converted: int
    skipped: int
    failed: int
    wall: float
    user: float
    system: float
    main_peak: int
    worker_peaks: list[int]

    @property
    def per_hour(self) -> float:
        return self.converted / self.wall * 3600


def convert(bids: Path, out: Path, scheduler: str, workers: int, qa: bool, device: str) -> Result:
    """Run ``fmri-data convert`` in a child process, watching its process tree."""
    cmd = [sys.executable, "-m", "fmri_data", "convert", str(bids), str(out), "--recipe", "neurostorm",
           *([] if qa else ["--set", "qa.enabled=false"]), "--scheduler", scheduler, "--workers", str(workers),
           "--device", device, "--atlas-dir", str(DATA / "atlases"), "--no-progress"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watch = Watch(child.pid)
    done = threading.Event()

    def sampler():
        while not done.is_set():
            watch.sample()
            done.wait(SAMPLE_S)

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    stdout, stderr = child.communicate()
    wall = time.perf_counter() - start
    done.set()
    thread.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    found = REPORT.search(stdout)
    if child.returncode or not found:
        tail = (stderr or stdout).strip().splitlines()[-5:]
        raise SystemExit(f"conversion failed (exit {child.returncode}): {' | '.join(tail)}")
    converted, _, _, skipped, failed = (int(g) for g in found.groups())
    if failed:
        raise SystemExit(f"{failed} runs failed to convert:\n{stdout}")
    return Result(converted, skipped, failed, wall, user, system, max(watch.of("main"), default=0), watch.of("worker"))


def gib(n: int) -> str:
    return f"{n / 2**30:5.2f}"


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def cohort_table(name: str, bids: Path, tmp: Path, workers: list[int], qa: bool, device: str) -> Result | None:
    threads = max(workers)
    cases = [("processes", w) for w in workers] + [("threads", threads)]
    print(f"\n{name}")
    print(f"  {'scheduler':28s} {'runs':>4} {'wall s':>7} {'runs/hour':>9} {'CPU s/run user+sys':>18}"
          f" {'main GiB':>8}  {'peak per worker GiB':20s}  load")
    results: dict[tuple[str, int], Result] = {}
    for i, (scheduler, w) in enumerate(cases):
        res = convert(bids, tmp / f"{name.split()[0]}-{i}.zarr", scheduler, w, qa, device)
        results[(scheduler, w)] = res
        label = f"{'Dask LocalCluster' if scheduler == 'processes' else 'threads'}, {w} {'worker' if scheduler == 'processes' else 'thread'}{'s' if w > 1 else ''}"
        workers_text = " ".join(gib(p).strip() for p in res.worker_peaks) if res.worker_peaks else "(in main)"
        per_run = f"{res.user / max(res.converted, 1):.1f}+{res.system / max(res.converted, 1):.1f}"
        print(f"  {label:28s} {res.converted:>4} {res.wall:>7.1f} {res.per_hour:>9.0f} {per_run:>18}"
              f" {gib(res.main_peak):>8}  {workers_text:20s}  {load()}", flush=True)
    base = results.get(("processes", 1))
    for w in workers:
        if w != 1 and base is not None:
            r = results[("processes", w)]
            print(f"  scaling 1 -> {w} worker processes: {r.per_hour / base.per_hour:.2f}x runs/hour (linear: {w}.00x)")
    if base is not None:
        r = results[("threads", threads)]
        print(f"  threads ({threads}) / 1 worker process: {r.per_hour / base.per_hour:.2f}x runs/hour")
    return base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=4, help="synthetic subjects, one run each (default 4)")
    parser.add_argument("--frames", type=int, default=300, help="frames per synthetic run (default 300; HCP: 1200)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="worker processes of the local Dask cluster, in turn (default 1 2); threads use the largest")
    parser.add_argument("--qa", action="store_true", help="QA on (default off: conversion alone)")
    parser.add_argument("--device", default="cpu", help="resampling device passed to fmri-data convert (default cpu)")
    parser.add_argument("--no-real", action="store_true", help="skip ds-real")
    parser.add_argument("--no-synthetic", action="store_true", help="skip the synthetic cohort")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"fmri-data convert --recipe neurostorm (QA {'on' if args.qa else 'off'}, --device {args.device});"
          f" {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB; {load()}")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        base = None
        if not args.no_synthetic:
            start = time.perf_counter()
            cohort = make_cohort(tmp / "synthetic", args.runs, args.frames)
            print(f"synthetic cohort: {args.runs} runs of 91x109x91x{args.frames} float32, TR 0.72 s"
                  f" (written in {time.perf_counter() - start:.0f} s)")
            base = cohort_table(f"synthetic HCP-sized runs ({args.runs} x {args.frames} frames)", cohort, tmp,
                                args.workers, args.qa, args.device)
        real = DATA / "bids" / "ds-real"
        if not args.no_real:
            if real.is_dir():
                cohort_table("ds-real (real data: 12 Haxby runs, sub-me1, the HCP parcellated run)", real, tmp,
                             args.workers, args.qa, args.device)
            else:
                print(f"\nds-real skipped: {real} not found")
        if base is not None:
            cpu_run = (base.user + base.system) / base.converted
            peak = max(base.worker_peaks, default=0)
            print(f"\nestimate for a 16-core node (not measured; synthetic runs of {args.frames} frames): 16 worker processes"
                  f" x {base.per_hour:.0f} runs/hour (this machine's 1-worker rate) = {16 * base.per_hour:.0f} runs/hour, or"
                  f" 16 cores / {cpu_run:.1f} CPU s per run = {16 * 3600 / cpu_run:.0f} runs/hour if CPU-bound and scaling"
                  f" linearly; memory 16 x {peak / 2**30:.2f} GiB = {16 * peak / 2**30:.0f} GiB of workers")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; {load()}")


if __name__ == "__main__":
    main()
