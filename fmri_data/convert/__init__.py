"""Convert a BIDS dataset into a training store: one independent task per run.

Per run: read the sources lazily (discover -> read), map every frame through precomputed
linear operators onto the target grid and the atlas parcels (resample), resample the
series in time, normalize (derive), and write the run into a staging group that is
committed atomically (write). Runs that fail record a one-line error naming the file and
the cause; the others still convert. A second conversion into the same store skips the
runs already complete.

Modules: ``dataset`` (the whole dataset), ``run`` (one run), ``outputs`` (one module per kind
of output, each declaring the values it needs and provides; ``outputs.OUTPUT_KINDS`` is their
order), ``context`` (a run's read-only inputs and operator caches).
"""

import sys
import types

from .dataset import ConvertReport, convert
from .run import RunResult, convert_run

__all__ = ["ConvertReport", "RunResult", "convert", "convert_run"]


class _CallableModule(types.ModuleType):
    """This module, callable as its function of the same name (see ``fmri_data/__init__.py``)."""

    def __call__(self, *args, **kwargs):
        return convert(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
