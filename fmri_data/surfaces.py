"""Cortical surface meshes by template space (the geometry of surface BOLD data).

``fsaverage5`` (10,242 vertices per hemisphere) ships inside nilearn, so it needs no
download. Meshes are returned as ``(coordinates (V, 3) float64 mm, faces (F, 3) int64)``.
"""

from __future__ import annotations

import functools

import numpy as np

from .errors import InputError

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
    from nilearn import datasets

    meshes = datasets.load_fsaverage(_NILEARN_SPACES[space])
    if kind not in meshes:
        raise InputError(space, f"no '{kind}' mesh for {space}")
    part = meshes[kind].parts["left" if hemi == "L" else "right"]
    return np.asarray(part.coordinates, dtype=np.float64), np.asarray(part.faces, dtype=np.int64)


def known_spaces() -> list[str]:
    return sorted(_NILEARN_SPACES)
