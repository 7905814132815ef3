"""JSON Schema contracts of the store (``schemas/*.schema.json``), validated on write and open."""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import jsonschema
import numpy as np

from .resources import schemas_dir
from ..errors import StoreError

SCHEMA_VERSION = "1.0.0"


@functools.lru_cache(maxsize=None)
def load_schema(name: str) -> dict[str, Any]:
    """The JSON Schema ``schemas/<name>.schema.json`` as a dict."""
    return json.loads((schemas_dir() / f"{name}.schema.json").read_text())


def validate(instance: dict[str, Any], name: str, where: str, definition: str | None = None) -> None:
    """Validate ``instance`` against schema ``name`` (or its ``$defs/<definition>``).

    Raises:
        StoreError: ``"<where>: <json path>: <message>"``.
    """
    schema = load_schema(name)
    if definition is not None:
        schema = {**schema["$defs"][definition], "$defs": schema["$defs"]}
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    error = jsonschema.exceptions.best_match(validator.iter_errors(instance))
    if error is not None:
        path = ".".join(str(p) for p in error.absolute_path) or "<attributes>"
        raise StoreError(f"{where}: {path}: {error.message}")


def to_json(value: Any) -> Any:
    """Convert numpy scalars/arrays, tuples and non-finite floats into strict JSON values.

    NaN and infinities become None (Zarr writes attributes as JSON, where they are invalid).
    """
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_json(value.tolist())
    if isinstance(value, np.generic):
        return to_json(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
