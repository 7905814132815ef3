"""Read windows from a store: lazy and fork-safe, integrity-checked, with bounded read-ahead.

A :class:`WindowReader` holds only the index (plain arrays) until it reads: the store is
opened on the first read in each process (and again after a ``fork``), so a reader can be
pickled into DataLoader workers. Before reading a window it checks that the shard files
the window needs exist (Zarr reads a missing shard as fill values, silently); a chunk
that fails its CRC-32C (or cannot be decoded) is located by re-reading chunk by chunk.
Either raises :class:`ChunkError` naming the run, the array, the chunk (frames) and the
shard file, or, with ``on_error="skip"``, logs that message and skips the window.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from fsspec.implementations.local import LocalFileSystem

from ..errors import FmriDataError
from ..imports import load_module
from ..store.direct import (
    EMPTY,
    chunk_spans,
    direct_layout,
    read_frames,
    shard_index,
    will_need,
)
from ..store.layout import RUNS
from ..store.root import Store
from ..store.validate import corrupt_blocks, missing_shards
from .index import WindowIndex

log = logging.getLogger("fmri_data.load")
ON_ERROR = ("raise", "skip")


class ChunkError(FmriDataError):
    """A chunk of a window, or of the run's mask, is missing or corrupt.

    Attributes: ``run_id``, ``array``, ``frames`` (``(start, stop)`` of the chunk; None for
    an array without a time axis, such as ``brain_mask``), ``shard`` (the shard or chunk
    file, or the array's ``zarr.json``, relative to the store), ``cause``.
    """

    def __init__(self, url: str, run_id: str, array: str, frames: tuple[int, int] | None, shard: str, cause: str):
        self.run_id, self.array, self.frames, self.shard, self.cause = run_id, array, frames, shard, cause
        where = f"chunk of frames [{frames[0]}, {frames[1]}) in shard {shard}" if frames is not None else f"file {shard}"
        super().__init__(f"{url}/{RUNS}/{run_id}/{array}: {where}: {cause}")


class WindowReader:
    """Reads window ``i`` of an index as a ``(L, *frame_shape)`` array of the stored dtype.

    Args:
        index: the windows (:func:`build_index`).
        on_error: ``"raise"`` (default) a :class:`ChunkError`, or ``"skip"``: log it at
            WARNING on logger ``fmri_data.load`` and return None.
        mask: an array of each run to read once and return with its windows
            (``"flat_mask"``, ``"brain_mask"``), or None. A mask that is missing a file or
            fails its CRC is a :class:`ChunkError` of every window of that run (skipped
            with ``on_error="skip"``).
    """

    def __init__(self, index: WindowIndex, on_error: str = "raise", mask: str | None = None):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, not '{on_error}'")
        self.index, self.on_error, self.mask_name = index, on_error, mask
        self.skipped: list[str] = []
        self._reset()

    def _reset(self) -> None:
        self._pid = None
        self._store: Store | None = None
        self._local = False
        self._arrays: dict[int, Any] = {}
        self._layouts: dict[int, Any] = {}  # run -> DirectLayout, or None to read through Zarr
        self._shard_indexes: dict[tuple[int, int], np.ndarray] = {}
        self._missing: dict[int, dict[int, str]] = {}
        self._masks: dict[int, np.ndarray | None] = {}
        self._lock = threading.Lock()  # read-ahead threads open runs concurrently

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in ("_pid", "_store", "_local", "_arrays", "_layouts", "_shard_indexes", "_missing", "_masks", "_lock"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    # ------------------------------------------------------------------ opening
    def store(self) -> Store:
        """The store, opened in this process (reopened after a fork)."""
        if self._pid != os.getpid():
            self._reset()
            self._store = Store.open(self.index.url, self.index.storage_options)
            self._local = isinstance(self._store.fs, LocalFileSystem)
            self._pid = os.getpid()
        return self._store

    def _array(self, r: int):
        store = self.store()
        with self._lock:
            if r not in self._arrays:
                entry = self.index.runs[r]
                array = store.run(entry.run_id)[entry.array]
                self._missing[r] = self._missing_shards(store, entry, array)
                self._layouts[r] = direct_layout(array)
                self._arrays[r] = array
        return self._arrays[r]

    @staticmethod
    def _missing_shards(store: Store, entry, array) -> dict[int, str]:
        """``{time shard index: key}`` of shard files absent from storage (one listing per run)."""
        grid = array.shards if array.shards is not None else array.chunks
        counts = [-(-n // c) for n, c in zip(array.shape, grid)]
        base = f"{store.path}/{RUNS}/{entry.run_id}/{entry.array}/c"
        try:
            present = {p[len(base) + 1:] for p in store.fs.find(base)}
        except FileNotFoundError:
            present = set()
        missing: dict[int, str] = {}
        for idx in np.ndindex(*counts):
            key = "/".join(str(i) for i in idx)
            if key not in present:
                missing.setdefault(idx[0], f"{entry.array}/c/{key}")
        return missing

    def mask(self, r: int) -> np.ndarray | None:
        """The run's mask array (``mask`` argument), read once per process; None without one.

        Raises:
            ChunkError: the mask's chunk file is missing or corrupt, or its ``zarr.json``
                unreadable (naming the run, the array and the file; raised again on every
                later call for that run).
            KeyError: the run has no array ``mask``.
        """
        if self.mask_name is None:
            return None
        store = self.store()
        with self._lock:
            if r not in self._masks:
                try:
                    self._masks[r] = self._read_mask(store, self.index.runs[r])
                except ChunkError as exc:
                    self._masks[r] = exc
        value = self._masks[r]
        if isinstance(value, ChunkError):
            raise ChunkError(self.index.url, value.run_id, value.array, value.frames, value.shard, value.cause)
        return value

    def _read_mask(self, store: Store, entry) -> np.ndarray:
        name, run_id, url = self.mask_name, entry.run_id, self.index.url
        group = store.run(run_id)
        try:
            array = group[name]
        except KeyError:
            raise
        except Exception as exc:  # undecodable metadata: zarr raises several types
            raise ChunkError(url, run_id, name, None, f"{RUNS}/{run_id}/{name}/zarr.json",
                             f"unreadable ({type(exc).__name__}: {exc})") from exc
        missing = missing_shards(store, run_id, name)
        if missing:  # zarr would return fill values for it, silently
            raise ChunkError(url, run_id, name, None, f"{RUNS}/{run_id}/{missing[0]}", "file missing")
        try:
            return np.asarray(array[...])
        except Exception as exc:  # CRC-32C mismatch (ValueError), truncated or undecodable
            bad = corrupt_blocks(array)
            key, error = (bad[0][0], bad[0][2]) if bad else ("c", f"{type(exc).__name__}: {exc}")
            raise ChunkError(url, run_id, name, None, f"{RUNS}/{run_id}/{name}/{key}", f"unreadable ({error})") from exc

    # ------------------------------------------------------------------ reading
    def _shard_key(self, entry, t: int) -> str:
        rest = "/".join("0" for _ in entry.frame_shape)
        return f"{RUNS}/{entry.run_id}/{entry.array}/c/{t}" + (f"/{rest}" if rest else "")

    def _span(self, i: int) -> tuple[np.ndarray | None, int, int]:
        """Window ``i``'s frame numbers (None when contiguous) and the frames ``[start, stop)`` it spans."""
        frames = self.index.frames[i] if self.index.frames is not None else None
        if frames is None:
            start = int(self.index.start[i])
            return None, start, start + self.index.length
        return frames, int(frames.min()), int(frames.max()) + 1

    def read(self, i: int, out: np.ndarray | None = None) -> np.ndarray | None:
        """Frames ``[start, start + L)`` of window ``i`` (or its frame numbers, ``index.frames``:
        the frames they span are read, then gathered), shape ``(L, *frame_shape)``, stored dtype.

        Args:
            i: window number in the index.
            out: optional C-contiguous array of that shape and dtype to decode into
                (e.g. the numpy view of a pinned tensor).

        Returns:
            The window (``out`` when given), or None when it was skipped (``on_error="skip"``).

        Raises:
            ChunkError: a needed shard file is missing or a chunk is corrupt (``on_error="raise"``).
        """
        r = int(self.index.run[i])
        entry = self.index.runs[r]
        frames, start, stop = self._span(i)
        if frames is not None:
            window = self._read_span(i, r, entry, start, stop, None)
            if window is None:
                return None
            if out is None:
                return window[frames - start]
            np.take(window, frames - start, axis=0, out=out)
            return out
        return self._read_span(i, r, entry, start, stop, out)

    def _read_span(self, i: int, r: int, entry, start: int, stop: int, out: np.ndarray | None) -> np.ndarray | None:
        try:
            if self.mask_name is not None:
                self.mask(r)  # a corrupt mask fails (or skips) each window of its run
            array = self._array(r)
            for t in range(start // entry.shard_frames, (stop - 1) // entry.shard_frames + 1):
                if t in self._missing[r]:
                    a = t * entry.shard_frames
                    raise ChunkError(self.index.url, entry.run_id, entry.array, (a, min(a + entry.shard_frames, entry.n_frames)),
                                     f"{RUNS}/{entry.run_id}/{self._missing[r][t]}", "shard file missing")
            try:
                if self._layouts[r] is not None:
                    return self._read_direct(r, entry, start, stop, out)
                if out is not None:
                    default_buffer_prototype = load_module("zarr.core.buffer").default_buffer_prototype

                    buffer = default_buffer_prototype().nd_buffer.from_numpy_array(out)
                    array.get_basic_selection(slice(start, stop), out=buffer)
                    return out
                return array[start:stop]
            except Exception as exc:  # CRC-32C mismatch (ValueError), truncated or undecodable shard
                raise self._locate(array, entry, start, stop, exc) from exc
        except ChunkError as exc:
            if self.on_error == "raise":
                raise
            log.warning("skipping window %d (%s, frames [%d, %d)): %s", i, entry.run_id, start, stop, exc)
            self.skipped.append(str(exc))
            return None

    def _shard_path(self, r: int, t: int) -> str:
        return f"{self.store().path}/{self._shard_key(self.index.runs[r], t)}"

    def _shard_index(self, r: int, t: int) -> np.ndarray:
        if (r, t) not in self._shard_indexes:
            self._shard_indexes[(r, t)] = shard_index(self.store().fs, self._shard_path(r, t), self._layouts[r])
        return self._shard_indexes[(r, t)]

    def _read_direct(self, r: int, entry, start: int, stop: int, out: np.ndarray | None) -> np.ndarray:
        """Frames ``[start, stop)`` decoded straight from the shard files (:mod:`.chunks`)."""
        layout = self._layouts[r]
        if out is None:
            out = np.empty((stop - start, *layout.chunk_shape[1:]), layout.dtype)
        return read_frames(self.store().fs, lambda t: self._shard_path(r, t), lambda t: self._shard_index(r, t),
                           layout, start, stop, out)

    def advise(self, i: int) -> None:
        """Start reading window ``i``'s chunk bytes into the page cache in the background
        (local stores that :mod:`.chunks` decodes directly; otherwise nothing). Never raises:
        a window that cannot be read fails, with its :class:`ChunkError`, when it is read."""
        r = int(self.index.run[i])
        _, start, stop = self._span(i)
        try:
            self._array(r)
            if self._layouts[r] is None or not self._local:
                return
            missing = self._missing[r]
            for _, t, offset, nbytes in chunk_spans(lambda t: self._shard_index(r, t), self._layouts[r], start, stop):
                if t not in missing and offset != EMPTY:
                    will_need(self._shard_path(r, t), offset, nbytes)
        except Exception as exc:  # noqa: BLE001 - only a hint; read() reports the problem
            log.debug("no read-ahead for window %d: %s", i, exc)

    def _locate(self, array, entry, start: int, stop: int, exc: Exception) -> ChunkError:
        """The first chunk of ``[start, stop)`` that cannot be read (chunk by chunk)."""
        c = entry.chunk_frames
        for a in range((start // c) * c, stop, c):
            b = min(a + c, entry.n_frames)
            try:
                array[a:b]
            except Exception as inner:  # noqa: BLE001 - any decoding failure locates the chunk
                return ChunkError(self.index.url, entry.run_id, entry.array, (a, b),
                                  self._shard_key(entry, a // entry.shard_frames), f"unreadable ({type(inner).__name__}: {inner})")
        a = (start // entry.shard_frames) * entry.shard_frames
        return ChunkError(self.index.url, entry.run_id, entry.array, (start, stop),
                          self._shard_key(entry, a // entry.shard_frames), f"unreadable ({type(exc).__name__}: {exc})")

    def read_ahead(self, items: Iterable[tuple[Any, int]], depth: int, alloc=None) -> Iterator[tuple[Any, np.ndarray | None]]:
        """``(key, window)`` for each ``(key, i)`` in order, reading up to ``depth`` windows ahead on threads.

        ``depth=0`` reads synchronously. ``alloc(key)`` may return the output array of a
        window (see :meth:`read`). The buffer is bounded: at most ``depth`` windows are in
        flight or read but not yet taken. The chunk bytes of the ``depth`` windows after
        those are requested from the kernel in advance (:meth:`advise`), so the disk reads
        while the threads decode.
        """
        items = iter(items)
        if depth <= 0:
            for key, i in items:
                yield key, self.read(i, alloc(key) if alloc else None)
            return
        self.store()  # open once, before the threads
        advised: deque = deque()

        def upcoming() -> Iterator[tuple[Any, int]]:
            for item in items:
                self.advise(item[1])
                advised.append(item)
                if len(advised) > depth:
                    yield advised.popleft()
            while advised:
                yield advised.popleft()

        with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="fmri-data-read") as pool:
            pending: deque = deque()
            try:
                for key, i in upcoming():
                    pending.append((key, pool.submit(self.read, i, alloc(key) if alloc else None)))
                    if len(pending) >= depth:
                        first, future = pending.popleft()
                        yield first, future.result()
                while pending:
                    first, future = pending.popleft()
                    yield first, future.result()
            finally:
                for _, future in pending:
                    future.cancel()
