"""Surface and CIFTI BOLD -> ROI series (parcellated CIFTI as is; dense CIFTI and GIFTI via atlases)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...derive.roi import cifti_parcel_operator, surface_parcel_operator
from ...errors import InputError
from ...read.cifti import open_cifti
from ...read.gifti import open_gifti_series
from ...read.common import resolve_tr
from ...resample.operator import PreparedOperator
from ...resample.temporal import resample_tr
from ...store.writer import RunWriter
from ...store.layout import roi_key
from ..context import OPERATORS, RunContext, cached_atlas, check_finite, frames_per_block, resample_device, write_roi


def cifti_outputs(ctx: RunContext, writer: RunWriter, atlas_rois: bool) -> dict[str, Any]:
    """Parcellated CIFTI -> ROI series directly; dense CIFTI -> atlas parcels (if ``atlas_rois``)."""
    spec, recipe = ctx.spec, ctx.recipe
    temporal = recipe["temporal"]
    device = resample_device(recipe)
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
        ctx.tr_in, ctx.tr_out = tr_in, tr_out
        data = check_finite(cifti.read(), cifti.path, 0, recipe["inputs"]["nan_policy"])
        if atlas_name is None:
            key = src.entities.get("seg") or Path(src.path).name.split(".")[0]
            labels, info, missing, n_vox = cifti.names, {"name": key, "file": ctx.origin.get(src.path, src.path)}, [], None
        else:
            atlas = cached_atlas(atlas_name, ctx.atlas_dir)
            p = cifti_parcel_operator(atlas, cifti.brain_models, cifti.path)
            data = PreparedOperator(p.matrix, device=device, dtype=np.float64)(data.T).T
            key, labels, info, missing, n_vox = roi_key(atlas.name), atlas.labels, atlas.provenance(), p.missing, p.n_voxels
        series = resample_tr(data, tr_in, tr_out, temporal["interpolation"], temporal["antialias"], device=device)
        write_roi(ctx, writer, key, series, labels, info, src.kind, missing, n_vox)
        new = dict(tr_s=tr_out, source_tr_s=tr_in, n_frames=series.shape[0], n_frames_source=cifti.n_frames)
        for k, v in new.items():
            if k in attrs and not np.isclose(attrs[k], v, rtol=0.01):
                raise InputError(src.path, f"{k}={v} differs from the run's other sources ({attrs[k]})")
        attrs.update(new)
    return attrs


def gifti_outputs(ctx: RunContext, writer: RunWriter) -> dict[str, Any]:
    """GIFTI pair (left, right) on a template surface -> atlas parcel series."""
    spec, recipe = ctx.spec, ctx.recipe
    temporal = recipe["temporal"]
    device = resample_device(recipe)
    left, right = spec.surface["L"], spec.surface["R"]
    series = {h: open_gifti_series(spec.surface[h].path) for h in ("L", "R")}
    if series["L"].n_frames != series["R"].n_frames:
        raise InputError(right.path, f"{series['R'].n_frames} frames; hemi-L has {series['L'].n_frames}")
    tr_in, tr_warnings = resolve_tr(left.path, left.metadata, None)
    ctx.warnings += tr_warnings
    for h in ("L", "R"):
        ctx.add_source(spec.surface[h].path, "gifti", spec.surface[h].space, spec.surface[h].derivative)
    tr_out = temporal["tr"] or tr_in
    ctx.tr_in, ctx.tr_out = tr_in, tr_out
    n_vertices = {h: series[h].n_vertices for h in ("L", "R")}
    n_frames = series["L"].n_frames
    attrs: dict[str, Any] = {}
    for name in recipe["roi"]["atlases"]:
        atlas = cached_atlas(name, ctx.atlas_dir)
        key = ("surface-roi", atlas.name, ctx.atlas_dir, left.space, n_vertices["L"], n_vertices["R"])
        p = OPERATORS.get(key, lambda: surface_parcel_operator(atlas, left.space, n_vertices, left.path))
        out = np.empty((n_frames, p.matrix.shape[0]), dtype=np.float32)
        apply = PreparedOperator(p.matrix, device=device, dtype=np.float64)
        step = frames_per_block(n_frames, n_vertices["L"] + n_vertices["R"])
        for start in range(0, n_frames, step):
            stop = min(start + step, n_frames)
            block = np.vstack([series["L"].read(start, stop), series["R"].read(start, stop)])
            block = check_finite(block, left.path, start, recipe["inputs"]["nan_policy"])
            apply(block, out=out[start:stop].T)
        out = resample_tr(out, tr_in, tr_out, temporal["interpolation"], temporal["antialias"], device=device)
        write_roi(ctx, writer, roi_key(atlas.name), out, atlas.labels, atlas.provenance(), "gifti", p.missing, p.n_voxels)
        ctx.warnings.append(
            f"roi/{roi_key(atlas.name)}: volume atlas labels projected onto {left.space} white-to-pial surfaces"
        )
        attrs.update(tr_s=tr_out, source_tr_s=tr_in, n_frames=out.shape[0], n_frames_source=n_frames)
    return attrs


