"""The Zarr v3 training store: layout, atomic run commits, schema checks, run index.

Layout (``schemas/store.schema.json`` and ``schemas/run.schema.json`` are the contract)::

    OUT.zarr/                 root group; attributes: schema_version, recipe, created, software
      runs/<run_id>/          one group per run, attributes per run.schema.json
        bold                  (T, X, Y, Z) float16, chunks (L, X, Y, Z), shards (k*L, X, Y, Z)
        brain_mask            (X, Y, Z) bool
        roi/<atlas>           (T, R) float32, chunks (L, R), shards (k*L, R)
        confounds             (T_source, C) float32
      index.parquet           one row per run (complete, failed, skipped), rebuilt after a conversion
      _staging/               runs being written
      _claims/<run_id>.json   which converter process is writing a run (host, pid, heartbeat)

A run is written into ``_staging/<run_id>.<token>/`` and moved to ``runs/<run_id>/`` only
once every array and its attributes are written (a directory rename on a local disk, so
readers never see half a run). A run group whose attributes do not say
``status: complete`` is treated as absent and rewritten by the next conversion.

Several converters may work on one store at once (processes on one machine or many): a
converter first *claims* a run by creating ``_claims/<run_id>.json`` exclusively (an
``O_EXCL`` create on a local disk, a conditional ``If-None-Match: *`` PUT on S3), skips
runs claimed by others, refreshes its claim while writing, and removes it after the
commit. A claim whose process is gone (same host, pid no longer alive) or that was not
refreshed for ``CLAIM_TIMEOUT_S`` is taken over, so a converter killed with SIGKILL does
not block its runs forever.

Writes to sharded arrays always cover whole shards (``k*L`` frames starting at a multiple
of ``k*L``): a partial-shard write from two writers would lose data (zarr-python #3682).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import os
import platform
import secrets
import socket
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import fsspec
import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from .errors import StoreError
from .schema import SCHEMA_VERSION, to_json, validate

RUNS = "runs"
STAGING = "_staging"
CLAIMS = "_claims"
INDEX = "index.parquet"
#: A claim not refreshed for this long is considered abandoned (seconds; $FMRI_DATA_CLAIM_TIMEOUT_S).
CLAIM_TIMEOUT_S = float(os.environ.get("FMRI_DATA_CLAIM_TIMEOUT_S", 900))

_SOFTWARE = ("fmri-data", "numpy", "scipy", "nibabel", "nilearn", "zarr", "dask", "numba", "bids2table")

warnings.filterwarnings("ignore", message="Object at _staging is not recognized")


def software_versions() -> dict[str, str | None]:
    """Versions of fmri-data and the libraries whose numerics shape the store."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _SOFTWARE:
        try:
            out[name.replace("-", "_")] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name.replace("-", "_")] = None
    return out


def now() -> str:
    """Current UTC time, ISO 8601."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def compressors(spec: dict[str, Any], typesize: int) -> list:
    """Chunk codecs: Blosc from the recipe's ``store.compression``, then a CRC-32C checksum.

    The checksum makes zarr refuse a corrupted chunk on read (``ValueError``) instead of
    returning garbage; shard indexes carry their own CRC-32C.
    """
    blosc = BloscCodec(cname=spec["cname"], clevel=int(spec["clevel"]), shuffle=spec["shuffle"], typesize=typesize)
    return [blosc, Crc32cCodec()]


def content_digest(blocks) -> str:
    """SHA-256 of an array's values: the C-order bytes of its blocks along axis 0, in order."""
    digest = hashlib.sha256()
    for block in blocks:
        digest.update(np.ascontiguousarray(block).tobytes())
    return digest.hexdigest()


class Store:
    """An fmri-data store on any fsspec filesystem (local path, ``s3://``, ``memory://``).

    Use :meth:`create` to start or resume a conversion and :meth:`open` to read.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = str(url)
        self.storage_options = dict(storage_options or {})
        self.fs, self.path = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.path = self.path.rstrip("/")
        if _is_local(self.fs):
            self.zarr_store = zarr.storage.LocalStore(self.path)
        else:
            self.zarr_store = zarr.storage.FsspecStore.from_url(self.url, storage_options=self.storage_options)
        self._root: zarr.Group | None = None

    # ------------------------------------------------------------------ open / create
    @classmethod
    def create(
        cls,
        url: str,
        recipe: dict[str, Any],
        recipe_hash: str,
        *,
        overwrite: bool = False,
        bids_root: str | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> "Store":
        """Create a store, or reopen one written with the same recipe (to resume).

        Raises:
            StoreError: the location is not writable; it exists but is not an fmri-data
                store; or it was written with a different recipe and ``overwrite`` is False.
        """
        store = cls(url, storage_options)
        existing = store._read_root_attrs()
        if existing is not None and overwrite:
            store.fs.rm(store.path, recursive=True)
            existing = None
        if existing is not None:
            validate(existing, "store", store.url)
            if existing["recipe_hash"] != recipe_hash:
                raise StoreError(
                    f"{store.url}: written with recipe '{existing['recipe'].get('name')}' ({existing['recipe_hash']}), "
                    f"not '{recipe.get('name')}' ({recipe_hash}); pass --overwrite to replace it or choose another output"
                )
            return store
        if store.fs.exists(store.path) and store.fs.ls(store.path):
            raise StoreError(f"{store.url}: exists and is not an fmri-data store; refusing to write into it")
        attrs = to_json(
            {
                "schema_version": SCHEMA_VERSION,
                "created": now(),
                "recipe": recipe,
                "recipe_hash": recipe_hash,
                "software": software_versions(),
                "bids_root": bids_root,
            }
        )
        validate(attrs, "store", store.url)
        try:
            root = zarr.open_group(store=store.zarr_store, mode="w", attributes=attrs)
            root.require_group(RUNS)
        except (OSError, PermissionError) as exc:
            raise StoreError(f"{store.url}: cannot create store ({exc})") from exc
        store._root = root
        return store

    @classmethod
    def open(cls, url: str, storage_options: dict[str, Any] | None = None) -> "Store":
        """Open an existing store for reading; its root attributes are validated.

        Raises:
            StoreError: missing, not an fmri-data store, or attributes off-contract.
        """
        store = cls(url, storage_options)
        attrs = store._read_root_attrs()
        if attrs is None:
            raise StoreError(f"{store.url}: not an fmri-data store (no root zarr.json with fmri-data attributes)")
        validate(attrs, "store", store.url)
        return store

    def _read_root_attrs(self) -> dict[str, Any] | None:
        try:
            raw = self.fs.cat_file(f"{self.path}/zarr.json")
        except (FileNotFoundError, OSError):
            return None
        try:
            meta = json.loads(raw)
        except ValueError:
            return None
        attrs = meta.get("attributes", {})
        return attrs if "schema_version" in attrs else None

    @property
    def root(self) -> zarr.Group:
        if self._root is None:
            self._root = zarr.open_group(store=self.zarr_store, mode="r+" if self._writable() else "r")
        return self._root

    def _writable(self) -> bool:
        return not getattr(self.zarr_store, "read_only", False)

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.root.attrs)

    @property
    def recipe(self) -> dict[str, Any]:
        return dict(self.attrs["recipe"])

    # ------------------------------------------------------------------ runs
    def _run_attrs_raw(self, run_id: str) -> dict[str, Any] | None:
        try:
            meta = json.loads(self.fs.cat_file(f"{self.path}/{RUNS}/{run_id}/zarr.json"))
        except (FileNotFoundError, OSError, ValueError):
            return None
        return meta.get("attributes", {})

    def run_ids(self) -> list[str]:
        """Complete runs, sorted."""
        base = f"{self.path}/{RUNS}"
        try:
            entries = self.fs.ls(base, detail=False)
        except FileNotFoundError:
            return []
        out = []
        for entry in entries:
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name != "zarr.json" and self.is_complete(name):
                out.append(name)
        return sorted(out)

    def is_complete(self, run_id: str) -> bool:
        attrs = self._run_attrs_raw(run_id)
        return bool(attrs) and attrs.get("status") == "complete"

    def run(self, run_id: str) -> zarr.Group:
        """The Zarr group of a complete run.

        Raises:
            StoreError: the run does not exist or is incomplete.
        """
        if not self.is_complete(run_id):
            raise StoreError(f"{self.url}: no complete run '{run_id}'")
        return zarr.open_group(store=self.zarr_store, path=f"{RUNS}/{run_id}", mode="r")

    def run_attrs(self, run_id: str) -> dict[str, Any]:
        """Attributes of a complete run, validated against run.schema.json."""
        attrs = self._run_attrs_raw(run_id)
        if not attrs or attrs.get("status") != "complete":
            raise StoreError(f"{self.url}: no complete run '{run_id}'")
        validate(attrs, "run", f"{self.url}/{RUNS}/{run_id}")
        return attrs

    def remove_run(self, run_id: str) -> None:
        path = f"{self.path}/{RUNS}/{run_id}"
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def begin_run(self, run_id: str) -> "RunWriter":
        """Start writing a run into a private staging group."""
        return RunWriter(self, run_id)

    def clear_staging(self, run_id: str) -> None:
        """Remove staging groups of ``run_id`` left by an interrupted conversion (claim the run first)."""
        base = f"{self.path}/{STAGING}"
        try:
            entries = self.fs.ls(base, detail=False)
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0] == run_id:
                self.fs.rm(entry, recursive=True)

    # ------------------------------------------------------------------ claims
    def _claim_path(self, run_id: str) -> str:
        return f"{self.path}/{CLAIMS}/{run_id}.json"

    def claim(self, run_id: str) -> bool:
        """Claim a run for this process; False when a live converter holds it.

        The claim is created exclusively; an abandoned claim (dead process on this host, or
        no heartbeat for ``CLAIM_TIMEOUT_S``) is removed and claimed again.
        """
        path = self._claim_path(run_id)
        for _ in range(3):
            try:
                self.fs.makedirs(f"{self.path}/{CLAIMS}", exist_ok=True)
                self.fs.pipe_file(path, _claim_payload(), mode="create")
                return True
            except FileExistsError:
                pass
            except OSError as exc:  # S3 answers a failed If-None-Match with 412 PreconditionFailed
                if "Precondition" not in str(exc) and "412" not in str(exc):
                    raise StoreError(f"{self.url}: cannot claim run {run_id} ({exc})") from exc
            holder = self._read_claim(path)
            if holder is not None and not _abandoned(holder):
                return False
            try:
                self.fs.rm(path)
            except FileNotFoundError:
                pass
        return False

    def refresh_claim(self, run_id: str) -> None:
        """Heartbeat: rewrite this process's claim with the current time."""
        path = self._claim_path(run_id)
        holder = self._read_claim(path)
        if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.fs.pipe_file(path, _claim_payload())

    def release(self, run_id: str) -> None:
        """Remove this process's claim on a run (others' claims are left alone)."""
        path = self._claim_path(run_id)
        holder = self._read_claim(path)
        if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            try:
                self.fs.rm(path)
            except FileNotFoundError:
                pass

    def _read_claim(self, path: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable (half-written by a killed process): treat as abandoned

    # ------------------------------------------------------------------ index
    def write_index(self, rows: Iterable[dict[str, Any]]) -> None:
        """Write ``index.parquet``: one row per run (complete, failed or skipped)."""
        import pandas as pd

        table = pd.DataFrame([{k: _cell(v) for k, v in row.items()} for row in rows])
        with self.fs.open(f"{self.path}/{INDEX}", "wb") as fh:
            table.to_parquet(fh, index=False)

    def read_index(self):
        """``index.parquet`` as a pandas DataFrame (empty when no conversion finished yet)."""
        import pandas as pd

        path = f"{self.path}/{INDEX}"
        if not self.fs.exists(path):
            return pd.DataFrame()
        with self.fs.open(path, "rb") as fh:
            return pd.read_parquet(fh)

    def nbytes_stored(self, run_id: str) -> int:
        """Bytes on storage under a run group."""
        return int(self.fs.du(f"{self.path}/{RUNS}/{run_id}", total=True))


def roi_key(atlas_name: str) -> str:
    """Array name under ``roi/`` for an atlas: ``"tian_s3+schaefer400_7n"`` -> ``"tian_s3-schaefer400_7n"``.

    ``+`` is avoided in storage keys (it reads as a space in URLs).
    """
    return atlas_name.replace("+", "-")


def _process_start() -> float:
    import psutil

    return psutil.Process().create_time()


def _claim_payload() -> bytes:
    return json.dumps(
        {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(), "heartbeat": time.time()}
    ).encode()


def _abandoned(holder: dict[str, Any]) -> bool:
    """A claim whose process is gone or whose heartbeat is older than ``CLAIM_TIMEOUT_S``."""
    if not holder:
        return True
    if time.time() - float(holder.get("heartbeat", 0)) > CLAIM_TIMEOUT_S:
        return True
    if holder.get("host") == socket.gethostname():
        import psutil

        try:
            return abs(psutil.Process(int(holder["pid"])).create_time() - float(holder["started"])) > 1.0
        except (psutil.NoSuchProcess, KeyError, ValueError):
            return True
    return False


def _cell(value: Any) -> Any:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(to_json(value))
    return to_json(value)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


class RunWriter:
    """Writes one run into ``_staging/`` and moves it into ``runs/`` on :meth:`commit`."""

    def __init__(self, store: Store, run_id: str):
        self.store = store
        self.run_id = run_id
        self.staging = f"{STAGING}/{run_id}.{secrets.token_hex(4)}"
        self.group = zarr.open_group(store=store.zarr_store, path=self.staging, mode="w", attributes={"status": "writing"})
        self.outputs: list[str] = []
        self.checksums: dict[str, str] = {}
        self._last_beat = time.monotonic()

    def write_series(
        self,
        name: str,
        n_frames: int,
        frame_shape: tuple[int, ...],
        dtype: str,
        chunk_frames: int,
        shard_chunks: int,
        compression: dict[str, Any],
        block: Callable[[int, int], np.ndarray],
        attrs: dict[str, Any] | None = None,
        dimension_names: tuple[str, ...] | None = None,
    ) -> zarr.Array:
        """Create a time-first array and fill it shard by shard.

        Args:
            name: array path inside the run group (``"bold"``, ``"roi/schaefer400_7n"``).
            n_frames: length of the time axis.
            frame_shape: shape of one frame.
            dtype: numpy dtype name of the stored values.
            chunk_frames: frames per chunk (a training window).
            shard_chunks: chunks per shard.
            compression: the recipe's ``store.compression``.
            block: ``block(start, stop)`` returns frames ``[start, stop)`` with shape
                ``(stop - start, *frame_shape)``; called once per shard, in order.
            attrs: array attributes.
            dimension_names: Zarr v3 dimension names.
        """
        shard_frames = chunk_frames * shard_chunks
        array = self.group.create_array(
            name,
            shape=(n_frames, *frame_shape),
            chunks=(chunk_frames, *frame_shape),
            shards=(shard_frames, *frame_shape),
            dtype=dtype,
            compressors=compressors(compression, np.dtype(dtype).itemsize),
            fill_value=0,
            attributes=to_json(attrs or {}),
            dimension_names=dimension_names,
            config={"write_empty_chunks": True},  # every shard exists: a missing one is detectable
        )
        digest = hashlib.sha256()
        for start in range(0, n_frames, shard_frames):
            stop = min(start + shard_frames, n_frames)
            values = np.asarray(block(start, stop), dtype=dtype)
            if values.shape != (stop - start, *frame_shape):
                raise ValueError(f"{name}: block [{start}, {stop}) has shape {values.shape}")
            array[start:stop] = values
            digest.update(np.ascontiguousarray(values).tobytes())
            self._heartbeat()
        self._written(name, digest.hexdigest())
        return array

    def _heartbeat(self) -> None:
        if time.monotonic() - self._last_beat > 60:
            self.store.refresh_claim(self.run_id)
            self._last_beat = time.monotonic()

    def _written(self, name: str, sha256: str) -> None:
        self.outputs.append(name)
        self.checksums[name] = sha256

    def write_array(
        self,
        name: str,
        values: np.ndarray,
        compression: dict[str, Any],
        attrs: dict[str, Any] | None = None,
        dimension_names: tuple[str, ...] | None = None,
    ) -> zarr.Array:
        """Write a small array whole, as one chunk (masks, normalization maps)."""
        values = np.asarray(values)
        array = self.group.create_array(
            name,
            shape=values.shape,
            chunks=values.shape if values.size else (1,) * values.ndim,
            dtype=values.dtype,
            compressors=compressors(compression, values.dtype.itemsize),
            fill_value=np.zeros((), dtype=values.dtype).item(),
            attributes=to_json(attrs or {}),
            dimension_names=dimension_names,
            config={"write_empty_chunks": True},
        )
        array[...] = values
        self._written(name, content_digest([values]))
        return array

    def commit(self, attrs: dict[str, Any]) -> None:
        """Validate the run attributes, write them, and move the run into ``runs/``.

        Raises:
            StoreError: the attributes break run.schema.json (the staging group is removed).
        """
        attrs = to_json({**attrs, "status": "complete", "outputs": list(self.outputs), "checksums": dict(self.checksums)})
        try:
            validate(attrs, "run", f"{self.store.url}/{RUNS}/{self.run_id}")
        except StoreError:
            self.abort()
            raise
        self.group.attrs.put(attrs)
        self.store.remove_run(self.run_id)
        self._move_into_place()

    def _move_into_place(self) -> None:
        """Local disk: one directory rename (atomic). Object stores: copy every object, the
        run group's ``zarr.json`` (which says ``status: complete``) last, then delete the staging
        objects; a reader never sees a complete-looking run with missing arrays."""
        fs, base = self.store.fs, self.store.path
        source, target = f"{base}/{self.staging}", f"{base}/{RUNS}/{self.run_id}"
        if _is_local(fs):
            fs.makedirs(f"{base}/{RUNS}", exist_ok=True)
            os.replace(source, target)
            return
        files = sorted(fs.find(source))
        head = f"{source}/zarr.json"
        body = [f for f in files if f != head]
        if body:
            fs.copy(body, [target + f[len(source):] for f in body])
        fs.copy(head, f"{target}/zarr.json")
        fs.rm(source, recursive=True)

    def abort(self) -> None:
        """Remove the staging group (nothing under ``runs/`` is touched)."""
        path = f"{self.store.path}/{self.staging}"
        if self.store.fs.exists(path):
            self.store.fs.rm(path, recursive=True)
