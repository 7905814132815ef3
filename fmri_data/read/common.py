"""What every reader shares: opening an image with one error per file, size limits, the TR, checksums."""

from __future__ import annotations

import gzip
import math
import queue
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.fileholders import FileHolder

from ..errors import InputError

try:  # python-isal: ISA-L's igzip inflate, a drop-in gzip.GzipFile subclass
    from isal import igzip as _isal_igzip
    from isal import isal_zlib as _isal_zlib
except ImportError:  # pragma: no cover - isal is a core dependency; kept optional for minimal installs
    _isal_igzip = _isal_zlib = None
try:  # indexed_gzip: what nibabel itself uses for .gz reads when installed
    import indexed_gzip as _indexed_gzip
except ImportError:
    _indexed_gzip = None


#: Plausible repetition times in seconds; anything outside is refused as a unit error.
TR_RANGE_S = (0.05, 60.0)

TIME_UNITS = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}
#: What nibabel and the decompressors raise on malformed files (each becomes an InputError).
READ_ERRORS = (
    OSError,
    EOFError,
    zlib.error,
    gzip.BadGzipFile,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    OverflowError,
    struct.error,
    nib.filebasedimages.ImageFileError,
    nib.spatialimages.HeaderDataError,
) + ((_isal_zlib.error,) if _isal_zlib is not None else ())
#: Largest plausible image: 512^3 voxels per frame, a million frames.
MAX_VOXELS_PER_FRAME = 512**3
MAX_FRAMES = 1_000_000
#: Bytes per read or write call of a large transfer (decoding in :func:`read_ahead`, a
#: conversion's temporary file, store files): a decoder asked for 100 MiB at once decodes
#: into a fresh buffer of that size and copies it (python-isal: 1.7x the time), and one
#: 30 MiB ``write`` into a new file costs ext4 several times the kernel time of the same
#: bytes in 4 MiB calls (measured on the 2-core CI machine).
IO_BYTES = 4 * 2**20


def gzip_decoder() -> str:
    """The inflate implementation :func:`load_image` uses for ``.nii.gz`` voxel data.

    ``"isal"`` (python-isal's ``isal.igzip.IGzipFile``, ISA-L's igzip: about 2-3x the
    inflate speed of zlib, measured by ``benchmarks/bench_convert.py``) when installed;
    else ``"indexed_gzip"`` when nibabel found it (nibabel's own choice,
    ``nibabel.openers`` opens ``.gz`` with it: zlib with a seek-point index); else
    ``"gzip"`` (the standard library, nibabel's default).
    """
    if _isal_igzip is not None:
        return "isal"
    return "indexed_gzip" if _indexed_gzip is not None else "gzip"


def open_gzip(path: str | Path) -> Any:
    """A binary read stream of a gzip file with the fastest available decoder
    (:func:`gzip_decoder`): ``isal.igzip.IGzipFile``, ``indexed_gzip.IndexedGzipFile`` or
    ``gzip.GzipFile``; all are ``seek``-able (forward seeks decode, backward seeks restart
    from the start except with ``indexed_gzip``)."""
    decoder = gzip_decoder()
    if decoder == "isal":
        return _isal_igzip.open(path, "rb")
    if decoder == "indexed_gzip":
        return _indexed_gzip.IndexedGzipFile(str(path), drop_handles=False)
    return gzip.open(path, "rb")


def open_frames(path: str | Path, offset: int) -> Any:
    """A sequential binary read stream of an image file positioned at byte ``offset`` of its
    (decoded) contents: ``.gz`` through :func:`open_gzip` (python-isal's igzip when
    installed), else the plain file. :func:`read_ahead` runs it in a background thread.

    Raises:
        OSError and the decoders' errors (:data:`READ_ERRORS`); the caller names the file.
    """
    if str(path).endswith(".gz"):
        stream = open_gzip(path)
        remaining = int(offset)
        while remaining:
            skipped = len(stream.read(min(remaining, 1 << 20)))
            if not skipped:
                stream.close()
                raise EOFError(f"ends before its data offset {offset}")
            remaining -= skipped
        return stream
    stream = open(path, "rb")  # noqa: SIM115 - returned to the caller
    stream.seek(int(offset))
    return stream


def read_ahead(open_stream: Callable[[], Any], buffers: list[np.ndarray], sizes: list[int]) -> Iterator[np.ndarray]:
    """Read consecutive pieces of a stream, each into the next of ``buffers`` in turn, in a
    background thread that stays one piece ahead of the caller (with two buffers: it fills
    one while the caller works on the other).

    Decoding (python-isal's inflate, file reads) releases the GIL, so on two or more cores
    decoding the next block of frames costs the caller no time beyond the wait for the
    first. (python-isal's own ``igzip_threaded`` reader queues only 2 MiB ahead, which a
    caller working on 100 MiB blocks never uses: decoding then stalled the caller.)

    Args:
        open_stream: called in the background thread; returns a binary stream (a context
            manager with ``readinto``), e.g. ``lambda: open_frames(path, offset)``.
        buffers: C-contiguous arrays, each at least as many bytes as the largest piece.
        sizes: bytes of each piece, in stream order.

    Yields:
        For each piece, the first ``sizes[i]`` bytes of its buffer as a flat ``uint8``
        array: valid until the caller asks for the piece after next (with two buffers: until
        the next step of the iteration, when that buffer is refilled).

    Raises:
        EOFError: the stream ends before the pieces (attribute ``bytes_read``);
            and whatever ``open_stream`` or the stream raise, re-raised in the caller. Closing
            the iteration early stops the thread and closes the stream.
    """
    free: queue.Queue = queue.Queue()
    filled: queue.Queue = queue.Queue()
    stop = threading.Event()
    for i in range(len(buffers)):
        free.put(i)

    def fill() -> None:
        total = 0
        try:
            with open_stream() as stream:
                for n in sizes:
                    i = None
                    while i is None:
                        if stop.is_set():
                            return
                        try:
                            i = free.get(timeout=0.05)
                        except queue.Empty:
                            pass
                    view, got = memoryview(buffers[i]).cast("B")[:n], 0
                    while got < n:
                        k = stream.readinto(view[got:got + IO_BYTES])
                        if not k:
                            ended = EOFError(f"ends after {total + got} bytes")
                            ended.bytes_read = total + got
                            raise ended
                        got += k
                    total += n
                    filled.put((i, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            filled.put((None, exc))

    worker = threading.Thread(target=fill, name="fmri-data-read-ahead", daemon=True)
    worker.start()
    try:
        for n in sizes:
            i, exc = filled.get()
            if exc is not None:
                raise exc
            yield buffers[i].reshape(-1).view(np.uint8)[:n]
            free.put(i)
    finally:
        stop.set()
        worker.join()


def load_image(path: str | Path) -> Any:
    """Open an image with nibabel without reading its data (``.nii`` memory-mapped).

    ``.nii.gz`` NIfTI-1/2 images read their voxels through one persistent stream of
    :func:`open_gzip` handed to nibabel's own hook for file objects
    (``FileHolder(fileobj=...)`` + ``from_file_map``); nibabel's array proxy seeks in it
    under its lock. Decoded values are bit-identical to ``nib.load`` (the same bytes, the
    same proxy scaling). Other ``.gz`` images use ``nib.load(keep_file_open=True)``.

    Raises:
        InputError: the file is missing or its header is unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        if not str(path).endswith(".gz"):
            return nib.load(path, mmap=True)
        img = nib.load(path, keep_file_open=True)  # nibabel picks the image class from the header
        if not isinstance(img, nib.Nifti1Image) or gzip_decoder() == "gzip":  # Nifti2Image is a Nifti1Image
            return img
        holder = FileHolder(filename=str(path), fileobj=open_gzip(path))
        return type(img).from_file_map({"image": holder, "header": holder})
    except READ_ERRORS as exc:
        raise InputError(path, f"cannot read image header ({type(exc).__name__}: {exc})") from exc


def check_size(path: str | Path, img: Any, shape: tuple[int, ...]) -> None:
    """Refuse implausible dimensions, and uncompressed files shorter than their header says."""
    if min(shape) < 1 or int(np.prod(shape[:3])) > MAX_VOXELS_PER_FRAME or (len(shape) > 3 and shape[3] > MAX_FRAMES):
        raise InputError(path, f"implausible image dimensions {shape}")
    if str(path).endswith(".gz"):
        return
    try:
        offset = int(img.dataobj.offset)
        itemsize = np.dtype(img.get_data_dtype()).itemsize
    except (AttributeError, TypeError, ValueError):
        return
    needed = offset + int(np.prod(shape)) * itemsize
    size = Path(path).stat().st_size
    if size < needed:
        raise InputError(path, f"file holds {size} bytes but its header describes {needed} (truncated or wrong dimensions)")


def resolve_tr(path: str, sidecar: dict[str, Any], header_tr_s: float | None, header_unit: str = "sec") -> tuple[float, list[str]]:
    """Repetition time of a run in seconds, and warnings about how it was found.

    The BIDS sidecar ``RepetitionTime`` (seconds, after inheritance) wins; the header value
    (``pixdim[4]`` in its ``xyzt_units``) is the fallback and a cross-check. A header with
    unknown time units and a value above 100 is read as milliseconds.

    Raises:
        InputError: no usable TR anywhere, or a TR outside ``TR_RANGE_S`` (a unit mistake,
            e.g. milliseconds in a sidecar).
    """
    warnings: list[str] = []
    lo, hi = TR_RANGE_S
    header = header_tr_s
    if header is not None and header_unit == "unknown":
        if header > 100:
            header /= 1000.0
            warnings.append(f"header TR has unknown units; read {header_tr_s} as milliseconds")
        else:
            warnings.append("header TR has unknown units; read as seconds")
    raw = sidecar.get("RepetitionTime")
    if raw is not None:
        try:
            tr = float(raw)
        except (TypeError, ValueError):
            raise InputError(path, f"sidecar RepetitionTime {raw!r} is not a number") from None
        if not (math.isfinite(tr) and lo <= tr <= hi):
            raise InputError(
                path, f"sidecar RepetitionTime {raw!r} s is outside [{lo}, {hi}] s (BIDS requires seconds)"
            )
        if header is not None and lo <= header <= hi and not math.isclose(header, tr, rel_tol=0.01):
            warnings.append(f"header TR {header:g} s disagrees with sidecar RepetitionTime {tr:g} s; using the sidecar")
        return tr, warnings
    if header is None:
        raise InputError(path, "no repetition time: no RepetitionTime in the BIDS sidecars and none in the header")
    if not (lo <= header <= hi):
        raise InputError(path, f"header TR {header_tr_s!r} ({header_unit}) is outside [{lo}, {hi}] s")
    warnings.append("no RepetitionTime in the BIDS sidecars; TR taken from the image header")
    return header, warnings


def file_sha256(path: str | Path, block: int = 1 << 22) -> str:
    """SHA-256 hex digest of a file, streamed in 4 MiB blocks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()

