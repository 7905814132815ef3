"""Cortical surface meshes by template space (the geometry of surface BOLD data).

``fsaverage5`` (10,242 vertices per hemisphere) ships inside nilearn, so it needs no
download. Meshes are returned as ``(coordinates (V, 3) float64 mm, faces (F, 3) int64)``.
Flat-map families (:func:`load_family`): fsLR 32k (HCP S1200 files), fsaverage5 (nilearn),
and pycortex subjects (``cortex.db.get_surf``).
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atlases import ATLAS_DIR_ENV
from ..errors import InputError
from ..imports import load_module

#: Mesh kinds, as nilearn names them: pial, white_matter, inflated, sphere, flat.
_NILEARN_SPACES = {"fsaverage5": "fsaverage5"}


@functools.lru_cache(maxsize=16)
def load_mesh(space: str, kind: str, hemi: str) -> tuple[np.ndarray, np.ndarray]:
    """Mesh of one hemisphere.

    Args:
        space: template space (``"fsaverage5"``).
        kind: ``"pial"``, ``"white_matter"``, ``"inflated"``, ``"sphere"`` or ``"flat"``.
        hemi: ``"L"`` or ``"R"``.

    Returns:
        ``(coordinates (V, 3) float64 in mm, faces (F, 3) int64)``.

    Raises:
        InputError: no mesh known for this space/kind.
    """
    if space not in _NILEARN_SPACES:
        raise InputError(space, f"no surface meshes known for space '{space}' (known: {', '.join(_NILEARN_SPACES)})")
    meshes = load_module("nilearn.datasets").load_fsaverage(_NILEARN_SPACES[space])
    if kind not in meshes:
        raise InputError(space, f"no '{kind}' mesh for {space}")
    part = meshes[kind].parts["left" if hemi == "L" else "right"]
    return np.asarray(part.coordinates, dtype=np.float64), np.asarray(part.faces, dtype=np.int64)


def known_spaces() -> list[str]:
    return sorted(_NILEARN_SPACES)


# --------------------------------------------------------------------------- flat-map families

#: File names of the fsLR 32k surfaces (HCP S1200 group average), TemplateFlow style.
FSLR_FILE = "tpl-fsLR_den-32k_hemi-{hemi}_{kind}.surf.gii"


@dataclass
class SurfaceFamily:
    """Meshes of both hemispheres for flat maps and volume-to-surface projection.

    Attributes:
        name: ``"fsLR"``, ``"fsaverage5"`` or ``"pycortex:<subject>"``.
        flat: ``{"L"|"R": (coords (V, 3) mm, faces (F, 3) int64)}`` flat surfaces.
        white, pial, midthickness: the same for the 3D surfaces (world mm), None where absent.
        files: where each mesh came from (paths, or a package name), for provenance.
    """

    name: str
    flat: dict[str, tuple[np.ndarray, np.ndarray]]
    white: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
    pial: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
    midthickness: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
    files: list[str] = field(default_factory=list)

    @property
    def n_vertices(self) -> dict[str, int]:
        return {h: len(self.flat[h][0]) for h in ("L", "R")}


def surface_dirs(atlas_dir: str | Path | None = None) -> list[Path]:
    """Where surface files are looked for: ``$FMRI_DATA_SURFACE_DIR``, the atlas folder, and
    a ``surfaces/`` folder beside the atlas folder."""
    out = []
    if os.environ.get("FMRI_DATA_SURFACE_DIR"):
        out.append(Path(os.environ["FMRI_DATA_SURFACE_DIR"]))
    folder = atlas_dir or os.environ.get(ATLAS_DIR_ENV)
    if folder:
        out += [Path(folder), Path(folder).parent / "surfaces"]
    return out


def _read_gifti_mesh(path: Path) -> tuple[np.ndarray, np.ndarray]:
    nib = load_module("nibabel")

    try:
        img = nib.load(str(path))
        coords = next(d.data for d in img.darrays if d.intent == nib.nifti1.intent_codes["NIFTI_INTENT_POINTSET"])
        faces = next(d.data for d in img.darrays if d.intent == nib.nifti1.intent_codes["NIFTI_INTENT_TRIANGLE"])
    except Exception as exc:  # nibabel raises many types on bad files
        raise InputError(path, f"not a GIFTI surface ({exc})") from exc
    return np.asarray(coords, dtype=np.float64), np.asarray(faces, dtype=np.int64)


def _fslr(folders: list[Path]) -> SurfaceFamily:
    meshes: dict[str, dict] = {}
    files = []
    for kind in ("flat", "midthickness"):
        meshes[kind] = {}
        for hemi in ("L", "R"):
            name = FSLR_FILE.format(hemi=hemi, kind=kind)
            path = next((d / name for d in folders if (d / name).is_file()), None)
            if path is None:
                where = ", ".join(str(d) for d in folders) or "(no folder given)"
                raise InputError(name, f"fsLR surface not found in {where} (set $FMRI_DATA_SURFACE_DIR)")
            meshes[kind][hemi] = _read_gifti_mesh(path)
            files.append(str(path))
    return SurfaceFamily("fsLR", meshes["flat"], midthickness=meshes["midthickness"], files=files)


def _fsaverage(space: str) -> SurfaceFamily:
    kinds = {"flat": "flat", "white": "white_matter", "pial": "pial"}
    meshes = {k: {h: load_mesh(space, v, h) for h in ("L", "R")} for k, v in kinds.items()}
    return SurfaceFamily(space, meshes["flat"], white=meshes["white"], pial=meshes["pial"],
                         files=[f"nilearn.datasets.load_fsaverage('{space}')"])


def _pycortex_database(cortex, subject: str):
    """pycortex's subject database: its configured filestore, or the one installed with
    this environment (``<sys.prefix>/share/pycortex/db``) when the configured folder does
    not exist (pycortex records the folder of the environment that built or first imported
    it, which a later environment may not have).

    Raises:
        InputError: neither folder exists.
    """
    db = cortex.db
    if os.path.isdir(db.filestore):
        return db
    installed = os.path.join(sys.prefix, "share", "pycortex", "db")
    if not os.path.isdir(installed):
        raise InputError(f"pycortex:{subject}", f"pycortex database {db.filestore} does not exist "
                         f"(set basic.filestore in {cortex.options.usercfg})")
    return cortex.database.Database(installed)


def _pycortex(subject: str) -> SurfaceFamily:
    try:
        cortex = load_module("cortex")  # optional, heavy
    except ImportError as exc:
        raise InputError(f"pycortex:{subject}", f"pycortex is not installed ({exc}); pip install pycortex") from exc
    db = _pycortex_database(cortex, subject)
    if subject not in db.subjects:
        raise InputError(f"pycortex:{subject}", f"no pycortex subject '{subject}' in {db.filestore} (known: {', '.join(db.subjects)})")

    def get(kind: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = {}
        for hemi, name in (("L", "lh"), ("R", "rh")):
            coords, faces = db.get_surf(subject, kind, hemisphere=name)
            out[hemi] = (np.asarray(coords, dtype=np.float64), np.asarray(faces, dtype=np.int64))
        return out

    return SurfaceFamily(f"pycortex:{subject}", get("flat"), white=get("wm"), pial=get("pia"),
                         files=[f"cortex.db.get_surf('{subject}', ...)"])


@functools.lru_cache(maxsize=8)
def load_family(name: str, atlas_dir: str | None = None) -> SurfaceFamily:
    """Surfaces of a flat-map family.

    Args:
        name: ``"fsLR"`` (32k, files ``tpl-fsLR_den-32k_hemi-{L,R}_{flat,midthickness}.surf.gii``
            looked up in :func:`surface_dirs`), ``"fsaverage5"`` (bundled in nilearn:
            flat, white, pial) or ``"pycortex:<subject>"`` (``cortex.db.get_surf``: flat, wm, pia).
        atlas_dir: the atlas folder (fsLR files may sit in it or in ``../surfaces``).

    Raises:
        InputError: unknown family, a missing file, or pycortex not installed.
    """
    if name == "fsLR":
        return _fslr(surface_dirs(atlas_dir))
    if name in _NILEARN_SPACES:
        return _fsaverage(name)
    if name.startswith("pycortex:"):
        return _pycortex(name.split(":", 1)[1])
    raise InputError(name, f"no flat-map surfaces for '{name}' (known: fsLR, fsaverage5, pycortex:<subject>)")


def cortex_from_dlabel(path: str | Path, n_vertices: dict[str, int]) -> dict[str, np.ndarray]:
    """Cortex masks ``{"L"|"R": (V,) bool}`` of an fsLR ``.dlabel.nii``: vertices with a label > 0
    (the medial wall and unlabelled vertices are False), as the reference uses a Schaefer map.

    Raises:
        InputError: unreadable, or its vertex count differs from the surfaces'.
    """
    nib = load_module("nibabel")

    try:
        img = nib.load(str(path))
        labels = np.asarray(img.dataobj)[0]
        models = img.header.get_axis(1)
    except Exception as exc:  # nibabel raises many types on bad files
        raise InputError(path, f"cannot read surface parcellation ({exc})") from exc
    out = {h: np.zeros(n, dtype=bool) for h, n in n_vertices.items()}
    for name, slc, model in models.iter_structures():
        hemi = {"CIFTI_STRUCTURE_CORTEX_LEFT": "L", "CIFTI_STRUCTURE_CORTEX_RIGHT": "R"}.get(str(name))
        if hemi is None:
            continue
        if models.nvertices[name] != n_vertices[hemi]:
            raise InputError(path, f"{models.nvertices[name]} vertices in {name}; the surfaces have {n_vertices[hemi]}")
        out[hemi][model.vertex[labels[slc] > 0]] = True
    return out
