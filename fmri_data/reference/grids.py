"""Voxel grids: template spaces and center crop/pad.

A :class:`Grid` is a 3D voxel lattice (shape + RAS+ affine, mm). Template grids follow
TemplateFlow's files (``tpl-<space>_res-<N>_T1w.nii.gz``) expressed in RAS+ voxel order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import RecipeError


@dataclass(frozen=True)
class Grid:
    """A 3D voxel grid.

    Attributes:
        shape: ``(X, Y, Z)`` voxels, RAS+ order.
        affine_rows: the 4x4 voxel -> world (mm) affine, as a tuple of rows (hashable).
        space: template name (TemplateFlow spelling) or None for a native grid.
        box: for a cropped/padded template grid, per axis the ``(lo, hi)`` voxel range that
            lies inside the original template box; None when the whole grid does.
    """

    shape: tuple[int, int, int]
    affine_rows: tuple[tuple[float, ...], ...]
    space: str | None = None
    box: tuple[tuple[int, int], ...] | None = None

    @classmethod
    def from_affine(cls, shape, affine, space=None, box=None) -> "Grid":
        rows = tuple(tuple(float(v) for v in row) for row in np.asarray(affine, dtype=np.float64))
        return cls(tuple(int(s) for s in shape), rows, space, box)

    @property
    def affine(self) -> np.ndarray:
        return np.array(self.affine_rows, dtype=np.float64)

    @property
    def voxel_size(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.shape))

    def box_mask(self) -> np.ndarray:
        """Boolean ``(X, Y, Z)``: voxels inside the original template box (all True if no crop/pad)."""
        mask = np.zeros(self.shape, dtype=bool)
        if self.box is None:
            mask[...] = True
        else:
            mask[tuple(slice(lo, hi) for lo, hi in self.box)] = True
        return mask

    def crop_or_pad(self, shape: tuple[int, int, int], orientation: str = "RAS") -> "Grid":
        """Center crop/pad to ``shape`` keeping world positions.

        In the array order ``orientation`` (the order the volume is stored in), new voxel 0
        on each axis is old voxel ``(old - new) // 2``: 91 -> 96 pads 3 voxels before and 2
        after; 109 -> 96 crops 6 before and 7 after — NeuroSTORM's ``select_middle_96``
        (start ``(dim - 96) // 2``) and ``pad_to_96`` (``ceil(pad / 2)`` before). With
        ``"LAS"`` "before" on x is the right side, so in this (RAS+) grid the x offset is
        ``ceil((old - new) / 2)``: 91 -> 96 pads 2 voxels on the left and 3 on the right.

        Raises:
            RecipeError: unknown orientation.
        """
        shape = tuple(int(s) for s in shape)
        if orientation not in ORIENTATIONS:
            raise RecipeError(f"unknown orientation {orientation!r}: {' | '.join(ORIENTATIONS)}")
        offset = np.array([(o - n) // 2 for o, n in zip(self.shape, shape)], dtype=np.float64)
        if orientation == "LAS":
            offset[0] = -((shape[0] - self.shape[0]) // 2)  # ceil((old - new) / 2)
        shift = np.eye(4)
        shift[:3, 3] = offset
        box = tuple(
            (int(max(0, -off)), int(min(n, o - off))) for off, o, n in zip(offset.astype(int), self.shape, shape)
        )
        return Grid.from_affine(shape, self.affine @ shift, self.space, box)


#: Stored voxel orders: RAS+ (this project's) or LAS (x runs right -> left: FSL/HCP MNI
#: files as on disk, what NeuroSTORM's released weights were trained on).
ORIENTATIONS = ("RAS", "LAS")


def stored_affine(affine: np.ndarray, shape: tuple[int, int, int], orientation: str) -> np.ndarray:
    """The affine of a RAS+ grid's volume stored in ``orientation`` order.

    For ``"LAS"`` the stored x index is ``X - 1 - i``, so the stored affine is
    ``affine @ F`` with ``F`` flipping x: it maps stored indices to the same mm.

    Args:
        affine: 4x4 RAS+ voxel -> world (mm).
        shape: ``(X, Y, Z)``.
        orientation: ``"RAS"`` (returned unchanged) or ``"LAS"``.

    Returns:
        4x4 float64.

    Raises:
        RecipeError: unknown orientation.
    """
    if orientation not in ORIENTATIONS:
        raise RecipeError(f"unknown orientation {orientation!r}: {' | '.join(ORIENTATIONS)}")
    affine = np.asarray(affine, dtype=np.float64)
    if orientation == "RAS":
        return affine.copy()
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, float(shape[0] - 1)
    return affine @ flip


def to_orientation(volume: np.ndarray, orientation: str, x_axis: int = 0) -> np.ndarray:
    """A RAS+ array in ``orientation`` order (or back: the flip is its own inverse).

    Args:
        volume: array whose axis ``x_axis`` is x (e.g. ``(X, Y, Z)`` or ``(T, X, Y, Z)`` with 1).
        orientation: ``"RAS"`` (unchanged) or ``"LAS"`` (x reversed; a view).

    Raises:
        RecipeError: unknown orientation.
    """
    if orientation not in ORIENTATIONS:
        raise RecipeError(f"unknown orientation {orientation!r}: {' | '.join(ORIENTATIONS)}")
    return np.flip(volume, axis=x_axis) if orientation == "LAS" else volume


# TemplateFlow grids, RAS+ voxel order: (shape, origin of voxel 0 in mm) per resolution label.
_TEMPLATES: dict[tuple[str, int], tuple[tuple[int, int, int], tuple[float, float, float], float]] = {
    ("MNI152NLin6Asym", 1): ((182, 218, 182), (-91.0, -126.0, -72.0), 1.0),
    ("MNI152NLin6Asym", 2): ((91, 109, 91), (-90.0, -126.0, -72.0), 2.0),
    ("MNI152NLin2009cAsym", 1): ((193, 229, 193), (-96.0, -132.0, -78.0), 1.0),
    ("MNI152NLin2009cAsym", 2): ((97, 115, 97), (-96.0, -132.0, -78.0), 2.0),
}


def template_spaces() -> list[tuple[str, int]]:
    """The ``(space, res)`` pairs :func:`template_grid` knows."""
    return sorted(_TEMPLATES)


def template_grid(space: str, resolution: int) -> Grid:
    """The TemplateFlow grid of ``space`` at ``res-<resolution>``, in RAS+ order.

    Raises:
        RecipeError: unknown (space, resolution).
    """
    try:
        shape, origin, step = _TEMPLATES[(space, int(resolution))]
    except KeyError:
        known = ", ".join(f"{s} res-{r}" for s, r in template_spaces())
        raise RecipeError(f"no template grid for {space} res-{resolution}; known: {known}") from None
    affine = np.diag([step, step, step, 1.0])
    affine[:3, 3] = origin
    return Grid.from_affine(shape, affine, space)


def grid_matches(shape, affine, grid: Grid, atol: float = 1e-3) -> bool:
    """True when an image (RAS+ shape/affine) lies on ``grid``."""
    return tuple(int(s) for s in shape[:3]) == grid.shape and np.allclose(affine, grid.affine, atol=atol)
