"""Check a store against its contract (``schemas/``): attributes, array layout and contents.

Every finding is reported, never only the first: a run whose group cannot be read, an
array whose chunks fail their CRC-32C or a run whose attributes were edited after the
commit is one problem naming the run and the file, and the check goes on with the rest.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import zarr

from ..config.schema import validate
from ..errors import StoreError
from .layout import ATTRS_CHECKSUM, INDEX, RUNS, ContentDigest, attrs_digest
from .root import Store
from .saliency_group import check_run_saliency

log = logging.getLogger("fmri_data.store.validate")

#: The note for a run committed before run attributes were checksummed (not a problem).
NO_ATTRS_CHECKSUM = "no attribute checksum (written by an older version)"


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


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")


# ---------------------------------------------------------------------------- run groups
def run_group_problem(store: Store, run_id: str) -> str | None:
    """Why ``runs/<run_id>`` is not a complete run that readers can see, or None when it is.

    Returns:
        One line naming the run group's ``zarr.json`` and what is wrong with it: missing,
        unreadable, not JSON, without a ``status`` attribute, or with a status other than
        ``complete`` (such a run is invisible to :meth:`Store.run_ids` and every reader).
    """
    rel = f"{RUNS}/{run_id}/zarr.json"
    where = f"{store.url}/{rel}"
    try:
        raw = store.fs.cat_file(f"{store.path}/{rel}")
    except FileNotFoundError:
        return f"{where}: missing; run {run_id} is invisible to readers (an interrupted commit? rerun convert)"
    except OSError as exc:
        return f"{where}: unreadable ({_error(exc)}); run {run_id} is invisible to readers"
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        return f"{where}: unreadable, not JSON ({_error(exc)}); run {run_id} is invisible to readers"
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    if not isinstance(attrs, dict) or "status" not in attrs:
        return f"{where}: no 'status' attribute; run {run_id} is invisible to readers"
    if attrs["status"] != "complete":
        return f"{where}: status '{attrs['status']}', not 'complete'; run {run_id} is invisible to readers"
    return None


def run_group_ids(store: Store) -> list[str]:
    """Names of every group folder under ``runs/``, complete or not, sorted."""
    try:
        entries = store.fs.ls(f"{store.path}/{RUNS}", detail=True)
    except FileNotFoundError:
        return []
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")


def survey_runs(store: Store, listed: Iterable[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The complete runs, and the runs the store holds or lists that readers cannot see.

    One read of each run group's ``zarr.json`` (as :meth:`Store.run_ids`).

    Args:
        store: the store.
        listed: run ids another record says are complete; each must have a complete run
            group. None: those ``index.parquet`` lists as complete (none when it is
            missing or unreadable; :func:`validate_store` reports that).

    Returns:
        ``(complete run ids, {run_id: problem})``, both in run-id order; a problem
        (:func:`run_group_problem`) is given for every folder under ``runs/`` and every
        ``listed`` run that is not a complete run.
    """
    listed = set(_complete_in_index(store, []) if listed is None else listed)
    complete: list[str] = []
    broken: dict[str, str] = {}
    for run_id in sorted(set(run_group_ids(store)) | listed):
        problem = run_group_problem(store, run_id)
        if problem is None:
            complete.append(run_id)
        else:
            broken[run_id] = problem + ("; index.parquet lists it as complete" if run_id in listed else "")
    return complete, broken


def broken_runs(store: Store, listed: Iterable[str] | None = None) -> dict[str, str]:
    """``{run_id: problem}`` of the runs readers cannot see (:func:`survey_runs`)."""
    return survey_runs(store, listed)[1]


def _complete_in_index(store: Store, problems: list[str]) -> list[str]:
    """Run ids ``index.parquet`` lists as complete; an unreadable index is a problem."""
    try:
        index = store.read_index()
    except Exception as exc:  # noqa: BLE001 - pyarrow, fsspec and StoreError alike: report, go on
        problems.append(str(exc) if isinstance(exc, StoreError) else f"{store.url}/{INDEX}: unreadable ({_error(exc)})")
        return []
    if not len(index) or "run_id" not in index or "status" not in index:
        return []
    return [str(r) for r in index.loc[index["status"] == "complete", "run_id"]]


# ---------------------------------------------------------------------------- arrays
def _grid(array: Any) -> tuple[int, ...]:
    return tuple(array.shards if array.shards is not None else array.chunks)


def _blocks(array: Any, row: tuple[int, int] | None = None) -> Iterator[tuple[str, tuple[slice, ...]]]:
    """``(storage key relative to the array, region)`` of each shard (or chunk, unsharded),
    in C order; ``row`` keeps those whose axis-0 range is ``[start, stop)``."""
    if not array.ndim:
        yield "c", ()
        return
    grid = _grid(array)
    counts = [max(-(-n // g), 1) for n, g in zip(array.shape, grid)]
    for index in np.ndindex(*counts):
        region = tuple(slice(i * g, min((i + 1) * g, n)) for i, g, n in zip(index, grid, array.shape))
        if row is None or (region[0].start, region[0].stop) == row:
            yield "c/" + "/".join(str(i) for i in index), region


def corrupt_blocks(array: Any, row: tuple[int, int] | None = None) -> list[tuple[str, tuple[slice, ...], str]]:
    """Shard (chunk, when unsharded) files of a Zarr array that cannot be read.

    Each shard is read on its own (every chunk's CRC-32C checked, :func:`.layout.compressors`).

    Args:
        array: a Zarr array.
        row: only the shards whose axis-0 range is ``[start, stop)`` (None: all).

    Returns:
        ``(storage key relative to the array, e.g. "c/1/0/0/0", region, "ErrorType: message")``
        for each unreadable one (a failed CRC-32C, a truncated or undecodable file), in C order.
    """
    out = []
    for key, region in _blocks(array, row):
        try:
            array[region] if region else array[...]
        except Exception as exc:  # noqa: BLE001 - zarr raises ValueError on a CRC mismatch, others on truncation
            out.append((key, region, _error(exc)))
    return out


def _unreadable(store: Store, run_id: str, name: str, array: Any, row: tuple[int, int] | None = None) -> list[str]:
    """One problem per shard (chunk) file of ``runs/<run_id>/<name>`` that cannot be read,
    naming the run, the array and the file (and, for a time series, its frames)."""
    where = f"{store.url}/{RUNS}/{run_id}/{name}"
    out = []
    for key, region, error in corrupt_blocks(array, row):
        file = f"{RUNS}/{run_id}/{name}/{key}"
        if array.shards is not None:
            out.append(f"{where}: frames [{region[0].start}, {region[0].stop}) unreadable in shard file {file} ({error})")
        else:
            out.append(f"{where}: corrupt, file {file} unreadable ({error})")
    return out


def read_run_array(store: Store, run_id: str, name: str) -> np.ndarray:
    """Read the small array ``runs/<run_id>/<name>`` (a mask, a normalization map) whole.

    Returns:
        The array's values (stored shape and dtype).

    Raises:
        StoreError: one line naming the run, the array and the shard (chunk) file that is
            corrupt, or the array's ``zarr.json`` when its metadata cannot be read.
    """
    try:
        array = store.run(run_id)[name]
    except StoreError:
        raise
    except Exception as exc:  # KeyError, JSON and zarr metadata errors alike
        raise StoreError(f"{store.url}/{RUNS}/{run_id}/{name}: cannot open {RUNS}/{run_id}/{name}/zarr.json ({_error(exc)})") from exc
    try:
        return array[...]
    except Exception as exc:
        found = _unreadable(store, run_id, name, array)
        raise StoreError(found[0] if found else f"{store.url}/{RUNS}/{run_id}/{name}: unreadable ({_error(exc)})") from exc


def validate_run(store: Store, run_id: str, notes: list[str] | None = None) -> list[str]:
    """Problems found in one run (empty list = valid): its group, attributes (schema and
    checksum), array layout, brain mask and saliency groups.

    Args:
        store: the store.
        run_id: a run group under ``runs/``.
        notes: when given, findings that are not problems (a run committed before
            attributes were checksummed, :data:`NO_ATTRS_CHECKSUM`) are appended here;
            otherwise they are logged at WARNING on ``fmri_data.store.validate``.

    Returns:
        One line per problem, each naming the run and the array or file.
    """
    where = f"{store.url}/{RUNS}/{run_id}"
    problem = run_group_problem(store, run_id)
    if problem is not None:
        return [problem]
    try:
        attrs = store.run_attrs(run_id)
    except StoreError as exc:
        return [str(exc)]
    problems: list[str] = []
    if ATTRS_CHECKSUM not in attrs:
        _note(notes, f"{where}/zarr.json: {NO_ATTRS_CHECKSUM}")
    elif attrs[ATTRS_CHECKSUM] != attrs_digest(attrs):
        problems.append(f"{where}/zarr.json: attributes differ from the checksum recorded at commit "
                        f"({ATTRS_CHECKSUM}): edited after the commit")
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
        mask = None
        if "brain_mask" in group:
            try:
                mask = read_run_array(store, run_id, "brain_mask")
            except StoreError as exc:
                problems.append(str(exc))
        if mask is None:
            if "brain_mask" not in group:
                problems.append(f"{where}/brain_mask: missing")
        elif mask.shape != tuple(volume["shape"]) or mask.dtype != np.bool_:
            problems.append(f"{where}/brain_mask: not a bool volume of shape {volume['shape']}")
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
    try:
        problems += check_run_saliency(store, group, attrs, where)
    except Exception as exc:  # noqa: BLE001 - a corrupt saliency array: name its file, go on
        found = [p for path, array in _arrays(group, "saliency") for p in _unreadable(store, run_id, path, array)]
        problems += found or [f"{where}/saliency: unreadable ({_error(exc)})"]
    return problems


def _arrays(group: Any, path: str) -> list[tuple[str, Any]]:
    """``(path inside the run, array)`` of every array below ``group[path]``."""
    if path not in group:
        return []
    return [(f"{path}/{name}", m) for name, m in group[path].members(max_depth=None) if isinstance(m, zarr.Array)]


def _note(notes: list[str] | None, note: str) -> None:
    if notes is None:
        log.warning("%s", note)
    else:
        notes.append(note)


def missing_shards(store: Store, run_id: str, name: str) -> list[str]:
    """Storage keys of shards (or chunks) of ``runs/<run_id>/<name>`` that do not exist.

    Zarr reads a missing shard as fill values, silently; this lists them instead.
    """
    group = store.run(run_id)
    array = group[name]
    base = f"{store.path}/{RUNS}/{run_id}/{name}/c"
    present = set()
    try:
        for path in store.fs.find(base):
            present.add(path[len(base) + 1 :] if path.startswith(base) else path)
    except FileNotFoundError:
        pass
    return [f"{name}/{key}" for key, _ in _blocks(array) if key.removeprefix("c/") not in present]


def verify_run_contents(store: Store, run_id: str) -> list[str]:
    """Re-read every array of a run and compare with the checksum of its values recorded at
    write time (:class:`~fmri_data.store.layout.ContentDigest`: XXH3-128, or SHA-256 in
    stores written before).

    Returns:
        Problems naming the run, the array and the shard file (and its frames) that is
        missing, unreadable (failed CRC-32C, truncated) or different; every shard is read,
        so each corrupt one is named. Empty when every array verifies.
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
        try:
            if name not in group:
                problems.append(f"{where}/{name}: missing")
                continue
            array = group[name]
        except Exception as exc:  # noqa: BLE001 - unreadable array metadata
            problems.append(f"{where}/{name}: cannot open {RUNS}/{run_id}/{name}/zarr.json ({_error(exc)})")
            continue
        for key in missing_shards(store, run_id, name):
            problems.append(f"{where}/{key}: shard missing")
        digest = ContentDigest(expected)
        readable = True
        for start, stop in _axis0_blocks(array):
            try:
                values = array[start:stop] if array.ndim else array[...]
            except Exception:  # noqa: BLE001 - name each unreadable shard file of this row
                problems += _unreadable(store, run_id, name, array, (start, stop) if array.ndim else None)
                readable = False
                continue
            if readable:
                digest.update(values)
        if readable and expected is not None and digest.value() != expected:
            problems.append(f"{where}/{name}: contents differ from the checksum recorded at write time")
        if expected is None:
            problems.append(f"{where}/{name}: no checksum recorded")
    return problems


def _axis0_blocks(array: Any) -> list[tuple[int, int]]:
    step = array.shards[0] if array.shards is not None else array.chunks[0]
    n = array.shape[0] if array.ndim else 1
    return [(start, min(start + step, n)) for start in range(0, max(n, 1), step)]


def validate_store(
    url: str, storage_options: dict[str, Any] | None = None, *, deep: bool = False, notes: list[str] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[str]:
    """Problems found in a whole store: root attributes, ``index.parquet``, every run group
    under ``runs/`` and every run the index lists as complete, each run's attributes and
    arrays. A run that cannot be checked is a problem naming it; the rest is still checked.

    Args:
        url: store location.
        storage_options: fsspec options.
        deep: also re-read every array and verify its SHA-256 and chunk CRCs (reads the
            whole store).
        notes: collects findings that are not problems (:func:`validate_run`); None logs
            them at WARNING on ``fmri_data.store.validate``.
        progress: ``progress(done, total, what)`` after each run is checked.

    Returns:
        Human-readable problems, each naming the group, array or file; empty when valid.
    """
    try:
        store = Store.open(url, storage_options)
    except StoreError as exc:
        return [str(exc)]
    problems: list[str] = []
    complete, broken = survey_runs(store, _complete_in_index(store, problems))
    problems += broken.values()
    checks = [validate_run] + ([verify_run_contents] if deep else [])
    for done, run_id in enumerate(complete, 1):
        for check in checks:
            try:
                found = check(store, run_id, notes) if check is validate_run else check(store, run_id)
            except Exception as exc:  # noqa: BLE001 - one broken run must not hide the others
                found = [f"{store.url}/{RUNS}/{run_id}: cannot be checked ({_error(exc)})"]
            problems += [p for p in found if p not in problems]
        if progress is not None:
            progress(done, len(complete), "re-reading runs" if deep else "checking runs")
    return problems
