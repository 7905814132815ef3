"""Loader throughput per model family against the training step a GPU runs: windows/s of each
family's base window from a warm and a cold page cache with 0 and 2 DataLoader workers, the
raw read of the same files, a NeuroSTORM-style per-frame baseline, and whether storing only
the valid flat-map pixels would make flat windows cheaper.

Windows (``fmri_data/train/configs.py`` and the recipes in ``pipelines/``), each read from a
store converted here from real data (``../shared/data``) through the real converter, QA
off, with the recipes' ``store.compression`` (the default codec, printed; Blosc + byte
shuffle; ``--compression lz4:5:noshuffle`` to compare) + CRC-32C:

=============  ===============  ==============================================================
family         window           store
=============  ===============  ==============================================================
NeuroSTORM     96^3 x 20        ``default`` recipe, every ds-real volume run: ``bold (T, 96,
                                96, 96)`` float16, chunks of 20 frames as the ``neurostorm``
                                recipe stores them (at the native TR: fewer frames to
                                convert than at its TR 0.8 s), sliding windows of 20
SLIM-Brain     96^3 x 40        ``slim_brain`` recipe (saliency off: its windows start on the
                                same 40-frame grid), chunks of 40, sliding windows of 40
flat-map MAE   16 x 224 x 560   ``flat_mae`` recipe, the fsaverage5 resting-state run of
                                ds-real linked under ``--flat-copies`` subjects (default 8;
                                one run is 57 windows, too few for a cold-cache epoch):
                                ``flat`` float16 chunks of 16 frames + ``flat_mask``
fMRI-LM        450 x 160        ``fmri_lm`` recipe (Tian S3 + Schaefer-400 7N = 450 parcels,
                                TR 2.0 s), ``roi/tian_s3-schaefer400_7n`` float32 chunks of
                                160 frames; the reference's cut (``window="first"``: one window
                                per run, shorter runs nearest-upsampled): 14 real windows,
                                repeated in the index to ``--roi-windows`` per epoch
=============  ===============  ==============================================================

Runs are read as training reads them: epochs of shuffled windows (``WindowDataset`` +
``WindowLoader``, persistent workers, ``WindowDataset``'s default read-ahead of 2 windows per
process, ``--prefetch`` to change it) in batches of 4 (volumes), 32 (flat maps: fmri-fm's
batch) and 32 (ROI). One untimed epoch first, then ``--repeat`` timed epochs; each gives a
steady-state rate, from the arrival of its first batch to its last (the first batch not
counted: the pipeline filling at an epoch's start happens once per epoch of a real training
set, and these epochs are short); medians are printed. Cold: the page cache of the array's
files is dropped (``fsync`` + ``posix_fadvise(DONTNEED)``) before each timed epoch and raw
read; for the fMRI-LM windows, repeated in the index, only the first read of each chunk in
an epoch comes from disk (the whole array is 3 MB).

Per family it prints: the raw sequential read of the array's files (4 MiB blocks, nothing
decoded), ``reader alone``: one thread calling ``WindowReader.read`` over the windows
(warm; the per-core ceiling of read + CRC-32C + Blosc decode without the batching), then
per cache state and worker count: windows/s, stored MB/s and its share of the raw read
(1 MB = 10^6 bytes), decoded MB/s; for NeuroSTORM also the per-frame baseline (every frame
its own ``.pt`` file, one ``torch.load`` per frame, stacked, same DataLoader and batch) and
the speed-up over it. The summary sets the rates next to the training step a GPU runs:
fmri-fm's flat-map MAE step at 585 samples/s (batch 32) and its Arrow loader at 274
samples/s (fmri-fm's figures, quoted in issue 16; this project's CUDA measurement of its
own steps is pending) and checks issue 16's targets (2 cores, default codec, warm cache):
flat windows >= 585/s, 450 x 160 ROI windows >= 5,000/s; volume windows are reported.

Valid flat-map pixels: real ``flat`` chunks (one run of the flat store) encoded with the
store's Blosc settings as stored (16 x 224 x 560) and as fmri-fm's shards keep them (the
pixels inside ``flat_mask`` gathered, ``(16, n_valid)``): bytes, CRC-32C + decode time per
window (single-threaded, as the readers decode; best of 9, interleaved) and the scatter back
onto the 224 x 560 grid on the CPU (numpy fancy-index assignment); if the GPU scattered, the
CPU's part would be the decode alone. The store format is not changed.

Default run: about 5 minutes on the 2-core development machine (shared, load 4-6).

    python benchmarks/bench_loader.py
    python benchmarks/bench_loader.py --cache warm --workers 0 2 4
    python benchmarks/bench_loader.py --compression lz4:5:noshuffle
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fmri_data.load import WindowDataset, WindowLoader, build_index
from fmri_data.load.index import WindowIndex
from fmri_data.load.reader import WindowReader
from fmri_data.store.root import Store

#: fmri-fm's figures (issue 16); this project's CUDA step measurement is pending.
FMRI_FM_MAE_STEP = 585.0
FMRI_FM_ARROW = 274.0
ROI_TARGET = 5000.0
FLAT_RUN = Path("derivatives/preproc/sub-010188/ses-02/func")


@dataclass(frozen=True)
class Case:
    family: str
    window: str
    store: str  # key of the stores dict
    array: str
    length: int
    layout: str
    batch: int
    cut: str = "contiguous"
    mask: str | None = None
    target: float | None = None


CASES = [
    Case("NeuroSTORM", "96^3 x 20", "volume20", "bold", 20, "neurostorm", 4),
    Case("SLIM-Brain", "96^3 x 40", "volume40", "bold", 40, "neurostorm", 4),
    Case("flat-map MAE", "16 x 224 x 560", "flat", "flat", 16, "flat", 32, mask="flat_mask", target=FMRI_FM_MAE_STEP),
    Case("fMRI-LM", "450 x 160", "roi", "roi/tian_s3-schaefer400_7n", 160, "roi", 32, cut="first", target=ROI_TARGET),
]


def load() -> str:
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---------------------------------------------------------------- stores

def flat_cohort(root: Path, data: Path, copies: int) -> Path:
    """A derivatives dataset with ds-real's fsaverage5 run linked under ``copies`` subjects."""
    source = data / "bids" / "ds-real" / FLAT_RUN
    (root).mkdir(parents=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "flat cohort", "BIDSVersion": "1.9.0", "DatasetType": "derivative"}))
    for k in range(1, copies + 1):
        func = root / f"sub-010188c{k:02d}" / "ses-02" / "func"
        func.mkdir(parents=True)
        for f in source.iterdir():
            (func / f.name.replace("sub-010188", f"sub-010188c{k:02d}")).symlink_to(f)
    return root


def make_stores(root: Path, data: Path, compression: dict | None, flat_copies: int, keys: set[str]) -> dict[str, str]:
    """Convert the stores named in ``keys`` (see the module doc); ``compression`` overrides
    every recipe's ``store.compression``."""
    from fmri_data.convert import convert

    overrides = ["qa.enabled=false"] + [f"store.compression.{k}={v}" for k, v in (compression or {}).items()]
    bids, atlases = data / "bids" / "ds-real", str(data / "atlases")
    jobs = {
        "volume20": (lambda: bids, "default", []),
        "volume40": (lambda: bids, "slim_brain", ["saliency=null"]),
        "flat": (lambda: flat_cohort(root / "flat_bids", data, flat_copies), "flat_mae", []),
        "roi": (lambda: bids, "fmri_lm", []),
    }
    stores = {}
    for key, (source, recipe, extra) in jobs.items():
        if key not in keys:
            continue
        out = str(root / f"{key}.zarr")
        report = convert(source(), out, recipe, overrides=overrides + extra, atlas_dir=atlases, progress=False)
        if report.failed:
            raise SystemExit(f"{recipe}: conversion failed: {[r.error for r in report.failed]}")
        stores[key] = out
    return stores


def array_files(store: str, array: str) -> list[Path]:
    return sorted(p for p in Path(store, "runs").glob(f"*/{array}/c/**/*") if p.is_file())


def tiled(index: WindowIndex, at_least: int) -> tuple[WindowIndex, int]:
    """``index`` repeated until it has ``at_least`` windows (and the repeat count)."""
    k = max(1, -(-at_least // len(index)))
    if k == 1:
        return index, 1
    return WindowIndex(index.url, index.storage_options, index.length, index.runs, np.tile(index.run, k),
                       np.tile(index.start, k), index.event_labels * k, index.source, dict(index.dropped),
                       None if index.frames is None else np.tile(index.frames, (k, 1))), k


# ---------------------------------------------------------------- reads

def drop_cache(files) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(files) -> tuple[float, int]:
    """Seconds and bytes to read ``files`` sequentially, 4 MiB at a time."""
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return time.perf_counter() - t0, total


def measure_raw(files, warm: bool, repeat: int) -> float:
    """Median MB/s of ``repeat`` sequential reads of ``files``."""
    rates = []
    for _ in range(repeat):
        if not warm:
            drop_cache(files)
        sec, nbytes = raw_read(files)
        rates.append(nbytes / sec / 1e6)
    return float(np.median(rates))


def reader_alone(index: WindowIndex, n: int) -> float:
    """Windows/s of one thread calling ``WindowReader.read`` into one reused buffer (warm cache)."""
    reader = WindowReader(index)
    r0 = index.runs[0]
    out = np.empty((index.length, *r0.frame_shape), dtype=r0.dtype)
    order = np.random.default_rng(0).permutation(len(index))[:n]
    reader.read(int(order[0]), out)  # opens the store
    t0 = time.perf_counter()
    for i in order:
        reader.read(int(i), out)
    return len(order) / (time.perf_counter() - t0)


class FrameFiles(torch.utils.data.Dataset):
    """NeuroSTORM-style: one ``.pt`` file per frame; a window = ``torch.load`` of each frame, stacked."""

    def __init__(self, windows: list[tuple[Path, int]], length: int, volume: bool):
        self.windows, self.length, self.volume = windows, length, volume

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        folder, start = self.windows[i]
        frames = [torch.load(folder / f"frame_{t}.pt") for t in range(start, start + self.length)]
        return torch.stack(frames, dim=-1).unsqueeze(0) if self.volume else torch.stack(frames).unsqueeze(0)


def write_frame_files(store: str, array: str, run_ids, root: Path) -> dict[str, Path]:
    s = Store.open(store)
    out = {}
    for run_id in run_ids:
        folder = root / array / run_id
        folder.mkdir(parents=True)
        values = s.run(run_id)[array]
        for a in range(0, values.shape[0], 100):
            block = torch.from_numpy(values[a:a + 100])
            for t in range(block.shape[0]):
                torch.save(block[t].clone(), folder / f"frame_{a + t}.pt")
        out[run_id] = folder
    return out


def _timed_epochs(loader, files, warm: bool, size, repeat: int) -> tuple[float, int]:
    """Median steady-state windows/s of ``repeat`` timed epochs, and windows per epoch: from
    the arrival of an epoch's first batch to its last (the first batch's windows not counted:
    the pipeline filling up at an epoch's start, once per epoch of a real training set, is
    left out). One untimed epoch first starts the persistent workers and fills the buffer
    pools."""
    for _ in loader:
        pass
    rates, n = [], 0
    for _ in range(repeat):
        if not warm:
            drop_cache(files)
        first, n = None, 0
        for batch in loader:
            k = size(batch)
            n += k
            if first is None:
                first = (time.perf_counter(), k)
        end = time.perf_counter()
        rates.append((n - first[1]) / (end - first[0]))
    return float(np.median(rates)), n


def measure_loader(index, case: Case, workers: int, files, warm: bool, repeat: int, prefetch: int | None) -> tuple[float, int]:
    ds = WindowDataset(index, batch_size=case.batch, seed=0, layout=case.layout, mask=case.mask,
                       **({} if prefetch is None else {"prefetch": prefetch}))
    loader = WindowLoader(ds, num_workers=workers, persistent_workers=True, pin_memory=False)
    return _timed_epochs(loader, files, warm, lambda b: int(b["data"].shape[0]), repeat)


def measure_baseline(windows, case: Case, workers, files, warm, repeat) -> tuple[float, int]:
    loader = torch.utils.data.DataLoader(FrameFiles(windows, case.length, True), batch_size=case.batch, shuffle=True,
                                         num_workers=workers, persistent_workers=workers > 0,
                                         generator=torch.Generator().manual_seed(0))
    return _timed_epochs(loader, files, warm, lambda b: int(b.shape[0]), repeat)


# ---------------------------------------------------------------- valid flat-map pixels

def valid_pixels(store: str, codec: dict, n_chunks: int = 24, repeat: int = 9) -> None:
    """Full 224 x 560 frames vs the gathered pixels inside ``flat_mask`` (fmri-fm's shards),
    both with the store's Blosc settings, single-threaded, CRC-32C included (see module doc)."""
    import google_crc32c
    import numcodecs
    import numcodecs.blosc

    numcodecs.blosc.use_threads = False  # the readers decode single-threaded
    s = Store.open(store)
    run = s.run(min(s.run_ids()))
    flat, mask = run["flat"], np.asarray(run["flat_mask"][...], dtype=bool)
    c = flat.chunks[0]
    starts = np.unique(np.linspace(0, (flat.shape[0] // c - 1) * c, n_chunks).astype(int) // c * c)
    chunks = [np.ascontiguousarray(flat[a:a + c]) for a in starts]
    idx = np.flatnonzero(mask.ravel())
    n_valid = idx.size
    outside = np.concatenate([ch.reshape(c, -1)[:, ~mask.ravel()].ravel() for ch in chunks])
    shuffle = {"shuffle": numcodecs.Blosc.SHUFFLE, "noshuffle": numcodecs.Blosc.NOSHUFFLE,
               "bitshuffle": numcodecs.Blosc.BITSHUFFLE}[codec["shuffle"]]
    blosc = numcodecs.Blosc(codec["cname"], int(codec["clevel"]), shuffle)
    valid = [np.ascontiguousarray(ch.reshape(c, -1)[:, idx]) for ch in chunks]
    packed_full = [blosc.encode(ch) for ch in chunks]
    packed_valid = [blosc.encode(v) for v in valid]

    out = np.empty_like(chunks[0])
    vout = np.empty_like(valid[0])
    flat2d = out.reshape(c, -1)

    def full():
        for p in packed_full:
            google_crc32c.value(p)
            numcodecs.blosc.decompress(p, out)

    def gathered():
        for p in packed_valid:
            google_crc32c.value(p)
            numcodecs.blosc.decompress(p, vout)

    def scatter():
        for _ in packed_valid:
            flat2d[:, idx] = vout

    def scatter_zeroed():
        for _ in packed_valid:
            out.fill(0)
            flat2d[:, idx] = vout

    fns = (full, gathered, scatter, scatter_zeroed)
    best = [float("inf")] * len(fns)
    for _ in range(repeat):  # interleaved, best of repeat: the box is shared
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], (time.perf_counter() - t0) / len(chunks))
    t_full, t_valid, t_scatter, t_zeroed = best
    for ch, v, p in zip(chunks, valid, packed_valid):  # the round trip is exact
        numcodecs.blosc.decompress(p, vout)
        flat2d[:, idx] = vout
        assert np.array_equal(vout, v) and np.array_equal(out.reshape(c, -1)[:, idx], ch.reshape(c, -1)[:, idx])
    b_full = sum(len(p) for p in packed_full) / len(chunks)
    b_valid = sum(len(p) for p in packed_valid) / len(chunks)
    us = 1e6
    print(f"\nvalid flat-map pixels (Blosc {codec['cname']} {codec['clevel']} {codec['shuffle']}, one thread, CRC-32C included,"
          f" best of {repeat}; {len(chunks)} real chunks of {c} x 224 x 560 float16):")
    print(f"  flat_mask: {n_valid} of {mask.size} pixels valid ({n_valid / mask.size:.1%}); stored values outside it:"
          f" {np.count_nonzero(outside)} of {outside.size} non-zero")
    print(f"  {'per window of ' + str(c) + ' frames':42s} {'stored KB':>9} {'ratio':>6} {'CPU us':>8} {'windows/s/core':>14}")
    raw = chunks[0].nbytes
    rows = [
        ("full frames (as stored): CRC + decode", b_full, t_full),
        ("valid pixels: CRC + decode (GPU scatters)", b_valid, t_valid),
        ("valid pixels + CPU scatter (reused buffer)", b_valid, t_valid + t_scatter),
        ("valid pixels + zero buffer + CPU scatter", b_valid, t_valid + t_zeroed),
    ]
    for label, nbytes, sec in rows:
        print(f"  {label:42s} {nbytes / 1e3:>9.0f} {raw / nbytes:>6.2f} {sec * us:>8.0f} {1 / sec:>14.0f}")
    print(f"  valid / full: {b_valid / b_full:.2f}x the stored bytes, {n_valid / mask.size:.2f}x the decoded bytes (and bytes"
          f" copied to the GPU); CPU: decode {t_valid / t_full:.2f}x, decode + scatter {(t_valid + t_scatter) / t_full:.2f}x"
          f" (scatter alone {t_scatter * us:.0f} us: numpy fancy-index assignment, the fastest of the CPU ways tried)")


# ---------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data",
                        help="the shared data folder (holds bids/ds-real and atlases)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--cache", nargs="+", choices=["warm", "cold"], default=["warm", "cold"],
                        help="page cache states to measure (cold: dropped before each timed read)")
    parser.add_argument("--families", nargs="+", default=[c.family for c in CASES], metavar="FAMILY",
                        help=f"subset of {[c.family for c in CASES]}")
    parser.add_argument("--repeat", type=int, default=3, help="timed epochs (and raw reads) per case; medians are printed")
    parser.add_argument("--prefetch", type=int, default=None,
                        help="the loader's read-ahead, windows per process (default: WindowDataset's, as training uses)")
    parser.add_argument("--flat-copies", type=int, default=8, help="subjects the real fsaverage5 run is linked under")
    parser.add_argument("--roi-windows", type=int, default=4096, help="ROI windows per epoch (the 14 real ones repeated)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the per-frame-file baseline")
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--compression", default=None, metavar="CNAME:CLEVEL:SHUFFLE",
                        help="Blosc settings instead of the recipes', e.g. zstd:3:shuffle")
    args = parser.parse_args()
    compression = None
    if args.compression:
        cname, clevel, shuffle = args.compression.split(":")
        compression = {"cname": cname, "clevel": int(clevel), "shuffle": shuffle}
    cases = [c for c in CASES if c.family in args.families]
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    results: dict[tuple[str, str, int], float] = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        stores = make_stores(tmp, args.data, compression, args.flat_copies, {c.store for c in cases})
        codec = Store.open(next(iter(stores.values()))).recipe["store"]["compression"]
        prefetch = args.prefetch if args.prefetch is not None else inspect.signature(WindowDataset).parameters["prefetch"].default
        print(f"stores converted from real data in {time.perf_counter() - t0:.0f} s; Blosc {codec['cname']} {codec['clevel']}"
              f" {codec['shuffle']}; read-ahead {prefetch} windows per process; {os.cpu_count()} CPUs; {load()}")
        for case in cases:
            store = stores[case.store]
            index = build_index(store, case.length, case.length, array=case.array, window=case.cut)
            distinct = len(index)
            if case.cut == "first":
                index, _ = tiled(index, args.roi_windows)
            files = array_files(store, case.array)
            store_bytes = sum(f.stat().st_size for f in files)
            window_bytes = index.length * int(np.prod(index.runs[0].frame_shape)) * np.dtype(index.runs[0].dtype).itemsize
            alone = reader_alone(index, min(len(index), 200))
            tile_text = f" ({distinct} real windows x {len(index) // distinct})" if len(index) > distinct else ""
            print(f"\n{case.family} {case.window} ({index.runs[0].dtype}): {len(index)} windows per epoch{tile_text}"
                  f" of {window_bytes / 1e6:.2f} MB, batch {case.batch}; array files {store_bytes / 1e6:.0f} MB"
                  f" (compression {distinct * window_bytes / store_bytes:.2f}x)")
            print(f"  reader alone (1 thread, warm): {alone:.0f} windows/s")
            baseline = case.family == "NeuroSTORM" and not args.no_baseline
            if baseline:
                t0 = time.perf_counter()
                frame_dirs = write_frame_files(store, case.array, [r.run_id for r in index.runs], tmp / "frames")
                frame_files = [p for d in frame_dirs.values() for p in d.iterdir()]
                windows = [(frame_dirs[index.run_id(i)], int(index.start[i])) for i in range(len(index))]
                print(f"  per-frame baseline: {len(frame_files)} .pt files written in {time.perf_counter() - t0:.0f} s")
            head = (f"  {'cache':5s} {'raw MB/s':>8} {'workers':>7} {'windows/s':>10} {'stored MB/s':>11} {'vs raw':>6}"
                    f" {'decoded MB/s':>12}")
            print(head + (f"   {'per-frame win/s':>15} {'speed-up':>8}" if baseline else "") + "   load")
            for cache in args.cache:
                warm = cache == "warm"
                raw_mb_s = measure_raw(files, warm, args.repeat)
                for workers in args.workers:
                    rate, _ = measure_loader(index, case, workers, files, warm, args.repeat, args.prefetch)
                    results[(case.family, cache, workers)] = rate
                    stored_mb_s = store_bytes / distinct * rate / 1e6
                    line = (f"  {cache:5s} {raw_mb_s:>8.0f} {workers:>7} {rate:>10.1f} {stored_mb_s:>11.0f}"
                            f" {stored_mb_s / raw_mb_s:>6.0%} {rate * window_bytes / 1e6:>12.0f}")
                    if baseline:
                        base_rate, _ = measure_baseline(windows, case, workers, frame_files, warm, args.repeat)
                        line += f"   {base_rate:>15.1f} {rate / base_rate:>7.1f}x"
                    print(line + f"   {load()}", flush=True)
        print(f"\nsummary: windows/s (medians of {args.repeat} epochs), next to the GPU training step;"
              f" 2 cores shared with other work: {load()}")
        cols = [(c, w) for c in args.cache for w in args.workers]
        print(f"  {'family':13s} {'window':15s} " + " ".join(f"{c + ' ' + str(w) + 'w':>9}" for c, w in cols)
              + "   GPU step to feed (samples/s)")
        for case in cases:
            gpu = (f"{FMRI_FM_MAE_STEP:.0f} fmri-fm MAE step, batch 32 (its Arrow loader: {FMRI_FM_ARROW:.0f})"
                   if case.family == "flat-map MAE" else "not measured")
            print(f"  {case.family:13s} {case.window:15s} "
                  + " ".join(f"{results.get((case.family, c, w), float('nan')):>9.0f}" for c, w in cols) + f"   {gpu}")
        print("  GPU figures: fmri-fm's own (issue 16); the CUDA measurement of this project's training steps is pending.")
        for case in cases:
            if case.target is None or "warm" not in args.cache:
                continue
            rates = {w: results[(case.family, "warm", w)] for w in args.workers}
            best_w = max(rates, key=rates.get)
            verdict = "met" if rates[best_w] >= case.target else "NOT met"
            print(f"  target {case.family} {case.window} >= {case.target:.0f}/s warm: {verdict} (best {rates[best_w]:.0f}/s"
                  f" with {best_w} workers; " + ", ".join(f"{w} workers {r:.0f}/s {'ok' if r >= case.target else 'below'}"
                                                        for w, r in rates.items()) + ")")
        if "flat" in {c.store for c in cases}:
            valid_pixels(stores["flat"], codec)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; {load()}")


if __name__ == "__main__":
    main()
