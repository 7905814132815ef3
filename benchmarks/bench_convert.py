"""Conversion of an HCP-sized run: phase breakdown, the decode floor, codecs, and a NeuroSTORM-style baseline.

Input: one synthetic run with real geometry — MNI152NLin6Asym 2 mm (91 x 109 x 91),
TR 0.72 s, N frames (1,200 by default, an HCP resting-state run), values inside a
brain-shaped ellipsoid and 0 outside (as HCP minimally preprocessed volumes are), laid out
as an fMRIPrep derivative with its brain mask, written frame by frame (gzip level 1, as
``nib.save``). Target: the ``neurostorm`` recipe (96^3, TR 0.8 s, global z-score, float16),
QA off (``--set qa.enabled=false``; QA is measured by ``bench_qa.py``).

What it prints, each measured in this run:

1. **Decode floor**: the time to merely stream-decode the source ``.nii.gz`` with the
   fastest available decoder (``fmri_data.read.common.open_gzip``: python-isal's igzip when
   installed), next to the standard library's ``gzip`` (nibabel's default).
2. **fmri-data conversion** (``fmri-data convert ... --scheduler synchronous`` in a child
   process, as a user runs it: wall time and peak RSS, whose ratio to the decode floor is
   issue 16's target), the **cost of each further run of a command** (the same command on
   a dataset of 3 subjects whose run is this one, linked: (its time - the one-run time) / 2;
   Python start-up, imports and numba's cache loads are paid once per command, not per run)
   and a **phase breakdown** of the same conversion run again in a
   second child whose converter functions are timed: the functions the converter calls
   (``fmri_data.convert.outputs.volume``: waiting for the next block of decoded source
   frames (decoding runs one block ahead in a background thread, overlapping the other
   phases; "read+decode" is the time the converter waited for it), finite check, spatial
   operator build and application, the TR step applied as frames arrive
   (``TemporalStream.push``; ``resample_tr`` when it takes the column pass), the
   normalization's statistics, the working series' temporary file ("scratch file"), ROI
   operators, the per-chunk ``block`` callback of ``write_series`` that normalizes, casts to
   float16 and scatters onto the 96^3 grid in one kernel ("scatter to grid"), shard files
   ("write")) are wrapped with timers in that child; a call made inside another timed call
   counts for the outer one (``resample_tr``'s operator is temporal, not spatial), except
   inside the containers (the ``block`` callback, ``write_series`` and the output kinds).
   "volume output (rest)" is the volume kind's own code between those calls; "other" is
   outside the output kinds (discovery, store set-up; the sources' SHA-256 for provenance
   runs in a background thread). The Blosc encodes that the writer runs in its threads are
   printed as CPU seconds summed over those threads (they overlap "write", which waits for
   them).
3. **Codecs** on real chunks: the ``bold`` chunks (20 x 96^3 float16) of the real ds-real
   ``sub-me1`` run converted with the same recipe, and of the synthetic run: compress and
   decompress time (single-threaded Blosc, as the store's readers use it; best of 3) and ratio for
   lz4 9 + shuffle (the default), lz4 5 (shuffle / noshuffle), lz4hc 5 (the default before)
   and 1 + shuffle, and zstd 1 / 3 + shuffle.
4. **NeuroSTORM-style baseline** (written here, after CUHK-AIM-Group/NeuroSTORM
   ``datasets/preprocessing_volume.py``): load the whole run as float64, interpolate to TR
   0.8 s with scipy along time, crop/pad to 96^3, z-score over the non-zero voxels, write one
   float16 ``.pt`` file per frame; its peak memory grows with the run (about 3 float64 copies
   of it). It runs only when its estimated peak fits in ``--baseline-max-gib`` (default: half
   of the available memory); else it is skipped with that reason. A failure is reported,
   never raised.

    python benchmarks/bench_convert.py --frames 1200
    python benchmarks/bench_convert.py --frames 100   # quick; the baseline fits and runs
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared/data"
ME1 = DATA / "bids/ds-real/derivatives/preproc/sub-me1/func/sub-me1_task-visual_desc-preproc_bold.nii.gz"
SHAPE = (91, 109, 91)
TR_IN, TR_OUT = 0.72, 0.8
PAD = 96
RECIPE = ["--recipe", "neurostorm", "--set", "qa.enabled=false"]
BLOCK = 1 << 24  # bytes per read of the decode floor
COHORT = 3  # runs of the cohort command (the cost of each run after the first)


def make_dataset(root: Path, frames: int) -> Path:
    """An fMRIPrep-style derivative dataset with one HCP-sized run (synthetic values), written
    frame by frame (memory: one frame), gzip level 1 (``nib.save``'s level)."""
    from fmri_data.read.common import gzip_decoder

    func = root / "sub-01" / "func"
    func.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "bench", "BIDSVersion": "1.9.0", "DatasetType": "derivative"}))
    affine = np.array([[-2.0, 0, 0, 90], [0, 2, 0, -126], [0, 0, 2, -72], [0, 0, 0, 1]])  # TemplateFlow LAS
    ijk = np.indices(SHAPE).reshape(3, -1).T
    centre = np.array([45, 60, 40])
    brain = ((((ijk - centre) / np.array([36, 46, 34])) ** 2).sum(axis=1) <= 1.0).reshape(SHAPE)
    base = "sub-01_task-rest_space-MNI152NLin6Asym_res-2"
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), func / f"{base}_desc-brain_mask.nii.gz")
    header = nib.Nifti1Image(np.zeros(SHAPE + (1,), np.float32), affine).header
    header.set_data_shape(SHAPE + (frames,))
    header.set_xyzt_units("mm", "sec")
    header["pixdim"][4] = TR_IN
    path = func / f"{base}_desc-preproc_bold.nii.gz"
    if gzip_decoder() == "isal":
        from isal import igzip as gz
    else:
        import gzip as gz
    rng = np.random.default_rng(0)
    mean = 1000 + 200 * rng.standard_normal(int(brain.sum())).astype(np.float32)
    frame = np.zeros(SHAPE, dtype=np.float32)
    with gz.open(path, "wb", compresslevel=1) as out:
        header.write_to(out)  # 348 bytes + the 4-byte extension flag of a single .nii file
        out.write(b"\0" * (int(header["vox_offset"]) - out.tell()))
        for _ in range(frames):
            frame[brain] = mean + 20 * rng.standard_normal(mean.size).astype(np.float32)
            out.write(frame.tobytes(order="F"))
    (func / f"{base}_desc-preproc_bold.json").write_text(json.dumps({"RepetitionTime": TR_IN, "TaskName": "rest"}))
    return path


def link_subjects(func: Path, root: Path, subjects: int) -> Path:
    """A derivatives dataset at ``root`` of ``subjects`` subjects whose run is the run of
    ``func`` (a ``sub-01/func`` folder), linked under each subject's name: distinct runs for
    the converter (each decoded, resampled and written on its own), one source on disk."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "cohort", "BIDSVersion": "1.9.0", "DatasetType": "derivative"}))
    for k in range(1, subjects + 1):
        linked = root / f"sub-{k:02d}" / "func"
        linked.mkdir(parents=True)
        for f in func.iterdir():
            (linked / f.name.replace("sub-01", f"sub-{k:02d}")).symlink_to(f.resolve())
    return root


def decode_seconds(path: Path, decoder: str) -> tuple[float, int]:
    """Seconds to stream-decode ``path`` to its end with ``decoder`` (``fastest`` or ``gzip``), and the bytes."""
    import gzip

    from fmri_data.read.common import open_gzip

    start, n = time.perf_counter(), 0
    with (open_gzip(path) if decoder == "fastest" else gzip.open(path, "rb")) as fh:
        while chunk := fh.read(BLOCK):
            n += len(chunk)
    return time.perf_counter() - start, n


# ---------------------------------------------------------------- phase breakdown (child)

class Phases:
    """Wall seconds per phase. A timed call opens its phase only on a thread with no open
    phase or whose open phase is a container; inside another phase it counts for that one.
    A container's own time excludes the phases opened inside it."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()
        self.local = threading.local()

    def _stack(self) -> list:
        if not hasattr(self.local, "stack"):
            self.local.stack = []
        return self.local.stack

    def call(self, label: str, container: bool, fn, *args, clock=time.perf_counter, **kwargs):
        stack = self._stack()
        if stack and not stack[-1][1]:
            return fn(*args, **kwargs)
        entry = [label, container, clock(), 0.0]  # label, container, start, time of inner phases
        stack.append(entry)
        try:
            return fn(*args, **kwargs)
        finally:
            stack.pop()
            total = clock() - entry[2]
            with self.lock:
                self.seconds[label] += total - entry[3]
                self.calls[label] += 1
            if stack:
                stack[-1][3] += total

    def wrap(self, owner, name: str, label, container: bool = False, clock=time.perf_counter) -> None:
        """Replace ``owner.name`` by a timed version; ``label`` is a string or ``f(args) -> str | None``
        (None: not a phase of its own); ``clock``: wall (``perf_counter``) or this thread's CPU time."""
        fn = getattr(owner, name)
        phases = self

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            text = label(args) if callable(label) else label
            if text is None:
                return fn(*args, **kwargs)
            if name == "write_series":  # its per-shard block callback: the scatter onto the grid
                bound = inspect.signature(fn).bind(*args, **kwargs)
                bound.arguments["block"] = functools.partial(phases.call, "scatter to grid", True, bound.arguments["block"])
                args, kwargs = bound.args, bound.kwargs
            return phases.call(text, container, fn, *args, clock=clock, **kwargs)

        setattr(owner, name, timed)

    def wrap_iter(self, owner, name: str, label: str) -> None:
        """Replace the generator function ``owner.name`` by one whose every step is timed."""
        fn = getattr(owner, name)
        phases = self

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            items = fn(*args, **kwargs)
            while True:
                try:
                    item = phases.call(label, False, next, items)
                except StopIteration:
                    return
                yield item

        setattr(owner, name, timed)


def instrument() -> Phases:
    import numcodecs.blosc

    from fmri_data.convert import context, scratch
    from fmri_data.convert.outputs import OUTPUT_KINDS
    from fmri_data.convert.outputs import volume as vol_out
    from fmri_data.read import nifti
    from fmri_data.resample import operator, temporal
    from fmri_data.store import writer

    phases = Phases()
    for kind in OUTPUT_KINDS:  # each kind's remaining own time
        run = kind.run
        object.__setattr__(kind, "run", functools.partial(phases.call, f"{kind.name} output (rest)", True, run))
    phases.wrap(nifti.VolumeSeries, "read", "read+decode")
    phases.wrap_iter(nifti.VolumeSeries, "iter_frame_rows", "read+decode")
    phases.wrap(vol_out, "open_volume", "read+decode")
    phases.wrap(vol_out, "read_image_3d", "read+decode")
    phases.wrap(vol_out, "check_finite", "finite check")
    for name in ("footprint_mask", "resample_mask", "resampling_matrix", "inside_source", "source_coordinates", "grid_indices"):
        phases.wrap(vol_out, name, "spatial resample")
    parcel_matrices: set[int] = set()

    def parcel_operator(*args, **kwargs):
        op = build_parcels(*args, **kwargs)
        parcel_matrices.add(id(op.matrix))
        return op

    build_parcels = vol_out.cached_parcel_operator
    vol_out.cached_parcel_operator = parcel_operator
    phases.wrap(vol_out, "cached_parcel_operator", "ROI derivation")
    init = operator.PreparedOperator.__init__

    def tagged_init(self, matrix, *args, **kwargs):
        init(self, matrix, *args, **kwargs)
        self._bench_roi = id(matrix) in parcel_matrices

    operator.PreparedOperator.__init__ = tagged_init
    phases.wrap(operator.PreparedOperator, "__init__", "kernel setup (CUDA probe)")
    for name in ("__call__", "apply_rows"):
        phases.wrap(operator.PreparedOperator, name,
                    lambda args: "ROI derivation" if getattr(args[0], "_bench_roi", False) else "spatial resample")
    phases.wrap(vol_out, "resample_tr", "temporal resample")
    phases.wrap_iter(temporal.TemporalStream, "push", "temporal resample")
    phases.wrap(vol_out, "write_roi", "ROI derivation")
    for name in ("fit", "finish", "apply"):
        phases.wrap(vol_out.VolumeNormalizer, name, "normalize")
    for name in ("write", "write_columns", "rows", "columns"):
        phases.wrap(scratch.Series, name, "scratch file")
    phases.wrap(context, "temporal_mean", "read+decode")
    for name in ("write_series", "write_array", "commit"):
        phases.wrap(writer.RunWriter, name, "write", container=True)
    phases.wrap(numcodecs.blosc.Blosc, "encode", ENCODE, clock=time.thread_time)  # in the writer's threads
    return phases


def phases_child(bids: str, out: str, result: str) -> None:
    """Convert in this process with timed phases; write the wall time, ``{phase: seconds}`` and
    ``{phase: calls}`` to ``result`` (JSON)."""
    from fmri_data.cli.main import app

    phases = instrument()
    start = time.perf_counter()
    app([
        "convert", bids, out, *RECIPE, "--scheduler", "synchronous", "--no-progress",
    ], standalone_mode=False)
    wall = time.perf_counter() - start
    Path(result).write_text(json.dumps({"wall": wall, "seconds": phases.seconds, "calls": phases.calls}))


# ---------------------------------------------------------------- codecs on real chunks

CODECS = [
    ("lz4 9 + shuffle (default)", "lz4", 9, "shuffle"),
    ("lz4hc 5 + shuffle (earlier default)", "lz4hc", 5, "shuffle"),
    ("lz4hc 1 + shuffle", "lz4hc", 1, "shuffle"),
    ("lz4 5 + shuffle", "lz4", 5, "shuffle"),
    ("lz4 5, no shuffle", "lz4", 5, "noshuffle"),
    ("zstd 1 + shuffle", "zstd", 1, "shuffle"),
    ("zstd 3 + shuffle", "zstd", 3, "shuffle"),
]


def bold_chunks(store: Path, n: int = 5) -> list[np.ndarray]:
    """Up to ``n`` chunks (evenly spread) of the first run's ``bold`` array, as stored."""
    import zarr

    array = next(iter(sorted(store.glob("runs/*/bold"))), None)
    if array is None:
        return []
    bold = zarr.open_array(array, mode="r")
    step = bold.chunks[0]
    starts = np.unique(np.linspace(0, (bold.shape[0] // step - 1) * step, n).astype(int) // step * step)
    return [np.ascontiguousarray(bold[a : a + step]) for a in starts]


REPEAT = 3


def codec_table(name: str, chunks: list[np.ndarray]) -> None:
    import numcodecs.blosc

    numcodecs.blosc.use_threads = False  # one thread, as the store readers decode
    raw = sum(c.nbytes for c in chunks)
    print(f"  {name}: {len(chunks)} chunks of {chunks[0].shape} {chunks[0].dtype}, {raw / 2**20:.0f} MiB")
    base = None
    for label, cname, level, shuffle in CODECS:
        codec = numcodecs.Blosc(cname, level, numcodecs.Blosc.SHUFFLE if shuffle == "shuffle" else numcodecs.Blosc.NOSHUFFLE)
        out = [np.empty_like(c) for c in chunks]
        enc = dec = float("inf")
        for _ in range(REPEAT):  # best of REPEAT: the box is shared
            start = time.perf_counter()
            packed = [codec.encode(c) for c in chunks]
            enc = min(enc, time.perf_counter() - start)
            start = time.perf_counter()
            for p, o in zip(packed, out):
                codec.decode(p, out=o)
            dec = min(dec, time.perf_counter() - start)
        ratio = raw / sum(len(p) for p in packed)
        base = base or (enc, dec)
        print(f"    {label:28s} compress {raw / 2**20 / enc:6.0f} MiB/s ({base[0] / enc:4.1f}x the default)"
              f"  decompress {raw / 2**20 / dec:6.0f} MiB/s ({base[1] / dec:4.1f}x)  ratio {ratio:4.2f}")


def real_chunks(tmp: Path) -> list[np.ndarray]:
    """``bold`` chunks of the real ds-real sub-me1 run converted with the same recipe."""
    if not ME1.exists():
        return []
    ds = tmp / "me1"
    func = ds / "sub-me1" / "func"
    func.mkdir(parents=True)
    (ds / "dataset_description.json").write_text(json.dumps({"Name": "me1", "BIDSVersion": "1.9.0", "DatasetType": "derivative"}))
    for f in ME1.parent.iterdir():  # links to the shared real data, nothing copied
        (func / f.name).symlink_to(f)
    subprocess.run([sys.executable, "-m", "fmri_data", "convert", str(ds), str(tmp / "me1.zarr"), *RECIPE,
                    "--scheduler", "synchronous", "--no-progress"], check=True, stdout=subprocess.DEVNULL)
    return bold_chunks(tmp / "me1.zarr")


# ---------------------------------------------------------------- the NeuroSTORM-style baseline

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


def baseline_gib(frames: int) -> float:
    """Estimated peak of the baseline (GiB): at the interpolation, the float32 read, its
    float64 copy and the float64 output coexist; later the interpolated run, the padded
    96^3 float64 run and its masked copies; plus the interpreter with torch."""
    t_out = int((frames - 1) * TR_IN / TR_OUT) + 1
    voxels = int(np.prod(SHAPE))
    at_interp = voxels * frames * (4 + 8) + voxels * t_out * 8
    at_zscore = voxels * t_out * 8 + PAD**3 * t_out * (8 + 1 + 2 * 8)
    return 1.0 + max(at_interp, at_zscore) / 2**30  # + ~1 GiB of interpreter, torch and nibabel


def run_child(cmd: list[str]) -> tuple[float, float]:
    """Seconds and peak RSS (GiB) of a child process.

    Raises:
        subprocess.CalledProcessError: the child failed (its stderr tail in ``stderr``).
    """
    code = (
        "import resource, subprocess, sys, time\n"
        f"start = time.perf_counter(); done = subprocess.run({cmd!r}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)\n"
        "sys.stderr.write(done.stderr[-2000:]); sys.exit(done.returncode) if done.returncode else None\n"
        "print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    if done.returncode:
        raise subprocess.CalledProcessError(done.returncode, cmd, done.stdout, done.stderr)
    seconds, kib = done.stdout.split()
    return float(seconds), int(kib) / 2**20


ENCODE = "Blosc encode (CPU s, the writer's threads)"
ORDER = ["read+decode", "finite check", "kernel setup (CUDA probe)", "spatial resample", "scratch file",
         "temporal resample", "normalize", "ROI derivation", "scatter to grid", "write", "volume output (rest)"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=1200)
    parser.add_argument("--workdir", default=None, help="folder for the synthetic run and outputs (default: a temp dir)")
    parser.add_argument("--baseline-max-gib", type=float, default=None,
                        help="run the NeuroSTORM-style baseline only if its estimated peak fits (default: half the available memory)")
    parser.add_argument("--no-codecs", action="store_true", help="skip the codec comparison")
    parser.add_argument("--phases-child", nargs=3, metavar=("BIDS", "OUT", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phases_child:
        phases_child(*args.phases_child)
        return
    from fmri_data.read.common import gzip_decoder

    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        bold = make_dataset(tmp / "ds", args.frames)
        os.sync()  # the new file's write-back must not overlap the timed runs
        print(f"synthetic HCP-sized run: 91x109x91x{args.frames} float32 ({bold.stat().st_size / 2**30:.2f} GiB gz),"
              f" written in {time.perf_counter() - start:.0f} s")

        floor, n = decode_seconds(bold, "fastest")
        stdlib, _ = decode_seconds(bold, "gzip")
        print(f"decode floor ({gzip_decoder()}, stream to the end): {floor:6.1f} s  ({n / 2**20 / floor:4.0f} MiB/s decoded);"
              f" standard library gzip {stdlib:6.1f} s ({n / 2**20 / stdlib:4.0f} MiB/s): {stdlib / floor:.2f}x slower")

        result = tmp / "phases.json"

        def convert_cmd(bids: Path, out: Path) -> list[str]:  # as a user runs it
            return [str(Path(sys.executable).with_name("fmri-data")), "convert", str(bids), str(out), *RECIPE,
                    "--scheduler", "synchronous", "--no-progress"]

        ours_cmd = convert_cmd(tmp / "ds", tmp / "plain.zarr")
        phases_cmd = [sys.executable, str(Path(__file__).resolve()), "--phases-child", str(tmp / "ds"), str(tmp / "out.zarr"),
                      str(result)]
        cohort_cmd = convert_cmd(link_subjects(bold.parent, tmp / "cohort", COHORT), tmp / "cohort.zarr")
        try:
            t_ours, m_ours = run_child(ours_cmd)  # as a user runs it: the ratio
            shutil.rmtree(tmp / "plain.zarr")
            t_cohort, _ = run_child(cohort_cmd)  # the same run COHORT times in one command
            shutil.rmtree(tmp / "cohort.zarr")
            run_child(phases_cmd)  # the same conversion with its phases timed (timers add a little)
        except subprocess.CalledProcessError as exc:
            tail = (exc.stderr or "").strip().splitlines()
            print(f"fmri-data convert: failed (exit {exc.returncode}: {tail[-1] if tail else 'no message'})")
            return
        phases = json.loads(result.read_text())
        wall = phases["wall"]
        seconds = phases["seconds"]
        encode = seconds.pop(ENCODE, 0.0)  # CPU time in other threads, overlapping "write": not part of the sum
        print(f"fmri-data convert (neurostorm recipe, QA off, synchronous): {t_ours:7.1f} s  peak RSS {m_ours:5.2f} GiB"
              f"   conversion / decode floor: {t_ours / floor:.2f}x (target <= 2x)")
        per_run = (t_cohort - t_ours) / (COHORT - 1)
        print(f"  each further run of a command ({COHORT} runs of this source in one command: {t_cohort:.1f} s): {per_run:.1f} s"
              f" per run = {per_run / floor:.2f}x the decode floor (Python start-up, imports and numba's cache loads"
              f" happen once per command)")
        print(f"  phases (s, % of the {wall:.1f} s conversion call; python start-up and imports excluded):")
        shown = ORDER + sorted(k for k in seconds if k not in ORDER)
        for name in shown:
            if seconds.get(name, 0.0) >= 0.05:
                print(f"    {name:28s} {seconds[name]:7.1f}  {100 * seconds[name] / wall:5.1f} %")
        print(f"    {'other (discovery, provenance checksum, store)':28s} {max(0.0, wall - sum(seconds.values())):7.1f}")
        from fmri_data.config.recipe import load_recipe

        codec = load_recipe("neurostorm")["store"]["compression"]
        print(f"  within 'write': {encode:.1f} CPU s of Blosc encoding ({codec['cname']} {codec['clevel']},"
              f" {codec['shuffle']}) summed over the writer's threads")
        if "read+decode" in seconds:
            print(f"  read+decode / decode floor: {seconds['read+decode'] / floor:.2f}x"
                  f" ({phases['calls'].get('read+decode', 0)} timed reads)")

        if not args.no_codecs:
            print(f"codecs (single-threaded Blosc, same chunks, best of {REPEAT}):")
            me1 = real_chunks(tmp)
            if me1:
                codec_table("real ds-real sub-me1 bold, neurostorm recipe", me1)
            else:
                print(f"  real chunks skipped: {ME1} not found")
            codec_table("synthetic HCP-sized run (noise: compresses poorly)", bold_chunks(tmp / "out.zarr"))

        need = baseline_gib(args.frames)
        budget = args.baseline_max_gib or psutil.virtual_memory().available / 2**30 / 2
        if need > budget:
            fits = args.frames
            while fits > 2 and baseline_gib(fits) > budget:
                fits = int(fits * 0.9)
            fits_text = f"it fits up to about --frames {fits}" if baseline_gib(fits) <= budget else "it fits at no run length"
            print(f"NeuroSTORM-style baseline: skipped: it holds the whole run in float64 (estimated peak {need:.1f} GiB)"
                  f" and {budget:.1f} GiB may be used here (--baseline-max-gib); {fits_text}")
            return
        base_cmd = [sys.executable, "-c", BASELINE, str(bold), str(tmp / "frames")]
        try:
            t_base, m_base = run_child(base_cmd)
        except subprocess.CalledProcessError as exc:
            tail = (exc.stderr or "").strip().splitlines()
            print(f"NeuroSTORM-style baseline: failed (exit {exc.returncode}: {tail[-1] if tail else 'no message'});"
                  f" estimated peak {need:.1f} GiB")
            return
        print(f"NeuroSTORM-style baseline: {t_base:7.1f} s  peak RSS {m_base:5.2f} GiB (estimated {need:.1f})")
        print(f"speed ratio fmri-data / baseline: {t_base / t_ours:.2f}x   memory ratio: {m_ours / m_base:.2f}")


if __name__ == "__main__":
    main()
