"""Torch datasets of store windows: a resumable, sharded, shuffled IterableDataset of batches,
a map-style Dataset for evaluation, a stateful loader, and on-device normalization.

Batches are dicts::

    {"data":    (B, *layout) tensor, stored dtype (float16 volumes / flat maps, float32 ROI),
     "mask":    (B, *frame) bool tensor            (only with ``mask=``),
     "index":   (B,) int64  window numbers in the index,
     "start":   (B,) int64  first frame of each window,
     "run_id":  [B] str,
     "labels":  [B] dict    entities, participant columns, event columns,
     "targets": {name: (B,) int64 class index (-1 = missing) or float32 (NaN = missing)},
     "span":    int     windows of the epoch this batch stands for (B plus windows skipped
                        for a missing/corrupt chunk with ``on_error="skip"``)}

Layouts of ``data`` (``L`` = window length, one window ``(L, *frame)`` as stored):

=============== ==========================  =====================================
``time_first``  ``(B, L, *frame)``          any time-first array (``(B, L, 96, 96, 96)``)
``neurostorm``  ``(B, 1, X, Y, Z, L)``      NeuroSTORM / SwiFT volumes (a view)
``flat``        ``(B, 1, L, H, W)``         flat-map ViT MAE (with ``mask="flat_mask"``)
``roi``         ``(B, R, L)``               parcel series (Brain-JEPA, BrainLM; a view)
=============== ==========================  =====================================

Each window is decoded straight into the batch buffer: a pinned tensor when the dataset is
iterated in the training process with ``pin_memory=True`` on a CUDA machine, a shared
memory tensor inside DataLoader workers (handed to the main process without a copy; the
DataLoader's ``pin_memory`` pins it). Unpinned buffers are reused once nothing refers to a
batch any more (:mod:`.buffers`; in workers only under a :class:`WindowLoader`, which tells
them), so decoding does not pay for page faults on fresh memory. The CPU does no arithmetic on the values:
:meth:`WindowDataset.to_device` moves a batch to the GPU and converts it to float32 there,
with optional frame-wise z-scoring (``normalize=True``) or the store's dataset statistics
(``normalize="dataset"``: the kind of ``stats/<array>.json``, :mod:`fmri_data.stats`, e.g.
fMRI-LM's ``(x - median) / iqr``), then clamping.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ..stats import read_stats, stats_kind
from .buffers import BufferPool, SlotTable, shared_empty
from .index import WindowIndex
from .order import epoch_order, rank_positions, worker_positions
from .reader import WindowReader


# ---------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class Layout:
    """How a batch buffer ``(B, L, *frame)`` is presented, and where a frame's values are.

    Attributes:
        view: buffer -> ``data`` (a view, no copy).
        spatial: axes of ``data`` that hold one frame's values (frame z-score reduces over them).
        mask_view: ``(B, *frame)`` mask -> broadcastable against ``data``.
    """

    name: str
    view: Callable[[torch.Tensor], torch.Tensor]
    spatial: Callable[[int], tuple[int, ...]]
    mask_view: Callable[[torch.Tensor], torch.Tensor]


def _frame_axes(offset: int) -> Callable[[int], tuple[int, ...]]:
    return lambda ndim: tuple(range(offset, ndim))


LAYOUTS = {
    "time_first": Layout("time_first", lambda b: b, _frame_axes(2), lambda m: m.unsqueeze(1)),
    "neurostorm": Layout(
        "neurostorm", lambda b: b.movedim(1, -1).unsqueeze(1), lambda ndim: tuple(range(2, ndim - 1)),
        lambda m: m.unsqueeze(1).unsqueeze(-1),
    ),
    "flat": Layout("flat", lambda b: b.unsqueeze(1), _frame_axes(3), lambda m: m.unsqueeze(1).unsqueeze(1)),
    "roi": Layout("roi", lambda b: b.transpose(1, 2), lambda ndim: (1,), lambda m: m.unsqueeze(-1)),
}


def layout(name: str) -> Layout:
    """A layout by name (``time_first``, ``neurostorm``, ``flat``, ``roi``).

    Raises:
        ValueError: unknown name.
    """
    if name not in LAYOUTS:
        raise ValueError(f"unknown layout '{name}'; one of {sorted(LAYOUTS)}")
    return LAYOUTS[name]


def normalize_frames(data: torch.Tensor, lay: Layout, mask: torch.Tensor | None = None, *, clamp: float | None = None,
                     eps: float = 1e-6) -> torch.Tensor:
    """Z-score each frame of a batch (over its voxels/vertices/parcels), then clamp; float32.

    Args:
        data: a batch in layout ``lay`` (any device, any float dtype).
        mask: ``(B, *frame)`` bool; statistics use the voxels inside it and values outside
            are set to 0.
        clamp: clip to ``[-clamp, clamp]`` afterwards (None: no clipping).
        eps: added to the variance.

    Returns:
        float32 tensor of ``data``'s shape.
    """
    x = data.float()
    axes = lay.spatial(x.ndim)
    if mask is None:
        mean = x.mean(axes, keepdim=True)
        var = x.var(axes, keepdim=True, unbiased=False)
        x = (x - mean) / torch.sqrt(var + eps)
    else:
        m = lay.mask_view(mask.to(device=x.device)).to(x.dtype)
        count = (m.expand_as(x)).sum(axes, keepdim=True).clamp_min(1.0)
        mean = (x * m).sum(axes, keepdim=True) / count
        var = (((x - mean) * m) ** 2).sum(axes, keepdim=True) / count
        x = (x - mean) / torch.sqrt(var + eps) * m
    return x.clamp(-clamp, clamp) if clamp is not None else x


# ---------------------------------------------------------------------------- common
def _targets_codec(index: WindowIndex, names: tuple[str, ...]) -> dict[str, dict[Any, int] | None]:
    """``{name: {value: class}}`` for categorical labels, ``{name: None}`` for numeric ones."""
    out: dict[str, dict[Any, int] | None] = {}
    for name in names:
        classes = index.classes(name)
        numeric = classes and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in classes)
        out[name] = None if numeric else {v: c for c, v in enumerate(classes)}
    return out


def _encode_targets(codec: dict[str, dict[Any, int] | None], labels: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    out = {}
    for name, classes in codec.items():
        values = [lab.get(name) for lab in labels]
        if classes is None:
            out[name] = torch.tensor([np.nan if v is None else float(v) for v in values], dtype=torch.float32)
        else:
            out[name] = torch.tensor([classes.get(v, -1) for v in values], dtype=torch.int64)
    return out


#: Decoded bytes of a window from which :class:`WindowDataset` reads ahead by default.
READ_AHEAD_MIN_BYTES = 2**20


class _Windows:
    """What both datasets share: the index, a reader, the layout, label encoding."""

    def __init__(self, index: WindowIndex, layout_name: str, mask: str | None, targets: tuple[str, ...], on_error: str):
        if not len(index):
            raise ValueError(f"{index.url}: the index has no windows ({index.dropped or 'no runs'})")
        shapes = {(r.frame_shape, r.dtype) for r in index.runs}
        if len(shapes) != 1:
            raise ValueError(f"{index.url}: runs of the index differ in frame shape or dtype {sorted(shapes)}; build one index per shape")
        (self.frame_shape, dtype), = shapes
        self.dtype = getattr(torch, dtype)
        self.index, self.layout = index, layout(layout_name)
        self.reader = WindowReader(index, on_error=on_error, mask=mask)
        self.codec = _targets_codec(index, tuple(targets))
        self._stats: dict[str, Any] | None = None  # the store's dataset statistics, read on first use
        self._stats_on: dict[str, dict[str, torch.Tensor]] = {}  # their parameters per device

    def dataset_stats(self) -> dict[str, Any]:
        """The store's statistics of the indexed array (``stats/<array>.json``), read once.

        Raises:
            StoreError: none stored, or stale (runs added or removed since; see :func:`fmri_data.stats.read_stats`).
        """
        if self._stats is None:
            arrays = sorted({r.array for r in self.index.runs})
            if len(arrays) != 1:
                raise ValueError(f"{self.index.url}: the index mixes arrays {arrays}; dataset statistics are per array")
            self._stats = read_stats(self.index.url, arrays[0], storage_options=self.index.storage_options)
        return self._stats

    def _stats_params(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The statistics' parameters as float32 tensors on ``device``, broadcastable against
        ``data`` in this layout (a per-element parameter has a frame's shape)."""
        key = str(device)
        if key not in self._stats_on:
            out = {}
            for name, value in self.dataset_stats()["params"].items():
                v = torch.as_tensor(np.asarray(value, dtype=np.float32), device=device)
                if v.ndim:
                    v = self.layout.mask_view(v.reshape(1, *self.frame_shape))
                out[name] = v
            self._stats_on[key] = out
        return self._stats_on[key]

    def _alloc(self, n: int, pinned: bool) -> torch.Tensor:
        shape = (n, self.index.length, *self.frame_shape)
        if pinned:
            return torch.empty(shape, dtype=self.dtype, pin_memory=True)
        if get_worker_info() is None:
            return torch.empty(shape, dtype=self.dtype)
        return shared_empty(shape, self.dtype)

    def _batch(self, buf: torch.Tensor, ids: list[int], ok: list[bool]) -> dict[str, Any]:
        if not all(ok):
            keep = [k for k, good in enumerate(ok) if good]
            buf, ids = buf[keep], [ids[k] for k in keep]
        labels = [self.index.labels(i) for i in ids]
        batch: dict[str, Any] = {
            "data": self.layout.view(buf),
            "span": len(ok),
            "index": torch.tensor(ids, dtype=torch.int64),
            "start": torch.as_tensor(self.index.start[ids], dtype=torch.int64),
            "run_id": [self.index.run_id(i) for i in ids],
            "labels": labels,
        }
        if self.reader.mask_name is not None:
            batch["mask"] = torch.stack([torch.from_numpy(self.reader.mask(int(self.index.run[i]))) for i in ids]) if ids else torch.empty(0)
        if self.codec:
            batch["targets"] = _encode_targets(self.codec, labels)
        return batch

    def to_device(self, batch: dict[str, Any], device: str | torch.device, *, normalize: bool | str = False,
                  clamp: float | None = None, non_blocking: bool = True) -> dict[str, Any]:
        """Move a batch's tensors to ``device``; ``data`` becomes float32 there, frame-z-scored
        (inside ``mask`` when the batch has one) when ``normalize`` is True, normalized with the
        store's dataset statistics when ``normalize="dataset"`` (their kind's formula,
        elementwise on the device; :meth:`dataset_stats`), then clamped to ``[-clamp, clamp]``
        when given (see :func:`normalize_frames`).

        Raises:
            StoreError: ``normalize="dataset"`` and the statistics are missing or stale.
        """
        if normalize not in (True, False, "dataset"):
            raise ValueError(f"normalize must be True, False or 'dataset', not {normalize!r}")
        out = {k: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        if "targets" in batch:
            out["targets"] = {k: v.to(device, non_blocking=non_blocking) for k, v in batch["targets"].items()}
        if normalize == "dataset":
            data = out["data"].float()
            data = stats_kind(self.dataset_stats()["kind"]).apply(data, self._stats_params(data.device))
            out["data"] = data.clamp(-clamp, clamp) if clamp is not None else data
        elif normalize:
            out["data"] = normalize_frames(out["data"], self.layout, out.get("mask"), clamp=clamp)
        else:
            data = out["data"].float()
            out["data"] = data.clamp(-clamp, clamp) if clamp is not None else data
        return out


# ---------------------------------------------------------------------------- iterable
class WindowDataset(_Windows, IterableDataset):
    """Shuffled, rank- and worker-partitioned, resumable batches of windows (IterableDataset).

    Use with ``DataLoader(dataset, batch_size=None, num_workers=...)`` or, to resume across
    worker processes, :class:`WindowLoader`. Every epoch reads each window once (plus the
    padding that gives every rank the same count, see :mod:`fmri_data.load.order`), in an
    order that depends only on ``(seed, epoch)``.

    Args:
        index: the windows (:func:`fmri_data.load.build_index`).
        batch_size: windows per batch on this rank (the global batch is
            ``world_size * batch_size``).
        seed: shuffle seed (>= 0); shuffle: False reads in index order.
        mix: shards whose windows are shuffled together (see :func:`epoch_order`).
        rank, world_size: this process's rank and the number of ranks (default: from an
            initialized ``torch.distributed``, else 0 and 1).
        drop_last: cut (instead of pad) the epoch to a multiple of ``world_size``.
        layout: ``time_first``, ``neurostorm``, ``flat`` or ``roi``.
        mask: a per-run array returned as ``batch["mask"]`` (``"flat_mask"``, ``"brain_mask"``).
        targets: label names to encode as tensors in ``batch["targets"]``.
        prefetch: windows read ahead on threads per process (the bounded buffer; 0 = none).
            Default: 2 for windows of at least :data:`READ_AHEAD_MIN_BYTES` decoded, else 0:
            a small window (a 450 x 160 ROI window, 288 kB) is read in about 80 us, and a
            thread hand-off per window costs more than it overlaps (``bench_loader.py``:
            with 2 workers, 9,347 ROI windows/s without read-ahead against 5,884 with 2).
        pin_memory: decode into pinned memory when iterated in the main process on CUDA.
        on_error: ``"raise"`` or ``"skip"`` a window with a missing/corrupt chunk (logged).

    The position in the epoch lives in a small shared-memory tensor, so
    :meth:`set_epoch` and :meth:`load_state_dict` reach ``persistent_workers`` too.
    """

    def __init__(self, index: WindowIndex, *, batch_size: int = 1, seed: int = 0, shuffle: bool = True, mix: int = 4,
                 rank: int | None = None, world_size: int | None = None, drop_last: bool = False,
                 layout: str = "time_first", mask: str | None = None, targets: tuple[str, ...] = (),
                 prefetch: int | None = None, pin_memory: bool = False, on_error: str = "raise"):
        super().__init__(index, layout, mask, targets, on_error)
        if rank is None or world_size is None:
            dist = torch.distributed
            on = dist.is_available() and dist.is_initialized()
            rank = dist.get_rank() if on and rank is None else (rank or 0)
            world_size = dist.get_world_size() if on and world_size is None else (world_size or 1)
        self.batch_size, self.seed, self.shuffle, self.mix = int(batch_size), int(seed), bool(shuffle), int(mix)
        self.rank, self.world_size, self.drop_last = int(rank), int(world_size), bool(drop_last)
        if prefetch is None:
            window_bytes = index.length * int(np.prod(self.frame_shape)) * self.dtype.itemsize
            prefetch = 2 if window_bytes >= READ_AHEAD_MIN_BYTES else 0
        self.prefetch, self.pin_memory = int(prefetch), bool(pin_memory)
        rank_positions(len(index), self.world_size, self.rank, self.batch_size)  # checks rank, world size, batch size
        if self.seed < 0 or self.mix < 1 or self.prefetch < 0:
            raise ValueError(f"need seed >= 0, mix >= 1, prefetch >= 0 (got {seed}, {mix}, {prefetch})")
        self._blocks = index.blocks()
        self._position = torch.zeros(2, dtype=torch.int64).share_memory_()  # [epoch, windows consumed]
        # Where the current iteration started: workers partition from this snapshot, not from
        # _position, which the main process advances while workers are still starting.
        self._start = torch.zeros(2, dtype=torch.int64).share_memory_()
        self._managed = False  # True when a WindowLoader counts consumption
        self._slot_state: torch.Tensor | None = None  # (workers, slots) buffer states, set by a WindowLoader
        self._pools: tuple[int, BufferPool | None] = (-1, None)  # (pid, this process's pool)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pools"] = (-1, None)  # buffers belong to the process that made them
        state["_stats_on"] = {}  # device tensors stay in the process that made them
        return state

    # ------------------------------------------------------------------ order
    def windows_of_epoch(self, epoch: int) -> np.ndarray:
        """This rank's window numbers for ``epoch``, in the order they are yielded."""
        order = epoch_order(self._blocks, self.seed, epoch, shuffle=self.shuffle, mix=self.mix)
        return order[rank_positions(len(order), self.world_size, self.rank, self.batch_size, drop_last=self.drop_last)]

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        n = len(rank_positions(len(self.index), self.world_size, self.rank, 1, drop_last=self.drop_last))
        return -(-n // self.batch_size)

    @property
    def epoch(self) -> int:
        return int(self._position[0])

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning at the next iteration (no-op if already there)."""
        if int(epoch) != self.epoch:
            self._position[0], self._position[1] = int(epoch), 0

    def state_dict(self) -> dict[str, Any]:
        """Where the next iteration starts: ``epoch`` and ``consumed`` windows of this rank,
        with the settings a resume must share (checked by :meth:`load_state_dict`)."""
        return {
            "epoch": int(self._position[0]), "consumed": int(self._position[1]), "seed": self.seed,
            "shuffle": self.shuffle, "mix": self.mix, "rank": self.rank, "world_size": self.world_size,
            "batch_size": self.batch_size, "drop_last": self.drop_last, "index": self.index.fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next iteration yields exactly the windows an uninterrupted run would
        have yielded after ``state["consumed"]`` windows of ``state["epoch"]``.

        Raises:
            ValueError: the state was taken with another index, seed, shuffle, world size,
                per-rank batch size or padding (the order would differ).
        """
        mine = self.state_dict()
        differ = [k for k in ("seed", "shuffle", "mix", "world_size", "drop_last", "index", "rank", "batch_size") if state.get(k) != mine[k]]
        if differ:
            raise ValueError(f"cannot resume: {', '.join(f'{k} {state.get(k)!r} != {mine[k]!r}' for k in differ)}")
        self._position[0], self._position[1] = int(state["epoch"]), int(state["consumed"])

    def _advance(self, n: int, finished: bool) -> None:
        if finished:
            self._position[0], self._position[1] = self.epoch + 1, 0
        else:
            self._position[1] += n

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, consumed = (int(v) for v in (self._start if self._managed else self._position))
        rest = self.windows_of_epoch(epoch)[consumed:]
        mine = rest[worker_positions(len(rest), self.batch_size, worker, workers)]
        counting = info is None and not self._managed
        pinned = info is None and self.pin_memory and torch.cuda.is_available()
        for batch in self._batches(mine, pinned):
            if counting:
                self._advance(batch["span"], False)
            if len(batch["index"]) or self._managed:  # a WindowLoader counts, then drops, empty batches
                yield batch
        if counting:
            self._advance(0, True)

    def _pool(self) -> BufferPool:
        """This process's pool of full-batch buffers (see :mod:`.buffers`)."""
        pid, pool = self._pools
        if pid != os.getpid() or pool is None:
            info = get_worker_info()
            shape = (self.batch_size, self.index.length, *self.frame_shape)
            if info is None:  # the read-ahead's batches, the caller's batch and the one before it
                ahead = -(-self.prefetch // self.batch_size)
                pool = BufferPool(shape, self.dtype, ahead + 3, lambda sh, dt: torch.empty(sh, dtype=dt))
            else:
                state = self._slot_state[info.id]
                pool = BufferPool(shape, self.dtype, state.numel(), shared_empty, state)
            self._pools = (os.getpid(), pool)
        return pool

    def _batches(self, windows: np.ndarray, pinned: bool) -> Iterator[dict[str, Any]]:
        b = self.batch_size
        info = get_worker_info()
        # Workers reuse buffers only when a WindowLoader tells them which ones the consumer let go.
        pooled = not pinned and (info is None or self._slot_state is not None)
        if pooled:
            self._pool().reclaim()
        buffers: dict[int, tuple[torch.Tensor, int]] = {}  # batch -> (buffer, pool slot or -1)

        def alloc(pos: int) -> np.ndarray:
            k = pos // b
            if k not in buffers:
                n = min(b, len(windows) - k * b)
                buffers[k] = self._pool().take() if pooled and n == b else (self._alloc(n, pinned), -1)
            return buffers[k][0][pos - k * b].numpy()

        ids: list[int] = []
        ok: list[bool] = []
        items = ((pos, int(i)) for pos, i in enumerate(windows))
        for pos, window in self.reader.read_ahead(items, self.prefetch, alloc):
            ids.append(int(windows[pos]))
            ok.append(window is not None)
            if len(ids) == buffers[pos // b][0].shape[0]:
                buf, slot = buffers.pop(pos // b)
                batch = self._batch(buf, ids, ok)
                if slot >= 0 and info is not None:
                    pool = self._pool()
                    if pool.owns(batch["data"], slot):
                        batch["buffer"] = (info.id, slot)  # the WindowLoader reports when it is free
                    else:  # windows were skipped: the batch is a copy
                        pool.release(slot)
                del buf, window
                ids, ok = [], []
                yield batch
                del batch  # the pool sees the buffer free once the caller drops it


# ---------------------------------------------------------------------------- map-style
class WindowMapDataset(_Windows, Dataset):
    """Map-style access for evaluation: ``ds[i]`` is window ``i`` of the index as a sample
    (the batch dict of one window without the batch axis; ``labels`` a dict). Use
    :func:`collate_windows` as the DataLoader's ``collate_fn``. Arguments as
    :class:`WindowDataset` (``on_error="skip"`` raises :class:`KeyError` for a bad window)."""

    def __init__(self, index: WindowIndex, *, layout: str = "time_first", mask: str | None = None,
                 targets: tuple[str, ...] = (), on_error: str = "raise"):
        super().__init__(index, layout, mask, targets, on_error)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self.index):
            raise IndexError(i)
        buf = self._alloc(1, False)
        if self.reader.read(int(i), buf[0].numpy()) is None:
            raise KeyError(f"window {i} skipped: {self.reader.skipped[-1]}")
        batch = self._batch(buf, [int(i)], [True])
        batch.pop("span")
        return {k: ({n: t[0] for n, t in v.items()} if k == "targets" else v[0]) for k, v in batch.items()}


def collate_windows(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch samples of :class:`WindowMapDataset` (tensors stacked, strings/dicts as lists)."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif key == "targets":
            out[key] = {n: torch.stack([v[n] for v in values]) for n in values[0]}
        else:
            out[key] = values
    return out


# ---------------------------------------------------------------------------- loader
class WindowLoader:
    """A DataLoader over a :class:`WindowDataset` that knows how far training got.

    Iterating yields the dataset's batches in the rank's order for any ``num_workers``;
    :meth:`state_dict` counts the windows *handed to the caller* (batches the workers
    prefetched but the caller did not get are read again after a resume). An epoch that
    runs to its end moves the dataset to the next epoch.

    With workers, each worker keeps up to ``prefetch_factor + ceil(prefetch / batch_size) + 3``
    batch buffers in shared memory and decodes into one again once this loader has seen that
    the caller dropped every reference to its batch (or, with ``pin_memory``, on receipt:
    the DataLoader copied it). A caller that keeps batches only makes the workers allocate
    fresh ones.

    Args:
        dataset: the windows.
        num_workers, persistent_workers, prefetch_factor, multiprocessing_context: as
            :class:`torch.utils.data.DataLoader`.
        pin_memory: pin batches in the DataLoader (default: when CUDA is available).
    """

    def __init__(self, dataset: WindowDataset, *, num_workers: int = 0, persistent_workers: bool = False,
                 pin_memory: bool | None = None, prefetch_factor: int | None = None, multiprocessing_context=None):
        self.dataset = dataset
        dataset._managed = True
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.loader = DataLoader(
            dataset, batch_size=None, num_workers=num_workers, pin_memory=pin and num_workers > 0,
            persistent_workers=persistent_workers and num_workers > 0,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
        )
        if num_workers == 0:
            dataset.pin_memory = dataset.pin_memory or pin
        # Workers' batch buffers: in flight (prefetch_factor), being filled by the read-ahead,
        # and the two the caller may still hold (the batch it has and the one before).
        in_flight = prefetch_factor if prefetch_factor is not None else 2
        ahead = -(-dataset.prefetch // dataset.batch_size)
        self._slots = SlotTable(num_workers, in_flight + ahead + 3) if num_workers > 0 else None
        dataset._slot_state = self._slots.table if self._slots is not None else None

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.dataset._start.copy_(self.dataset._position)  # before any worker reads it
        slots = self._slots
        if slots is not None and not self.loader.persistent_workers:
            slots.reset()  # new worker processes, empty pools
        for batch in self.loader:
            if slots is not None:
                slots.collect()
                slots.received(batch.pop("buffer", None), batch["data"])
            self.dataset._advance(batch["span"], False)
            if len(batch["index"]):  # empty when every window of the batch was skipped (on_error="skip")
                yield batch
        self.dataset._advance(0, True)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)
