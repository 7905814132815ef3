"""Convert a BIDS dataset into a training store: one independent task per run.

Per run: read the sources lazily (discover -> read), map every frame through precomputed
linear operators onto the target grid and the atlas parcels (resample), resample the
series in time, normalize (derive), and write the run into a staging group that is
committed atomically (write). Runs that fail record a one-line error naming the file and
the cause; the others still convert. A second conversion into the same store skips the
runs already complete.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import engine
from .atlases import Atlas, load_atlas
from .derive.roi import ParcelOperator, cifti_parcel_operator, surface_parcel_operator, volume_parcel_operator
from .derive.volume import background_value, epi_mask, normalize
from .discover import NATIVE, RunSpec, discover
from .errors import FmriDataError, InputError
from .grids import Grid, template_grid
from .read import (
    VolumeSeries,
    file_sha256,
    open_cifti,
    open_gifti_series,
    open_volume,
    read_confounds,
    read_events,
    read_image_3d,
    resolve_tr,
)
from .recipe import Recipe, load_recipe, recipe_hash
from .resample.spatial import grid_indices, inside_source, resampling_matrix, source_coordinates
from .resample.temporal import n_output_frames, resample_tr
from .store import STAGING, RunWriter, Store, now, roi_key, software_versions

log = logging.getLogger(__name__)

#: Source frames read per block (bounded by bytes: ~256 MiB of float32 per block).
BLOCK_BYTES = 256 * 2**20


@dataclass
class RunResult:
    """Outcome of one run: ``complete``, ``exists`` (already in the store), ``failed`` or ``skipped``."""

    run_id: str
    status: str
    entities: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    tr_s: float | None = None
    n_frames: int | None = None
    outputs: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def row(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ConvertReport:
    """All run results of one ``convert`` call, and the store written."""

    store_url: str
    results: list[RunResult]

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def failed(self) -> list[RunResult]:
        return [r for r in self.results if r.status == "failed"]


# --------------------------------------------------------------------------- operator cache


class _LRU:
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


_OPERATORS = _LRU()
_ATLASES = _LRU(16)


def _geometry_key(shape, affine) -> tuple:
    return (tuple(int(s) for s in shape[:3]), np.asarray(affine, dtype=np.float64).round(6).tobytes())


def _atlas(name: str, folder: str | None) -> Atlas:
    return _ATLASES.get((name, folder), lambda: load_atlas(name, folder))


def _parcel_operator(atlas: Atlas, folder: str | None, shape, affine) -> ParcelOperator:
    key = ("roi", atlas.name, folder) + _geometry_key(shape, affine)
    return _OPERATORS.get(key, lambda: volume_parcel_operator(atlas, shape, affine))


# --------------------------------------------------------------------------- per-run pipeline


@dataclass
class _Context:
    spec: RunSpec
    recipe: Recipe
    recipe_hash: str
    atlas_dir: str | None
    warnings: list[str] = field(default_factory=list)
    sources: list[dict[str, Any]] = field(default_factory=list)

    def add_source(self, path: str, kind: str, space: str | None, derivative: bool) -> None:
        if any(s["path"] == path for s in self.sources):
            return
        try:
            digest = file_sha256(path)
        except OSError as exc:
            raise InputError(path, f"cannot read ({exc})") from exc
        self.sources.append({"path": path, "kind": kind, "space": space, "derivative": derivative, "sha256": digest})


def _check_finite(block: np.ndarray, path: str, start: int, policy: str) -> np.ndarray:
    finite = np.isfinite(block)
    if finite.all():
        return block
    if policy == "zero":
        return np.where(finite, block, 0.0).astype(np.float32)
    bad = int((~finite).sum())
    raise InputError(path, f"{bad} NaN/inf values in frames from {start} (recipe inputs.nan_policy=error)")


def _target_grid(volume_cfg: dict[str, Any]) -> Grid:
    grid = template_grid(volume_cfg["space"], volume_cfg["resolution"])
    return grid.crop_or_pad(tuple(volume_cfg["shape"])) if volume_cfg.get("shape") else grid


def _source_mask(ctx: _Context, vol: VolumeSeries, mode: str, grid: Grid) -> tuple[np.ndarray, str]:
    """Brain mask resampled (nearest) onto the target grid, and how it was obtained."""
    spec = ctx.spec
    if mode == "auto":
        mode = "file" if spec.mask else "epi"
    if mode == "file":
        if not spec.mask:
            raise InputError(vol.path, "recipe volume.mask=file but the run has no desc-brain_mask file")
        data, affine = read_image_3d(spec.mask)
        ctx.add_source(spec.mask, "mask", spec.volume.space if spec.volume else None, True)
    elif mode == "epi":
        total = np.zeros(vol.shape[:3], dtype=np.float64)
        for _, _, block in vol.iter_frames(_frames_per_block(vol)):
            total += np.nan_to_num(block).sum(axis=3)
        data, affine = epi_mask(total / vol.n_frames, vol.affine), vol.affine
    elif mode == "nonzero":
        data, affine = np.nan_to_num(vol.read(0, 1)[..., 0]) != 0, vol.affine
    else:  # none
        data, affine = np.ones(vol.shape[:3], dtype=bool), vol.affine
    nearest = resampling_matrix(data.shape, affine, grid_indices(grid.shape), grid.affine, order=0)
    on_grid = (nearest @ (np.asarray(data).reshape(-1) > 0.5).astype(np.float64)) > 0.5
    return on_grid.reshape(grid.shape), mode


def _frames_per_block(vol: VolumeSeries) -> int:
    return max(1, min(vol.n_frames, BLOCK_BYTES // (4 * int(np.prod(vol.shape[:3])))))


def _volume_run(ctx: _Context, writer: RunWriter) -> dict[str, Any]:
    """Volume source -> ``bold`` (+ mask) and volume-atlas ROI series. Returns run attributes."""
    spec, recipe = ctx.spec, ctx.recipe
    src = spec.volume
    vol = open_volume(src.path)
    tr_in, tr_warnings = resolve_tr(vol.path, spec.metadata, vol.header_tr_s, vol.header_time_unit)
    ctx.warnings += tr_warnings
    ctx.add_source(src.path, "volume", src.space, src.derivative)
    tr_out = recipe["temporal"]["tr"] or tr_in
    t_out = n_output_frames(vol.n_frames, tr_in, tr_out)

    volume_cfg = recipe["volume"]
    attrs: dict[str, Any] = {}
    if volume_cfg is not None and src.space == NATIVE:
        policy = recipe["inputs"]["native_space"]
        if policy == "error":
            raise InputError(vol.path, f"volume is in native space, not {volume_cfg['space']} (recipe inputs.native_space=error)")
        if policy == "skip":
            ctx.warnings.append("native-space volume: no volume output (recipe inputs.native_space=skip)")
            volume_cfg = None
    atlases = [_atlas(name, ctx.atlas_dir) for name in (recipe["roi"] or {}).get("atlases", [])]
    if volume_cfg is None and not atlases:
        return {}

    order = 0 if volume_cfg and volume_cfg["interpolation"] == "nearest" else 1
    op = None
    if volume_cfg is not None:
        grid = _target_grid(volume_cfg)
        mask, mask_mode = _source_mask(ctx, vol, volume_cfg["mask"], grid)
        ijk_all = grid_indices(grid.shape)
        fov = inside_source(source_coordinates(vol.affine, grid.affine, ijk_all), vol.shape[:3]).reshape(grid.shape)
        mask &= fov & grid.box_mask()
        if not mask.any():
            raise InputError(vol.path, "brain mask is empty on the target grid (does the run overlap the template box?)")
        op = resampling_matrix(vol.shape[:3], vol.affine, np.argwhere(mask), grid.affine, order)
    parcel_ops = [_parcel_operator(a, ctx.atlas_dir, vol.shape[:3], vol.affine) for a in atlases]
    if src.space != NATIVE and atlases and any(c.space not in (None, src.space) for a in atlases for c in a.components):
        ctx.warnings.append(f"atlas space differs from the run's space {src.space}; parcels applied by world coordinates")

    # One streaming pass: every block of source frames goes through every operator.
    brain = np.empty((vol.n_frames, op.shape[0]), dtype=np.float32) if op is not None else None
    parcels = [np.empty((vol.n_frames, p.matrix.shape[0]), dtype=np.float32) for p in parcel_ops]
    policy = recipe["inputs"]["nan_policy"]
    for start, stop, block in vol.iter_frames(_frames_per_block(vol)):
        flat = _check_finite(block, vol.path, start, policy).reshape(-1, stop - start)
        if op is not None:
            brain[start:stop] = (op @ flat).T
        for out, p in zip(parcels, parcel_ops):
            out[start:stop] = (p.matrix @ flat).T

    temporal = recipe["temporal"]
    if op is not None:
        brain = resample_tr(brain, tr_in, tr_out, temporal["interpolation"], temporal["antialias"])
        attrs["volume"] = _write_volume(ctx, writer, brain, mask, grid, mask_mode, src.space, volume_cfg)
    for atlas, p, series in zip(atlases, parcel_ops, parcels):
        series = resample_tr(series, tr_in, tr_out, temporal["interpolation"], temporal["antialias"])
        _write_roi(ctx, writer, roi_key(atlas.name), series, atlas.labels, atlas.provenance(), "volume", p.missing, p.n_voxels)
    attrs.update(tr_s=tr_out, source_tr_s=tr_in, n_frames=t_out, n_frames_source=vol.n_frames)
    return attrs


def _write_volume(ctx, writer, brain, mask, grid, mask_mode, source_space, cfg) -> dict[str, Any]:
    store_cfg = ctx.recipe["store"]
    z, params, arrays = normalize(brain, cfg["normalization"])
    background = background_value(z, cfg["background"])
    params["background"] = background
    flat_index = np.flatnonzero(mask.reshape(-1))
    n_frames = z.shape[0]

    def block(start: int, stop: int) -> np.ndarray:
        dense = np.full((stop - start, grid.n_voxels), background, dtype=cfg["dtype"])
        dense[:, flat_index] = z[start:stop]
        return dense.reshape((stop - start,) + grid.shape)

    writer.write_series(
        "bold", n_frames, grid.shape, cfg["dtype"], store_cfg["chunk_frames"], store_cfg["shard_chunks"],
        store_cfg["compression"], block, dimension_names=("time", "x", "y", "z"),
    )
    writer.write_array("brain_mask", mask, store_cfg["compression"], dimension_names=("x", "y", "z"))
    for name, values in arrays.items():
        volume = np.zeros(grid.n_voxels, dtype=np.float32)
        volume[flat_index] = values
        writer.write_array(f"norm_{name}", volume.reshape(grid.shape), store_cfg["compression"], dimension_names=("x", "y", "z"))
    aligned = source_space == cfg["space"]
    if not aligned:
        ctx.warnings.append(
            f"source space '{source_space}' is not {cfg['space']}: resampled by world coordinates, without registration"
        )
    return {
        "space": cfg["space"],
        "resolution": cfg["resolution"],
        "shape": list(grid.shape),
        "affine": grid.affine.tolist(),
        "voxel_size_mm": list(grid.voxel_size),
        "source_space": source_space,
        "alignment": "template" if aligned else "world-coordinates",
        "interpolation": cfg["interpolation"],
        "mask": mask_mode,
        "n_brain_voxels": int(mask.sum()),
        "normalization": params,
        "dtype": cfg["dtype"],
    }


def _write_roi(ctx, writer, key, series, labels, atlas_info, source, missing, n_voxels) -> None:
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
    writer.write_series(
        f"roi/{key}", z.shape[0], (z.shape[1],), "float32", store_cfg["chunk_frames"], store_cfg["shard_chunks"],
        store_cfg["compression"], lambda a, b: z[a:b], attrs=attrs, dimension_names=("time", "parcel"),
    )


def _cifti_runs(ctx: _Context, writer: RunWriter, atlas_rois: bool) -> dict[str, Any]:
    """Parcellated CIFTI -> ROI series directly; dense CIFTI -> atlas parcels (if ``atlas_rois``)."""
    spec, recipe = ctx.spec, ctx.recipe
    temporal = recipe["temporal"]
    attrs: dict[str, Any] = {}
    jobs = [(s, None) for s in spec.parcellated]
    if spec.cifti_dense is not None and atlas_rois and recipe["roi"]:
        jobs += [(spec.cifti_dense, name) for name in recipe["roi"]["atlases"]]
    for src, atlas_name in jobs:
        cifti = open_cifti(src.path)
        tr_in, tr_warnings = resolve_tr(cifti.path, src.metadata, cifti.tr_s, "sec")
        ctx.warnings += [w for w in tr_warnings if w not in ctx.warnings]
        ctx.add_source(src.path, src.kind, src.space, src.derivative)
        tr_out = temporal["tr"] or tr_in
        data = _check_finite(cifti.read(), cifti.path, 0, recipe["inputs"]["nan_policy"])
        if atlas_name is None:
            key = src.entities.get("seg") or Path(src.path).name.split(".")[0]
            labels, info, missing, n_vox = cifti.names, {"name": key, "file": src.path}, [], None
        else:
            atlas = _atlas(atlas_name, ctx.atlas_dir)
            p = cifti_parcel_operator(atlas, cifti.brain_models, cifti.path)
            data = np.asarray((p.matrix @ data.T).T, dtype=np.float32)
            key, labels, info, missing, n_vox = roi_key(atlas.name), atlas.labels, atlas.provenance(), p.missing, p.n_voxels
        series = resample_tr(data, tr_in, tr_out, temporal["interpolation"], temporal["antialias"])
        _write_roi(ctx, writer, key, series, labels, info, src.kind, missing, n_vox)
        new = dict(tr_s=tr_out, source_tr_s=tr_in, n_frames=series.shape[0], n_frames_source=cifti.n_frames)
        for k, v in new.items():
            if k in attrs and not np.isclose(attrs[k], v, rtol=0.01):
                raise InputError(src.path, f"{k}={v} differs from the run's other sources ({attrs[k]})")
        attrs.update(new)
    return attrs


def _gifti_run(ctx: _Context, writer: RunWriter) -> dict[str, Any]:
    """GIFTI pair (left, right) on a template surface -> atlas parcel series."""
    spec, recipe = ctx.spec, ctx.recipe
    temporal = recipe["temporal"]
    left, right = spec.surface["L"], spec.surface["R"]
    series = {h: open_gifti_series(spec.surface[h].path) for h in ("L", "R")}
    if series["L"].n_frames != series["R"].n_frames:
        raise InputError(right.path, f"{series['R'].n_frames} frames; hemi-L has {series['L'].n_frames}")
    tr_in, tr_warnings = resolve_tr(left.path, left.metadata, None)
    ctx.warnings += tr_warnings
    for h in ("L", "R"):
        ctx.add_source(spec.surface[h].path, "gifti", spec.surface[h].space, spec.surface[h].derivative)
    tr_out = temporal["tr"] or tr_in
    n_vertices = {h: series[h].n_vertices for h in ("L", "R")}
    n_frames = series["L"].n_frames
    attrs: dict[str, Any] = {}
    for name in recipe["roi"]["atlases"]:
        atlas = _atlas(name, ctx.atlas_dir)
        key = ("surface-roi", atlas.name, ctx.atlas_dir, left.space, n_vertices["L"], n_vertices["R"])
        p = _OPERATORS.get(key, lambda: surface_parcel_operator(atlas, left.space, n_vertices, left.path))
        out = np.empty((n_frames, p.matrix.shape[0]), dtype=np.float32)
        step = max(1, BLOCK_BYTES // (4 * (n_vertices["L"] + n_vertices["R"])))
        for start in range(0, n_frames, step):
            stop = min(start + step, n_frames)
            block = np.vstack([series["L"].read(start, stop), series["R"].read(start, stop)])
            block = _check_finite(block, left.path, start, recipe["inputs"]["nan_policy"])
            out[start:stop] = (p.matrix @ block).T
        out = resample_tr(out, tr_in, tr_out, temporal["interpolation"], temporal["antialias"])
        _write_roi(ctx, writer, roi_key(atlas.name), out, atlas.labels, atlas.provenance(), "gifti", p.missing, p.n_voxels)
        ctx.warnings.append(
            f"roi/{roi_key(atlas.name)}: volume atlas labels projected onto {left.space} white-to-pial surfaces"
        )
        attrs.update(tr_s=tr_out, source_tr_s=tr_in, n_frames=out.shape[0], n_frames_source=n_frames)
    return attrs


def _tables(ctx: _Context, writer: RunWriter, n_frames_source: int) -> dict[str, Any]:
    spec = ctx.spec
    attrs: dict[str, Any] = {}
    if spec.events:
        attrs["events"] = read_events(spec.events)
        ctx.add_source(spec.events, "events", None, False)
    if spec.confounds:
        columns, values = read_confounds(spec.confounds)
        ctx.add_source(spec.confounds, "confounds", None, True)
        if values.shape[0] != n_frames_source:
            ctx.warnings.append(f"confounds have {values.shape[0]} rows for {n_frames_source} frames; not stored")
        else:
            writer.write_array(
                "confounds", values, ctx.recipe["store"]["compression"],
                attrs={"columns": columns, "tr_s": ctx.spec.metadata.get("RepetitionTime")},
                dimension_names=("time", "confound"),
            )
    return attrs


def _no_output_reason(spec: RunSpec, recipe: Recipe) -> str:
    kinds = sorted({f"{s.kind} ({s.space})" for s in spec.sources()})
    return f"no output of recipe '{recipe['name']}' applies to this run's sources: {', '.join(kinds)}"


def convert_run(
    spec: RunSpec,
    recipe: Recipe,
    store_url: str,
    *,
    atlas_dir: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> RunResult:
    """Convert one run into the store. Never raises for bad input: returns a failed result.

    Args:
        spec: the run, from :func:`fmri_data.discover.discover`.
        recipe: resolved recipe.
        store_url: an existing store (see :meth:`Store.create`).
        atlas_dir: folder of atlas files.
        storage_options: fsspec options of the store.

    Returns:
        :class:`RunResult` with status ``complete``, ``skipped`` or ``failed``.
    """
    started = time.perf_counter()
    result = RunResult(spec.run_id, "failed", entities=dict(spec.entities))
    if spec.error:
        result.error = spec.error
        return result
    ctx = _Context(spec, recipe, recipe_hash(recipe), atlas_dir)
    writer = None
    try:
        store = Store.open(store_url, storage_options)
        writer = store.begin_run(spec.run_id)
        attrs: dict[str, Any] = {}
        if spec.volume is not None:
            attrs.update(_volume_run(ctx, writer))
        has_roi = any(name.startswith("roi/") for name in writer.outputs)
        attrs.update(_cifti_runs(ctx, writer, atlas_rois=not has_roi))
        has_roi = has_roi or (spec.cifti_dense is not None and bool(recipe["roi"]))
        if spec.surface and recipe["roi"] and not has_roi:
            attrs.update(_gifti_run(ctx, writer))
        if not writer.outputs:
            writer.abort()
            result.status, result.error = "skipped", _no_output_reason(spec, recipe)
            return result
        attrs.update(_tables(ctx, writer, attrs["n_frames_source"]))
        attrs.update(
            run_id=spec.run_id,
            entities=spec.entities,
            sources=ctx.sources,
            participant=spec.participant,
            metadata=spec.metadata,
            recipe_hash=ctx.recipe_hash,
            software=software_versions(),
            created=now(),
            warnings=ctx.warnings,
        )
        writer.commit(attrs)
        result.status = "complete"
        result.tr_s, result.n_frames = attrs["tr_s"], attrs["n_frames"]
        result.outputs = list(writer.outputs)
    except FmriDataError as exc:
        result.error = str(exc)
    except MemoryError:
        result.error = f"{spec.primary.path}: out of memory while converting"
    except Exception as exc:  # a bug or an unforeseen file defect: report it, keep converting others
        log.exception("unexpected error converting %s", spec.run_id)
        result.error = f"{spec.primary.path}: unexpected {type(exc).__name__}: {exc}"
    finally:
        if writer is not None and result.status != "complete":
            try:
                writer.abort()
            except Exception:  # pragma: no cover - best effort cleanup
                pass
        result.warnings = list(ctx.warnings)
        result.seconds = time.perf_counter() - started
    return result


# --------------------------------------------------------------------------- dataset


def convert(
    bids_root: str | Path,
    output: str,
    recipe: str | Path | Recipe = "default",
    *,
    overrides: list[str] | None = None,
    participant_label: list[str] | None = None,
    task: list[str] | None = None,
    space: list[str] | None = None,
    derivatives: list[str | Path] | None = None,
    atlas_dir: str | None = None,
    scheduler: str = "threads",
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> ConvertReport:
    """Convert every run of a BIDS dataset into one Zarr v3 store.

    Args:
        bids_root: raw BIDS dataset (its ``derivatives/`` are used) or a derivatives dataset.
        output: store location (local path or fsspec URL).
        recipe: bundled recipe name, YAML path, or an already resolved recipe dict.
        overrides: ``key.path=value`` recipe overrides.
        participant_label, task, space: discovery filters (``space`` defaults to the
            recipe's ``inputs.spaces``).
        derivatives: extra derivatives datasets outside ``bids_root``.
        atlas_dir: folder holding atlas files (else ``$FMRI_DATA_ATLAS_DIR``).
        scheduler: ``"threads"`` (default), ``"processes"`` (a local distributed cluster),
            ``"synchronous"``, or the address of a running Dask scheduler (``tcp://host:8786``).
        workers: concurrent runs (threads or worker processes).
        overwrite: delete an existing store first.
        progress: show a progress bar.
        storage_options: fsspec options for ``output``.

    Returns:
        :class:`ConvertReport`; failed runs are listed there, not raised.

    Raises:
        FmriDataError: the dataset cannot be indexed, the recipe is invalid, or the store
            cannot be created.
    """
    resolved = recipe if isinstance(recipe, dict) else load_recipe(recipe, overrides)
    digest = recipe_hash(resolved)
    volume_cfg = resolved.get("volume") or {}
    runs = discover(
        bids_root,
        derivatives=derivatives,
        participant_label=participant_label,
        task=task,
        space=space or resolved["inputs"].get("spaces"),
        prefer=resolved["inputs"]["prefer"],
        volume_space=volume_cfg.get("space"),
        volume_res=volume_cfg.get("resolution"),
    )
    for name in (resolved["roi"] or {}).get("atlases", []):
        _atlas(name, atlas_dir)  # a missing or off-grid atlas fails the whole conversion up front
    store = Store.create(output, resolved, digest, overwrite=overwrite, bids_root=str(bids_root), storage_options=storage_options)
    done = set(store.run_ids())
    results = [RunResult(r.run_id, "exists", entities=dict(r.entities)) for r in runs if r.run_id in done]
    todo = [r for r in runs if r.run_id not in done]
    _clear_stale_staging(store, [r.run_id for r in todo])
    results += engine.map_runs(
        convert_run,
        todo,
        scheduler=scheduler,
        workers=workers,
        progress=progress,
        label=f"converting {len(todo)} runs",
        kwargs={"recipe": resolved, "store_url": store.url, "atlas_dir": atlas_dir, "storage_options": storage_options},
    )
    results.sort(key=lambda r: r.run_id)
    _write_index(store, results)
    return ConvertReport(store.url, results)


def _clear_stale_staging(store: Store, run_ids: list[str]) -> None:
    """Remove staging groups left by an interrupted conversion of these runs."""
    base = f"{store.path}/{STAGING}"
    if not store.fs.exists(base):
        return
    wanted = set(run_ids)
    for entry in store.fs.ls(base, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.rsplit(".", 1)[0] in wanted:
            store.fs.rm(entry, recursive=True)


def _write_index(store: Store, results: list[RunResult]) -> None:
    previous = store.read_index()
    rows: dict[str, dict[str, Any]] = {}
    if len(previous):
        for row in previous.to_dict(orient="records"):
            rows[row["run_id"]] = row
    for r in results:
        if r.status == "exists" and r.run_id in rows:
            continue
        rows[r.run_id] = {k: v for k, v in r.row().items()}
    for run_id in store.run_ids():
        attrs = store.run_attrs(run_id)
        row = rows.setdefault(run_id, {"run_id": run_id})
        row.update(
            status="complete",
            entities=attrs["entities"],
            error=None,
            tr_s=attrs["tr_s"],
            n_frames=attrs["n_frames"],
            outputs=attrs["outputs"],
            warnings=attrs["warnings"],
        )
        row.setdefault("seconds", 0.0)
    store.write_index(sorted(rows.values(), key=lambda r: r["run_id"]))
