"""Lazy readers for BOLD series: NIfTI-1/2 volumes, GIFTI surfaces, CIFTI-2 dense/parcels.

Readers never load a whole run: they return an object whose ``read(start, stop)`` gives
frames ``[start, stop)`` as float32. Volume readers always return voxels in RAS+ order
(first axis left->right, second posterior->anterior, third inferior->superior) with the
matching affine, whatever the orientation on disk; scaling (``scl_slope``/``scl_inter``)
is applied by nibabel's array proxy.

Every failure (missing file, corrupt header, truncated gzip stream, wrong number of
dimensions) raises :class:`~fmri_data.errors.InputError` naming the file.
"""

from __future__ import annotations

import base64
import gzip
import math
import mmap
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel import orientations

from .errors import InputError

#: Plausible repetition times in seconds; anything outside is refused as a unit error.
TR_RANGE_S = (0.05, 60.0)

_TIME_UNITS = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}
#: What nibabel and the decompressors raise on malformed files (each becomes an InputError).
_READ_ERRORS = (
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
)
#: Largest plausible image: 512^3 voxels per frame, a million frames.
MAX_VOXELS_PER_FRAME = 512**3
MAX_FRAMES = 1_000_000


def _load(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        return nib.load(path, keep_file_open=True) if str(path).endswith(".gz") else nib.load(path, mmap=True)
    except _READ_ERRORS as exc:
        raise InputError(path, f"cannot read image header ({type(exc).__name__}: {exc})") from exc


def _ras_orientation(affine: np.ndarray) -> np.ndarray:
    """Orientation transform (nibabel ``ornt``) taking on-disk voxel axes to RAS+."""
    return orientations.io_orientation(affine)


def _ras_affine(affine: np.ndarray, ornt: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return affine @ orientations.inv_ornt_aff(ornt, shape[:3])


@dataclass
class VolumeSeries:
    """A 4D BOLD volume, read lazily in RAS+ voxel order.

    Attributes:
        path: the file.
        shape: ``(X, Y, Z, T)`` in RAS+ order.
        affine: 4x4 voxel -> world (mm) matrix for RAS+ voxel indices.
        header_tr_s: repetition time from ``pixdim[4]`` converted to seconds, or None when
            the header has none.
        header_time_unit: ``xyzt_units`` time unit as nibabel names it (``sec``, ``msec``,
            ``usec``, ``unknown``).
        dtype: on-disk data type.
    """

    path: str
    shape: tuple[int, int, int, int]
    affine: np.ndarray
    header_tr_s: float | None
    header_time_unit: str
    dtype: np.dtype
    _img: Any = field(repr=False)
    _ornt: np.ndarray = field(repr=False)

    @property
    def n_frames(self) -> int:
        return self.shape[3]

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Frames ``[start, stop)`` as float32 of shape ``(X, Y, Z, stop - start)`` (RAS+).

        Raises:
            InputError: truncated or corrupt data.
        """
        stop = self.n_frames if stop is None else stop
        try:
            block = np.asarray(self._img.dataobj[..., start:stop], dtype=np.float32)
        except _READ_ERRORS as exc:
            raise InputError(self.path, f"truncated or corrupt image data ({type(exc).__name__}: {exc})") from exc
        return orientations.apply_orientation(block, self._ornt)

    def iter_frames(self, frames_per_block: int):
        """Yield ``(start, stop, block)`` over the whole run, blocks of ``frames_per_block``."""
        for start in range(0, self.n_frames, frames_per_block):
            stop = min(start + frames_per_block, self.n_frames)
            yield start, stop, self.read(start, stop)


def _check_size(path: str | Path, img: Any, shape: tuple[int, ...]) -> None:
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


def _header_tr(header: Any) -> tuple[float | None, str]:
    zooms = header.get_zooms()
    try:
        unit = header.get_xyzt_units()[1]
    except KeyError:  # an xyzt_units code NIfTI does not define
        unit = "unknown"
    if len(zooms) < 4 or not np.isfinite(zooms[3]) or zooms[3] <= 0:
        return None, unit
    value = float(zooms[3])
    if unit in _TIME_UNITS:
        return value * _TIME_UNITS[unit], unit
    return value, unit


def open_volume(path: str | Path) -> VolumeSeries:
    """Open a 4D NIfTI-1/NIfTI-2 BOLD series (``.nii`` or ``.nii.gz``) without reading voxels.

    Raises:
        InputError: the file is missing, its header is unreadable, or it is not 4D with at
            least 2 frames.
    """
    img = _load(path)
    shape = tuple(int(s) for s in img.shape)
    if len(shape) != 4:
        raise InputError(path, f"{len(shape)}D image of shape {shape}; expected a 4D BOLD series (X, Y, Z, T)")
    if shape[3] < 2:
        raise InputError(path, f"only {shape[3]} frame; a BOLD series needs at least 2")
    _check_size(path, img, shape)
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(path, "affine is singular or not finite")
    ornt = _ras_orientation(affine)
    tr, unit = _header_tr(img.header)
    return VolumeSeries(
        path=str(path),
        shape=tuple(int(s) for s in orientations.apply_orientation(np.empty(shape[:3] + (0,)), ornt).shape[:3])
        + (shape[3],),
        affine=_ras_affine(affine, ornt, shape),
        header_tr_s=tr,
        header_time_unit=unit,
        dtype=np.dtype(img.get_data_dtype()),
        _img=img,
        _ornt=ornt,
    )


def read_image_3d(path: str | Path, *, dtype: Any = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D image (brain mask, atlas) whole, in RAS+ order.

    Returns:
        ``(data (X, Y, Z), affine 4x4)``. A 4D image with one frame is squeezed.

    Raises:
        InputError: unreadable, or not 3D.
    """
    img = _load(path)
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(path, f"image of shape {tuple(img.shape)}; expected a 3D volume")
    _check_size(path, img, shape)
    try:
        data = np.asarray(img.dataobj, dtype=dtype).reshape(shape)
    except _READ_ERRORS as exc:
        raise InputError(path, f"truncated or corrupt image data ({type(exc).__name__}: {exc})") from exc
    affine = np.asarray(img.affine, dtype=np.float64)
    ornt = _ras_orientation(affine)
    return orientations.apply_orientation(data, ornt), _ras_affine(affine, ornt, shape)


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


# --------------------------------------------------------------------------- GIFTI

_DA_RE = re.compile(rb"<DataArray\b([^>]*)>")
_DATA_RE = re.compile(rb"<Data(/?)>")
_ATTR_RE = re.compile(rb'([A-Za-z0-9_]+)\s*=\s*"([^"]*)"')
_GIFTI_DTYPES = {
    "NIFTI_TYPE_FLOAT32": "f4",
    "NIFTI_TYPE_FLOAT64": "f8",
    "NIFTI_TYPE_INT32": "i4",
    "NIFTI_TYPE_UINT8": "u1",
    "NIFTI_TYPE_INT16": "i2",
}


@dataclass
class _DataArray:
    attrs: dict[str, str]
    start: int  # byte offset of the encoded payload
    stop: int

    @property
    def dims(self) -> tuple[int, ...]:
        n = int(self.attrs.get("Dimensionality", "1"))
        return tuple(int(self.attrs[f"Dim{i}"]) for i in range(n))


@dataclass
class SurfaceSeries:
    """A GIFTI functional series (one hemisphere) read lazily, frame by frame.

    The file is indexed once (byte offsets of every ``<DataArray>`` payload); ``read``
    decodes only the requested frames. Files whose series sits in one 2D data array
    (``vertices x frames``) are decoded whole on first access.

    Attributes:
        path: the ``.func.gii`` file.
        n_vertices: vertices of the mesh.
        n_frames: time points.
    """

    path: str
    n_vertices: int
    n_frames: int
    _buffer: Any = field(repr=False)
    _arrays: list[_DataArray] = field(repr=False)
    _whole: np.ndarray | None = field(default=None, repr=False)

    def _decode(self, da: _DataArray) -> np.ndarray:
        enc = da.attrs.get("Encoding", "GZipBase64Binary")
        dtype = np.dtype(_GIFTI_DTYPES.get(da.attrs.get("DataType", ""), "f4"))
        if da.attrs.get("Endian", "LittleEndian") == "BigEndian":
            dtype = dtype.newbyteorder(">")
        raw = bytes(self._buffer[da.start : da.stop])
        try:
            if enc == "ASCII":
                arr = np.array(raw.split(), dtype=np.float64).astype(dtype)
            elif enc in ("Base64Binary", "GZipBase64Binary"):
                payload = base64.b64decode(b"".join(raw.split()))
                if enc == "GZipBase64Binary":
                    payload = zlib.decompress(payload)
                arr = np.frombuffer(payload, dtype=dtype)
            else:
                raise InputError(self.path, f"GIFTI encoding {enc} is not supported by the lazy reader")
        except (ValueError, zlib.error, base64.binascii.Error) as exc:
            raise InputError(self.path, f"corrupt GIFTI data array ({exc})") from exc
        order = "F" if da.attrs.get("ArrayIndexingOrder") == "ColumnMajorOrder" else "C"
        if arr.size != int(np.prod(da.dims)):
            raise InputError(self.path, f"GIFTI data array holds {arr.size} values, header says {da.dims}")
        return arr.reshape(da.dims, order=order).astype(np.float32)

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Frames ``[start, stop)`` as float32 of shape ``(V, stop - start)``."""
        stop = self.n_frames if stop is None else stop
        if len(self._arrays) == 1:
            if self._whole is None:
                whole = self._decode(self._arrays[0])
                self._whole = whole if whole.shape[0] == self.n_vertices else whole.T
            return np.ascontiguousarray(self._whole[:, start:stop])
        out = np.empty((self.n_vertices, stop - start), dtype=np.float32)
        for j, da in enumerate(self._arrays[start:stop]):
            out[:, j] = self._decode(da).reshape(-1)
        return out


def open_gifti_series(path: str | Path) -> SurfaceSeries:
    """Index a GIFTI ``.func.gii`` time series without decoding it.

    Raises:
        InputError: missing, not GIFTI, or data arrays of inconsistent length.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    try:
        with path.open("rb") as fh:
            buffer = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot open ({exc})") from exc
    if buffer.find(b"<GIFTI", 0, 4096) < 0:
        raise InputError(path, "not a GIFTI file (no <GIFTI> element)")
    arrays: list[_DataArray] = []
    for match in _DA_RE.finditer(buffer):
        attrs = {k.decode(): v.decode() for k, v in _ATTR_RE.findall(match.group(1))}
        if attrs.get("Encoding") == "ExternalFileBinary":
            raise InputError(path, "GIFTI ExternalFileBinary encoding is not supported")
        data_tag = _DATA_RE.search(buffer, match.end())
        if data_tag is None or data_tag.group(1):
            raise InputError(path, "GIFTI data array without data")
        close_tag = buffer.find(b"</Data>", data_tag.end())
        if close_tag < 0:
            raise InputError(path, "truncated GIFTI file (unterminated <Data>)")
        arrays.append(_DataArray(attrs, data_tag.end(), close_tag))
    if not arrays:
        raise InputError(path, "GIFTI file holds no data arrays")
    if buffer.find(b"</GIFTI>") < 0:
        raise InputError(path, "truncated GIFTI file (no closing </GIFTI>)")
    if len(arrays) == 1:
        dims = arrays[0].dims
        if len(dims) != 2:
            raise InputError(path, f"single GIFTI data array of shape {dims}; expected vertices x frames")
        n_vertices, n_frames = dims if dims[0] >= dims[1] else dims[::-1]
    else:
        sizes = {int(np.prod(a.dims)) for a in arrays}
        if len(sizes) != 1:
            raise InputError(path, f"GIFTI data arrays have different lengths {sorted(sizes)}")
        n_vertices, n_frames = sizes.pop(), len(arrays)
    return SurfaceSeries(str(path), int(n_vertices), int(n_frames), buffer, arrays)


# --------------------------------------------------------------------------- CIFTI


@dataclass
class CiftiSeries:
    """A CIFTI-2 dense (``.dtseries.nii``) or parcellated (``.ptseries.nii``) series.

    Attributes:
        path: the file.
        kind: ``"dense"`` or ``"parcels"``.
        n_frames: time points (first CIFTI axis).
        tr_s: repetition time from the series axis, in seconds.
        names: parcel names in file order (parcels), or None (dense).
        brain_models: nibabel ``BrainModelAxis`` (dense), or None.
    """

    path: str
    kind: str
    n_frames: int
    tr_s: float | None
    names: list[str] | None
    brain_models: Any
    _img: Any = field(repr=False)

    @property
    def n_columns(self) -> int:
        return int(self._img.shape[1])

    def read(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Frames ``[start, stop)`` as float32 of shape ``(stop - start, columns)``."""
        stop = self.n_frames if stop is None else stop
        try:
            return np.asarray(self._img.dataobj[start:stop], dtype=np.float32)
        except _READ_ERRORS as exc:
            raise InputError(self.path, f"truncated or corrupt CIFTI data ({type(exc).__name__}: {exc})") from exc


def open_cifti(path: str | Path) -> CiftiSeries:
    """Open a CIFTI-2 series lazily.

    Raises:
        InputError: not CIFTI-2, no series axis in seconds, or an unsupported second axis.
    """
    img = _load(path)
    if not isinstance(img, nib.Cifti2Image):
        raise InputError(path, "not a CIFTI-2 image")
    try:
        series = img.header.get_axis(0)
        columns = img.header.get_axis(1)
    except Exception as exc:
        raise InputError(path, f"malformed CIFTI-2 header ({exc})") from exc
    if not isinstance(series, nib.cifti2.SeriesAxis):
        raise InputError(path, f"first CIFTI axis is {type(series).__name__}; expected a time series")
    unit = str(series.unit).upper()
    if unit != "SECOND":
        raise InputError(path, f"CIFTI series axis unit is {unit}; expected SECOND")
    tr = float(series.step) if series.step > 0 else None
    if isinstance(columns, nib.cifti2.ParcelsAxis):
        return CiftiSeries(str(path), "parcels", len(series), tr, [str(n) for n in columns.name], None, img)
    if isinstance(columns, nib.cifti2.BrainModelAxis):
        return CiftiSeries(str(path), "dense", len(series), tr, None, columns, img)
    raise InputError(path, f"second CIFTI axis is {type(columns).__name__}; expected brain models or parcels")


# --------------------------------------------------------------------------- tables


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a BIDS ``events.tsv`` (``onset``/``duration`` in seconds, floats; ``n/a`` -> None).

    Raises:
        InputError: unreadable, or missing the required ``onset``/``duration`` columns.
    """
    import pandas as pd

    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise InputError(path, f"cannot parse events table ({exc})") from exc
    missing = {"onset", "duration"} - set(table.columns)
    if missing:
        raise InputError(path, f"events table lacks required columns {sorted(missing)}")
    table = table.astype(object).where(table.notna(), None)
    return [{k: _plain(v) for k, v in row.items()} for row in table.to_dict(orient="records")]


def read_confounds(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Columns and values of a confounds TSV, values float32 ``(T, C)`` (``n/a`` -> NaN).

    Raises:
        InputError: unreadable or non-numeric.
    """
    import pandas as pd

    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False)
        values = table.to_numpy(dtype=np.float32)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise InputError(path, f"cannot parse confounds table ({exc})") from exc
    return [str(c) for c in table.columns], values


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value


def file_sha256(path: str | Path, block: int = 1 << 22) -> str:
    """SHA-256 hex digest of a file, streamed in 4 MiB blocks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = [
    "CiftiSeries",
    "SurfaceSeries",
    "VolumeSeries",
    "file_sha256",
    "open_cifti",
    "open_gifti_series",
    "open_volume",
    "read_confounds",
    "read_events",
    "read_image_3d",
    "resolve_tr",
]
