"""A run's ``(T, N)`` float32 working series, in memory or in an unnamed temporary file.

A conversion holds a few whole-run series between its passes (the brain voxels after
spatial and temporal resampling, until the normalization is known; QA's brain voxels). At
HCP size (1,200 frames x ~230,000 brain voxels) each is about 1 GiB, and it grows with the
run; so a :class:`Series` holds its first frames in memory up to a budget (by default the
whole series up to :data:`SPILL_BYTES`, else none; QA keeps up to 512 MiB) and the rest in
an unnamed temporary file (deleted when closed or collected; never under the store), read
back in bounded pieces: frame blocks (rows) or column slabs (voxels, for per-voxel temporal
work). File reads and writes are ``pread``/``pwrite`` of contiguous row pieces, not
``mmap``: the page cache holds the data, the process's resident memory holds one piece.

The folder is ``FMRI_DATA_TMPDIR`` when set, else :mod:`tempfile`'s (``TMPDIR``); an
HCP-sized run needs about 1-2 GiB there while it converts (its brain series, and QA's).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from ..errors import FmriDataError
from ..read.common import IO_BYTES

#: By default, series larger than this (bytes) are kept in a temporary file, not in memory
#: (holding more would not save time: first-touching fresh memory costs about as much CPU
#: time as writing the page cache, 2 s per GiB on the 2-core CI machine).
SPILL_BYTES = 256 * 2**20

#: Bytes of one column slab read back at a time (:func:`column_slabs`).
SLAB_BYTES = 64 * 2**20


class ScratchError(FmriDataError):
    """The temporary folder cannot hold a run's working series (full, read-only, missing)."""


def scratch_dir() -> str:
    """The folder of spilled series: ``FMRI_DATA_TMPDIR``, else :func:`tempfile.gettempdir`."""
    return os.environ.get("FMRI_DATA_TMPDIR") or tempfile.gettempdir()


def scratch_error(directory: str, exc: OSError) -> ScratchError:
    """The one-line failure of a temporary file in ``directory``."""
    return ScratchError(f"cannot use the temporary folder {directory} for a run's working series "
                        f"({exc.strerror or exc}); set FMRI_DATA_TMPDIR to a folder with space")


def temporary_file(nbytes: int, directory: str | None = None):
    """An unnamed temporary file of ``nbytes`` (sparse) in ``directory`` (default
    :func:`scratch_dir`), deleted when closed or collected.

    Raises:
        ScratchError: it cannot be made (names the folder).
    """
    directory = directory or scratch_dir()
    try:
        file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 - the caller owns it
        file.truncate(nbytes)
    except OSError as exc:
        raise scratch_error(directory, exc) from exc
    return file


def column_slabs(n_frames: int, n_columns: int, slab_bytes: int = SLAB_BYTES) -> list[tuple[int, int]]:
    """``[(a, b), ...]`` covering ``range(n_columns)`` so that ``(n_frames, b - a)`` float32
    is at most ``slab_bytes`` (at least 256 columns, at most all)."""
    width = int(min(max(256, slab_bytes // (4 * max(1, n_frames))), max(1, n_columns)))
    return [(a, min(a + width, n_columns)) for a in range(0, n_columns, width)]


class Series:
    """A ``(T, N)`` float32 series: its first frames held in memory (up to ``memory_bytes``),
    the rest in an unnamed temporary file (see the module).

    Indexing as numpy for what its readers use: ``s[a:b]`` -> frames ``(b - a, N)``;
    ``s[:, a:b]`` -> a column slab ``(T, b - a)``; ``s[t]`` / ``s[t, columns]`` -> a frame;
    ``s[k:]`` -> the series from frame ``k`` (a view on the same data; :meth:`head` the first
    frames). :meth:`write` fills frames, :meth:`write_columns` a column slab; :meth:`rows`,
    :meth:`columns` and :meth:`column_parts` read into a caller's buffer, and :meth:`held`
    gives the frames held in memory to write in place.

    Args:
        n_frames: T; n_columns: N.
        memory_bytes: bytes of leading frames held in memory; default: the whole series when
            it is at most :data:`SPILL_BYTES`, else none (0: all in the file).
        directory: the temporary file's folder (default :func:`scratch_dir`).

    Raises:
        ScratchError: the temporary file cannot be made or written (names the folder).
    """

    dtype = np.dtype(np.float32)

    def __init__(self, n_frames: int, n_columns: int, memory_bytes: int | None = None, directory: str | None = None,
                 *, _store: tuple | None = None, _first: int = 0, _frames: int | None = None):
        if _store is None:
            if memory_bytes is None:
                memory_bytes = n_frames * n_columns * 4 if n_frames * n_columns * 4 <= SPILL_BYTES else 0
            held = int(min(n_frames, memory_bytes // max(1, 4 * n_columns)))
            directory = directory or scratch_dir()
            rest = (n_frames - held) * n_columns * 4
            file = temporary_file(rest, directory) if held < n_frames else None
            _store = (np.empty((held, n_columns), dtype=np.float32), file, int(n_frames), directory)
        self._store = _store
        self._memory, self._file, total, self.directory = _store
        self._held = self._memory.shape[0]
        self._first = _first
        self.shape = (total - _first if _frames is None else _frames, int(n_columns))

    @property
    def spilled(self) -> bool:
        """Whether some frames live in the temporary file."""
        return self._file is not None

    def shares_data(self, other: Series) -> bool:
        """Whether both are views of the same storage (:meth:`head`, ``s[k:]``)."""
        return self._store is other._store

    def head(self, n_frames: int) -> Series:
        """The first ``n_frames`` frames as a series on the same data (``n_frames`` <= T): a
        shorter result written over its input, column slab by column slab, reuses its pages."""
        if not 0 < n_frames <= self.shape[0]:
            raise ValueError(f"head of {n_frames} frames of a {self.shape[0]}-frame series")
        return Series(0, self.shape[1], _store=self._store, _first=self._first, _frames=n_frames)

    def _offset(self, frame: int, column: int = 0) -> int:
        """Byte offset in the file of absolute frame ``frame`` (>= the held frames)."""
        return ((frame - self._held) * self.shape[1] + column) * 4

    def _pwrite(self, data: np.ndarray, offset: int) -> None:
        view = memoryview(np.ascontiguousarray(data, dtype=np.float32)).cast("B")
        try:
            while view.nbytes:
                written = os.pwrite(self._file.fileno(), view[:IO_BYTES], offset)
                view, offset = view[written:], offset + written
        except OSError as exc:
            raise scratch_error(self.directory, exc) from exc

    def _pread(self, out: np.ndarray, offset: int) -> None:
        view = memoryview(out).cast("B")
        while view.nbytes:
            got = os.preadv(self._file.fileno(), [view[:IO_BYTES]], offset)
            if got <= 0:
                raise ScratchError(f"temporary file in {self.directory} ended early at byte {offset}")
            view, offset = view[got:], offset + got

    def write(self, start: int, rows: np.ndarray) -> None:
        """Frames ``[start, start + len(rows))`` from ``rows (k, N)``."""
        first = self._first + start
        in_memory = max(0, min(len(rows), self._held - first))
        if in_memory:
            self._memory[first:first + in_memory] = rows[:in_memory]
        if in_memory < len(rows):
            self._pwrite(rows[in_memory:], self._offset(first + in_memory))

    def write_columns(self, a: int, values: np.ndarray) -> None:
        """Columns ``[a, a + values.shape[1])`` of every frame from ``values (T, b - a)``."""
        held = min(self.shape[0], max(0, self._held - self._first))
        self._memory[self._first:self._first + held, a:a + values.shape[1]] = values[:held]
        for t in range(held, self.shape[0]):
            self._pwrite(values[t], self._offset(self._first + t, a))

    def held(self, a: int, b: int) -> np.ndarray | None:
        """Frames ``[a, b)`` as a writable view of the memory when all of them are held, else None."""
        a, b = self._first + a, self._first + b
        return self._memory[a:b] if b <= self._held else None

    def rows(self, a: int, b: int, out: np.ndarray | None = None) -> np.ndarray:
        """Frames ``[a, b)`` as a ``(b - a, N)`` float32 array: a view when all are held in
        memory, else read (into ``out``, a C-contiguous float32 array of that shape, when given)."""
        a, b = self._first + a, self._first + max(a, b)
        if b <= self._held:
            return self._memory[a:b]
        out = np.empty((b - a, self.shape[1]), dtype=np.float32) if out is None else out
        split = min(max(a, self._held), b)
        out[:split - a] = self._memory[a:split]
        if b > split:
            self._pread(out[split - a:], self._offset(split))
        return out

    def column_parts(self, a: int, b: int, out: np.ndarray | None = None) -> list[tuple[int, np.ndarray]]:
        """Columns ``[a, b)`` as ``[(first frame, (frames, b - a) array)]``: a view of the held
        frames and the other frames read (into ``out``, C-contiguous ``(T, b - a)``, when given)."""
        held = min(self.shape[0], max(0, self._held - self._first))
        parts = [(0, self._memory[self._first:self._first + held, a:b])] if held else []
        if held < self.shape[0]:
            out = np.empty((self.shape[0], b - a), dtype=np.float32) if out is None else out
            rest = out[:self.shape[0] - held]
            for t in range(held, self.shape[0]):
                self._pread(rest[t - held], self._offset(self._first + t, a))
            parts.append((held, rest))
        return parts

    def columns(self, a: int, b: int, out: np.ndarray | None = None) -> np.ndarray:
        """Columns ``[a, b)`` of every frame as a ``(T, b - a)`` float32 array (a copy; into
        ``out``, C-contiguous, when given): ``s[:, a:b]``."""
        out = np.empty((self.shape[0], b - a), dtype=np.float32) if out is None else out
        held = min(self.shape[0], max(0, self._held - self._first))
        out[:held] = self._memory[self._first:self._first + held, a:b]
        for t in range(held, self.shape[0]):
            self._pread(out[t], self._offset(self._first + t, a))
        return out

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        rows, columns = key if isinstance(key, tuple) else (key, None)
        if isinstance(rows, (int, np.integer)):
            frame = self.rows(int(rows), int(rows) + 1)[0]
            return frame if columns is None else frame[columns]
        if isinstance(rows, slice) and rows.step in (None, 1):
            a, b, _ = rows.indices(self.shape[0])
            if columns is None:
                if rows.stop is None:
                    return Series(0, self.shape[1], _store=self._store, _first=self._first + a, _frames=self.shape[0] - a)
                return self.rows(a, b)
            if (a, b) == (0, self.shape[0]) and isinstance(columns, slice) and columns.step in (None, 1):
                c0, c1, _ = columns.indices(self.shape[1])
                return self.columns(c0, c1)
        raise TypeError(f"Series does not support the index {key!r}")

    def close(self) -> None:
        """Release the temporary file (the memory goes with the last reference)."""
        if self._file is not None:
            self._file.close()
