"""The one ``key=value`` parser: recipe overrides, training-config overrides, storage and
cluster options, and the probe's label filters all go through it.

Values are YAML scalars or lists (``tr=2.0`` -> ``2.0``, ``anon=true`` -> ``True``,
``atlases=[a, b]`` -> ``["a", "b"]``); an empty value is ``None``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import yaml

from ..errors import FmriDataError


class OverrideError(FmriDataError, ValueError):
    """A ``key=value`` text is malformed (no ``=``, an empty key, or a value that is not YAML)."""


def split_pair(text: str, what: str = "option", form: str = "key=value") -> tuple[str, str]:
    """``"a.b = 2"`` -> ``("a.b", " 2")``: the stripped key and the raw value.

    Raises:
        OverrideError: ``text`` has no ``=`` or an empty key (the message names ``what``
            and the expected ``form``).
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise OverrideError(f"{what} '{text}' is not of the form {form}")
    return key, raw


def yaml_value(raw: str) -> Any:
    """A raw value parsed as YAML; ``""`` -> ``None``.

    Raises:
        OverrideError: the value is not valid YAML.
    """
    if not raw.strip():
        return None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise OverrideError(f"value '{raw.strip()}' is not valid YAML ({str(exc).splitlines()[0]})") from None


def comma_list(raw: str) -> list[str]:
    """``"face, house"`` -> ``["face", "house"]`` (a label filter's values)."""
    return [v.strip() for v in raw.split(",")]


def parse_pairs(pairs: Iterable[str], what: str = "option",
                value: Callable[[str], Any] = yaml_value) -> dict[str, Any]:
    """``["anon=true", "endpoint_url=http://x"]`` -> ``{"anon": True, "endpoint_url": "http://x"}``.

    Later pairs win over earlier ones with the same key.

    Raises:
        OverrideError: a pair is malformed.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, raw = split_pair(pair, what)
        out[key] = value(raw)
    return out


def nested(key: str, value: Any, what: str = "override") -> dict[str, Any]:
    """``("temporal.tr", 2.0)`` -> ``{"temporal": {"tr": 2.0}}``.

    Raises:
        OverrideError: the dotted key has an empty part.
    """
    parts = key.split(".")
    if not all(p.strip() for p in parts):
        raise OverrideError(f"{what} key '{key}' has an empty part")
    out: dict[str, Any] = {}
    node = out
    for part in parts[:-1]:
        node = node.setdefault(part.strip(), {})
    node[parts[-1].strip()] = value
    return out
