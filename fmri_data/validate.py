"""Check a store against its contract (``schemas/``): attributes and array layout."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import StoreError
from .saliency import check_run_saliency
from .schema import validate
from .store import RUNS, Store


def _check_series(problems: list[str], where: str, array: Any, n_frames: int, frame_shape: tuple, chunk_frames: int) -> None:
    expected = (n_frames, *frame_shape)
    if tuple(array.shape) != expected:
        problems.append(f"{where}: shape {tuple(array.shape)}, expected {expected}")
    if array.chunks[0] != chunk_frames:
        problems.append(f"{where}: {array.chunks[0]} frames per chunk, recipe says {chunk_frames}")
    if array.shards is None:
        problems.append(f"{where}: not sharded")
    elif array.shards[0] % array.chunks[0]:
        problems.append(f"{where}: shard of {array.shards[0]} frames is not a whole number of chunks")


def validate_run(store: Store, run_id: str) -> list[str]:
    """Problems found in one run (empty list = valid)."""
    where = f"{store.url}/{RUNS}/{run_id}"
    try:
        attrs = store.run_attrs(run_id)
    except StoreError as exc:
        return [str(exc)]
    problems: list[str] = []
    group = store.run(run_id)
    chunk_frames = store.recipe["store"]["chunk_frames"]
    n_frames = attrs["n_frames"]
    for name in attrs["outputs"]:
        if name not in group:
            problems.append(f"{where}: output '{name}' listed in attributes but missing")
    volume = attrs.get("volume")
    if volume is not None and "bold" in group:
        bold = group["bold"]
        _check_series(problems, f"{where}/bold", bold, n_frames, tuple(volume["shape"]), chunk_frames)
        if str(bold.dtype) != volume["dtype"]:
            problems.append(f"{where}/bold: dtype {bold.dtype}, attributes say {volume['dtype']}")
        mask = group["brain_mask"][...] if "brain_mask" in group else None
        if mask is None or mask.shape != tuple(volume["shape"]) or mask.dtype != np.bool_:
            problems.append(f"{where}/brain_mask: missing or not a bool volume of shape {volume['shape']}")
        elif int(mask.sum()) != volume["n_brain_voxels"]:
            problems.append(f"{where}/brain_mask: {int(mask.sum())} voxels, attributes say {volume['n_brain_voxels']}")
    for name in attrs["outputs"]:
        if not name.startswith("roi/") or name not in group:
            continue
        array = group[name]
        roi_attrs = dict(array.attrs)
        try:
            validate(roi_attrs, "run", f"{where}/{name}", definition="roi_attrs")
        except StoreError as exc:
            problems.append(str(exc))
            continue
        _check_series(problems, f"{where}/{name}", array, n_frames, (len(roi_attrs["labels"]),), chunk_frames)
    problems += check_run_saliency(store, group, attrs, where)
    return problems


def validate_store(url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Problems found in a whole store: root attributes, every run's attributes and arrays.

    Returns:
        Human-readable problems, each naming the group or array; empty when valid.
    """
    try:
        store = Store.open(url, storage_options)
    except StoreError as exc:
        return [str(exc)]
    problems: list[str] = []
    for run_id in store.run_ids():
        problems += validate_run(store, run_id)
    return problems
