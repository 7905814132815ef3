"""Surface or volume BOLD -> ``flat`` ``(T, H, W)`` flat-map video + ``flat_mask`` ``(H, W)``.

Sources, in order of preference: a GIFTI pair (its space names the surface family), dense
CIFTI (fsLR cortex structures), then a volume (projected onto the recipe's ``flat.family``
surfaces by world coordinates). The flat operator (and for volumes the composed
voxel -> pixel operator) comes from :mod:`fmri_data.derive.flatmap`, cached on disk.

Order per run, as the reference (fmri-fm): per recipe ``flat.normalization =
vertex_zscore`` each vertex series is z-scored over the run (population std, ddof 0, as
``sklearn.preprocessing.scale``) at the source TR, then resampled to ``temporal.tr``
(:func:`fmri_data.resample.temporal.resample_tr`; ``pchip`` runs on the data in column
blocks, no operator), then mapped to pixels. Vertices without signal (std <= 1e-6, e.g. a
medial wall stored as 0, or absent from a dense CIFTI) are zeros; with ``flat.no_signal =
keep`` (the reference) they are interpolated as zeros and ``flat_mask`` is the geometry's
valid-pixel mask; with ``drop`` they are left out: a pixel interpolates its triangle's
remaining vertices, and drops out of ``flat_mask`` if none remains. Vertices a volume does
not reach are always left out (the composed operator has no columns for them). With
``normalization = none`` volume runs go through the one composed ``(pixels, voxels)`` matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import scipy.sparse as sp

from ...derive.flatmap import (
    GRID_KEYS, FlatOperator, projection_matrix, render_flat, restrict_to_vertices, surface_flat_operator,
    vertex_normals, volume_flat_operator,
)
from ...discover import NATIVE
from ...errors import InputError
from ...read.cifti import open_cifti
from ...read.gifti import open_gifti_series
from ...read.nifti import open_volume, read_image_3d
from ...read.common import resolve_tr
from ...resample.operator import PreparedOperator
from ...resample.temporal import resample_tr
from ...reference.surfaces import SurfaceFamily, cortex_from_dlabel, load_family
from ..context import OPERATORS, RunInputs, cached_atlas, check_finite, frames_per_block, resample_device
from .base import OutputKind, Produced, Timing

#: Template spaces of surface data -> flat-map family.
SPACE_FAMILY = {"fsaverage5": "fsaverage5", "fsLR": "fsLR"}
_NO_SIGNAL = 1e-6


def _cortex(family: SurfaceFamily, cfg: dict[str, Any], run: RunInputs) -> tuple[dict, str]:
    """Cortex masks per recipe ``flat.medial_wall`` and the mode actually used."""
    mode = cfg["medial_wall"]
    if mode in ("atlas", "auto") and family.name == "fsLR":
        try:
            atlas = cached_atlas(cfg["cortex_atlas"], run.atlas_dir)
            dlabel = next(c.surface for c in atlas.components if c.surface)
        except (InputError, StopIteration) as exc:
            if mode == "atlas":
                raise InputError(cfg["cortex_atlas"], f"no fsLR surface parcellation for flat.medial_wall=atlas ({exc})") from exc
        else:
            return cortex_from_dlabel(dlabel, family.n_vertices), f"atlas:{atlas.name}"
    elif mode == "atlas":
        raise InputError(family.name, "flat.medial_wall=atlas needs an fsLR surface parcellation; use auto or flat")
    return {"L": None, "R": None}, "flat"


def _surface_operator(family: SurfaceFamily, cfg: dict[str, Any], run: RunInputs) -> tuple[FlatOperator, str]:
    key = ("flat", family.name, run.atlas_dir, cfg["medial_wall"], cfg["cortex_atlas"]) + tuple(str(cfg[k]) for k in GRID_KEYS)

    def build():
        cortex, mode = _cortex(family, cfg, run)
        return surface_flat_operator(family.flat, cortex, cfg), mode

    return OPERATORS.get(key, build)


def _vertex_series_gifti(run: RunInputs, family: SurfaceFamily) -> tuple[np.ndarray, np.ndarray, float, list[str]]:
    spec = run.spec
    series = {h: open_gifti_series(spec.surface[h].path) for h in ("L", "R")}
    for h in ("L", "R"):
        if series[h].n_vertices != family.n_vertices[h]:
            raise InputError(series[h].path, f"{series[h].n_vertices} vertices; {family.name} hemi-{h} has {family.n_vertices[h]}")
        run.add_source(spec.surface[h].path, "gifti", spec.surface[h].space, spec.surface[h].derivative)
    if series["L"].n_frames != series["R"].n_frames:
        raise InputError(series["R"].path, f"{series['R'].n_frames} frames; hemi-L has {series['L'].n_frames}")
    left = spec.surface["L"]
    tr_in, warnings = resolve_tr(left.path, left.metadata, None)
    data = np.vstack([series["L"].read(), series["R"].read()])
    data = check_finite(data, left.path, 0, run.recipe["inputs"]["nan_policy"])
    return data, np.ones(len(data), dtype=bool), tr_in, warnings


def _vertex_series_cifti(run: RunInputs, family: SurfaceFamily) -> tuple[np.ndarray, np.ndarray, float, list[str]]:
    src = run.spec.cifti_dense
    cifti = open_cifti(src.path)
    tr_in, warnings = resolve_tr(cifti.path, src.metadata, cifti.tr_s, "sec")
    run.add_source(src.path, src.kind, src.space, src.derivative)
    data = check_finite(cifti.read(), cifti.path, 0, run.recipe["inputs"]["nan_policy"])  # (T, G)
    n = family.n_vertices
    out = np.zeros((n["L"] + n["R"], cifti.n_frames), dtype=np.float32)
    covered = np.zeros(len(out), dtype=bool)
    found = set()
    for name, slc, model in cifti.brain_models.iter_structures():
        hemi = {"CIFTI_STRUCTURE_CORTEX_LEFT": "L", "CIFTI_STRUCTURE_CORTEX_RIGHT": "R"}.get(str(name))
        if hemi is None:
            continue
        if cifti.brain_models.nvertices[name] != n[hemi]:
            raise InputError(cifti.path, f"{name} has {cifti.brain_models.nvertices[name]} vertices; {family.name} has {n[hemi]}")
        rows = model.vertex + (0 if hemi == "L" else n["L"])
        out[rows] = data[:, slc].T
        covered[rows] = True
        found.add(hemi)
    if found != {"L", "R"}:
        raise InputError(cifti.path, "dense CIFTI without both CORTEX_LEFT and CORTEX_RIGHT structures")
    return out, covered, tr_in, warnings


def _projection(run: RunInputs, family: SurfaceFamily, vol, cfg: dict[str, Any]):
    """``(V, voxels)`` projection of the run's volume onto the family's surfaces, and its description."""
    proj = cfg["projection"]
    surfaces = proj["surfaces"]
    if surfaces == "auto":
        surfaces = "white_pial" if family.white is not None and family.pial is not None else "midthickness"
    if surfaces == "white_pial" and (family.white is None or family.pial is None):
        raise InputError(family.name, "flat.projection.surfaces=white_pial but the family has no white/pial surfaces")
    if surfaces == "midthickness" and family.midthickness is None:
        raise InputError(family.name, "flat.projection.surfaces=midthickness but the family has no midthickness surface")
    mask = None
    if run.spec.mask:
        data, affine = read_image_3d(run.spec.mask)
        if data.shape == tuple(vol.shape[:3]) and np.allclose(affine, vol.affine, atol=1e-3):
            mask = data > 0.5
            run.add_source(run.spec.mask, "mask", run.spec.volume.space, True)
    blocks = []
    for hemi in ("L", "R"):
        if surfaces == "white_pial":
            outer, inner, normals = family.pial[hemi][0], family.white[hemi][0], None
        else:
            outer, faces = family.midthickness[hemi]
            inner, normals = None, vertex_normals(outer, faces)
        blocks.append(projection_matrix(outer, inner, normals, vol.affine, vol.shape[:3], proj["n_samples"],
                                        proj["radius_mm"], mask))
    info = {"surfaces": surfaces, "n_samples": proj["n_samples"], "mask": "file" if mask is not None else "none",
            "semantics": "nilearn vol_to_surf (linear, " + ("depth pial->white" if surfaces == "white_pial"
                                                            else f"line +-{proj['radius_mm']} mm along normals") + ")"}
    arrays = [np.asarray(vol.affine), np.asarray(vol.shape[:3])] + ([mask] if mask is not None else [])
    return sp.vstack(blocks).tocsr(), info, arrays


@dataclass(frozen=True)
class FlatSource:
    """A run's flat-map source series, read and mapped to the operator's first stage.

    Attributes:
        path: the source file (named in errors); kind: ``gifti``, ``cifti_dense`` or ``volume``.
        family: the surface family; op: the flat operator; medial_wall: the mode used.
        data: ``(n, T_in)`` float32 vertex series, or pixel series when ``pixel_space``.
        covered: ``(n,)`` bool, rows that carry source data.
        pixel_space: rows are pixels of the composed volume operator (not vertices).
        tr_in: source TR (s); tr_warnings: warnings of the TR lookup.
        projection_info: volume -> surface projection (run attribute ``flat.projection``), or None.
    """

    path: str
    kind: str
    family: SurfaceFamily
    op: FlatOperator
    medial_wall: str
    data: np.ndarray
    covered: np.ndarray
    pixel_space: bool
    tr_in: float
    tr_warnings: list[str]
    projection_info: dict[str, Any] | None = None


def _read_surface_source(run: RunInputs, cfg: dict[str, Any]) -> FlatSource:
    """GIFTI pair or dense CIFTI -> ``(V, T_in)`` vertex series of the space's family.

    Raises:
        InputError: no flat-map surfaces for the source space, or vertex counts that do not match.
    """
    spec = run.spec
    src = spec.surface["L"] if spec.surface else spec.cifti_dense
    family_name = SPACE_FAMILY.get(src.space)
    if family_name is None:
        raise InputError(src.path, f"no flat-map surfaces for space '{src.space}' (known: {', '.join(SPACE_FAMILY)})")
    family = load_family(family_name, run.atlas_dir)
    reader = _vertex_series_gifti if spec.surface else _vertex_series_cifti
    data, covered, tr_in, tr_warnings = reader(run, family)
    op, medial_wall = _surface_operator(family, cfg, run)
    kind = "gifti" if spec.surface else "cifti_dense"
    return FlatSource(src.path, kind, family, op, medial_wall, data, covered, False, tr_in, tr_warnings)


def _read_volume_source(run: RunInputs, cfg: dict[str, Any], device: str) -> FlatSource:
    """Volume -> ``(V, T_in)`` vertex series projected onto ``flat.family`` (or, without a
    per-vertex z-score, ``(P, T_in)`` pixel series through the composed operator), streamed.

    Raises:
        InputError: the volume covers no cortex, or non-finite values (``inputs.nan_policy=error``).
    """
    spec = run.spec
    src = spec.volume
    family = load_family(cfg["family"], run.atlas_dir)
    vol = open_volume(src.path)
    tr_in, tr_warnings = resolve_tr(vol.path, spec.metadata, vol.header_tr_s, vol.header_time_unit)
    run.add_source(src.path, "volume", src.space, src.derivative)
    surface_op, medial_wall = _surface_operator(family, cfg, run)
    key = ("flat-volume", surface_op.meta["key"], vol.path, tuple(vol.shape[:3]), str(cfg["projection"]))
    projection, projection_info, arrays = OPERATORS.get(key, lambda: _projection(run, family, vol, cfg))
    op = OPERATORS.get(key + ("op",), lambda: volume_flat_operator(surface_op, projection, {**cfg["projection"],
                       "info": projection_info}, arrays + [projection.indptr, projection.indices]))
    if not op.mask.any():
        raise InputError(vol.path, f"the volume covers none of the {family.name} cortex (world coordinates)")
    step = frames_per_block(vol.n_frames, np.prod(vol.shape[:3]))
    # Without a per-vertex z-score the composed (pixels, voxels) matrix gives pixel series at once.
    pixel_space = cfg["normalization"] != "vertex_zscore"
    stage = op.matrix if pixel_space else op.vertex_stage
    apply_stage = PreparedOperator(stage, device=device)
    data = np.empty((stage.shape[0], vol.n_frames), dtype=np.float32)
    for start, stop, block in vol.iter_frames(step):
        block = check_finite(block, vol.path, start, run.recipe["inputs"]["nan_policy"]).reshape(-1, stop - start)
        apply_stage(block, out=data[:, start:stop])
    covered = np.ones(len(data), bool) if pixel_space else np.asarray(op.vertex_stage.getnnz(axis=1) > 0)
    space = src.space
    note = "native-space volume" if space == NATIVE else f"{space} volume"
    run.warnings.append(
        f"flat: {note} projected onto {family.name} surfaces by world coordinates "
        f"({'no registration; ' if space == NATIVE else ''}template surfaces approximate MNI space)"
    )
    return FlatSource(src.path, "volume", family, op, medial_wall, data, covered, pixel_space, tr_in, tr_warnings,
                      projection_info)


def _normalize(source: FlatSource, normalization: str) -> tuple[np.ndarray, np.ndarray]:
    """Signal check and (``vertex_zscore``) z-score over the run of each row of ``source.data``
    (ddof 0; rows without signal become 0, as ``sklearn.preprocessing.scale`` makes a constant row).

    Returns:
        ``(n, T_in)`` float32 series and ``(n,)`` bool rows with signal (covered, std > 1e-6).

    Raises:
        InputError: no row has signal.
    """
    data = source.data
    std = data.std(axis=1, dtype=np.float64)
    signal = source.covered & (std > _NO_SIGNAL)
    if not signal.any():
        raise InputError(source.path, "no BOLD signal on the cortex: every vertex is constant over time")
    if normalization == "vertex_zscore":
        mean = data.mean(axis=1, dtype=np.float64)
        data = ((data - mean[:, None]) / np.where(signal, std, 1.0)[:, None]).astype(np.float32)
        data[~signal] = 0.0
    return data, signal


def _pixel_mapping(source: FlatSource, data: np.ndarray, signal: np.ndarray, no_signal: str = "keep"):
    """The rows that are mapped (all with ``no_signal="keep"``, those with signal with
    ``"drop"``), and how they map to pixels.

    Returns:
        ``(flat_matrix, mask, values)``: ``(P, n_signal)`` CSR vertex -> pixel matrix (None
        when the rows already are pixels), ``(H, W)`` bool ``flat_mask`` and ``(n_signal, T_in)``
        float32 series.
    """
    op = source.op
    if no_signal not in ("keep", "drop"):
        raise InputError(source.path, f"unknown flat.no_signal '{no_signal}' (keep or drop)")
    if no_signal == "keep":  # the operator's own valid pixels; rows without signal are zeros
        base = None if source.pixel_space else (op.flat_stage if source.kind == "volume" else op.matrix)
        return base, op.mask, data
    if source.pixel_space:  # data already holds pixel series
        mask = np.zeros(op.mask.size, dtype=bool)
        mask[np.flatnonzero(op.mask.ravel())[signal]] = True
        return None, mask.reshape(op.mask.shape), data[signal]
    base = op.flat_stage if source.kind == "volume" else op.matrix
    flat_matrix, mask = restrict_to_vertices(base, signal, op.mask)
    columns = np.flatnonzero(signal)
    return flat_matrix[:, columns].tocsr(), mask, data[columns]


def _write_flat(run: RunInputs, cfg: dict[str, Any], series: np.ndarray, flat_matrix, mask: np.ndarray,
                device: str) -> None:
    """Write ``flat`` ``(T_out, H, W)`` (``flat.dtype``) from ``series (T_out, n)`` and ``flat_mask`` ``(H, W)``."""
    store_cfg = run.recipe["store"]
    valid = np.flatnonzero(mask.ravel())
    height, width = mask.shape
    apply_flat = PreparedOperator(flat_matrix, device=device) if flat_matrix is not None else None  # once per run

    def block(start: int, stop: int) -> np.ndarray:
        if apply_flat is not None:
            return render_flat(apply_flat, mask, series[start:stop].T)
        out = np.zeros((stop - start, height * width), dtype=np.float32)
        out[:, valid] = series[start:stop]
        return out.reshape(stop - start, height, width)

    run.writer.write_series("flat", series.shape[0], (height, width), cfg["dtype"], store_cfg["chunk_frames"],
                            store_cfg["shard_chunks"], store_cfg["compression"], block, dimension_names=("time", "y", "x"))
    run.writer.write_array("flat_mask", mask, store_cfg["compression"], dimension_names=("y", "x"))


def _flat_attrs(source: FlatSource, cfg: dict[str, Any], mask: np.ndarray, signal: np.ndarray) -> dict[str, Any]:
    """Run attribute ``flat``."""
    op, family = source.op, source.family
    attrs = {
        "family": family.name,
        "surfaces": family.files,
        "source": source.kind,
        "bbox_mm": op.meta["bbox_mm"],
        "resolution_mm": op.meta["resolution_mm"],
        "shape": list(mask.shape),
        "fit": cfg["fit"],
        "scale": op.meta["scale"],
        "hemisphere_gap_mm": cfg["hemisphere_gap_mm"],
        "edge_threshold_mm": cfg["edge_threshold_mm"],
        "medial_wall": source.medial_wall,
        "triangulation": op.meta["triangulation"],
        "operator_key": op.meta["key"],
        "n_valid_pixels": int(mask.sum()),
        "n_vertices": int(op.meta["n_vertices"]),
        "n_signal": int(signal.sum()),
        "no_signal": cfg.get("no_signal", "drop"),
        "normalization": {"kind": cfg["normalization"]},
        "dtype": cfg["dtype"],
    }
    if source.projection_info is not None:
        attrs["projection"] = source.projection_info
    return attrs


def flat_outputs(run: RunInputs, inputs: Mapping[str, Any]) -> Produced:
    """Write ``flat`` and ``flat_mask``: read the source, normalize, resample in time, map to pixels.

    Args:
        inputs: ``timing`` of the run's other outputs, or None (``n_frames`` must agree with it).

    Returns:
        run attributes (``flat``, timing) and value ``timing``.

    Raises:
        InputError: no surfaces for the run's space, vertex counts that do not match the
            family, a volume that covers no cortex, no signal, or a frame count that differs
            from the run's other outputs.
    """
    cfg, spec, recipe = run.recipe["flat"], run.spec, run.recipe
    temporal = recipe["temporal"]
    device = resample_device(recipe)  # every product runs in the shared kernel (numba on CPU, torch on CUDA)
    if spec.surface or spec.cifti_dense:
        source = _read_surface_source(run, cfg)
    else:
        source = _read_volume_source(run, cfg, device)
    run.warnings.extend([w for w in source.tr_warnings if w not in run.warnings])
    tr_in = source.tr_in
    tr_out = temporal["tr"] or tr_in

    # Vertex (or, for a composed volume operator, pixel) series: signal check, z-score, TR.
    data, signal = _normalize(source, cfg["normalization"])
    flat_matrix, mask, values = _pixel_mapping(source, data, signal, cfg.get("no_signal", "drop"))
    series = resample_tr(values.T, tr_in, tr_out, temporal["interpolation"], temporal["antialias"], device=device,
                         grid=temporal["grid"])  # (T_out, n)
    n_frames = series.shape[0]
    known = inputs["timing"]
    if known is not None and known.n_frames != n_frames:
        raise InputError(source.path, f"flat map has {n_frames} frames; the run's other outputs have {known.n_frames}")

    _write_flat(run, cfg, series, flat_matrix, mask, device)
    timing = Timing(tr_s=tr_out, source_tr_s=tr_in, n_frames=n_frames, n_frames_source=int(data.shape[1]))
    attrs = {"flat": _flat_attrs(source, cfg, mask, signal)}
    attrs.update(tr_s=tr_out, source_tr_s=tr_in, n_frames=n_frames, n_frames_source=int(data.shape[1]))
    return Produced(attrs, {"timing": timing})


#: Surface, dense CIFTI or volume BOLD -> ``flat`` video + ``flat_mask`` (recipe ``flat`` section).
KIND = OutputKind(
    name="flat",
    needs=("timing",),
    provides=("timing",),
    applies=lambda run, inputs: bool(run.recipe.get("flat"))
    and bool(run.spec.surface or run.spec.cifti_dense or run.spec.volume),
    run=flat_outputs,
)
