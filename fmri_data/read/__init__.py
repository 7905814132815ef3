"""Read the sources of a run: NIfTI volumes, GIFTI surfaces, CIFTI-2 series, BIDS tables, remote files.

Readers never load a whole run: they return an object whose ``read(start, stop)`` gives
frames ``[start, stop)`` as float32. Every failure raises
:class:`~fmri_data.errors.InputError` naming the file.
"""

from .cifti import CiftiSeries, open_cifti
from .common import file_sha256, resolve_tr
from .gifti import SurfaceSeries, open_gifti_series
from .nifti import VolumeSeries, open_volume, read_image_3d
from .tables import read_confounds, read_events

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
