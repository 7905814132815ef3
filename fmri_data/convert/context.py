"""Per-run state shared by the conversion steps, operator caches, and small helpers."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..reference.atlases import Atlas, load_atlas
from ..derive.roi import ParcelOperator, volume_parcel_operator
from ..derive.volume import normalize
from ..discover import RunSpec
from ..errors import InputError
from ..reference.grids import Grid
from ..read.common import file_sha256
from ..config.recipe import Recipe
from ..store.writer import RunWriter

#: Source frames read per block (bounded by bytes: ~256 MiB of float32 per block).
BLOCK_BYTES = 256 * 2**20


def frames_per_block(n_frames: int, values_per_frame: int) -> int:
    """Frames of float32 source data per streamed block: at most :data:`BLOCK_BYTES`, at least 1."""
    return max(1, min(int(n_frames), BLOCK_BYTES // (4 * int(values_per_frame))))


def temporal_mean(vol) -> np.ndarray:
    """``(X, Y, Z)`` float64 mean over time of a :class:`~fmri_data.read.nifti.VolumeSeries`
    (NaN/inf counted as 0), streamed in blocks of :func:`frames_per_block` frames."""
    total = np.zeros(vol.shape[:3], dtype=np.float64)
    for _, _, block in vol.iter_frames(frames_per_block(vol.n_frames, np.prod(vol.shape[:3]))):
        total += np.nan_to_num(block).sum(axis=3)
    return total / vol.n_frames


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



@dataclass
class RunContext:
    """What one run's conversion knows and has produced so far.

    Steps fill the data fields so that later steps (quality metrics, saliency scores)
    reuse what is already in memory instead of reading the sources again:

    Attributes:
        tr_in, tr_out: source and stored repetition times (s).
        brain_source: ``(T_in, N)`` float32 brain-voxel series on the target grid at the
            source TR, before temporal resampling and normalization (None without volume output).
        mask: ``(X, Y, Z)`` bool brain mask on the target grid; ``grid`` that grid.
        roi: stored ROI series by array key, ``(T_out, R)`` float32 (normalized as stored).
        confounds: ``(columns, (T_in, C) float32)`` or None.
        source_frames: what the volume QA metrics need from the source frames
            (:class:`fmri_data.convert.outputs.qa.SourceFrames`), gathered in the converter's
            streaming pass; QA takes it (and drops it) or reads the source itself when None.
        origin: local copy -> original URL, for files fetched from remote storage.
    """

    spec: RunSpec
    recipe: Recipe
    recipe_hash: str
    atlas_dir: str | None
    warnings: list[str] = field(default_factory=list)
    sources: list[dict[str, Any]] = field(default_factory=list)
    tr_in: float | None = None
    tr_out: float | None = None
    brain_source: np.ndarray | None = None
    mask: np.ndarray | None = None
    grid: Grid | None = None
    roi: dict[str, np.ndarray] = field(default_factory=dict)
    confounds: tuple[list[str], np.ndarray] | None = None
    source_frames: Any = None
    origin: dict[str, str] = field(default_factory=dict)

    def add_source(self, path: str, kind: str, space: str | None, derivative: bool) -> None:
        """Record a file read for this run, with its sha256 (under its original URL when fetched)."""
        original = self.origin.get(path, path)
        if any(s["path"] == original for s in self.sources):
            return
        try:
            digest = file_sha256(path)
        except OSError as exc:
            raise InputError(original, f"cannot read ({exc})") from exc
        self.sources.append({"path": original, "kind": kind, "space": space, "derivative": derivative, "sha256": digest})


def resample_device(recipe: Recipe) -> str:
    """Where resampling runs: recipe ``compute.device`` (``auto`` = CUDA when torch sees one)."""
    return (recipe.get("compute") or {}).get("device") or "auto"


def check_finite(block: np.ndarray, path: str, start: int, policy: str) -> np.ndarray:
    """Apply the recipe's ``inputs.nan_policy`` to a block of frames starting at frame ``start``."""
    finite = np.isfinite(block)
    if finite.all():
        return block
    if policy == "zero":
        return np.where(finite, block, 0.0).astype(np.float32)
    bad = int((~finite).sum())
    raise InputError(path, f"{bad} NaN/inf values in frames from {start} (recipe inputs.nan_policy=error)")


def write_roi(ctx: RunContext, writer: RunWriter, key: str, series, labels, atlas_info, source, missing, n_voxels) -> None:
    """Normalize (recipe ``roi.normalization``) and write ``roi/<key>`` ``(T, R)`` float32."""
    store_cfg = ctx.recipe["store"]
    z, params, arrays = normalize(series, ctx.recipe["roi"]["normalization"] if ctx.recipe["roi"] else "none")
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
        ctx.warnings.append(f"roi/{key}: {len(missing)} parcels have no voxel in the field of view (series set to 0)")
    ctx.roi[key] = z
    writer.write_series(
        f"roi/{key}", z.shape[0], (z.shape[1],), "float32", store_cfg["chunk_frames"], store_cfg["shard_chunks"],
        store_cfg["compression"], lambda a, b: z[a:b], attrs=attrs, dimension_names=("time", "parcel"),
    )


