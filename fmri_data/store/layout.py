"""The layout of a store: path names, codecs, digests, and the rules every writer follows.

Layout (``schemas/store.schema.json`` and ``schemas/run.schema.json`` are the contract)::

    OUT.zarr/                 root group; attributes: schema_version, recipe, recipe_hash, created,
                              software, bids_root, saliency_models (fitted networks: path, sha256, ...)
      runs/<run_id>/          one group per run, attributes per run.schema.json
        bold                  (T, X, Y, Z) float16, chunks (L, X, Y, Z), shards (k*L, X, Y, Z)
        brain_mask            (X, Y, Z) bool
        norm_<stat>           (X, Y, Z) float32, per-voxel normalization maps of ``bold``
        flat                  (T, H, W) float16 flat-map video, chunks (L, H, W), shards (k*L, H, W)
        flat_mask             (H, W) bool, pixels covered by cortex
        roi/<atlas>           (T, R) float32, chunks (L, R), shards (k*L, R); ``<atlas>`` = roi_key()
        confounds             (T_source, C) float32; attrs columns, tr_s
        time, time_source,    xarray coordinates written at commit (fmri_data/store/export.py):
        x, y, z, confound,    frame times (s), source frame times (s), voxel world coordinates
        roi/time, roi/parcel  (mm), confound columns, parcel labels; not in ``outputs``
        saliency/             group; attrs {"skipped": {scorer: reason}}
          <scorer>/           group; attrs scorer, source, window, stride, k, k_requested,
                              n_windows, n_frames, tr_s, description, params, created,
                              software (+ model {name, path, sha256} for fitted networks)
            scores            (n_windows,) float32, higher = more salient
            starts            (n_windows,) int64, first frame of each window
            topk              (k,) int64, indices into scores/starts, best first
            censored          (n_windows,) int64, *_motion_penalized scorers only
      models/saliency/<name>.safetensors   fitted saliency networks (root attrs saliency_models)
      stats/<array>.json      dataset statistics of an array (`fmri-data stats`; fmri_data/stats.py):
                              kind, params, the run ids and recipe hash covered ($defs/stats of
                              store.schema.json); written whole, atomically (Store.write_bytes)
      index.parquet           one row per run (complete, failed, skipped), rebuilt after a conversion
      qa.parquet              one row per complete run: entities and scalar QA metrics
      _staging/               runs being written; groups replacing parts of a committed run
      _claims/<run_id>.json   which converter process is writing a run (host, pid, heartbeat)

Which arrays a run has depends on the recipe (its ``outputs`` attribute lists them; ``T`` is
the stored time axis, ``T_source`` the source's, ``L`` the recipe's ``chunk_frames``). Every
array carries Zarr v3 ``dimension_names`` (time, x, y, z; time, row, col; time_source,
confound; time, parcel; :func:`fmri_data.store.export.array_dimensions`), so
``xarray.open_zarr(store, group="runs/<run_id>")`` opens a run with labelled coordinates.

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

Every write to a store goes through this package: a conversion writes runs with
:class:`~fmri_data.store.writer.RunWriter`; later changes (rescoring ``saliency/``,
recomputed ``qa`` attributes, ``index.parquet``, ``qa.parquet``, fitted networks, root
attributes) use :mod:`fmri_data.store.replace` through :class:`~fmri_data.store.root.Store`:
files are written to a temporary file renamed into place on a local disk (one PUT elsewhere)
and groups inside a committed run are written under ``_staging/`` and moved into place.

Writes to sharded arrays always cover whole shards (``k*L`` frames starting at a multiple
of ``k*L``): a partial-shard write from two writers would lose data (zarr-python #3682).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import json
import platform
from typing import Any

import fsspec
import numpy as np
import xxhash
from zarr.codecs import BloscCodec, Crc32cCodec




RUNS = "runs"
STAGING = "_staging"
CLAIMS = "_claims"
INDEX = "index.parquet"
QA_TABLE = "qa.parquet"
SALIENCY = "saliency"
SALIENCY_MODELS = "models/saliency"
#: Everything fmri-data writes at the top of a store (plus ``*.tmp`` files of atomic writes
#: cut short); ``--overwrite`` deletes a store only when it holds nothing else.
TOP_LEVEL = ("zarr.json", RUNS, STAGING, CLAIMS, INDEX, QA_TABLE, "models", "stats")


def foreign_entries(fs, path: str) -> list[str]:
    """Paths under a store root that fmri-data does not write: top-level names outside
    :data:`TOP_LEVEL` and anything directly in ``runs/`` that is not a group (a folder with a
    ``zarr.json``) or its ``zarr.json``. Sorted, relative to ``path``."""
    root = path.rstrip("/")
    out = []
    for entry in fs.ls(root, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name not in TOP_LEVEL and not name.endswith(".tmp"):
            out.append(name)
    if fs.isdir(f"{root}/{RUNS}"):
        for entry in fs.ls(f"{root}/{RUNS}", detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name != "zarr.json" and not (fs.isdir(entry) and fs.exists(f"{entry.rstrip('/')}/zarr.json")):
                out.append(f"{RUNS}/{name}")
    return sorted(out)

_SOFTWARE = ("fmri-data", "numpy", "scipy", "nibabel", "nilearn", "zarr", "dask", "numba", "bids2table")


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


#: The hash of an array's values recorded in the run attribute ``checksums``, as
#: ``"xxh3_128:<32 hex digits>"``: XXH3 128-bit (xxHash 0.8, Yann Collet; 26 GB/s against
#: SHA-256's 1.8 GB/s on one core of the 2-core dev machine). SHA-256 was this checksum
#: before (a bare 64-hex-digit value, still verified). It detects corruption, not
#: tampering; the attributes' own ``attrs_sha256`` and the sources' checksums stay SHA-256.
CONTENT_HASH = "xxh3_128"


class ContentDigest:
    """The checksum of an array's values: the C-order bytes of its blocks along axis 0, in
    order (:meth:`update` each block), whatever the codecs that store them.

    Args:
        recorded: a checksum recorded before, whose algorithm this digest then uses: a
            ``"xxh3_128:"`` value or a bare 64-hex-digit SHA-256 (stores written before
            fmri-data recorded XXH3). Default: :data:`CONTENT_HASH`.
    """

    def __init__(self, recorded: str | None = None):
        self._sha256 = recorded is not None and ":" not in recorded
        self._hash = hashlib.sha256() if self._sha256 else xxhash.xxh3_128()

    def update(self, block: np.ndarray) -> None:
        """Add the next block's values (releases the GIL)."""
        self._hash.update(memoryview(np.ascontiguousarray(block).reshape(-1)).cast("B"))

    def value(self) -> str:
        """The checksum as recorded: ``"xxh3_128:<hex>"`` (or the bare SHA-256 hex)."""
        return self._hash.hexdigest() if self._sha256 else f"{CONTENT_HASH}:{self._hash.hexdigest()}"


def content_digest(blocks) -> str:
    """:class:`ContentDigest` of an array given as its blocks along axis 0."""
    digest = ContentDigest()
    for block in blocks:
        digest.update(block)
    return digest.value()


#: Run attribute holding the SHA-256 of the run's other attributes (:func:`attrs_digest`).
ATTRS_CHECKSUM = "attrs_sha256"


def attrs_digest(attrs: dict[str, Any]) -> str:
    """SHA-256 (hex) of a run's attributes in canonical form: every key except
    :data:`ATTRS_CHECKSUM`, as ``json.dumps(..., sort_keys=True, separators=(",", ":"))``
    (ASCII, JSON-ready values) encoded as UTF-8. Written at commit and by
    ``Store.write_run_attrs``; ``fmri-data validate`` recomputes it to find attributes edited
    by hand after the commit.
    """
    payload = {k: v for k, v in attrs.items() if k != ATTRS_CHECKSUM}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def roi_key(atlas_name: str) -> str:
    """Array name under ``roi/`` for an atlas: ``"tian_s3+schaefer400_7n"`` -> ``"tian_s3-schaefer400_7n"``.

    ``+`` is avoided in storage keys (it reads as a space in URLs).
    """
    return atlas_name.replace("+", "-")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local disk (where a rename is atomic)."""
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))

