"""Surface and CIFTI BOLD -> ROI series (parcellated CIFTI as is; dense CIFTI and GIFTI via atlases)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ...derive.roi import cifti_parcel_operator, surface_parcel_operator
from ...errors import InputError
from ...read.cifti import open_cifti
from ...read.gifti import open_gifti_series
from ...read.common import resolve_tr
from ...resample.operator import PreparedOperator
from ...resample.temporal import resample_tr
from ...store.layout import roi_key
from ..context import OPERATORS, RunInputs, cached_atlas, check_finite, frames_per_block, resample_device, write_roi
from .base import OutputKind, Produced, Timing


def cifti_outputs(run: RunInputs, inputs: Mapping[str, Any]) -> Produced:
    """Parcellated CIFTI -> ROI series directly; dense CIFTI -> atlas parcels (unless the
    ``atlas_parcels`` input says that atlas parcel series are already written).

    Returns:
        run attributes (timing) and values ``timing``, ``roi_series`` (the input's series plus
        these), ``atlas_parcels`` (also true when dense CIFTI atlas parcels apply).

    Raises:
        InputError: a source whose TR or frame count differs from the run's other CIFTI sources,
            non-finite values (``inputs.nan_policy=error``), or an atlas that does not fit.
    """
    spec, recipe = run.spec, run.recipe
    temporal = recipe["temporal"]
    device = resample_device(recipe)
    attrs: dict[str, Any] = {}
    roi_series = dict(inputs["roi_series"] or {})
    atlas_parcels = bool(inputs["atlas_parcels"])
    timing = None
    jobs = [(s, None) for s in spec.parcellated]
    if spec.cifti_dense is not None and not atlas_parcels and recipe["roi"]:
        jobs += [(spec.cifti_dense, name) for name in recipe["roi"]["atlases"]]
    for src, atlas_name in jobs:
        cifti = open_cifti(src.path)
        tr_in, tr_warnings = resolve_tr(cifti.path, src.metadata, cifti.tr_s, "sec")
        run.warnings.extend([w for w in tr_warnings if w not in run.warnings])
        run.add_source(src.path, src.kind, src.space, src.derivative)
        tr_out = temporal["tr"] or tr_in
        data = check_finite(cifti.read(), cifti.path, 0, recipe["inputs"]["nan_policy"])
        if atlas_name is None:
            key = src.entities.get("seg") or Path(src.path).name.split(".")[0]
            labels, info, missing, n_vox = cifti.names, {"name": key, "file": run.origin.get(src.path, src.path)}, [], None
        else:
            atlas = cached_atlas(atlas_name, run.atlas_dir)
            p = cifti_parcel_operator(atlas, cifti.brain_models, cifti.path)
            data = PreparedOperator(p.matrix, device=device, dtype=np.float64)(data.T).T
            key, labels, info, missing, n_vox = roi_key(atlas.name), atlas.labels, atlas.provenance(), p.missing, p.n_voxels
        series = resample_tr(data, tr_in, tr_out, temporal["interpolation"], temporal["antialias"], device=device,
                             grid=temporal["grid"])
        roi_series[key] = write_roi(run, key, series, labels, info, src.kind, missing, n_vox)
        new = dict(tr_s=tr_out, source_tr_s=tr_in, n_frames=series.shape[0], n_frames_source=cifti.n_frames)
        for k, v in new.items():
            if k in attrs and not np.isclose(attrs[k], v, rtol=0.01):
                raise InputError(src.path, f"{k}={v} differs from the run's other sources ({attrs[k]})")
        attrs.update(new)
        timing = Timing(**new)
    dense_atlas_parcels = spec.cifti_dense is not None and bool(recipe["roi"])
    values: dict[str, Any] = {"roi_series": roi_series, "atlas_parcels": atlas_parcels or dense_atlas_parcels}
    if timing is not None:
        values["timing"] = timing
    return Produced(attrs, values)


def gifti_outputs(run: RunInputs, inputs: Mapping[str, Any]) -> Produced:
    """GIFTI pair (left, right) on a template surface -> atlas parcel series.

    Returns:
        run attributes (timing) and values ``timing``, ``roi_series`` (the input's series plus these).

    Raises:
        InputError: hemispheres with different frame counts, non-finite values
            (``inputs.nan_policy=error``), or a surface the atlas cannot be projected onto.
    """
    spec, recipe = run.spec, run.recipe
    temporal = recipe["temporal"]
    device = resample_device(recipe)
    left, right = spec.surface["L"], spec.surface["R"]
    series = {h: open_gifti_series(spec.surface[h].path) for h in ("L", "R")}
    if series["L"].n_frames != series["R"].n_frames:
        raise InputError(right.path, f"{series['R'].n_frames} frames; hemi-L has {series['L'].n_frames}")
    tr_in, tr_warnings = resolve_tr(left.path, left.metadata, None)
    run.warnings.extend(tr_warnings)
    for h in ("L", "R"):
        run.add_source(spec.surface[h].path, "gifti", spec.surface[h].space, spec.surface[h].derivative)
    tr_out = temporal["tr"] or tr_in
    n_vertices = {h: series[h].n_vertices for h in ("L", "R")}
    n_frames = series["L"].n_frames
    attrs: dict[str, Any] = {}
    roi_series = dict(inputs["roi_series"] or {})
    timing = None
    for name in recipe["roi"]["atlases"]:
        atlas = cached_atlas(name, run.atlas_dir)
        key = ("surface-roi", atlas.name, run.atlas_dir, left.space, n_vertices["L"], n_vertices["R"])
        p = OPERATORS.get(key, lambda: surface_parcel_operator(atlas, left.space, n_vertices, left.path))
        out = np.empty((n_frames, p.matrix.shape[0]), dtype=np.float32)
        apply = PreparedOperator(p.matrix, device=device, dtype=np.float64)
        step = frames_per_block(n_frames, n_vertices["L"] + n_vertices["R"])
        for start in range(0, n_frames, step):
            stop = min(start + step, n_frames)
            block = np.vstack([series["L"].read(start, stop), series["R"].read(start, stop)])
            block = check_finite(block, left.path, start, recipe["inputs"]["nan_policy"])
            apply(block, out=out[start:stop].T)
        out = resample_tr(out, tr_in, tr_out, temporal["interpolation"], temporal["antialias"], device=device,
                          grid=temporal["grid"])
        roi_series[roi_key(atlas.name)] = write_roi(
            run, roi_key(atlas.name), out, atlas.labels, atlas.provenance(), "gifti", p.missing, p.n_voxels
        )
        run.warnings.append(
            f"roi/{roi_key(atlas.name)}: volume atlas labels projected onto {left.space} white-to-pial surfaces"
        )
        attrs.update(tr_s=tr_out, source_tr_s=tr_in, n_frames=out.shape[0], n_frames_source=n_frames)
        timing = Timing(tr_s=tr_out, source_tr_s=tr_in, n_frames=out.shape[0], n_frames_source=n_frames)
    values: dict[str, Any] = {"roi_series": roi_series}
    if timing is not None:
        values["timing"] = timing
    return Produced(attrs, values)


#: Parcellated CIFTI -> ``roi/<seg>``; dense CIFTI -> atlas ``roi/*`` (unless the volume gave them).
CIFTI_KIND = OutputKind(
    name="cifti",
    needs=("roi_series", "atlas_parcels"),
    provides=("timing", "roi_series", "atlas_parcels"),
    applies=lambda run, inputs: bool(run.spec.parcellated) or run.spec.cifti_dense is not None,
    run=cifti_outputs,
)

#: GIFTI pair -> atlas ``roi/*`` (only when no earlier source gave atlas parcel series).
GIFTI_KIND = OutputKind(
    name="gifti",
    needs=("roi_series", "atlas_parcels"),
    provides=("timing", "roi_series"),
    applies=lambda run, inputs: bool(run.spec.surface) and bool(run.recipe["roi"]) and not inputs["atlas_parcels"],
    run=gifti_outputs,
)


