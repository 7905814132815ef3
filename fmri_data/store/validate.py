"""Check a store against its contract (``schemas/``): attributes and array layout."""

from __future__ import annotations

from typing import Any

import numpy as np

import hashlib

from ..errors import StoreError
from ..config.schema import validate
from .layout import RUNS
from .root import Store
from .saliency_group import check_run_saliency


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


def _axis0_blocks(array: Any) -> list[tuple[int, int]]:
    step = array.shards[0] if array.shards is not None else array.chunks[0]
    n = array.shape[0] if array.ndim else 1
    return [(start, min(start + step, n)) for start in range(0, max(n, 1), step)]


def missing_shards(store: Store, run_id: str, name: str) -> list[str]:
    """Storage keys of shards (or chunks) of ``runs/<run_id>/<name>`` that do not exist.

    Zarr reads a missing shard as fill values, silently; this lists them instead.
    """
    group = store.run(run_id)
    array = group[name]
    grid = array.shards if array.shards is not None else array.chunks
    counts = [-(-n // c) for n, c in zip(array.shape, grid)] or [1]
    base = f"{store.path}/{RUNS}/{run_id}/{name}/c"
    present = set()
    try:
        for path in store.fs.find(base):
            present.add(path[len(base) + 1 :] if path.startswith(base) else path)
    except FileNotFoundError:
        pass
    missing = []
    for index in np.ndindex(*counts):
        key = "/".join(str(i) for i in index) if array.ndim else "0"
        if key not in present:
            missing.append(f"{name}/c/{key}")
    return missing


def verify_run_contents(store: Store, run_id: str) -> list[str]:
    """Re-read every array of a run and compare with the SHA-256 recorded at write time.

    Returns:
        Problems naming the run, the array and the shard (first frame) that is missing,
        unreadable (failed CRC-32C) or different; empty when every array verifies.
    """
    where = f"{store.url}/{RUNS}/{run_id}"
    try:
        attrs = store.run_attrs(run_id)
    except StoreError as exc:
        return [str(exc)]
    group = store.run(run_id)
    problems: list[str] = []
    for name in attrs["outputs"]:
        expected = attrs.get("checksums", {}).get(name)
        if name not in group:
            problems.append(f"{where}/{name}: missing")
            continue
        for key in missing_shards(store, run_id, name):
            problems.append(f"{where}/{key}: shard missing")
        array = group[name]
        digest = hashlib.sha256()
        readable = True
        for start, stop in _axis0_blocks(array):
            try:
                values = array[start:stop] if array.ndim else array[...]
            except Exception as exc:  # zarr raises ValueError on a CRC mismatch, others on truncation
                problems.append(f"{where}/{name}: frames [{start}, {stop}) unreadable ({type(exc).__name__}: {exc})")
                readable = False
                break
            digest.update(np.ascontiguousarray(values).tobytes())
        if readable and expected is not None and digest.hexdigest() != expected:
            problems.append(f"{where}/{name}: contents differ from the checksum recorded at write time")
        if expected is None:
            problems.append(f"{where}/{name}: no checksum recorded")
    return problems


def validate_store(url: str, storage_options: dict[str, Any] | None = None, *, deep: bool = False) -> list[str]:
    """Problems found in a whole store: root attributes, every run's attributes and arrays.

    Args:
        url: store location.
        storage_options: fsspec options.
        deep: also re-read every array and verify its SHA-256 and chunk CRCs (reads the
            whole store).

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
        if deep:
            problems += verify_run_contents(store, run_id)
    return problems
