"""Loader throughput: 96^3 x 20 volume windows and 16-frame flat-map windows, 0/2/4 workers,
against (a) a raw sequential read of the same store files and (b) a NeuroSTORM-style
baseline of one ``torch.load`` per frame file.

Input: ds-real from ``../shared/data`` converted here through the real converter: the
default recipe's store (every volume run, ``bold (T, 96, 96, 96)`` float16 in MNI 2 mm,
chunks of 20 frames, shards of 5 chunks) and the ``flat_mae`` recipe's store of the
fsaverage5 resting-state run (``flat (912, 224, 560)`` float16, chunks of 16 frames), both
with the recipes' ``store.compression`` (Blosc lz4hc level 5 + byte shuffle;
``--compression lz4:5:noshuffle`` to compare) + CRC-32C. Runs are read as training would
read them: epochs of shuffled windows in batches of 4 (``WindowDataset`` + ``WindowLoader``,
``--prefetch`` windows read ahead per process).

- raw read ("the physical limit"): every shard file of the windowed array read
  sequentially in 4 MiB blocks, nothing decoded; MB/s of file bytes.
- baseline ("NeuroSTORM-style", written here): every frame saved as its own ``.pt`` file
  (``torch.save`` of the float16 frame, as NeuroSTORM's preprocessing writes them); a
  map-style dataset loads the window's frames with one ``torch.load`` each and stacks
  them; same DataLoader, batch size and worker count.

Each side runs one untimed epoch with persistent workers (steady state, as in training),
then ``--repeat`` timed epochs; the raw read is repeated as often. The medians are printed
(this machine's disk varies by tens of percent from one read to the next). By default the
page cache of every file is dropped before each timed read (``fsync`` +
``posix_fadvise(DONTNEED)``), so every side reads from disk; ``--warm`` keeps it.

How MB/s is counted (1 MB = 10^6 bytes, per second of the timed epoch):

- ``stored MB/s``: bytes of the store files behind the windows read (compressed chunk
  bytes, an epoch reads every file once), the same bytes the raw read reads, so
  ``stored / raw`` is the share of the physical read limit the loader reaches (target
  >= 80 %);
- ``decoded MB/s``: bytes of the decoded windows handed to the training loop
  (``windows x L x frame x 2`` for float16), i.e. stored MB/s times the compression
  ratio; the per-frame baseline's MB/s is counted the same way (its files are not
  compressed, so its stored and decoded bytes are equal).

The speed-up is windows/s of the loader over windows/s of the per-frame baseline at the
same worker count (target >= 3x).

    python benchmarks/bench_loader.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fmri_data.load import WindowDataset, WindowLoader, build_index  # noqa: E402
from fmri_data.store.root import Store  # noqa: E402

BATCH = 4


def make_stores(root: Path, data: Path, compression: dict | None) -> tuple[str, str]:
    """Convert ds-real with the default recipe (every volume run: ``bold (T, 96, 96, 96)``)
    and its fsaverage5 resting-state run with the ``flat_mae`` recipe (``flat (912, 224,
    560)``); ``compression`` overrides both recipes' ``store.compression``."""
    from fmri_data.convert import convert

    overrides = [f"store.compression.{k}={v}" for k, v in (compression or {}).items()]
    bids, atlases = data / "bids" / "ds-real", str(data / "atlases")
    volume = convert(bids, str(root / "volume.zarr"), "default", overrides=overrides, atlas_dir=atlases, progress=False)
    flat = convert(bids, str(root / "flat.zarr"), "flat_mae", overrides=overrides, atlas_dir=atlases,
                   participant_label=["010188"], progress=False)
    for report in (volume, flat):
        if report.failed:
            raise SystemExit(f"conversion failed: {[r.error for r in report.failed]}")
    return str(root / "volume.zarr"), str(root / "flat.zarr")


def array_files(store: str, array: str) -> list[Path]:
    return sorted(p for p in Path(store, "runs").glob(f"*/{array}/c/**/*") if p.is_file())


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
    """Median seconds of ``repeat`` timed epochs, and windows per epoch; one untimed epoch
    first starts the persistent workers and fills the buffer pools (steady state)."""
    for _ in loader:
        pass
    times, n = [], 0
    for _ in range(repeat):
        if not warm:
            drop_cache(files)
        t0 = time.perf_counter()
        n = sum(size(batch) for batch in loader)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), n


def measure_loader(index, layout: str, workers: int, files, warm: bool, repeat: int, prefetch: int) -> tuple[float, int]:
    ds = WindowDataset(index, batch_size=BATCH, seed=0, layout=layout, prefetch=prefetch)
    loader = WindowLoader(ds, num_workers=workers, persistent_workers=True, pin_memory=False)
    return _timed_epochs(loader, files, warm, lambda b: int(b["data"].shape[0]), repeat)


def measure_baseline(windows, length, volume, workers, files, warm, repeat) -> tuple[float, int]:
    loader = torch.utils.data.DataLoader(FrameFiles(windows, length, volume), batch_size=BATCH, shuffle=True,
                                         num_workers=workers, persistent_workers=workers > 0,
                                         generator=torch.Generator().manual_seed(0))
    return _timed_epochs(loader, files, warm, lambda b: int(b.shape[0]), repeat)


def measure_raw(files, warm: bool, repeat: int) -> float:
    """Median MB/s of ``repeat`` sequential reads of ``files``."""
    rates = []
    for _ in range(repeat):
        if not warm:
            drop_cache(files)
        sec, nbytes = raw_read(files)
        rates.append(nbytes / sec / 1e6)
    return float(np.median(rates))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data",
                        help="the shared data folder (holds bids/ds-real and atlases)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--repeat", type=int, default=5, help="timed epochs (and raw reads) per case; medians are printed")
    parser.add_argument("--prefetch", type=int, default=4, help="the loader's read-ahead (windows per process)")
    parser.add_argument("--warm", action="store_true", help="keep the page cache (default: drop it before each read)")
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--compression", default=None, metavar="CNAME:CLEVEL:SHUFFLE",
                        help="Blosc settings instead of the default recipe's, e.g. zstd:3:shuffle")
    args = parser.parse_args()
    compression = None
    if args.compression:
        cname, clevel, shuffle = args.compression.split(":")
        compression = {"cname": cname, "clevel": int(clevel), "shuffle": shuffle}
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        stores = make_stores(tmp, args.data, compression)
        codec = Store.open(stores[0]).recipe["store"]["compression"]
        print(f"stores: ds-real converted in {time.perf_counter() - t0:.0f} s (default recipe: every volume run;"
              f" flat_mae: the fsaverage5 run), Blosc {codec['cname']} {codec['clevel']} {codec['shuffle']};"
              f" {os.cpu_count()} CPUs, page cache {'warm' if args.warm else 'dropped before each read'}")
        cases = [("volume 96^3 x 20", stores[0], "bold", 20, "neurostorm", True),
                 ("flat 224x560 x 16", stores[1], "flat", 16, "flat", False)]
        for name, store, array, length, layout, volume in cases:
            index = build_index(store, length, length, array=array)
            files = array_files(store, array)
            store_bytes = sum(f.stat().st_size for f in files)
            window_bytes = index.length * int(np.prod(index.runs[0].frame_shape)) * 2
            raw_mb_s = measure_raw(files, args.warm, args.repeat)
            frame_dirs = write_frame_files(store, array, [r.run_id for r in index.runs], tmp / "frames")
            frame_files = [p for d in frame_dirs.values() for p in d.iterdir()]
            windows = [(frame_dirs[index.run_id(i)], int(index.start[i])) for i in range(len(index))]
            print(f"\n{name}: {len(index)} windows of {window_bytes / 1e6:.1f} MB; store files {store_bytes / 1e6:.0f} MB "
                  f"(compression {len(index) * window_bytes / store_bytes:.2f}x); raw sequential read {raw_mb_s:.0f} MB/s")
            print(f"  {'workers':>7}  {'loader win/s':>12} {'stored MB/s':>11} {'vs raw':>6} {'decoded MB/s':>12}"
                  f"   {'per-frame win/s':>15} {'MB/s':>6} {'speed-up':>8}")
            for workers in args.workers:
                sec, n = measure_loader(index, layout, workers, files, args.warm, args.repeat, args.prefetch)
                base_sec, base_n = measure_baseline(windows, length, volume, workers, frame_files, args.warm, args.repeat)
                rate, base_rate = n / sec, base_n / base_sec
                stored_mb_s = store_bytes * n / len(index) / sec / 1e6
                print(f"  {workers:>7}  {rate:>12.1f} {stored_mb_s:>11.0f} {stored_mb_s / raw_mb_s:>6.0%} {rate * window_bytes / 1e6:>12.0f}"
                      f"   {base_rate:>15.1f} {base_rate * window_bytes / 1e6:>6.0f} {rate / base_rate:>7.1f}x", flush=True)
        print("\ntargets: stored MB/s >= 80% of the raw read of the same files, windows/s >= 3x the one-torch.load-per-frame baseline")


if __name__ == "__main__":
    main()
