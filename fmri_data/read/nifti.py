"""Lazy NIfTI-1/2 volume series reader (and whole 3D images: masks, atlases).

A :class:`VolumeSeries` never loads a whole run: ``read(start, stop)`` gives frames
``[start, stop)`` as float32. Volume readers always return voxels in RAS+ order
(first axis left->right, second posterior->anterior, third inferior->superior) with the
matching affine, whatever the orientation on disk; scaling (``scl_slope``/``scl_inter``)
is applied by nibabel's array proxy.

Every failure (missing file, corrupt header, truncated gzip stream, wrong number of
dimensions) raises :class:`~fmri_data.errors.InputError` naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from nibabel import orientations

from ..errors import InputError
from .common import READ_ERRORS, TIME_UNITS, check_size, load_image, open_frames, read_ahead


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
        warnings: what the header leaves ambiguous and how it was resolved (a qform that
            disagrees with the sform), for the run's log.
    """

    path: str
    shape: tuple[int, int, int, int]
    affine: np.ndarray
    header_tr_s: float | None
    header_time_unit: str
    dtype: np.dtype
    _img: Any = field(repr=False)
    _ornt: np.ndarray = field(repr=False)
    warnings: list[str] = field(default_factory=list)

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
        except READ_ERRORS as exc:
            raise InputError(self.path, f"truncated or corrupt image data ({type(exc).__name__}: {exc})") from exc
        return orientations.apply_orientation(block, self._ornt)

    def iter_frames(self, frames_per_block: int):
        """Yield ``(start, stop, block)`` over the whole run, blocks of ``frames_per_block``."""
        for start in range(0, self.n_frames, frames_per_block):
            stop = min(start + frames_per_block, self.n_frames)
            yield start, stop, self.read(start, stop)

    @property
    def _raw(self) -> bool:
        """Whether the voxels can be streamed from the file's bytes (a NIfTI data block)."""
        proxy = self._img.dataobj
        return getattr(proxy, "order", None) == "F" and isinstance(getattr(proxy, "offset", None), int) \
            and tuple(getattr(proxy, "shape", ())) == tuple(self._img.shape)

    def frame_order(self) -> np.ndarray:
        """``(X*Y*Z,)`` int64: for each voxel in RAS+ C order (the order of
        ``read(...).reshape(-1, t)`` and of operators built on :attr:`shape`/:attr:`affine`),
        its column in the frame rows of :meth:`iter_frame_rows`."""
        disk_shape = tuple(int(s) for s in self._img.shape[:3])
        if not self._raw:
            return np.arange(int(np.prod(self.shape[:3])), dtype=np.int64)
        position = np.arange(int(np.prod(disk_shape)), dtype=np.int64).reshape(disk_shape, order="F")
        return np.ascontiguousarray(orientations.apply_orientation(position, self._ornt)).reshape(-1)

    def to_ras(self, values: np.ndarray) -> np.ndarray:
        """A per-voxel vector in frame-row column order ``(X*Y*Z,)`` -> ``(X, Y, Z)`` in RAS+."""
        return np.asarray(values)[self.frame_order()].reshape(self.shape[:3])

    def ras_view(self, rows: np.ndarray) -> np.ndarray:
        """Frame rows ``(t, X*Y*Z)`` from :meth:`iter_frame_rows` as ``(X, Y, Z, t)`` RAS+
        (a view: axes permuted and flipped, no copy, when the rows were streamed)."""
        if not self._raw:
            return rows.T.reshape(self.shape[:3] + (rows.shape[0],))
        disk = rows.T.reshape(tuple(int(s) for s in self._img.shape[:3]) + (rows.shape[0],), order="F")
        return orientations.apply_orientation(disk, self._ornt)

    def iter_frame_rows(self, frames_per_block: int):
        """Yield ``(start, stop, rows)`` over the whole run: ``rows (stop - start, X*Y*Z)``
        float32, C-contiguous, one frame per row, voxels in the file's own order (columns
        as :meth:`frame_order` maps them; :meth:`ras_view` gives the RAS+ block).

        A NIfTI data block is streamed from its bytes in one sequential pass (``.nii.gz``
        decoded by python-isal's igzip), one block ahead of the caller in a background
        thread (:func:`~fmri_data.read.common.read_ahead`: decoding overlaps the caller's
        work), scaled as nibabel scales (float64 ``x * slope + inter`` when the header sets
        them, then float32): the values equal ``read()``'s. Other images go through
        :meth:`read`. The rows live in two buffers used in turn: valid until the next step
        of the iteration (copy what must outlive it).

        Raises:
            InputError: truncated or corrupt data (names the file).
        """
        if not self._raw:
            for start, stop, block in self.iter_frames(frames_per_block):
                yield start, stop, np.ascontiguousarray(block.reshape(-1, stop - start).T)
            return
        proxy = self._img.dataobj
        dtype = np.dtype(proxy.dtype)
        n_voxels = int(np.prod(self._img.shape[:3]))
        slope, inter = float(proxy.slope), float(proxy.inter)
        scaled = not (slope == 1.0 and inter == 0.0)
        as_is = dtype == np.float32 and dtype.isnative and not scaled
        frame_bytes = n_voxels * dtype.itemsize
        block = min(frames_per_block, self.n_frames)
        # two buffers for the whole pass, filled in turn (a fresh one per block costs the
        # kernel its pages again)
        buffers = [np.empty((block, n_voxels), dtype=dtype) for _ in range(2)]
        converted = None if as_is else np.empty((block, n_voxels), np.float32)
        starts = range(0, self.n_frames, frames_per_block)
        sizes = [(min(start + frames_per_block, self.n_frames) - start) * frame_bytes for start in starts]
        path, offset = self.path, proxy.offset
        try:
            for start, piece in zip(starts, read_ahead(lambda: open_frames(path, offset), buffers, sizes)):
                stop = min(start + frames_per_block, self.n_frames)
                raw = piece.view(dtype).reshape(stop - start, n_voxels)
                if converted is None:
                    yield start, stop, raw
                    continue
                rows = converted[:stop - start]
                if scaled:
                    rows[...] = raw.astype(np.float64) * slope + inter
                else:
                    rows[...] = raw
                yield start, stop, rows
        except READ_ERRORS as exc:
            if getattr(exc, "bytes_read", None) is not None:
                exc = EOFError(f"data ends at frame {exc.bytes_read // frame_bytes} of {self.n_frames}")
            raise InputError(self.path, f"truncated or corrupt image data ({type(exc).__name__}: {exc})") from exc


def _header_tr(header: Any) -> tuple[float | None, str]:
    zooms = header.get_zooms()
    try:
        unit = header.get_xyzt_units()[1]
    except KeyError:  # an xyzt_units code NIfTI does not define
        unit = "unknown"
    if len(zooms) < 4 or not np.isfinite(zooms[3]) or zooms[3] <= 0:
        return None, unit
    value = float(zooms[3])
    if unit in TIME_UNITS:
        return value * TIME_UNITS[unit], unit
    return value, unit


#: largest |difference| (mm) between the qform and sform affines taken as agreement
QFORM_SFORM_TOLERANCE_MM = 1e-3


def header_warnings(img: Any) -> list[str]:
    """Ambiguities of a NIfTI header: qform and sform both set (codes > 0) but mapping voxels
    to different places (largest difference over the corners of the image). nibabel, FSL and
    fMRIPrep use the sform then; ITK/ANTs use the qform, so the two tools disagree on where
    the brain is.
    """
    header = img.header
    try:
        qform, qcode = header.get_qform(coded=True)
        sform, scode = header.get_sform(coded=True)
    except (AttributeError, ValueError, TypeError):
        return []
    if qform is None or sform is None or not qcode or not scode:
        return []
    shape = np.asarray(img.shape[:3], dtype=float) - 1
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0]) for j in (0, shape[1]) for k in (0, shape[2])]).T
    diff = float(np.abs((qform - sform) @ corners).max())
    if diff <= QFORM_SFORM_TOLERANCE_MM:
        return []
    return [(f"qform and sform disagree by up to {diff:.3g} mm; using the sform (as nibabel, FSL and fMRIPrep do; "
             "ITK/ANTs would use the qform)")]


def open_volume(path: str | Path) -> VolumeSeries:
    """Open a 4D NIfTI-1/NIfTI-2 BOLD series (``.nii`` or ``.nii.gz``) without reading voxels.

    Raises:
        InputError: the file is missing, its header is unreadable, it holds complex values
            (a phase/magnitude pair is not a BOLD series: take the magnitude first), or it
            is not 4D with at least 2 frames.
    """
    img = load_image(path)
    shape = tuple(int(s) for s in img.shape)
    if len(shape) != 4:
        raise InputError(path, f"{len(shape)}D image of shape {shape}; expected a 4D BOLD series (X, Y, Z, T)")
    if shape[3] < 2:
        raise InputError(path, f"only {shape[3]} frame; a BOLD series needs at least 2")
    check_size(path, img, shape)
    dtype = np.dtype(img.get_data_dtype())
    if dtype.kind == "c":
        raise InputError(path, f"complex-valued data ({dtype}); a BOLD series is real: store its magnitude (abs) first")
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
        dtype=dtype,
        _img=img,
        _ornt=ornt,
        warnings=header_warnings(img),
    )


def read_image_3d(path: str | Path, *, dtype: Any = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D image (brain mask, atlas) whole, in RAS+ order.

    Returns:
        ``(data (X, Y, Z), affine 4x4)``. A 4D image with one frame is squeezed.

    Raises:
        InputError: unreadable, or not 3D.
    """
    img = load_image(path)
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(path, f"image of shape {tuple(img.shape)}; expected a 3D volume")
    check_size(path, img, shape)
    try:
        data = np.asarray(img.dataobj, dtype=dtype).reshape(shape)
    except READ_ERRORS as exc:
        raise InputError(path, f"truncated or corrupt image data ({type(exc).__name__}: {exc})") from exc
    affine = np.asarray(img.affine, dtype=np.float64)
    ornt = _ras_orientation(affine)
    return orientations.apply_orientation(data, ornt), _ras_affine(affine, ornt, shape)
