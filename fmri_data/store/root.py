"""The store root: create or open a store, list and read runs, claims between converters, the run index.

The layout and the commit and claim rules are described in :mod:`fmri_data.store.layout`.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import IO, Any

import fsspec
import zarr

from ..errors import StoreError
from ..imports import load_module
from ..config import recipe as hashing
from ..config.schema import SCHEMA_VERSION, to_json, validate

from . import replace
from .layout import (
    ATTRS_CHECKSUM, CLAIMS, INDEX, RUNS, STAGING, attrs_digest, foreign_entries, is_local, now, software_versions,
)
from .writer import RunWriter

_GROUP_META = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}).encode()

#: A claim not refreshed for this long is considered abandoned (seconds; $FMRI_DATA_CLAIM_TIMEOUT_S).
CLAIM_TIMEOUT_S = float(os.environ.get("FMRI_DATA_CLAIM_TIMEOUT_S", 900))

warnings.filterwarnings("ignore", message="Object at _staging is not recognized")


class Store:
    """An fmri-data store on any fsspec filesystem (local path, ``s3://``, ``memory://``).

    Use :meth:`create` to start or resume a conversion and :meth:`open` to read.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.url = str(url)
        self.storage_options = dict(storage_options or {})
        self.fs, self.path = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.path = self.path.rstrip("/")
        if is_local(self.fs):
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
        if existing is not None:
            store._check_root_attrs(existing)
            if overwrite:
                store._remove_store()
                existing = None
        if existing is not None:
            return store._join(existing, recipe, recipe_hash)
        if not store._creatable():
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
        meta = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attrs}).encode()
        try:
            # runs/ first (atomic, the same bytes from every creator), so that a converter
            # joining the moment the root appears finds the whole layout
            replace.write_bytes(store, f"{RUNS}/zarr.json", _GROUP_META)
            # create-if-absent: of converters started together on a new path, one creates the
            # store and the others join it (an O_EXCL create locally, If-None-Match on S3)
            store.fs.pipe_file(f"{store.path}/zarr.json", meta, mode="create")
        except FileExistsError:
            return store._join(store._wait_root_attrs(), recipe, recipe_hash)
        except OSError as exc:
            raise StoreError(f"{store.url}: cannot create store ({exc})") from exc
        return store

    def _creatable(self) -> bool:
        """Nothing is here, or only what a creator running at this moment has written so far
        (``runs/zarr.json``, a root ``zarr.json`` being written or already ours)."""
        try:
            entries = {p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False)}
        except (FileNotFoundError, NotADirectoryError):  # nothing here (or a parent that is a file: creating says so)
            return True
        if not entries <= {RUNS, "zarr.json"}:
            return False
        if RUNS in entries:
            inner = {p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(f"{self.path}/{RUNS}", detail=False)}
            if any(name != "zarr.json" and not name.endswith(".tmp") for name in inner):
                return False
        # a whole root zarr.json that is not an fmri-data one: someone else's folder
        return "zarr.json" not in entries or self._root_json_pending() or self._read_root_attrs() is not None

    def _check_root_attrs(self, attrs: dict[str, Any]) -> None:
        try:
            validate(attrs, "store", self.url)
        except StoreError as exc:
            raise StoreError(f"{self.url}: exists and is not an fmri-data store (its root attributes do not "
                             f"match the store schema: {str(exc).removeprefix(self.url + ': ')})") from None

    def _join(self, existing: dict[str, Any] | None, recipe: dict[str, Any], recipe_hash: str) -> "Store":
        """Reopen an existing store to resume or to convert beside another converter."""
        if existing is None:
            raise StoreError(f"{self.url}: another process is creating a store here but its zarr.json stays unreadable")
        self._check_root_attrs(existing)
        if existing["recipe_hash"] != recipe_hash and not self._same_but_codec(existing, recipe):
            raise StoreError(
                f"{self.url}: written with recipe '{existing['recipe'].get('name')}' ({existing['recipe_hash']}), "
                f"not '{recipe.get('name')}' ({recipe_hash}); pass overwrite=True (--overwrite) to replace it "
                "or choose another output"
            )
        return self

    @staticmethod
    def _same_but_codec(existing: dict[str, Any], recipe: dict[str, Any]) -> bool:
        """The store was written with ``recipe`` except its lossless ``store.compression`` (an
        earlier default codec): it may be resumed, keeping its own codec
        (:func:`~fmri_data.config.recipe.with_compression`)."""
        try:
            codec = existing["recipe"]["store"]["compression"]
            return hashing.recipe_hash(hashing.with_compression(recipe, codec)) == existing["recipe_hash"]
        except (KeyError, TypeError):
            return False

    def _root_json_pending(self) -> bool:
        """``zarr.json`` exists but is not yet whole JSON (its exclusive creator is writing it)."""
        try:
            json.loads(self.fs.cat_file(f"{self.path}/zarr.json"))
        except (FileNotFoundError, OSError):
            return False
        except ValueError:
            return True
        return False

    def _wait_root_attrs(self, seconds: float = 10.0) -> dict[str, Any] | None:
        """The root attributes another creator is writing at this moment (None after ``seconds``)."""
        deadline = time.monotonic() + seconds
        while True:
            attrs = self._read_root_attrs()
            if attrs is not None or time.monotonic() > deadline:
                return attrs
            time.sleep(0.05)

    def _remove_store(self) -> None:
        """Delete the store for ``overwrite``, only if everything in it is what fmri-data writes.

        Raises:
            StoreError: naming the entries fmri-data did not write (nothing is deleted).
        """
        foreign = foreign_entries(self.fs, self.path)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise StoreError(f"{self.url}: not overwritten: it holds {shown}, which fmri-data did not write; "
                             "move them away or choose another output")
        self.fs.rm(self.path, recursive=True)

    @classmethod
    def open(cls, url: str, storage_options: dict[str, Any] | None = None) -> "Store":
        """Open an existing store for reading; its root attributes are validated.

        Raises:
            StoreError: missing, not an fmri-data store, or attributes off-contract.
        """
        store = cls(url, storage_options)
        attrs = store._read_root_attrs()
        if attrs is None:
            if not store._exists():
                raise StoreError(f"{store.url}: no such store (nothing at this path)")
            raise StoreError(f"{store.url}: not an fmri-data store (no root zarr.json with fmri-data attributes)")
        validate(attrs, "store", store.url)
        return store

    def _exists(self) -> bool:
        try:
            return bool(self.fs.exists(self.path))
        except Exception:  # an unreachable object store: say "not a store", as before
            return True

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

    # ------------------------------------------------------------------ changes after a commit
    def write_file(self, rel: str, write: Callable[[IO[bytes]], None]) -> None:
        """Write the file ``rel`` (below the store root) atomically: ``write(fh)`` fills a binary
        file object; a temporary file renamed into place on a local disk, one PUT elsewhere.

        Raises:
            Whatever ``write`` raises (``rel`` is then untouched), ``OSError``.
        """
        replace.write_file(self, rel, write)

    def write_bytes(self, rel: str, data: bytes | Sequence[bytes]) -> None:
        """Write ``data`` (or its pieces, in order) to the file ``rel`` (below the store root)
        atomically (:meth:`write_file`)."""
        replace.write_bytes(self, rel, data)

    def write_root_attrs(self, attrs: dict[str, Any]) -> None:
        """Replace the root attributes in one step (``zarr.json`` written atomically).

        Raises:
            StoreError: ``attrs`` break store.schema.json (nothing is written).
        """
        attrs = to_json(attrs)
        validate(attrs, "store", self.url)
        replace.write_group_attrs(self, "", attrs)
        self._root = None

    def write_run_attrs(self, run_id: str, attrs: dict[str, Any]) -> None:
        """Replace the attributes of the committed run ``run_id`` in one step: its ``zarr.json``
        is written to a temporary file renamed into place on a local disk, with one PUT on
        object storage (a reader sees the old or the new attributes, never a mix). Arrays are
        not touched. The attributes' SHA-256 (``attrs_sha256``, :func:`.layout.attrs_digest`)
        is recomputed, after checking the stored one: attributes edited by hand after the
        commit are never re-signed.

        Raises:
            StoreError: no complete run ``run_id``, its stored attributes differ from their
                checksum, or ``attrs`` break run.schema.json (nothing is written).
        """
        if not self.is_complete(run_id):
            raise StoreError(f"{self.url}: no complete run '{run_id}'")
        stored = self._run_attrs_raw(run_id) or {}
        if ATTRS_CHECKSUM in stored and stored[ATTRS_CHECKSUM] != attrs_digest(stored):
            raise StoreError(f"{self.url}/{RUNS}/{run_id}/zarr.json: attributes differ from the checksum recorded "
                             "at commit (edited after the commit); not rewritten, reconvert the run")
        attrs = to_json({k: v for k, v in attrs.items() if k != ATTRS_CHECKSUM})
        attrs[ATTRS_CHECKSUM] = attrs_digest(attrs)
        validate(attrs, "run", f"{self.url}/{RUNS}/{run_id}")
        replace.write_group_attrs(self, f"{RUNS}/{run_id}", attrs)

    def replace_in_run(
        self,
        run_id: str,
        writes: Mapping[str, Callable[[zarr.Group], None]],
        remove: Iterable[str] = (),
        group_attrs: Mapping[str, dict[str, Any]] | None = None,
    ) -> None:
        """Add or replace groups inside the committed run ``run_id`` atomically.

        Each ``writes[name](group)`` fills a staging group, which replaces
        ``runs/<run_id>/<name>`` only once every write succeeded; ``remove`` lists paths
        inside the run to delete; ``group_attrs`` ``{name: attributes}`` creates or
        re-attributes groups inside the run (:func:`fmri_data.store.replace.replace_in_run`).

        Raises:
            StoreError: no complete run ``run_id``.
            Whatever a write raises: the run is then left as it was.
        """
        if not self.is_complete(run_id):
            raise StoreError(f"{self.url}: no complete run '{run_id}'")
        replace.replace_in_run(self, run_id, writes, remove, group_attrs)

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
                _HELD_CLAIMS.add(path)
                return True
            except FileExistsError:
                pass
            except OSError as exc:  # S3 answers a failed If-None-Match with 412 PreconditionFailed
                if "Precondition" not in str(exc) and "412" not in str(exc):
                    raise StoreError(f"{self.url}: cannot claim run {run_id} ({exc})") from exc
            holder = self._read_claim(path)
            if holder is not None and not _abandoned(holder) and not (_is_this_process(holder) and path not in _HELD_CLAIMS):
                return False  # a live converter holds it (a claim of ours left by a failed release is taken over)
            try:
                self.fs.rm(path)
            except FileNotFoundError:
                pass
        return False

    def refresh_claim(self, run_id: str) -> None:
        """Heartbeat: rewrite this process's claim with the current time."""
        path = self._claim_path(run_id)
        holder = self._read_claim(path)
        if holder is not None and _is_this_process(holder):
            self.fs.pipe_file(path, _claim_payload())

    def release(self, run_id: str) -> None:
        """Remove this process's claim on a run (others' claims are left alone)."""
        path = self._claim_path(run_id)
        _HELD_CLAIMS.discard(path)
        holder = self._read_claim(path)
        if holder is not None and _is_this_process(holder):
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
        """Write ``index.parquet``: one row per run (complete, failed or skipped).

        Atomic (:meth:`write_file`): a write cut short leaves the previous index, never a
        truncated file.
        """
        table = load_module("pandas").DataFrame([{k: _cell(v) for k, v in row.items()} for row in rows])
        self.write_file(INDEX, lambda fh: table.to_parquet(fh, index=False))

    def read_index(self):
        """``index.parquet`` as a pandas DataFrame (empty when no conversion finished yet)."""
        pd = load_module("pandas")
        path = f"{self.path}/{INDEX}"
        if not self.fs.exists(path):
            return pd.DataFrame()
        with self.fs.open(path, "rb") as fh:
            return pd.read_parquet(fh)

    def nbytes_stored(self, run_id: str) -> int:
        """Bytes on storage under a run group."""
        return int(self.fs.du(f"{self.path}/{RUNS}/{run_id}", total=True))


def _process_start() -> float:
    return load_module("psutil").Process().create_time()


def _claim_payload() -> bytes:
    return json.dumps(
        {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(), "heartbeat": time.time()}
    ).encode()


#: claims this process holds now (claimed and not yet released), by claim file path
_HELD_CLAIMS: set[str] = set()


def _is_this_process(holder: dict[str, Any]) -> bool:
    return holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()


def _abandoned(holder: dict[str, Any]) -> bool:
    """A claim whose process is gone or whose heartbeat is older than ``CLAIM_TIMEOUT_S``."""
    if not holder:
        return True
    if time.time() - float(holder.get("heartbeat", 0)) > CLAIM_TIMEOUT_S:
        return True
    if holder.get("host") == socket.gethostname():
        psutil = load_module("psutil")
        try:
            return abs(psutil.Process(int(holder["pid"])).create_time() - float(holder["started"])) > 1.0
        except (psutil.NoSuchProcess, KeyError, ValueError):
            return True
    return False


def _cell(value: Any) -> Any:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(to_json(value))
    return to_json(value)
