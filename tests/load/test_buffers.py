"""Reused batch buffers: a buffer is handed out again only when nobody refers to it, and
batches a caller keeps are never overwritten (small synthetic tensors where the test needs
exact states; loader runs on the store converted from ../shared/data/bids/ds-real)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmri_data.load import WindowDataset, WindowLoader, build_index
from fmri_data.load.buffers import BUSY, FREE, HELD, BufferPool, SlotTable, shared_empty
from fmri_data.load.reader import WindowReader

HAXBY = [f"sub-haxby1_task-objectviewing_run-{r:02d}" for r in (1, 2, 3)]
needs_use_count = pytest.mark.skipif(getattr(torch._C, "_storage_Use_Count", None) is None,
                                     reason="this torch does not report storage use counts")


def _empty(shape, dtype):
    return torch.empty(shape, dtype=dtype)


@needs_use_count
def test_pool_reuses_a_buffer_only_when_no_view_is_left():
    pool = BufferPool((2, 3), torch.float32, slots=2, allocate=_empty)
    a, slot_a = pool.take()
    view = a[1].numpy()  # what the read-ahead hands a decoding thread
    b, slot_b = pool.take()
    assert (slot_a, slot_b) == (0, 1) and a.data_ptr() != b.data_ptr()
    c, slot_c = pool.take()  # both slots referenced: a fresh buffer outside the pool
    assert slot_c == -1 and c.data_ptr() not in (a.data_ptr(), b.data_ptr())
    del b
    again, slot = pool.take()
    assert slot == 1 and pool.reused == 1  # b's buffer, no longer referenced
    del again, a
    x, slot = pool.take()
    assert slot == 1  # slot 0 is still referenced through the numpy view
    del view
    assert pool.take()[1] == 0
    assert pool.fresh == 3 and pool.reused == 3


@needs_use_count
def test_worker_pool_follows_the_shared_slot_states():
    table = SlotTable(workers=1, slots=2)
    pool = BufferPool((4,), torch.float16, slots=8, allocate=shared_empty, state=table.table[0])
    assert pool.slots == 2  # capped by the table
    buf, slot = pool.take()
    assert slot == 0 and buf.is_shared() and int(table.table[0, 0]) == BUSY
    # What the consumer process receives: its own mapping of the shared memory (a storage
    # of its own; in one process here, so another shared tensor stands for it).
    received = shared_empty((2, 2), torch.float16)
    table.received((0, slot), received)
    assert int(table.table[0, 0]) == HELD
    del buf  # the worker's references go once the batch is sent
    assert pool.take()[1] == 1  # slot 0 is held by the consumer
    table.collect()
    assert int(table.table[0, 0]) == HELD  # the consumer still refers to the batch
    del received
    table.collect()  # now only its own record is left
    assert int(table.table[0, 0]) == FREE
    assert pool.take()[1] == 0
    pool.reclaim()  # a new iteration: slots taken but never received are free again
    assert table.table[0].tolist() == [FREE, FREE]
    # a pinned copy frees the slot on receipt
    buf, slot = pool.take()
    table.received((0, slot), torch.empty(2))
    assert int(table.table[0, slot]) == FREE


def _check(batch, reader: WindowReader) -> None:
    for row, i in zip(batch["data"], batch["index"].tolist()):
        np.testing.assert_array_equal(row.numpy(), reader.read(i))


@needs_use_count
@pytest.mark.parametrize("workers", [0, 2])
def test_kept_batches_stay_intact_and_dropped_ones_are_reused(real_store, workers, monkeypatch):
    index = build_index(real_store, length=20, stride=20, array="bold", run_ids=HAXBY)
    reader = WindowReader(index)
    ds = WindowDataset(index, batch_size=2, seed=3, prefetch=2)
    loader = WindowLoader(ds, num_workers=workers, persistent_workers=True)
    kept = list(loader)  # every batch referenced at once: none may be overwritten
    assert sorted(i for b in kept for i in b["index"].tolist()) == list(range(len(index)))
    for batch in kept:
        _check(batch, reader)
    del kept, batch

    received = []
    if workers:
        original = SlotTable.received

        def spy(self, slot, data):
            received.append(None if slot is None else tuple(slot))
            original(self, slot, data)

        monkeypatch.setattr(SlotTable, "received", spy)
    for _ in range(2):  # training-style: each batch dropped before the next
        for batch in loader:
            _check(batch, reader)
    if workers:
        slots = [s for s in received if s is not None]
        assert len(slots) > len(set(slots))  # the workers decoded into buffers they had used before
    else:
        assert ds._pool().reused > ds._pool().fresh
