"""Locate the files that ship beside the code: JSON Schemas and pipeline recipes.

The repository's top-level ``schemas/`` and ``pipelines/`` folders are the source of
truth. A wheel carries copies of both under ``fmri_data/_data/``; an editable install
or a source checkout reads the top-level folders directly.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]  # fmri_data/


def _locate(name: str) -> Path:
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"fmri-data installation is missing its '{name}' folder")


def schemas_dir() -> Path:
    """Folder holding the JSON Schemas (``*.schema.json``)."""
    return _locate("schemas")


def pipelines_dir() -> Path:
    """Folder holding the bundled recipes (``*.yaml``)."""
    return _locate("pipelines")
