"""Labelled atlases, registered by name, with parcels in the order each model expects.

Names:

============================  ====  ===========================================================
name                          R     parcels, in order
============================  ====  ===========================================================
``schaefer400_7n``            400   Schaefer et al. 2018, 400 parcels, 7-network order
``schaefer400_17n``           400   Schaefer et al. 2018, 400 parcels, 17-network order
``tian_s3``                   50    Tian et al. 2020 subcortex, scale III
``a424``                      424   A424 (BrainLM), cortical grey matter expanded 2 mm
``tian_s3+schaefer400_7n``    450   Tian S3 first, then Schaefer-400 7-network (fMRI-LM)
``tian_s3+schaefer400_17n``   450   Tian S3 first, then Schaefer-400 17-network (Brain-JEPA)
============================  ====  ===========================================================

fMRI-LM (yuxiangwei0808/fMRI-LM @ 037dcf9) reads one atlas file,
``Schaefer2018_400Parcels_7Networks_order_Tian_Subcortex_S3``: the 50 Tian S3 parcels, then
the 400 Schaefer parcels in 7-network order. Brain-JEPA (Eric-LRL/Brain-JEPA @ b1dfa93,
``src/datasets/ukbiobank_scale.py`` l.50-63) uses Tian S3 then Schaefer-400 in 17-network
order. Composites keep each component's own label order (Tian S3 by ``index`` of its
``_dseg.tsv``, Schaefer by line of its ``_labels.txt``) and their store key is
:func:`fmri_data.store.layout.roi_key` (``+`` -> ``-``).

Any ``a+b+...`` of registered names concatenates their parcels in that order. A path to a
``*_dseg.nii.gz`` file is accepted too (labels from a BIDS ``*_dseg.tsv`` beside it).

Atlas files are looked up first in an atlas folder: the ``atlas_dir`` argument, else the
``FMRI_DATA_ATLAS_DIR`` environment variable, else ``~/.cache/fmri-data/atlases``. File
names are TemplateFlow's (``tpl-MNI152NLin6Asym_res-02_atlas-..._dseg.nii.gz``). A file
not there is then taken from the TemplateFlow home that fMRIPrep users already have
(``$TEMPLATEFLOW_HOME``, default ``~/.cache/templateflow``: ``tpl-<space>/<file>``; the
Schaefer label names from TemplateFlow's ``..._dseg.tsv``, whose ``7Networks_`` /
``17Networks_`` prefix is dropped so that the names equal those of Schaefer's
``_labels.txt``), and finally, when the ``templateflow`` package is installed and the
machine is online, fetched by ``templateflow.api.get``. Tian S3 and A424 are not in
TemplateFlow: they come from the atlas folder only.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError, RecipeError
from ..imports import load_module
from .grids import Grid, grid_matches, template_grid
from ..read.common import file_sha256
from ..read.nifti import read_image_3d

ATLAS_DIR_ENV = "FMRI_DATA_ATLAS_DIR"
TEMPLATEFLOW_HOME_ENV = "TEMPLATEFLOW_HOME"


@dataclass(frozen=True)
class AtlasEntry:
    """A registered atlas: where its files are and how to read its label names."""

    name: str
    title: str
    space: str
    resolution: int
    volume: str
    labels: str
    label_format: str  # "lines" | "bids_tsv" | "coordinates"
    n_parcels: int
    surface: str | None = None
    reference: str = ""
    templateflow_labels: str | None = None  # the label table's TemplateFlow name (bids_tsv), if it has one


REGISTRY: dict[str, AtlasEntry] = {
    e.name: e
    for e in (
        AtlasEntry(
            "schaefer400_7n", "Schaefer-400, 7 networks", "MNI152NLin6Asym", 2,
            "tpl-MNI152NLin6Asym_res-02_atlas-Schaefer2018_desc-400Parcels7Networks_dseg.nii.gz",
            "atlas-Schaefer2018_desc-400Parcels7Networks_labels.txt", "lines", 400,
            "tpl-fsLR_den-32k_atlas-Schaefer2018_desc-400Parcels7Networks_dseg.dlabel.nii",
            "Schaefer et al. 2018, Cereb Cortex 28:3095",
            "tpl-MNI152NLin6Asym_atlas-Schaefer2018_desc-400Parcels7Networks_dseg.tsv",
        ),
        AtlasEntry(
            "schaefer400_17n", "Schaefer-400, 17 networks", "MNI152NLin6Asym", 2,
            "tpl-MNI152NLin6Asym_res-02_atlas-Schaefer2018_desc-400Parcels17Networks_dseg.nii.gz",
            "atlas-Schaefer2018_desc-400Parcels17Networks_labels.txt", "lines", 400,
            "tpl-fsLR_den-32k_atlas-Schaefer2018_desc-400Parcels17Networks_dseg.dlabel.nii",
            "Schaefer et al. 2018, Cereb Cortex 28:3095",
            "tpl-MNI152NLin6Asym_atlas-Schaefer2018_desc-400Parcels17Networks_dseg.tsv",
        ),
        AtlasEntry(
            "tian_s3", "Tian subcortex scale III", "MNI152NLin6Asym", 2,
            "tpl-MNI152NLin6Asym_res-02_atlas-TianS3_dseg.nii.gz", "atlas-TianS3_dseg.tsv", "bids_tsv", 50,
            None, "Tian et al. 2020, Nat Neurosci 23:1421",
        ),
        AtlasEntry(
            "a424", "A424", "MNI152NLin6Asym", 2,
            "tpl-MNI152NLin6Asym_res-02_atlas-A424_dseg.nii.gz", "atlas-A424_coordinates.dat", "coordinates", 424,
            None, "Caro et al. 2023 (BrainLM), arXiv 2306.11208",
        ),
    )
}
ALIASES = {"tian_s3_schaefer400": "tian_s3+schaefer400_7n", "schaefer400": "schaefer400_7n"}


@dataclass
class VolumeAtlas:
    """One labelled volume, parcels in model order.

    Attributes:
        name: registry name or file stem.
        labels: ``R`` parcel names in order.
        values: ``(R,)`` int label values in the image, in the same order.
        data: ``(X, Y, Z)`` int32 label image, RAS+.
        affine: 4x4 voxel -> world (mm).
        space: template name (or None when unknown).
        files: paths and sha256 of the files read.
        surface: path of the fsLR ``.dlabel.nii`` of the same parcellation, or None.
    """

    name: str
    labels: list[str]
    values: np.ndarray
    data: np.ndarray
    affine: np.ndarray
    space: str | None
    files: dict[str, dict[str, str]] = field(default_factory=dict)
    surface: str | None = None

    @property
    def grid(self) -> Grid:
        return Grid.from_affine(self.data.shape, self.affine, self.space)


@dataclass
class Atlas:
    """A (possibly composite) atlas: component volumes whose parcels are concatenated."""

    name: str
    components: list[VolumeAtlas]

    @property
    def labels(self) -> list[str]:
        return [label for c in self.components for label in c.labels]

    @property
    def n_parcels(self) -> int:
        return sum(len(c.labels) for c in self.components)

    def provenance(self) -> dict:
        return {
            "name": self.name,
            "components": [{"name": c.name, "n_parcels": len(c.labels), "space": c.space, "files": c.files} for c in self.components],
        }


def atlas_dir(explicit: str | Path | None = None) -> Path:
    """The folder searched for atlas files (argument, ``$FMRI_DATA_ATLAS_DIR``, or the cache)."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get(ATLAS_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fmri-data" / "atlases"


def templateflow_home() -> Path:
    """TemplateFlow's cache folder: ``$TEMPLATEFLOW_HOME``, else ``~/.cache/templateflow``."""
    return Path(os.environ.get(TEMPLATEFLOW_HOME_ENV) or Path.home() / ".cache" / "templateflow").expanduser()


def _find(filename: str, folder: Path, space: str, templateflow_name: str | None = None) -> Path:
    """``folder/filename``, else the TemplateFlow home's copy, else a TemplateFlow download.

    Raises:
        InputError: in none of them; the message names both places looked in.
    """
    path = folder / filename
    if path.is_file():
        return path
    tf_name = templateflow_name or filename
    tf_path = templateflow_home() / f"tpl-{space}" / tf_name
    if tf_path.is_file() and tf_path.stat().st_size > 0:  # TemplateFlow's skeleton holds empty placeholders
        return tf_path
    fetched = _templateflow_get(tf_name)
    if fetched is not None:
        return fetched
    raise InputError(path, f"atlas file not found, nor {tf_name} in TemplateFlow ({tf_path.parent}); put it in the "
                           f"atlas folder (--atlas-dir or ${ATLAS_DIR_ENV}) or in ${TEMPLATEFLOW_HOME_ENV}")


def _templateflow_get(filename: str) -> Path | None:
    """Fetch a TemplateFlow file by its name with ``templateflow.api.get`` (the package is
    optional; None when it is missing, offline, or TemplateFlow has no such file)."""
    import importlib.util

    entities = dict(re.findall(r"([a-z]+)-([A-Za-z0-9]+)(?=_)", filename))
    if "tpl" not in entities or importlib.util.find_spec("templateflow") is None:
        return None
    suffix, _, extension = filename.rsplit("_", 1)[-1].partition(".")
    query = {k: v for k, v in entities.items() if k in ("atlas", "desc", "den", "hemi")}
    if "res" in entities:
        query["resolution"] = int(entities["res"])
    try:
        found = load_module("templateflow.api").get(entities["tpl"], suffix=suffix, extension=f".{extension}", **query)
    except Exception:  # offline, or an unknown query: the caller says where it looked
        return None
    found = found if isinstance(found, list) else [found]
    return Path(found[0]) if len(found) == 1 and Path(found[0]).is_file() else None


def _read_label_names(path: Path, fmt: str) -> tuple[list[int], list[str]]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read atlas labels ({exc})") from exc
    if fmt == "lines":
        names = [line.strip() for line in text.splitlines() if line.strip()]
        return list(range(1, len(names) + 1)), names
    if fmt == "coordinates":
        values, names = [], []
        for line in text.splitlines():
            parts = line.split()
            if not parts:
                continue
            value = int(parts[0])
            values.append(value)
            names.append(f"A424_{value:03d}")
        return values, names
    if fmt == "bids_tsv":
        rows = list(csv.DictReader(text.splitlines(), delimiter="\t"))
        if not rows or "index" not in rows[0]:
            raise InputError(path, "atlas label table needs 'index' and 'label' (or 'name') columns")
        key = "label" if "label" in rows[0] else "name"
        pairs = sorted((int(r["index"]), r[key]) for r in rows if int(r["index"]) != 0)
        return [v for v, _ in pairs], [n for _, n in pairs]
    raise ValueError(fmt)


def _label_image(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data, affine = read_image_3d(path, dtype=np.float64)
    if not np.all(np.isfinite(data)) or not np.allclose(data, np.round(data)):
        raise InputError(path, "atlas image holds non-integer values; expected a label (dseg) image")
    return np.round(data).astype(np.int32), affine


def _load_registered(entry: AtlasEntry, folder: Path) -> VolumeAtlas:
    volume = _find(entry.volume, folder, entry.space)
    label_file = _find(entry.labels, folder, entry.space, entry.templateflow_labels)
    data, affine = _label_image(volume)
    grid = template_grid(entry.space, entry.resolution)
    if not grid_matches(data.shape, affine, grid):
        raise InputError(
            volume,
            f"atlas grid {data.shape} with voxel origin {affine[:3, 3].round(2).tolist()} does not match "
            f"{entry.space} res-{entry.resolution} {grid.shape} (an atlas on another grid)",
        )
    if label_file.name == entry.templateflow_labels:  # TemplateFlow's table: index, name (with the network prefix)
        values, names = _read_label_names(label_file, "bids_tsv")
        names = [re.sub(r"^\d+Networks_", "", n) for n in names]
    else:
        values, names = _read_label_names(label_file, entry.label_format)
    if len(names) != entry.n_parcels:
        raise InputError(label_file, f"{len(names)} label names; {entry.name} has {entry.n_parcels} parcels")
    present = set(np.unique(data).tolist()) - {0}
    unknown = present - set(values)
    if unknown:
        raise InputError(volume, f"label values {sorted(unknown)[:5]} are not in {label_file.name}")
    surface = None
    if entry.surface:
        try:
            surface = _find(entry.surface, folder, "fsLR")
        except InputError:
            surface = None  # surface runs then use the volume labels projected onto the surface
    files = {"volume": {"path": str(volume), "sha256": file_sha256(volume)}, "labels": {"path": str(label_file), "sha256": file_sha256(label_file)}}
    return VolumeAtlas(entry.name, names, np.asarray(values, dtype=np.int32), data, affine, entry.space, files, str(surface) if surface else None)


def _load_path(path: Path) -> VolumeAtlas:
    data, affine = _label_image(path)
    stem = path.name.split(".")[0]
    match = re.search(r"tpl-([A-Za-z0-9]+)", path.name)
    space = match.group(1) if match else None
    tsv = path.with_name(stem + ".tsv")
    if tsv.is_file():
        values, names = _read_label_names(tsv, "bids_tsv")
    else:
        values = sorted(set(np.unique(data).tolist()) - {0})
        names = [f"label_{v}" for v in values]
    files = {"volume": {"path": str(path), "sha256": file_sha256(path)}}
    return VolumeAtlas(stem, names, np.asarray(values, dtype=np.int32), data, affine, space, files)


def load_atlas(name: str, folder: str | Path | None = None) -> Atlas:
    """Load a registered atlas, a composite ``a+b``, or an atlas file by path.

    Args:
        name: registry name (see module docstring), alias, ``a+b`` composite, or a path
            to a NIfTI label image.
        folder: atlas folder (default: :func:`atlas_dir`).

    Returns:
        :class:`Atlas` whose ``labels`` are the parcel names in output order.

    Raises:
        RecipeError: unknown atlas name.
        InputError: a file is missing, unreadable, not a label image, not on the grid of
            its declared template space, or holds labels its label table lacks.
    """
    base = atlas_dir(folder)
    name = ALIASES.get(name, name)
    as_path = Path(name).expanduser()
    if as_path.suffix in (".gz", ".nii") or as_path.is_file():
        return Atlas(as_path.name.split(".")[0], [_load_path(as_path)])
    components = []
    for part in name.split("+"):
        part = ALIASES.get(part, part)
        if part not in REGISTRY:
            raise RecipeError(f"unknown atlas '{part}'; registered: {', '.join(sorted(REGISTRY))}")
        components.append(_load_registered(REGISTRY[part], base))
    return Atlas(name, components)
