"""A run's read-only conversion inputs (:class:`RunInputs`), operator caches, and small helpers."""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from ..reference.atlases import Atlas, load_atlas
from ..derive.roi import ParcelOperator, normalize_parcels, volume_parcel_operator
from ..discover import RunSpec
from ..errors import InputError
from ..read.common import file_sha256
from ..config.recipe import Recipe
from ..store.writer import RunWriter

#: Source frames read per block (bounded by bytes: ~64 MiB of float32 per block; two blocks are
#: decoded ahead, and on the 2-core CI machine every GiB of fresh memory costs about 2 s of CPU).
BLOCK_BYTES = 64 * 2**20


def frames_per_block(n_frames: int, values_per_frame: int) -> int:
    """Frames of float32 source data per streamed block: at most :data:`BLOCK_BYTES`, at least 1."""
    return max(1, min(int(n_frames), BLOCK_BYTES // (4 * int(values_per_frame))))


def temporal_mean(vol) -> np.ndarray:
    """``(X, Y, Z)`` float64 mean over time of a :class:`~fmri_data.read.nifti.VolumeSeries`
    (NaN/inf counted as 0), streamed in blocks of :func:`frames_per_block` frames."""
    total = np.zeros(int(np.prod(vol.shape[:3])), dtype=np.float64)
    for _, _, rows in vol.iter_frame_rows(frames_per_block(vol.n_frames, np.prod(vol.shape[:3]))):
        total += np.nan_to_num(rows).sum(axis=0, dtype=np.float64)
    return vol.to_ras(total / vol.n_frames)


class LRU:
    """Small thread-safe LRU cache of operators keyed by geometry."""

    def __init__(self, size: int = 32):
        self.size = size
        self.items: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key, build: Callable[[], Any]):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = build()
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return value


OPERATORS = LRU()
ATLASES = LRU(16)


def geometry_key(shape, affine) -> tuple:
    return (tuple(int(s) for s in shape[:3]), np.asarray(affine, dtype=np.float64).round(6).tobytes())


def cached_atlas(name: str, folder: str | None) -> Atlas:
    return ATLASES.get((name, folder), lambda: load_atlas(name, folder))


def cached_parcel_operator(atlas: Atlas, folder: str | None, shape, affine) -> ParcelOperator:
    key = ("roi", atlas.name, folder) + geometry_key(shape, affine)
    return OPERATORS.get(key, lambda: volume_parcel_operator(atlas, shape, affine))



@dataclass(frozen=True)
class RunInputs:
    """What one run's outputs are built from: fixed before the first output, read by every one.

    ``warnings`` and ``sources`` are the run's append-only log (kept in the run attributes);
    what one output hands to the next is passed as named values instead
    (:mod:`fmri_data.convert.outputs.base`).

    Attributes:
        spec: the run, its file paths pointing at local copies.
        recipe: resolved recipe; recipe_hash: its hash.
        atlas_dir: folder of atlas files, or None.
        writer: the run's staging group.
        origin: local copy -> original URL, for files fetched from remote storage.
        warnings: the run's warnings, in order.
        sources: the files read, as run attribute ``sources`` entries (see :meth:`add_source`;
            complete once :meth:`finished_sources` returned).
    """

    spec: RunSpec
    recipe: Recipe
    recipe_hash: str
    atlas_dir: str | None
    writer: RunWriter
    origin: Mapping[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    sources: list[dict[str, Any]] = field(default_factory=list)

    _digests: list[Future] = field(default_factory=list)  # one per entry of sources

    def add_source(self, path: str, kind: str, space: str | None, derivative: bool) -> None:
        """Record a file read for this run, with its sha256 (under its original URL when fetched).

        The SHA-256 is computed in a background thread (:data:`HASHING`; hashlib releases the
        GIL), overlapping the conversion's set-up; :meth:`finished_sources` waits for it.
        """
        original = self.origin.get(path, path)
        if any(s["path"] == original for s in self.sources):
            return
        self.sources.append({"path": original, "kind": kind, "space": space, "derivative": derivative, "sha256": None})
        self._digests.append(HASHING.submit(file_sha256, path))

    def finished_sources(self) -> list[dict[str, Any]]:
        """:attr:`sources` with every SHA-256 filled in.

        Raises:
            InputError: a source file could not be read (names it).
        """
        for entry, digest in zip(self.sources, self._digests):
            try:
                entry["sha256"] = digest.result()
            except OSError as exc:
                raise InputError(entry["path"], f"cannot read ({exc})") from exc
        return self.sources


#: Threads that hash source files for provenance (:meth:`RunInputs.add_source`).
HASHING = ThreadPoolExecutor(2, thread_name_prefix="fmri-data-sha256")


def resample_device(recipe: Recipe) -> str:
    """Where resampling runs: recipe ``compute.device`` (``auto`` = CUDA when torch sees one)."""
    return (recipe.get("compute") or {}).get("device") or "auto"


def check_finite(block: np.ndarray, path: str, start: int, policy: str) -> np.ndarray:
    """Apply the recipe's ``inputs.nan_policy`` to a block of frames starting at frame ``start``."""
    with np.errstate(over="ignore", invalid="ignore"):
        total = block.sum()  # one fast reduction: NaN and inf propagate through a sum
    if np.isfinite(total):
        return block
    finite = np.isfinite(block)
    if finite.all():  # finite values whose float32 sum overflowed
        return block
    if policy == "zero":
        return np.where(finite, block, 0.0).astype(np.float32)
    bad = int((~finite).sum())
    raise InputError(path, f"{bad} NaN/inf values in frames from {start} (recipe inputs.nan_policy=error)")


def write_roi(run: RunInputs, key: str, series, labels, atlas_info, source, missing, n_voxels) -> np.ndarray:
    """Normalize (recipe ``roi.normalization``) and write ``roi/<key>`` ``(T, R)`` float32.

    Returns:
        the series as stored, ``(T, R)`` float32.
    """
    store_cfg = run.recipe["store"]
    z, params, arrays = normalize_parcels(series, run.recipe["roi"]["normalization"] if run.recipe["roi"] else "none")
    params.update({k: v.tolist() for k, v in arrays.items()})
    attrs = {
        "labels": list(labels),
        "atlas": atlas_info,
        "source": source,
        "normalization": params,
        "missing_parcels": list(missing),
    }
    if n_voxels is not None:
        attrs["n_voxels"] = [int(n) for n in n_voxels]
    if missing:
        run.warnings.append(f"roi/{key}: {len(missing)} parcels have no voxel in the field of view (series set to 0)")
    run.writer.write_series(
        f"roi/{key}", z.shape[0], (z.shape[1],), "float32", store_cfg["chunk_frames"], store_cfg["shard_chunks"],
        store_cfg["compression"], lambda a, b: z[a:b], attrs=attrs, dimension_names=("time", "parcel"),
    )
    return z
