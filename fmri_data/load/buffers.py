"""Batch buffers that are reused once nobody references them, so decoding writes into
memory that is already mapped.

A fresh 141 MB batch (4 windows of 96^3 x 20 float16) costs page faults on first write:
on the 2-core dev machine decoding a 35 MB window into a fresh torch tensor took 22 ms,
into a reused one 12 ms, and into fresh shared memory (what a DataLoader worker hands
over) 28 ms. A :class:`BufferPool` hands out a buffer again only when it is free:

- in the process that consumes the batches (``num_workers=0``): when no tensor, view or
  numpy array refers to its storage any more (the storage's use count is back to the
  pool's own references);
- in a DataLoader worker: when, in addition, the consuming process has said so through a
  shared ``(workers, slots)`` int32 state table (:class:`SlotTable`, filled by
  :class:`~fmri_data.load.dataset.WindowLoader`). A slot goes ``FREE`` -> ``BUSY`` (the
  worker decodes into it) -> ``HELD`` (the consumer received it and still refers to it)
  -> ``FREE``; with ``pin_memory`` the DataLoader copies the batch into pinned memory
  before the consumer sees it, so the consumer frees the slot on receipt.

When no buffer is free the pool allocates a fresh one outside it, so a consumer that keeps
batches (``list(loader)``) gets correct, distinct batches, only slower. Pinned buffers are
never pooled: torch's caching host allocator already reuses them and, unlike this pool,
knows when an asynchronous host-to-device copy from one has finished.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

FREE, BUSY, HELD = 0, 1, 2


def storage_refs(storage: torch.UntypedStorage) -> int | None:
    """References to ``storage``'s memory from tensors, views and storage objects of this
    process; None when this torch does not say (private API ``_storage_Use_Count``)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return None if count is None else int(count(storage._cdata))


def shared_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in shared memory (a worker hands it over without a copy)."""
    try:
        storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape)
    except (AttributeError, RuntimeError, TypeError):  # private API: fall back to a copy into shared memory
        return torch.empty(shape, dtype=dtype).share_memory_()


class BufferPool:
    """Up to ``slots`` reusable buffers of one shape and dtype.

    Args:
        shape, dtype: of every buffer.
        slots: buffers kept for reuse (more are allocated fresh, outside the pool).
        allocate: ``allocate(shape, dtype)`` makes a buffer (``torch.empty`` or :func:`shared_empty`).
        state: this worker's row of the slot table (``(slots,)`` int32 in shared memory), or
            None in the consuming process.
    """

    _OWN = 2  # references the pool itself holds: the buffer tensor and its storage object

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, slots: int,
                 allocate: Callable[[tuple[int, ...], torch.dtype], torch.Tensor], state: torch.Tensor | None = None):
        self.shape, self.dtype, self.allocate, self.state = tuple(shape), dtype, allocate, state
        self.slots = min(int(slots), len(state)) if state is not None else int(slots)
        self._buffers: dict[int, tuple[torch.Tensor, torch.UntypedStorage]] = {}
        self.reused = self.fresh = 0

    def reclaim(self) -> None:
        """Free the slots this worker took that the consumer never received (a new
        iteration starts: the DataLoader discarded the previous one's batches in flight)."""
        if self.state is not None:
            for s in self._buffers:
                if int(self.state[s]) == BUSY:
                    self.state[s] = FREE

    def release(self, slot: int) -> None:
        """Give back a slot whose buffer was not handed to the consumer."""
        if self.state is not None and slot in self._buffers:
            self.state[slot] = FREE

    def take(self) -> tuple[torch.Tensor, int]:
        """A buffer and its slot; slot -1 is a fresh buffer outside the pool.

        A pooled buffer is returned as a new view of the pool's tensor, so that the caller's
        references (even to the returned tensor itself) count against its storage.
        """
        for s, (buf, storage) in self._buffers.items():
            if self._free(s) and storage_refs(storage) == self._OWN:
                self._mark(s)
                self.reused += 1
                return buf.view(self.shape), s
        buf = self.allocate(self.shape, self.dtype)
        self.fresh += 1
        s = next((s for s in range(self.slots) if s not in self._buffers and self._free(s)), None)
        if s is None or storage_refs(buf.untyped_storage()) is None:
            return buf, -1
        self._buffers[s] = (buf, buf.untyped_storage())
        self._mark(s)
        return buf.view(self.shape), s

    def owns(self, tensor: torch.Tensor, slot: int) -> bool:
        """Whether ``tensor`` lies in slot ``slot``'s buffer (not a copy of it)."""
        return slot in self._buffers and tensor.untyped_storage().data_ptr() == self._buffers[slot][1].data_ptr()

    def _free(self, s: int) -> bool:
        return self.state is None or int(self.state[s]) == FREE

    def _mark(self, s: int) -> None:
        if self.state is not None:
            self.state[s] = BUSY


class SlotTable:
    """The consumer's side of the workers' pools: which received batches it still holds.

    ``table`` is the ``(workers, slots)`` int32 shared-memory state the workers' pools
    read. :meth:`received` is called for every batch the DataLoader yields, before the
    caller sees it; :meth:`collect` frees the slots whose batches nobody refers to any more.
    """

    def __init__(self, workers: int, slots: int):
        self.table = torch.zeros((workers, slots), dtype=torch.int32).share_memory_()
        self._held: dict[tuple[int, int], torch.UntypedStorage] = {}

    def received(self, slot: tuple[int, int] | None, data: torch.Tensor) -> None:
        """A batch from worker ``slot[0]``'s slot ``slot[1]`` arrived with ``data``. Data
        outside shared memory is the DataLoader's pinned copy: the worker's buffer is free."""
        if slot is None:
            return
        key = (int(slot[0]), int(slot[1]))
        if not data.is_shared():
            self.table[key] = FREE
        else:
            self.table[key] = HELD
            self._held[key] = data.untyped_storage()

    def collect(self) -> None:
        """Free every held slot whose storage only this table still refers to."""
        for key in [k for k, storage in self._held.items() if storage_refs(storage) == 1]:
            del self._held[key]
            self.table[key] = FREE

    def reset(self) -> None:
        """New worker processes (not persistent): they start with empty pools, so the
        slots the consumer does not hold are free."""
        held = torch.zeros_like(self.table, dtype=torch.bool)
        for key in self._held:
            held[key] = True
        self.table[~held] = FREE
