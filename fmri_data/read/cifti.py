"""Lazy CIFTI-2 series reader (dense and parcellated), time first."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ..errors import InputError

from .common import READ_ERRORS, load_image



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
        except READ_ERRORS as exc:
            raise InputError(self.path, f"truncated or corrupt CIFTI data ({type(exc).__name__}: {exc})") from exc


def open_cifti(path: str | Path) -> CiftiSeries:
    """Open a CIFTI-2 series lazily.

    Raises:
        InputError: not CIFTI-2, no series axis in seconds, or an unsupported second axis.
    """
    img = load_image(path)
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

