"""Load windows of a store for training: index, datasets, loader (the ``load`` stage).

Data flows store -> load -> train; nothing here writes to a store. The API the training
layer uses::

    from fmri_data.load import build_index, WindowDataset, WindowLoader

    index = build_index("OUT.zarr", length=20, stride=20, array="bold")   # every (run, start)
    train = index.split("train", by="subject", seed=0)                   # or by="run"
    ds = WindowDataset(train, batch_size=8, seed=0, layout="neurostorm",
                       rank=rank, world_size=world_size)                # default: torch.distributed
    loader = WindowLoader(ds, num_workers=4, persistent_workers=True)
    for epoch in range(n_epochs):                                        # each epoch a new order
        for batch in loader:
            batch = ds.to_device(batch, "cuda")                            # as stored: NeuroSTORM's run-wise z-score
            batch["data"]          # (8, 1, 96, 96, 96, 20) float32 on the GPU
            ...
            checkpoint = {"loader": loader.state_dict(), ...}            # resume exactly:
    loader.load_state_dict(checkpoint["loader"])                         # same windows after it

- :func:`build_index` / :class:`WindowIndex` (:mod:`.index`): sliding windows of length
  ``L`` and stride ``S``, the top-k saliency windows of a scorer (``source="saliency"``),
  or event-locked windows (``source="events"``, onset + HRF delay); labels from entities,
  participants and events; deterministic subject- or run-level splits. The references'
  cuts as options (one window per run): ``window="first"`` (fMRI-LM: first ``L`` frames,
  shorter runs nearest-upsampled) and ``window="evenly"`` (Brain-JEPA: ``L`` frames evenly
  spaced over ``clip`` frames, ``torch.linspace(...).long()`` truncation).
- :class:`WindowDataset` (:mod:`.dataset`): an ``IterableDataset`` of batches, partitioned
  by rank and DataLoader worker, shuffled in shard-aware blocks by ``(seed, epoch)`` only,
  with bounded read-ahead, ``state_dict``/``load_state_dict``;
  ``to_device(batch, "cuda", normalize="dataset")`` applies the store's dataset statistics
  (``fmri-data stats``, :mod:`fmri_data.stats`) on the device; :class:`WindowLoader` counts
  what the caller consumed when workers prefetch. :class:`WindowMapDataset` +
  :func:`collate_windows` for evaluation.
- :class:`WindowReader` (:mod:`.reader`): lazy, fork-safe reads from any fsspec store;
  :class:`ChunkError` names the run, array, frames and shard of a missing/corrupt chunk
  (``on_error="skip"`` logs and skips instead).
- :mod:`.order`: the pure functions that decide the order.
"""

from .dataset import (
    LAYOUTS, Layout, WindowDataset, WindowLoader, WindowMapDataset, collate_windows, layout, normalize_frames,
)
from .index import (
    DEFAULT_HRF_DELAY_S, RunEntry, WindowIndex, build_index, event_starts, evenly_frames, first_frames, sliding_starts, split_of,
)
from .order import epoch_order, rank_positions, worker_positions
from .reader import ChunkError, WindowReader

__all__ = [
    "ChunkError", "DEFAULT_HRF_DELAY_S", "evenly_frames", "first_frames", "LAYOUTS", "Layout", "RunEntry", "WindowDataset", "WindowIndex", "WindowLoader",
    "WindowMapDataset", "WindowReader", "build_index", "collate_windows", "epoch_order", "event_starts", "layout",
    "normalize_frames", "rank_positions", "sliding_starts", "split_of", "worker_positions",
]
