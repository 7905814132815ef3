"""Recipes: declarative conversion settings, one YAML file per model family.

A recipe names a target (grid, TR, normalization, atlases, chunking). Recipes live in
``pipelines/*.yaml``; one may ``extends`` another and override some keys. After
``extends`` is resolved the result must validate against
``schemas/recipe.schema.json``.
"""

from __future__ import annotations

import copy
import os
import hashlib
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .resources import pipelines_dir, schemas_dir
from .overrides import OverrideError, nested, split_pair, yaml_value
from ..errors import RecipeError

Recipe = dict[str, Any]


def available_recipes() -> list[str]:
    """Names of the recipes bundled with fmri-data (``pipelines/*.yaml``)."""
    return sorted(p.stem for p in pipelines_dir().glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise RecipeError(f"{path}: cannot read recipe ({exc})") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping")
    return data


def _resolve_path(name_or_path: str | Path) -> Path:
    """A recipe file when the argument looks like a path (a ``.yaml``/``.yml`` suffix or a
    folder separator), else a bundled recipe name: a folder or file named ``brainlm`` in the
    working directory never shadows the bundled ``brainlm``."""
    text = str(name_or_path)
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or "/" in text or os.sep in text:
        if not path.is_file():
            raise RecipeError(f"{path}: recipe file not found")
        return path
    bundled = pipelines_dir() / f"{text}.yaml"
    if not bundled.is_file():
        hint = f" (for the file '{text}' here, write ./{text})" if path.is_file() else ""
        raise RecipeError(f"unknown recipe '{text}'; bundled recipes: {', '.join(available_recipes())}{hint}")
    return bundled


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated recursively by ``override``.

    Mappings merge key by key; any other value (lists, scalars, ``None``) replaces.
    """
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load_chain(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path in seen:
        raise RecipeError(f"{path}: recipe 'extends' forms a cycle")
    data = _read_yaml(path)
    parent = data.get("extends")
    if parent is None:
        return data
    base = _load_chain(_resolve_path(parent), seen + (path,))
    return deep_merge(base, data)


def parse_override(text: str) -> dict[str, Any]:
    """Turn ``"temporal.tr=2.0"`` into ``{"temporal": {"tr": 2.0}}`` (value parsed as YAML).

    Raises:
        RecipeError: ``text`` is not ``key.path=value`` or its value is not YAML.
    """
    try:
        key, raw = split_pair(text, "override", "key.path=value")
        return nested(key, yaml_value(raw))
    except OverrideError as exc:
        raise RecipeError(str(exc)) from None


def validate_recipe(recipe: Recipe) -> None:
    """Validate a resolved recipe against ``schemas/recipe.schema.json``.

    Raises:
        RecipeError: naming the first offending key and why.
    """
    schema = json.loads((schemas_dir() / "recipe.schema.json").read_text())
    try:
        jsonschema.validate(recipe, schema)
    except jsonschema.ValidationError as exc:
        where = ".".join(str(p) for p in exc.absolute_path) or "<root>"
        raise RecipeError(f"recipe '{recipe.get('name', '?')}': {where}: {exc.message}") from None


def load_recipe(name_or_path: str | Path = "default", overrides: list[str] | None = None) -> Recipe:
    """Load a bundled recipe by name (``"neurostorm"``) or a YAML file by path.

    Args:
        name_or_path: bundled recipe name or path to a ``.yaml`` file.
        overrides: ``key.path=value`` strings applied after ``extends`` is resolved.

    Returns:
        The resolved recipe as a plain dict (``extends`` removed), validated.

    Raises:
        RecipeError: unknown name, unreadable YAML, or a schema violation.
    """
    recipe = _load_chain(_resolve_path(name_or_path))
    for text in overrides or []:
        recipe = deep_merge(recipe, parse_override(text))
    recipe.pop("extends", None)
    validate_recipe(recipe)
    return recipe


#: Recipe sections that say how to run, not what to produce: not part of the fingerprint.
#: ``qa`` only adds run attributes (quality metrics) and report thresholds, never array values.
EXECUTION_KEYS = ("description", "compute", "qa", "stats")  # settings that never change a stored array


def with_compression(recipe: Recipe, compression: dict[str, Any]) -> Recipe:
    """``recipe`` with ``store.compression`` replaced (a new dict; the codec is lossless, so
    the arrays' values are those of ``recipe``): how a conversion resumes a store made with
    another codec (an earlier default) and keeps that store's codec."""
    return {**recipe, "store": {**recipe["store"], "compression": dict(compression)}}


def recipe_hash(recipe: Recipe) -> str:
    """Stable 16-hex-digit fingerprint of what a recipe produces (ignores description, compute and qa)."""
    payload = {k: v for k, v in recipe.items() if k not in EXECUTION_KEYS}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
