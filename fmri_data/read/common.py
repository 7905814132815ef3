"""What every reader shares: opening an image with one error per file, size limits, the TR, checksums."""

from __future__ import annotations

import gzip
import math
import struct
import zlib
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
    (decoded) contents: ``.gz`` through python-isal's ``igzip_threaded`` (decoding in a
    background thread that escapes the GIL; :func:`open_gzip` without python-isal), else
    the plain file.

    Raises:
        OSError and the decoders' errors (:data:`READ_ERRORS`); the caller names the file.
    """
    if str(path).endswith(".gz"):
        if _isal_igzip is not None:
            from isal import igzip_threaded

            stream = igzip_threaded.open(str(path), "rb", threads=1)
        else:
            stream = open_gzip(path)
        remaining = int(offset)
        while remaining:
            skipped = len(stream.read(min(remaining, 1 << 20)))
            if not skipped:
                raise EOFError(f"ends before its data offset {offset}")
            remaining -= skipped
        return stream
    stream = open(path, "rb")  # noqa: SIM115 - returned to the caller
    stream.seek(int(offset))
    return stream


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

