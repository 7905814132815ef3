"""fmri-data: BIDS fMRI datasets -> chunked, sharded Zarr v3 stores for fMRI foundation models.

Python API::

    from fmri_data import convert, Store
    report = convert("ds000105", "out.zarr", "neurostorm", atlas_dir="atlases/")
    store = Store.open("out.zarr")

- ``convert(bids_root, output, recipe="default", ...)`` -> ``ConvertReport``: every run of a
  BIDS dataset (raw or fMRIPrep derivatives) into one Zarr v3 store (``fmri_data.convert``).
- ``discover(bids_root, ...)`` -> ``list[RunSpec]``: the runs a conversion would read.
- ``Store.open(url)``: runs, their arrays and attributes, ``index.parquet``, ``qa.parquet``.
- ``load_recipe(name_or_path, overrides)``: a bundled or YAML recipe, validated.
- ``validate_store(url, deep=False)``: a store against its schemas and checksums.
- ``fmri_data.load``: ``build_index``, ``WindowDataset``, ``WindowLoader`` (PyTorch training batches).
- ``fmri_data.train``: the model families; ``fmri_data.qa``: the QA report.

The command line is ``fmri-data --help``.
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


def __dir__() -> list[str]:  # help(fmri_data) and tab completion list the lazy exports
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover
    from .convert import ConvertReport, convert
    from .discover import discover
    from .config.recipe import load_recipe
    from .store.root import Store
    from .store.validate import validate_store
