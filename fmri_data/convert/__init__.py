"""Convert a BIDS dataset into a training store: one independent task per run.

Per run: read the sources lazily (discover -> read), map every frame through precomputed
linear operators onto the target grid and the atlas parcels (resample), resample the
series in time, normalize (derive), and write the run into a staging group that is
committed atomically (write). Runs that fail record a one-line error naming the file and
the cause; the others still convert. A second conversion into the same store skips the
runs already complete.

Modules: ``dataset`` (the whole dataset), ``run`` (one run), ``volume`` / ``surface`` /
``tables`` (one kind of output each), ``context`` (per-run state and operator caches).
"""

from .dataset import ConvertReport, convert
from .run import RunResult, convert_run

__all__ = ["ConvertReport", "RunResult", "convert", "convert_run"]
