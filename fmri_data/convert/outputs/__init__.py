"""The outputs a run can have, one module each: volume, surface/CIFTI ROI series, flat maps, tables, saliency, QA.

Each module declares its :class:`~.base.OutputKind` (the values it needs and provides);
:data:`OUTPUT_KINDS` is their fixed order, in which a run's outputs are built
(:func:`~.base.build_outputs`). Adding a kind: its module, and one entry here.
"""

from . import flat, qa, saliency, surface, tables, volume
from .base import OutputKind, check_order

#: Output kinds in build order: the series kinds (each later ROI source defers to earlier
#: atlas parcels), then the kinds that describe a run with stored series.
OUTPUT_KINDS: tuple[OutputKind, ...] = (
    volume.KIND,
    surface.CIFTI_KIND,
    surface.GIFTI_KIND,
    flat.KIND,
    tables.KIND,
    saliency.KIND,
    qa.KIND,
)

check_order(OUTPUT_KINDS)

__all__ = ["OUTPUT_KINDS", "OutputKind"]
