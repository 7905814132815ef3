"""fmri-data: BIDS fMRI datasets -> chunked, sharded Zarr v3 stores for fMRI foundation models.

Python API::

    from fmri_data import convert, Store
    report = convert("ds000105", "out.zarr", "neurostorm", atlas_dir="atlases/")
    store = Store.open("out.zarr")
"""

from __future__ import annotations

from importlib import metadata as _metadata
from typing import TYPE_CHECKING, Any

try:
    __version__ = _metadata.version("fmri-data")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = ["ConvertReport", "Store", "convert", "discover", "load_recipe", "validate_store"]

_EXPORTS = {
    "convert": ("fmri_data.convert", "convert"),
    "ConvertReport": ("fmri_data.convert", "ConvertReport"),
    "discover": ("fmri_data.discover", "discover"),
    "load_recipe": ("fmri_data.config.recipe", "load_recipe"),
    "Store": ("fmri_data.store.root", "Store"),
    "validate_store": ("fmri_data.store.validate", "validate_store"),
}


# ``convert`` and ``discover`` are also the names of a subpackage and a module. Once either is
# imported, Python binds ``fmri_data.convert`` (``fmri_data.discover``) to it, so both are
# callable modules that call the function of the same name: ``from fmri_data import convert``
# gives something that converts, whichever import came first.
def __getattr__(name: str) -> Any:  # lazy imports keep `import fmri_data` cheap
    if name in _EXPORTS:
        import importlib

        module, attr = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attr)
        if name not in ("convert", "discover"):  # those two are also subpackage/module names (see below)
            globals()[name] = value
        return value
    raise AttributeError(f"module 'fmri_data' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .convert import ConvertReport, convert
    from .discover import discover
    from .config.recipe import load_recipe
    from .store.root import Store
    from .store.validate import validate_store
