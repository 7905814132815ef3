"""Atomic changes to a store after a run was committed: whole files, group attributes, groups inside a run.

These are the only writes to a store besides a conversion's :class:`~fmri_data.store.writer.RunWriter`;
:class:`~fmri_data.store.root.Store` exposes them as methods (``write_file``, ``write_bytes``,
``write_group_attrs``, ``write_run_attrs``, ``replace_in_run``). Each leaves a reader the old
content or the new one, never a truncated file or a half-written group:

* a file (``index.parquet``, ``qa.parquet``, ``models/saliency/<name>.safetensors``, a
  group's ``zarr.json``) is written on a local disk to a temporary file in the same folder
  and renamed over the old one (``os.replace``); on other fsspec filesystems it is
  written with one PUT of the whole content (nothing is written when producing it fails);
* groups inside a committed run (``saliency/<scorer>``) are written whole under
  ``_staging/`` first and only then moved into place (a directory rename on a local disk).
"""

from __future__ import annotations

import io
import json
import os
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any

import zarr

from ..read.common import IO_BYTES
from .layout import RUNS, STAGING, is_local

if TYPE_CHECKING:  # pragma: no cover
    from .root import Store

#: Writes a group's content (arrays, subgroups, attributes) into the empty group it is given.
GroupWrite = Callable[[zarr.Group], None]


# ---------------------------------------------------------------------------- files
def write_file(store: Store, rel: str, write: Callable[[IO[bytes]], None]) -> None:
    """Write the file ``rel`` (relative to the store root) atomically.

    Args:
        store: the store.
        rel: path below the store root (``"index.parquet"``, ``"runs/<id>/zarr.json"``).
        write: ``write(fh)`` writes the whole content into the binary file object ``fh``.

    Local disk: ``write`` goes to ``<rel>.<token>.tmp`` in the same folder, which is flushed,
    synced and renamed over ``rel``; if ``write`` raises, the temporary file is removed and
    ``rel`` is untouched. Other filesystems: the content is collected in memory and stored
    with one PUT once ``write`` returned.

    Raises:
        Whatever ``write`` raises, and ``OSError`` from the filesystem.
    """
    path = f"{store.path}/{rel}"
    folder = path.rsplit("/", 1)[0]
    if not is_local(store.fs):
        buffer = io.BytesIO()
        write(buffer)
        store.fs.makedirs(folder, exist_ok=True)
        store.fs.pipe_file(path, buffer.getvalue())
        return
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_bytes(store: Store, rel: str, data: bytes | Sequence[bytes]) -> None:
    """Write ``data`` (one byte string, or several written in order) to the file ``rel``
    atomically (:func:`write_file`)."""

    def write(fh: IO[bytes]) -> None:
        for piece in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
            view = memoryview(piece)
            for start in range(0, len(view), IO_BYTES):
                fh.write(view[start:start + IO_BYTES])

    write_file(store, rel, write)


def write_group_attrs(store: Store, key: str, attrs: dict[str, Any]) -> None:
    """Replace the attributes of the existing group ``key`` (``""`` = the root) in one step.

    The group's ``zarr.json`` is read, its ``attributes`` replaced by ``attrs`` (JSON-ready
    values) and written back with :func:`write_file`: a reader sees the old or the new
    ``zarr.json``, never a mix. Arrays and subgroups are not touched.

    Raises:
        FileNotFoundError: the group does not exist. ValueError: its ``zarr.json`` is not JSON.
    """
    rel = f"{key}/zarr.json" if key else "zarr.json"
    meta = json.loads(store.fs.cat_file(f"{store.path}/{rel}"))
    meta["attributes"] = attrs
    write_bytes(store, rel, json.dumps(meta, indent=2).encode())


# ---------------------------------------------------------------------------- groups inside a run
def _tag(name: str) -> str:
    return name.replace("/", "-")


def clear_replace_staging(store: Store, run_id: str, name: str) -> None:
    """Remove staging copies of ``runs/<run_id>/<name>`` left by an interrupted :func:`replace_in_run`."""
    folder = f"{store.path}/{STAGING}"
    if not store.fs.exists(folder):
        return
    prefix = f"{run_id}.{_tag(name)}."
    for entry in store.fs.ls(folder, detail=False):
        if entry.rstrip("/").rsplit("/", 1)[-1].startswith(prefix):
            store.fs.rm(entry, recursive=True)


def _remove(store: Store, rel: str) -> None:
    path = f"{store.path}/{rel}"
    if store.fs.exists(path):
        store.fs.rm(path, recursive=True)


def _swap(store: Store, target: str, staging: str, aside: str) -> None:
    """Move ``staging`` to ``target``; an existing ``target`` is moved aside first, then removed.

    If the second move fails the old group is moved back. A crash between the two moves
    leaves no group at ``target`` (the old one waits in ``_staging/`` and is removed by the
    next replacement of that group).
    """
    fs, base = store.fs, store.path
    aside_used = fs.exists(f"{base}/{target}")
    if aside_used:
        fs.mv(f"{base}/{target}", f"{base}/{aside}", recursive=True)
    try:
        fs.mv(f"{base}/{staging}", f"{base}/{target}", recursive=True)
    except BaseException:
        if aside_used and not fs.exists(f"{base}/{target}"):
            fs.mv(f"{base}/{aside}", f"{base}/{target}", recursive=True)
        _remove(store, staging)
        raise
    if aside_used:
        _remove(store, aside)


def replace_in_run(
    store: Store,
    run_id: str,
    writes: Mapping[str, GroupWrite],
    remove: Iterable[str] = (),
    group_attrs: Mapping[str, dict[str, Any]] | None = None,
) -> None:
    """Add or replace groups inside the committed run ``runs/<run_id>`` and remove others.

    Every group of ``writes`` is first written whole into its own staging group
    ``_staging/<run_id>.<name with / as ->.<token>``; only when all were written are they
    moved into place one by one (a group being replaced is moved aside, then removed), then
    the groups of ``remove`` are removed the same way, then the attributes of
    ``group_attrs`` are rewritten (:func:`write_group_attrs`). If a write fails, every
    staging group is removed and the run is left exactly as it was.

    Args:
        store: the store.
        run_id: a committed run.
        writes: ``{name: write}``: ``name`` is a group path inside the run
            (``"saliency/dvars"``); ``write(group)`` fills the empty staging group.
        remove: group or array paths inside the run to remove (absent ones are ignored).
        group_attrs: ``{name: attributes}`` (JSON-ready) of groups inside the run
            (``{"saliency": {"skipped": {...}}}``): created when missing, else their
            attributes replaced. A missing parent group of ``writes`` not named here is
            created with no attributes.

    Raises:
        ValueError: a path of ``remove`` is one of ``writes`` or a parent of one.
        Whatever a ``write`` raises (after cleaning up), ``OSError`` from the filesystem.
    """
    fs, base = store.fs, store.path
    run_key = f"{RUNS}/{run_id}"
    remove = list(remove)
    clash = [r for r in remove for w in writes if w == r or w.startswith(f"{r}/")]
    if clash:
        raise ValueError(f"{store.url}/{run_key}: cannot both write and remove {', '.join(sorted(set(clash)))}")
    for name in [*writes, *remove]:
        clear_replace_staging(store, run_id, name)
    staged: list[tuple[str, str]] = []
    try:
        for name, write in writes.items():
            staging = f"{STAGING}/{run_id}.{_tag(name)}.{secrets.token_hex(4)}"
            staged.append((name, staging))
            write(zarr.open_group(store=store.zarr_store, path=staging, mode="w"))
    except BaseException:
        for _, staging in staged:
            _remove(store, staging)
        raise
    group_attrs = dict(group_attrs or {})
    parents = []
    for name, _ in staged:
        parts = name.split("/")
        parents += ["/".join(parts[:depth]) for depth in range(1, len(parts))]
    created = set()
    for name in [*parents, *group_attrs]:
        key = f"{run_key}/{name}"
        if name not in created and not fs.exists(f"{base}/{key}/zarr.json"):
            zarr.open_group(store=store.zarr_store, path=key, mode="w", attributes=group_attrs.get(name, {}))
            created.add(name)
    for name, staging in staged:
        _swap(store, f"{run_key}/{name}", staging, f"{staging}.old")
    for name in remove:
        target = f"{run_key}/{name}"
        if fs.exists(f"{base}/{target}"):
            aside = f"{STAGING}/{run_id}.{_tag(name)}.{secrets.token_hex(4)}.old"
            fs.mv(f"{base}/{target}", f"{base}/{aside}", recursive=True)
            _remove(store, aside)
    for name, attrs in group_attrs.items():
        if name not in created:
            write_group_attrs(store, f"{run_key}/{name}", attrs)
