"""A run's ``(T, N)`` float32 working series, in memory or in an unnamed temporary file.

A conversion holds a few whole-run series between its passes (the brain voxels after
spatial resampling, then after temporal resampling; QA's brain voxels). At HCP size
(1,200 frames x ~230,000 brain voxels) each is about 1 GiB, and it grows with the run; so
above :data:`SPILL_BYTES` a series lives in an unnamed temporary file (deleted when closed
or collected; never under the store) and is read back in bounded pieces: frame blocks
(rows) or column slabs (voxels, for per-voxel temporal work). Below it, a numpy array.
File reads and writes are ``pread``/``pwrite`` of contiguous row pieces, not ``mmap``: the
page cache holds the data, the process's resident memory holds one piece.

The folder is ``FMRI_DATA_TMPDIR`` when set, else :mod:`tempfile`'s (``TMPDIR``); a spilled
HCP-sized run needs about 2 GiB there while it converts.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from ..errors import FmriDataError

#: Series larger than this (bytes) are kept in a temporary file, not in memory.
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
    """A ``(T, N)`` float32 series, in memory or spilled (see the module).

    Indexing as numpy for what its readers use: ``s[a:b]`` -> frames ``(b - a, N)``;
    ``s[:, a:b]`` -> a column slab ``(T, b - a)``; ``s[t]`` / ``s[t, columns]`` -> a frame;
    ``s[k:]`` -> the series from frame ``k`` (a view on the same data; :meth:`head` the first
    frames). :meth:`write` fills frames, :meth:`write_columns` a column slab.

    Args:
        n_frames: T; n_columns: N.
        spill: keep it in a temporary file; default: when larger than :data:`SPILL_BYTES`.
        directory: the temporary file's folder (default :func:`scratch_dir`).

    Raises:
        ScratchError: the temporary file cannot be made or written (names the folder).
    """

    dtype = np.dtype(np.float32)

    def __init__(self, n_frames: int, n_columns: int, spill: bool | None = None, directory: str | None = None,
                 *, _parent: Series | None = None, _first: int = 0):
        self.shape = (int(n_frames) - _first, int(n_columns))
        self._first = _first
        if _parent is not None:
            self._array, self._file, self.directory = _parent._array, _parent._file, _parent.directory
            return
        if spill is None:
            spill = n_frames * n_columns * 4 > SPILL_BYTES
        self.directory = directory or scratch_dir()
        self._array = None if spill else np.empty((n_frames, n_columns), dtype=np.float32)
        self._file = temporary_file(n_frames * n_columns * 4, self.directory) if spill else None

    @property
    def spilled(self) -> bool:
        return self._file is not None

    def _offset(self, row: int, column: int = 0) -> int:
        return ((self._first + row) * self.shape[1] + column) * 4

    def _pwrite(self, data: np.ndarray, offset: int) -> None:
        view = memoryview(np.ascontiguousarray(data, dtype=np.float32)).cast("B")
        try:
            while view.nbytes:
                written = os.pwrite(self._file.fileno(), view, offset)
                view, offset = view[written:], offset + written
        except OSError as exc:
            raise scratch_error(self.directory, exc) from exc

    def _pread(self, out: np.ndarray, offset: int) -> None:
        view = memoryview(out).cast("B")
        while view.nbytes:
            got = os.preadv(self._file.fileno(), [view], offset)
            if got <= 0:
                raise ScratchError(f"temporary file in {self.directory} ended early at byte {offset}")
            view, offset = view[got:], offset + got

    def write(self, start: int, rows: np.ndarray) -> None:
        """Frames ``[start, start + len(rows))`` from ``rows (k, N)``."""
        if self._array is not None:
            self._array[self._first + start:self._first + start + len(rows)] = rows
        else:
            self._pwrite(rows, self._offset(start))

    def write_columns(self, a: int, values: np.ndarray) -> None:
        """Columns ``[a, a + values.shape[1])`` of every frame from ``values (T, b - a)``."""
        if self._array is not None:
            self._array[self._first:self._first + self.shape[0], a:a + values.shape[1]] = values
            return
        values = np.ascontiguousarray(values, dtype=np.float32)
        for t in range(self.shape[0]):
            self._pwrite(values[t], self._offset(t, a))

    def _rows(self, a: int, b: int) -> np.ndarray:
        if self._array is not None:
            return self._array[self._first + a:self._first + b]
        out = np.empty((b - a, self.shape[1]), dtype=np.float32)
        self._pread(out, self._offset(a))
        return out

    def _columns(self, a: int, b: int) -> np.ndarray:
        if self._array is not None:
            return self._array[self._first:self._first + self.shape[0], a:b]
        out = np.empty((self.shape[0], b - a), dtype=np.float32)
        for t in range(self.shape[0]):
            self._pread(out[t], self._offset(t, a))
        return out

    def head(self, n_frames: int) -> Series:
        """The first ``n_frames`` frames as a series on the same data (``n_frames`` <= T): a
        shorter result written over its input, column slab by column slab, reuses its pages."""
        if not 0 < n_frames <= self.shape[0]:
            raise ValueError(f"head of {n_frames} frames of a {self.shape[0]}-frame series")
        return Series(self._first + n_frames, self.shape[1], _parent=self, _first=self._first)

    def shares_data(self, other: Series) -> bool:
        """Whether both are views of the same storage (:meth:`head`, ``s[k:]``)."""
        return (self._array is not None and self._array is other._array) or (
            self._file is not None and self._file is other._file)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        rows, columns = key if isinstance(key, tuple) else (key, None)
        if isinstance(rows, (int, np.integer)):
            frame = self._rows(int(rows), int(rows) + 1)[0]
            return frame if columns is None else frame[columns]
        if isinstance(rows, slice) and rows.step in (None, 1):
            a, b, _ = rows.indices(self.shape[0])
            if columns is None:
                if rows.stop is None:
                    return Series(self._first + self.shape[0], self.shape[1], _parent=self, _first=self._first + a)
                return self._rows(a, b)
            if (a, b) == (0, self.shape[0]) and isinstance(columns, slice) and columns.step in (None, 1):
                c0, c1, _ = columns.indices(self.shape[1])
                return self._columns(c0, c1)
        raise TypeError(f"Series does not support the index {key!r}")

    def close(self) -> None:
        """Release the temporary file (or the array)."""
        if self._file is not None:
            self._file.close()
        self._array = None
