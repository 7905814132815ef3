"""Cortical flat maps as precomputed sparse operators (pure numerics, no I/O but the cache).

A flat map is an image ``(H, W)`` of both hemispheres' flattened cortex, side by side.
Mapping vertex values to pixels is linear and the same for every frame, so it is built
once per (surfaces, grid) as a sparse matrix ``(valid pixels, vertices)`` holding the
barycentric weights of the triangle that contains each pixel, plus the valid-pixel mask
``(H, W)``; a run is then one sparse-dense product over all frames. Volume BOLD goes
through a volume-to-surface projection ``(vertices, voxels)`` first; the two compose into
one ``(valid pixels, voxels)`` matrix (what pycortex does for its own flat maps).

Conventions (those of the flat-map MAE reference pipeline, fmri-fm ``surface_utils``,
arXiv 2510.13768):

- Vertices are both hemispheres concatenated, left then right, in the surfaces' own
  order (``V = V_L + V_R``); vertices outside the flat patch get all-zero columns.
- Flat coordinates in mm; the left hemisphere is moved (not scaled) so that the largest x
  of its whole flat surface is ``-gap`` and the right one so that its smallest x is
  ``+gap`` (``stack_surfaces``: the shift is taken before any vertex is masked out).
- The patch keeps in-plane vertices (``|z| < 1e-5``) inside the cortex mask (the
  reference's vertex mask; all of them are interpolation points, even one left in no
  kept triangle) and the triangles among them whose longest side is below
  ``edge_threshold_mm``.
- Pixel ``(i, j)`` samples the point ``(xmin + j * res, ymax - i * res)``: row 0 is
  the top of the image, ``W = round((xmax - xmin) / res)``, ``H = round((ymax - ymin) / res)``.
- A pixel is valid when its point lies inside a patch triangle. Its value is linear
  interpolation in the Delaunay triangulation of the patch vertices (exactly what
  ``scipy.interpolate.LinearNDInterpolator`` computes, as the reference does) or, with
  ``triangulation="mesh"``, in the patch triangle itself.

Volume-to-surface projection follows ``nilearn.surface.vol_to_surf`` (``interpolation=
"linear"``): samples at ``n_samples`` depths from the pial (0) to the white (1) surface
(``kind="depth"``), or along each vertex normal from ``+radius`` to ``-radius`` mm
(``kind="line"``, for a single midthickness surface); each sample is trilinear in the
voxel grid (RegularGridInterpolator with extrapolation inside ``[0, n)``), samples
outside the image or the mask are dropped and the vertex is their mean.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np
import scipy.sparse as sp

from ..errors import SettingError
from ..imports import load_module
from ..resample.operator import PreparedOperator

#: Bump when the operator numerics change, so that cached files are rebuilt.
OPERATOR_VERSION = 2
_IN_PLANE = 1e-5


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class FlatGrid:
    """The raster: bounding box ``(xmin, xmax, ymin, ymax)`` in flat mm and pixel size (mm)."""

    xmin: float
    xmax: float
    ymin: float
    ymax: float
    resolution_mm: float

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)``."""
        return (
            int(round((self.ymax - self.ymin) / self.resolution_mm)),
            int(round((self.xmax - self.xmin) / self.resolution_mm)),
        )

    def points(self) -> np.ndarray:
        """``(H * W, 2)`` float64 sample points (x, y) in mm, C order (row 0 = top)."""
        h, w = self.shape
        x = self.xmin + self.resolution_mm * np.arange(w)
        y = self.ymax - self.resolution_mm * np.arange(h)
        xx, yy = np.meshgrid(x, y)
        return np.c_[xx.ravel(), yy.ravel()]

    def to_json(self) -> dict[str, Any]:
        return {"bbox_mm": [self.xmin, self.xmax, self.ymin, self.ymax], "resolution_mm": self.resolution_mm,
                "shape": list(self.shape)}


def flat_patch(coords: np.ndarray, faces: np.ndarray, cortex: np.ndarray | None, edge_threshold_mm: float | None):
    """Vertices and triangles of one hemisphere's flat patch.

    Args:
        coords: ``(V, 3)`` flat surface coordinates (mm).
        faces: ``(F, 3)`` int triangles.
        cortex: ``(V,)`` bool cortex mask (medial wall False), or None.
        edge_threshold_mm: drop triangles whose longest side (mm) is not below this; None keeps all.

    Returns:
        ``keep (V,)`` bool vertices of the patch (in-plane and in cortex: the reference's
        vertex mask, ``extract_valid_flat``) and ``faces (F', 3)`` int64 kept triangles
        (all corners in ``keep``, longest side below the threshold; indices into the
        hemisphere's vertices).
    """
    coords = np.asarray(coords, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    keep = np.abs(coords[:, 2]) < _IN_PLANE
    if cortex is not None:
        keep &= np.asarray(cortex, dtype=bool)
    faces = faces[keep[faces].all(axis=1)]
    if edge_threshold_mm:
        xy = coords[:, :2]
        sides = np.stack([np.linalg.norm(xy[faces[:, k]] - xy[faces[:, (k + 1) % 3]], axis=1) for k in range(3)])
        faces = faces[sides.max(axis=0) < edge_threshold_mm]
    return keep, faces


def place_hemispheres(xy_left: np.ndarray, xy_right: np.ndarray, gap_mm: float,
                      extent: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Shift the hemispheres along x: left max x = ``-gap_mm``, right min x = ``+gap_mm``.

    Args:
        xy_left, xy_right: ``(n, 2)`` patch coordinates (mm) of each hemisphere.
        extent: ``(left max x, right min x)`` to align instead of the points' own (the whole
            flat surfaces', as the reference shifts before masking); None = the points'.
    """
    left = np.array(xy_left, dtype=np.float64)
    right = np.array(xy_right, dtype=np.float64)
    left_max, right_min = extent if extent is not None else (left[:, 0].max(), right[:, 0].min())
    left[:, 0] -= left_max + gap_mm
    right[:, 0] -= right_min - gap_mm
    return left, right


def contain_scale(xy_left: np.ndarray, xy_right: np.ndarray, gap_mm: float, bbox: tuple[float, float, float, float]) -> float:
    """Largest scale ``<= 1`` at which both hemispheres, placed with ``gap_mm``, fit the bbox.

    Used with ``fit="contain"`` for flat surfaces drawn at another scale than the bounding
    box was made for (HCP's S1200 fsLR flat maps span ~900 mm; the reference box, 672 mm).
    """
    xmin, xmax, ymin, ymax = bbox
    width_l = np.ptp(xy_left[:, 0])
    width_r = np.ptp(xy_right[:, 0])
    height = max(xy_left[:, 1].max(), xy_right[:, 1].max()) - min(xy_left[:, 1].min(), xy_right[:, 1].min())
    limits = [1.0, (-gap_mm - xmin) / width_l, (xmax - gap_mm) / width_r, (ymax - ymin) / height]
    return float(min(limits))


@numba.njit(cache=True)
def _rasterize(points, faces, xmin, ymax, res, h, w):  # pragma: no cover - compiled
    tri = np.full(h * w, -1, dtype=np.int64)
    eps = 1e-9
    for f in range(faces.shape[0]):
        a, b, c = faces[f, 0], faces[f, 1], faces[f, 2]
        ax, ay = points[a, 0], points[a, 1]
        bx, by = points[b, 0], points[b, 1]
        cx, cy = points[c, 0], points[c, 1]
        det = (by - cy) * (ax - cx) + (cx - bx) * (ay - cy)
        if abs(det) < 1e-12:
            continue
        j0 = max(0, int(np.ceil((min(ax, bx, cx) - xmin) / res - eps)))
        j1 = min(w - 1, int(np.floor((max(ax, bx, cx) - xmin) / res + eps)))
        i0 = max(0, int(np.ceil((ymax - max(ay, by, cy)) / res - eps)))
        i1 = min(h - 1, int(np.floor((ymax - min(ay, by, cy)) / res + eps)))
        for i in range(i0, i1 + 1):
            y = ymax - i * res
            for j in range(j0, j1 + 1):
                x = xmin + j * res
                l1 = ((by - cy) * (x - cx) + (cx - bx) * (y - cy)) / det
                l2 = ((cy - ay) * (x - cx) + (ax - cx) * (y - cy)) / det
                l3 = 1.0 - l1 - l2
                if l1 >= -eps and l2 >= -eps and l3 >= -eps and tri[i * w + j] < 0:
                    tri[i * w + j] = f
    return tri


def containing_triangle(points: np.ndarray, faces: np.ndarray, grid: FlatGrid) -> np.ndarray:
    """``(H * W,)`` int64 index of the mesh triangle containing each pixel point, -1 outside.

    A point on a shared edge goes to the lower-numbered triangle.
    """
    h, w = grid.shape
    return _rasterize(np.ascontiguousarray(points, dtype=np.float64), np.ascontiguousarray(faces, dtype=np.int64),
                      float(grid.xmin), float(grid.ymax), float(grid.resolution_mm), h, w)


def _barycentric(points: np.ndarray, triangles: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """``(n, 3)`` barycentric coordinates of ``xy (n, 2)`` in ``triangles (n, 3)`` of ``points``."""
    a, b, c = (points[triangles[:, k]] for k in range(3))
    v0, v1, v2 = b - a, c - a, xy - a
    det = v0[:, 0] * v1[:, 1] - v1[:, 0] * v0[:, 1]
    l2 = (v2[:, 0] * v1[:, 1] - v1[:, 0] * v2[:, 1]) / det
    l3 = (v0[:, 0] * v2[:, 1] - v2[:, 0] * v0[:, 1]) / det
    return np.c_[1.0 - l2 - l3, l2, l3]


def flat_operator(points: np.ndarray, faces: np.ndarray, grid: FlatGrid, n_vertices: int,
                  vertex_index: np.ndarray, triangulation: str = "delaunay") -> tuple[sp.csr_matrix, np.ndarray]:
    """Sparse flat-map operator of a patch.

    Args:
        points: ``(n, 2)`` placed patch coordinates (mm).
        faces: ``(F, 3)`` patch triangles (indices into ``points``).
        grid: the raster.
        n_vertices: columns of the operator (all vertices of both hemispheres).
        vertex_index: ``(n,)`` column of each patch point.
        triangulation: ``"delaunay"`` (LinearNDInterpolator semantics, the reference) or ``"mesh"``.

    Returns:
        ``matrix (n_valid, n_vertices)`` CSR float64, rows = valid pixels in C order, each
        row 3 barycentric weights summing to 1; ``mask (H, W)`` bool valid pixels.

    Raises:
        SettingError: unknown triangulation, or no pixel inside the patch.
    """
    if triangulation not in ("delaunay", "mesh"):
        raise SettingError(f"unknown triangulation '{triangulation}' (delaunay or mesh)")
    tri = containing_triangle(points, faces, grid)
    valid = tri >= 0
    if not valid.any():
        raise SettingError("no pixel of the grid lies inside the flat patch (check the bounding box)")
    xy = grid.points()[valid]
    if triangulation == "mesh":
        corners = faces[tri[valid]]
    else:
        # imported when used: 0.13 s of every conversion's start-up otherwise
        delaunay = load_module("scipy.spatial").Delaunay(points)
        simplex = delaunay.find_simplex(xy)
        if (simplex < 0).any():  # cannot happen for points inside patch triangles; guard rounding
            simplex = np.where(simplex < 0, delaunay.find_simplex(xy, tol=1e-6), simplex)
        corners = delaunay.simplices[simplex]
    weights = _barycentric(points, corners, xy)
    rows = np.repeat(np.arange(len(xy)), 3)
    matrix = sp.csr_matrix((weights.ravel(), (rows, vertex_index[corners].ravel())), shape=(len(xy), n_vertices))
    matrix.sum_duplicates()
    return matrix, valid.reshape(grid.shape)


@dataclass
class FlatLayout:
    """Placed patch of both hemispheres: ``points (n, 2)`` mm, ``faces (F, 3)`` into points,
    ``vertex_index (n,)`` columns (left vertices, then ``V_L +`` right), ``scale``, ``n_vertices``."""

    points: np.ndarray
    faces: np.ndarray
    vertex_index: np.ndarray
    n_vertices: int
    scale: float


def layout(flats: dict[str, tuple[np.ndarray, np.ndarray]], cortex: dict[str, np.ndarray | None], gap_mm: float,
           edge_threshold_mm: float | None, bbox: tuple[float, float, float, float] | None, fit: str) -> FlatLayout:
    """Both hemispheres' patches placed side by side (left on the left), optionally scaled to fit.

    Args:
        flats: ``{"L": (coords (V_L, 3), faces), "R": ...}`` flat surfaces (mm).
        cortex: ``{"L": (V_L,) bool or None, "R": ...}`` cortex masks.
        gap_mm: half gap between hemispheres.
        edge_threshold_mm: see :func:`flat_patch`.
        bbox: ``(xmin, xmax, ymin, ymax)`` or None.
        fit: ``"none"`` (place as is, aligned by the whole flat surfaces' extent; pixels
            outside bbox are cut: the reference) or ``"contain"`` (opt-in: shrink uniformly,
            only if needed, so the patch fits the bbox, aligned by the patch's own extent, and
            centre it vertically in the bbox).
    """
    patches = {h: flat_patch(*flats[h], cortex.get(h), edge_threshold_mm) for h in ("L", "R")}
    xy = {h: np.asarray(flats[h][0], dtype=np.float64)[patches[h][0], :2] for h in ("L", "R")}
    scale = 1.0
    if fit == "contain" and bbox is not None:
        scale = contain_scale(xy["L"], xy["R"], gap_mm, bbox)
    elif fit not in ("none", "contain"):
        raise SettingError(f"unknown fit '{fit}' (none or contain)")
    extent = None
    if fit == "none":  # the reference stacks the whole surfaces, then masks
        extent = (float(np.max(flats["L"][0][:, 0])), float(np.min(flats["R"][0][:, 0])))
    left, right = place_hemispheres(xy["L"] * scale, xy["R"] * scale, gap_mm, extent)
    points = np.vstack([left, right])
    if fit == "contain" and bbox is not None:
        points[:, 1] += 0.5 * (bbox[2] + bbox[3]) - 0.5 * (points[:, 1].min() + points[:, 1].max())
    n_left = len(flats["L"][0])
    index, faces, offset = [], [], 0
    for hemi, shift in (("L", 0), ("R", n_left)):
        keep, hemi_faces = patches[hemi]
        local = np.full(len(keep), -1, dtype=np.int64)
        local[keep] = np.arange(keep.sum()) + offset
        faces.append(local[hemi_faces])
        index.append(np.flatnonzero(keep) + shift)
        offset += int(keep.sum())
    return FlatLayout(points, np.vstack(faces), np.concatenate(index), n_left + len(flats["R"][0]), scale)


def fitted_grid(points: np.ndarray, resolution_mm: float, bbox: tuple[float, float, float, float] | None) -> FlatGrid:
    """The grid of ``bbox``, or (``bbox=None``) the patch extent rounded out to whole mm."""
    if bbox is None:
        lo, hi = np.floor(points.min(axis=0)), np.ceil(points.max(axis=0))
        bbox = (lo[0], hi[0], lo[1], hi[1])
    return FlatGrid(*(float(v) for v in bbox), float(resolution_mm))


# --------------------------------------------------------------------------- volume -> surface


def projection_matrix(outer: np.ndarray, inner: np.ndarray | None, normals: np.ndarray | None, affine: np.ndarray,
                      shape: tuple[int, int, int], n_samples: int = 10, radius_mm: float = 3.0,
                      mask: np.ndarray | None = None) -> sp.csr_matrix:
    """Volume-to-surface projection ``(V, X*Y*Z)`` (C-order voxels), nilearn ``vol_to_surf`` semantics.

    Args:
        outer: ``(V, 3)`` pial (``kind="depth"``) or midthickness (``kind="line"``) vertices, world mm.
        inner: ``(V, 3)`` white-matter vertices (depth sampling), or None for line sampling.
        normals: ``(V, 3)`` unit outward normals of ``outer`` (line sampling), else None.
        affine: 4x4 voxel -> world (mm) of the volume.
        shape: ``(X, Y, Z)``.
        n_samples: samples per vertex.
        radius_mm: half length of the normal segment (line sampling).
        mask: ``(X, Y, Z)`` bool; samples in voxels outside it are dropped.

    Returns:
        CSR float64; row ``v`` averages the trilinear weights of vertex ``v``'s kept
        samples (all-zero when no sample falls inside the image/mask: nilearn returns NaN).
    """
    steps = np.linspace(0.0, 1.0, n_samples)
    if inner is not None:
        samples = outer[None] + steps[:, None, None] * (inner - outer)[None]
    else:
        offsets = np.linspace(radius_mm, -radius_mm, n_samples)
        samples = outer[None] + offsets[:, None, None] * normals[None]
    n_vertices = outer.shape[0]
    world = samples.reshape(-1, 3)
    ijk = world @ np.linalg.inv(affine)[:3, :3].T + np.linalg.inv(affine)[:3, 3]
    dims = np.asarray(shape)
    kept = np.all((ijk >= 0) & (ijk < dims), axis=1)
    if mask is not None:
        floor = np.floor(ijk[kept]).astype(np.int64)
        kept[kept] = np.asarray(mask, dtype=bool)[floor[:, 0], floor[:, 1], floor[:, 2]]
    vertex = np.tile(np.arange(n_vertices), n_samples)[kept]
    coords = ijk[kept]
    base = np.clip(np.floor(coords), 0, np.maximum(dims - 2, 0)).astype(np.int64)
    frac = coords - base
    rows, cols, vals = [], [], []
    for corner in range(8):
        offset = np.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])
        index = np.minimum(base + offset, dims - 1)
        weight = np.prod(np.where(offset == 1, frac, 1.0 - frac), axis=1)
        rows.append(vertex)
        cols.append(np.ravel_multi_index(index.T, shape))
        vals.append(weight)
    counts = np.bincount(vertex, minlength=n_vertices).astype(np.float64)
    rows, vals = np.concatenate(rows), np.concatenate(vals)
    vals = vals / counts[rows]
    matrix = sp.csr_matrix((vals, (rows, np.concatenate(cols))), shape=(n_vertices, int(np.prod(shape))))
    matrix.sum_duplicates()
    matrix.eliminate_zeros()
    return matrix


def vertex_normals(coords: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """``(V, 3)`` unit vertex normals: area-weighted mean of the adjacent face normals."""
    a, b, c = (coords[faces[:, k]] for k in range(3))
    face_normals = np.cross(b - a, c - a)
    normals = np.zeros_like(coords, dtype=np.float64)
    for k in range(3):
        np.add.at(normals, faces[:, k], face_normals)
    norm = np.linalg.norm(normals, axis=1, keepdims=True)
    return normals / np.where(norm > 0, norm, 1.0)


def restrict_to_vertices(matrix: sp.csr_matrix, valid_vertices: np.ndarray, mask: np.ndarray):
    """Drop invalid vertices from a flat operator: each row's weights are renormalized over
    its valid vertices; rows left with none are removed from the operator and the mask.

    Args:
        matrix: ``(n_valid, V)`` flat operator; mask: its ``(H, W)`` valid pixels.
        valid_vertices: ``(V,)`` bool (e.g. vertices with signal, or covered by the volume).

    Returns:
        ``(matrix', mask')``.
    """
    kept = matrix @ sp.diags(np.asarray(valid_vertices, dtype=np.float64))
    total = np.asarray(kept.sum(axis=1)).ravel()
    rows = total > 1e-9
    kept = (sp.diags(np.divide(1.0, total, out=np.zeros_like(total), where=rows)) @ kept).tocsr()[rows]
    kept.eliminate_zeros()
    new_mask = np.zeros(mask.size, dtype=bool)
    new_mask[np.flatnonzero(mask.ravel())[rows]] = True
    return kept, new_mask.reshape(mask.shape)


# --------------------------------------------------------------------------- apply


@numba.njit(cache=True)
def _scatter(pixel_values, pixels, out):  # pragma: no cover - compiled
    # out[t, pixels[r]] = pixel_values[r, t], in blocks of 256 rows (both sides stay in cache)
    n_rows, n_frames = pixel_values.shape
    for r0 in range(0, n_rows, 256):
        r1 = min(r0 + 256, n_rows)
        for t in range(n_frames):
            for r in range(r0, r1):
                out[t, pixels[r]] = pixel_values[r, t]


#: Frames per product in :func:`render_flat`.
FRAMES_PER_STEP = 64


def render_flat(operator: sp.spmatrix | PreparedOperator, mask: np.ndarray, values: np.ndarray, fill: float = 0.0,
                method: str = "auto", device: str = "auto") -> np.ndarray:
    """Flat maps of all frames at once: ``(N, T)`` vertex/voxel values -> ``(T, H, W)`` image.

    The product ``(n_valid, N) @ (N, T)`` runs in the shared sparse kernel
    (:class:`fmri_data.resample.operator.PreparedOperator`: numba on CPU, torch CSR on CUDA,
    scipy as the reference), :data:`FRAMES_PER_STEP` frames at a time; the valid pixels
    are then scattered into the time-first image, the rest set to ``fill``.

    Args:
        operator: ``(n_valid, N)`` flat operator (N = vertices or voxels), or a
            ``PreparedOperator`` of it (prepare once to render many blocks of one run;
            ``method`` and ``device`` are then those it was prepared with).
        mask: ``(H, W)`` bool valid pixels (``n_valid`` True).
        values: ``(N,)`` or ``(N, T)`` values (any real dtype).
        fill: value of pixels outside the mask.
        method, device: backend of the product, see
            :func:`fmri_data.resample.operator.resolve_backend` (``"reference"`` = scipy).

    Returns:
        ``(H, W)`` or ``(T, H, W)`` float32 (time first).

    Raises:
        SettingError: ``values`` does not have N rows, ``mask`` does not have ``n_valid``
            valid pixels, or an unknown / unavailable method or device.
    """
    prepared = operator if isinstance(operator, PreparedOperator) else PreparedOperator(operator, method, device)
    values = np.asarray(values)
    single = values.ndim == 1
    series = values[:, None] if single else values  # (N, T)
    if series.shape[0] != prepared.shape[1]:
        raise SettingError(f"values have {series.shape[0]} rows; the operator has {prepared.shape[1]} columns")
    pixels = np.flatnonzero(np.asarray(mask).ravel())
    if len(pixels) != prepared.shape[0]:
        raise SettingError(f"mask has {len(pixels)} valid pixels; the operator has {prepared.shape[0]} rows")
    out = np.full((series.shape[1], mask.size), fill, dtype=np.float32)
    for start in range(0, series.shape[1], FRAMES_PER_STEP):  # the pixel block stays in cache for the scatter
        stop = min(start + FRAMES_PER_STEP, series.shape[1])
        _scatter(prepared(series[:, start:stop]), pixels, out[start:stop])
    out = out.reshape((-1,) + mask.shape)
    return out[0] if single else out


# --------------------------------------------------------------------------- disk cache


def cache_dir() -> Path:
    """Operator cache folder: ``$FMRI_DATA_CACHE/flatmap`` or ``~/.cache/fmri-data/flatmap``."""
    root = os.environ.get("FMRI_DATA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fmri-data")
    return Path(root) / "flatmap"


def content_key(arrays: list[np.ndarray], params: dict[str, Any]) -> str:
    """SHA-256 of the arrays' dtypes, shapes and bytes and of the JSON parameters."""
    digest = hashlib.sha256(json.dumps({"v": OPERATOR_VERSION, **params}, sort_keys=True, default=str).encode())
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def save_operator(path: Path, matrices: dict[str, sp.csr_matrix], mask: np.ndarray, meta: dict[str, Any]) -> None:
    """Write ``.npz`` atomically (temporary file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, np.ndarray] = {"mask": mask, "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    for name, m in matrices.items():
        m = m.tocsr()
        payload.update({f"{name}_data": m.data, f"{name}_indices": m.indices, f"{name}_indptr": m.indptr,
                        f"{name}_shape": np.asarray(m.shape)})
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **payload)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_operator(path: Path) -> tuple[dict[str, sp.csr_matrix], np.ndarray, dict[str, Any]] | None:
    """Read what :func:`save_operator` wrote; None when missing or unreadable (then rebuilt)."""
    try:
        with np.load(path) as z:
            names = {k[: -len("_shape")] for k in z.files if k.endswith("_shape")}
            matrices = {n: sp.csr_matrix((z[f"{n}_data"], z[f"{n}_indices"], z[f"{n}_indptr"]),
                                         shape=tuple(z[f"{n}_shape"])) for n in names}
            return matrices, z["mask"].astype(bool), json.loads(z["meta"].tobytes())
    except (OSError, ValueError, KeyError):
        return None


# --------------------------------------------------------------------------- cached builders

#: Recipe keys (``flat.*``) that shape the flat operator.
GRID_KEYS = ("resolution_mm", "bbox_mm", "fit", "hemisphere_gap_mm", "edge_threshold_mm", "triangulation")


@dataclass
class FlatOperator:
    """A built flat-map operator.

    Attributes:
        matrix: ``(n_valid, N)`` CSR float32 (float64 on disk); N = vertices (``V_L + V_R``) or voxels (C order).
        mask: ``(H, W)`` bool valid pixels.
        grid: the raster.
        meta: provenance (``key``, ``scale``, ``n_vertices``, ...), JSON-ready.
        vertex_stage: for volume operators, the ``(V, voxels)`` projection; ``flat_stage``
            the ``(n_valid, V)`` vertex operator (``matrix = flat_stage @ vertex_stage``).
    """

    matrix: sp.csr_matrix
    mask: np.ndarray
    grid: FlatGrid
    meta: dict[str, Any]
    vertex_stage: sp.csr_matrix | None = None
    flat_stage: sp.csr_matrix | None = None


def _grid_of(meta: dict[str, Any]) -> FlatGrid:
    xmin, xmax, ymin, ymax = meta["bbox_mm"]
    return FlatGrid(xmin, xmax, ymin, ymax, meta["resolution_mm"])


def _cached(key: str, build, cache: bool) -> tuple[dict[str, sp.csr_matrix], np.ndarray, dict[str, Any]]:
    path = cache_dir() / f"{key}.npz"
    if cache:
        hit = load_operator(path)
        if hit is not None:
            return hit
    matrices, mask, meta = build()
    meta = {**meta, "key": key}
    if cache:
        try:
            save_operator(path, matrices, mask, meta)
        except OSError:  # a read-only cache is not an error: the operator is still returned
            pass
    return matrices, mask, meta


def surface_flat_operator(flats: dict[str, tuple[np.ndarray, np.ndarray]], cortex: dict[str, np.ndarray | None],
                          params: dict[str, Any], cache: bool = True) -> FlatOperator:
    """Flat operator ``(n_valid, V_L + V_R)`` of a surface family, cached on disk.

    Args:
        flats: ``{"L"|"R": (coords (V, 3), faces (F, 3))}`` flat surfaces (mm).
        cortex: ``{"L"|"R": (V,) bool or None}`` cortex masks (medial wall False).
        params: ``resolution_mm``, ``bbox_mm`` (``[xmin, xmax, ymin, ymax]`` or None = fit
            to the patch), ``fit`` (``none``/``contain``), ``hemisphere_gap_mm``,
            ``edge_threshold_mm``, ``triangulation`` (``delaunay``/``mesh``).
        cache: read/write the cache (``$FMRI_DATA_CACHE``); the key is the SHA-256 of the
            surfaces, masks and params, so a changed surface never hits a stale file.
    """
    params = {k: params.get(k) for k in GRID_KEYS}
    arrays = [a for h in ("L", "R") for a in flats[h]] + [c for h in ("L", "R") if (c := cortex.get(h)) is not None]
    key = content_key(arrays, {"kind": "surface", **params})

    def build():
        bbox = tuple(params["bbox_mm"]) if params["bbox_mm"] else None
        placed = layout(flats, cortex, params["hemisphere_gap_mm"], params["edge_threshold_mm"], bbox,
                        params["fit"] or "none")
        grid = fitted_grid(placed.points, params["resolution_mm"], bbox)
        matrix, mask = flat_operator(placed.points, placed.faces, grid, placed.n_vertices, placed.vertex_index,
                                     params["triangulation"] or "delaunay")
        meta = {**grid.to_json(), "scale": placed.scale, "n_vertices": placed.n_vertices,
                "n_patch_vertices": int(len(placed.points)), "triangulation": params["triangulation"] or "delaunay"}
        return {"flat": matrix}, mask, meta

    matrices, mask, meta = _cached(key, build, cache)
    return FlatOperator(matrices["flat"].astype(np.float32), mask, _grid_of(meta), meta)


def volume_flat_operator(surface_op: FlatOperator, projection: sp.csr_matrix, cache_params: dict[str, Any],
                         arrays: list[np.ndarray], cache: bool = True) -> FlatOperator:
    """Compose a surface flat operator with a volume-to-surface projection: ``(n_valid, voxels)``.

    Pixels whose triangle has vertices the volume does not cover (no sample inside the
    image/mask) are interpolated from the covered ones; pixels with none are dropped.

    Args:
        surface_op: from :func:`surface_flat_operator`.
        projection: ``(V, voxels)`` from :func:`projection_matrix` (both hemispheres stacked).
        cache_params, arrays: what the projection was built from (for the cache key).
    """
    key = content_key(arrays, {"kind": "volume", "surface": surface_op.meta["key"], **cache_params})

    def build():
        covered = np.asarray(projection.getnnz(axis=1) > 0)
        flat, mask = restrict_to_vertices(surface_op.matrix, covered, surface_op.mask)
        composed = (flat @ projection).tocsr()
        meta = {**surface_op.meta, "surface_key": surface_op.meta["key"], "n_covered_vertices": int(covered.sum()),
                "n_voxels": int(projection.shape[1])}
        return {"composed": composed, "vertex": projection.tocsr(), "flat": flat}, mask, meta

    matrices, mask, meta = _cached(key, build, cache)
    m = {name: matrix.astype(np.float32) for name, matrix in matrices.items()}
    return FlatOperator(m["composed"], mask, _grid_of(meta), meta, m["vertex"], m["flat"])
