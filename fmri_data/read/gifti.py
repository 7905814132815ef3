"""Lazy GIFTI surface series reader: one hemisphere's ``(T, V)`` frames, decoded data array by data array."""

from __future__ import annotations

import base64
import mmap
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError




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

