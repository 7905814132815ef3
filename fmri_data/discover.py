"""Find the BOLD runs of a BIDS dataset and its derivatives.

Indexing uses `bids2table <https://github.com/childmindresearch/bids2table>`_ rather than
pybids: bids2table walks the tree with plain path globbing and string parsing and returns
an Arrow table, while pybids builds a SQL database of every file and sidecar field.
``benchmarks/bench_discover.py`` measures both on a synthetic tree of thousands of runs;
bids2table is over an order of magnitude faster there, and its index needs no database.

A *run* is one BOLD acquisition identified by its BIDS entities (``sub``, ``ses``,
``task``, ``acq``, ``ce``, ``rec``, ``dir``, ``run``, ``echo``). One run may have several
*sources*: the raw NIfTI, fMRIPrep-style preprocessed volumes in one or more template
spaces, GIFTI surface series per hemisphere, dense or parcellated CIFTI-2 series. The
recipe decides which source feeds which output.
"""

from __future__ import annotations

import sys
import types

import csv
import json
import logging
import math
import posixpath
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import bids2table

from .errors import InputError
from .imports import load_module

log = logging.getLogger(__name__)
logging.getLogger("bids2table").setLevel(logging.ERROR)

#: Entities that identify a run, in the order BIDS writes them in file names.
RUN_ENTITIES = ("sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "echo")
#: Space label used for sources without a ``space`` entity (raw data, native-space derivatives).
NATIVE = "native"

_VOLUME_EXTS = (".nii", ".nii.gz")
_KINDS = {".func.gii": "gifti", ".dtseries.nii": "cifti_dense", ".ptseries.nii": "cifti_parcels"}


@dataclass(frozen=True)
class Source:
    """One file holding BOLD data of a run.

    Attributes:
        path: absolute path of the file.
        kind: ``"volume"`` (NIfTI 4D), ``"gifti"`` (one hemisphere), ``"cifti_dense"``
            (``.dtseries.nii``) or ``"cifti_parcels"`` (``.ptseries.nii``).
        derivative: True when the file comes from a derivatives dataset.
        space: template label (``MNI152NLin6Asym``, ``fsaverage5``, ``fsLR``) or ``"native"``.
        entities: every BIDS entity of the file name, values as written (``run`` = ``"01"``).
        metadata: JSON sidecar fields after BIDS inheritance (derivative fields override raw).
    """

    path: str
    kind: str
    derivative: bool
    space: str
    entities: dict[str, str]
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def res(self) -> str | None:
        return self.entities.get("res")


@dataclass
class RunSpec:
    """Everything the converter needs to know about one run, before reading any voxel.

    Attributes:
        run_id: BIDS entities joined, e.g. ``sub-01_ses-02_task-rest_run-01``.
        entities: the identifying entities (keys of :data:`RUN_ENTITIES` present).
        volume: the chosen volume source, or None.
        surface: ``{"L": Source, "R": Source}`` GIFTI pair, or None.
        cifti_dense: dense CIFTI-2 source, or None.
        parcellated: parcellated CIFTI-2 sources (one per ``seg``).
        mask: brain mask file on the chosen volume source's grid, or None.
        confounds: confounds TSV (fMRIPrep ``desc-confounds_timeseries``), or None.
        events: ``events.tsv`` of the raw run, or None.
        participant: the ``participants.tsv`` row of the subject (``n/a`` -> None).
        metadata: sidecar of the primary source (volume > dense CIFTI > GIFTI > parcels).
        alternatives: paths of volume sources not chosen (kept for provenance).
        notes: what discovery decided that a user should hear about (a raw file set aside
            for its preprocessed derivative, or the reverse); the converter reports them as
            the run's warnings.
        error: why the run cannot be converted (e.g. a broken sidecar), found while
            discovering it; the converter records it as a failed run.
    """

    run_id: str
    entities: dict[str, str]
    volume: Source | None = None
    surface: dict[str, Source] | None = None
    cifti_dense: Source | None = None
    parcellated: list[Source] = field(default_factory=list)
    mask: str | None = None
    confounds: str | None = None
    events: str | None = None
    participant: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    alternatives: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def primary(self) -> Source:
        """The source whose sidecar and header define the run's TR and frame count."""
        for candidate in (self.volume, self.cifti_dense):
            if candidate is not None:
                return candidate
        if self.surface:
            return self.surface["L"]
        return self.parcellated[0]

    def sources(self) -> list[Source]:
        """All BOLD sources the run will read."""
        out = [s for s in (self.volume, self.cifti_dense) if s is not None]
        out += list((self.surface or {}).values()) + list(self.parcellated)
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_run_id(entities: dict[str, str]) -> str:
    """Join the identifying entities in BIDS order: ``sub-01_ses-02_task-rest_run-01``."""
    return "_".join(f"{k}-{entities[k]}" for k in RUN_ENTITIES if entities.get(k))


def _clean_label(value: str, prefix: str) -> str:
    return value[len(prefix):] if value.startswith(prefix) else value


class _Tree:
    """Read-only view of a dataset location: a local folder or an fsspec URL.

    Local folders are indexed with bids2table. Remote locations (``s3://``, ``gs://``,
    ``memory://``, ...) are listed with one recursive fsspec ``find`` (S3 lists 1,000 keys
    per request) and their names parsed with bids2table's BIDS entity parser.
    Paths are strings: absolute paths locally, full URLs remotely.
    """

    def __init__(self, root: str | Path, storage_options: dict[str, Any] | None = None):
        text = str(root)
        self.remote = "://" in text and not text.startswith("file://")
        if self.remote:
            fsspec = load_module("fsspec")

            try:
                self.fs, path = fsspec.core.url_to_fs(text, **(storage_options or {}))
            except (ImportError, ValueError, TypeError) as exc:  # no backend installed, bad option
                raise InputError(text, f"cannot open ({type(exc).__name__}: {exc})") from None
            self.root = self.fs.unstrip_protocol(path.rstrip("/"))
            self._listing: list[str] | None = None
        else:
            self.root = str(Path(text.removeprefix("file://")).expanduser().resolve())
        self._json: dict[str, dict[str, Any]] = {}
        self._json_files: dict[str, tuple[str, ...]] = {}

    # -- remote listing -------------------------------------------------------
    def _files(self) -> list[str]:
        if self._listing is None:
            try:
                found = self.fs.find(self.root, withdirs=False)
            except Exception as exc:  # fsspec backends raise their own (botocore, aiohttp) errors
                raise InputError(self.root, f"cannot list dataset ({type(exc).__name__}: {exc})") from None
            self._listing = sorted(self.fs.unstrip_protocol(p) for p in found)
        return self._listing

    def is_dir(self) -> bool:
        if self.remote:
            return bool(self._files())  # a listing that fails says why (InputError), not "not a directory"
        return Path(self.root).is_dir()

    def datasets(self) -> list[str]:
        """Dataset roots under ``root`` (``root`` first; nested ``derivatives/*`` datasets after)."""
        if not self.remote:
            return [str(d) for d in bids2table.find_bids_datasets(Path(self.root))]
        files = self._files()
        prefix = self.root + "/"
        roots = []
        if any(f == prefix + "dataset_description.json" or f[len(prefix):].startswith("sub-") for f in files):
            roots.append(self.root)
        for f in files:
            rel = f[len(prefix):]
            parts = rel.split("/")
            if parts[-1] == "dataset_description.json" and "derivatives" in parts[:-1]:
                roots.append(posixpath.dirname(f))
        return roots

    def index(self, ds_root: str, include: list[str] | None, nested: list[str]) -> list[str]:
        """BIDS data files (not sidecars) of one dataset, excluding nested datasets."""
        if not self.remote:
            table = bids2table.index_dataset(Path(ds_root), include_subjects=include)
            return [posixpath.join(ds_root, rel) for rel in table.column("path").to_pylist()]
        prefix = ds_root + "/"
        inner = [n + "/" for n in nested if n != ds_root and n.startswith(prefix)]
        out = []
        for f in self._files():
            if not f.startswith(prefix) or any(f.startswith(n) for n in inner):
                continue
            rel = f[len(prefix):]
            subject = rel.split("/", 1)[0]
            name = rel.rsplit("/", 1)[-1]
            if not subject.startswith("sub-") or not name.startswith("sub-") or "/" not in rel:
                continue
            if include and subject not in include:
                continue
            ent = bids2table.parse_bids_entities(f)
            if not (ent.get("suffix") and ent.get("ext")) or ent.get("ext") == ".json":
                continue
            out.append(f)
        return out

    def json_files(self, folder: str) -> tuple[str, ...]:
        """``*.json`` files directly in ``folder`` (listed once per folder)."""
        if folder not in self._json_files:
            if self.remote:
                prefix = folder + "/"
                found = [f for f in self._files() if f.startswith(prefix) and "/" not in f[len(prefix):]]
            else:
                found = [str(p) for p in Path(folder).glob("*.json")]
            self._json_files[folder] = tuple(sorted(f for f in found if f.endswith(".json")))
        return self._json_files[folder]

    def read_json(self, path: str) -> dict[str, Any]:
        """A JSON sidecar (read once per tree).

        Raises:
            InputError: not valid JSON, or not a JSON object.
        """
        if path not in self._json:
            try:
                data = json.loads(self.read_text(path))
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                raise InputError(path, f"sidecar is not valid JSON ({exc})") from exc
            if not isinstance(data, dict):
                raise InputError(path, "sidecar is not a JSON object")
            self._json[path] = data
        return self._json[path]

    def read_text(self, path: str) -> str:
        if not self.remote:
            return Path(path).read_text()
        return self.fs.cat_file(path).decode()

    def exists(self, path: str) -> bool:
        if not self.remote:
            return Path(path).is_file()
        return path in set(self._files())


def _read_participants(tree: _Tree) -> dict[str, dict[str, Any]]:
    path = posixpath.join(tree.root, "participants.tsv")
    if not tree.exists(path):
        return {}
    try:
        reader = csv.DictReader(tree.read_text(path).lstrip("\ufeff").splitlines(), delimiter="\t")
        rows = list(reader)
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot parse participants table ({exc})") from exc
    if rows and "participant_id" not in (reader.fieldnames or ()):
        raise InputError(path, f"participants table has no 'participant_id' column (columns: {reader.fieldnames})")
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        pid = row.get("participant_id")
        if not pid:
            continue
        out[_clean_label(pid, "sub-")] = {
            k: (None if v in ("n/a", "", None) else v) for k, v in row.items() if k != "participant_id"
        }
    return out


def sidecar_metadata(path: str | Path, dataset_root: str | Path, tree: _Tree | None = None) -> dict[str, Any]:
    """JSON sidecar fields of a BIDS file after the BIDS inheritance principle.

    Every ``*.json`` from ``dataset_root`` down to the file's folder whose entities are a
    subset of the file's entities (same suffix) applies; deeper files override shallower
    ones. Names are parsed with bids2table.

    Raises:
        InputError: an applicable sidecar is not valid JSON (bids2table's own loader
            skips such a file silently, which would hide a missing TR).
    """
    path, dataset_root = str(path), str(dataset_root)
    tree = tree or _Tree(dataset_root)
    ent = bids2table.parse_bids_entities(path)
    want = {k: v for k, v in ent.items() if k not in ("datatype", "ext")}
    chain: list[str] = []
    folder = posixpath.dirname(path)
    while True:
        chain.append(folder)
        parent = posixpath.dirname(folder)
        if folder == dataset_root or parent == folder or len(folder) <= len(dataset_root):
            break
        folder = parent
    meta: dict[str, Any] = {}
    for folder in reversed(chain):
        for candidate in tree.json_files(folder):
            cand = bids2table.parse_bids_entities(candidate)
            cand = {k: v for k, v in cand.items() if k not in ("datatype", "ext")}
            if cand.get("suffix") == want.get("suffix") and all(want.get(k) == v for k, v in cand.items()):
                meta.update(tree.read_json(candidate))
    return meta


def _index(tree: _Tree, participant_label: list[str] | None, forced_derivative: bool = False):
    """``(is_derivative, dataset_root, path, entities)`` for every BIDS data file under the tree."""
    datasets = tree.datasets()
    if not datasets:
        raise InputError(tree.root, "not a BIDS dataset (no dataset_description.json and no sub-* folders)")
    include = [f"sub-{_clean_label(p, 'sub-')}" for p in participant_label] if participant_label else None
    out = []
    for ds_root in datasets:
        rel = ds_root[len(tree.root):].split("/")
        derivative = forced_derivative or "derivatives" in rel or _is_derivative_dataset(tree, ds_root)
        for path in tree.index(ds_root, include, datasets):
            out.append((derivative, ds_root, path, bids2table.parse_bids_entities(path)))
    return out


def _is_derivative_dataset(tree: _Tree, root: str) -> bool:
    try:
        return json.loads(tree.read_text(posixpath.join(root, "dataset_description.json"))).get("DatasetType") == "derivative"
    except (OSError, ValueError, AttributeError):
        return False


def _key(entities: dict[str, str], with_echo: bool) -> tuple[tuple[str, str], ...]:
    names = RUN_ENTITIES if with_echo else RUN_ENTITIES[:-1]
    return tuple((k, entities[k]) for k in names if entities.get(k))


def _source_kind(entities: dict[str, str]) -> str | None:
    ext = entities.get("ext", "")
    if entities.get("suffix") != "bold":
        return None
    if ext in _VOLUME_EXTS:
        return "volume"
    return _KINDS.get(ext)


def discover(
    bids_root: str | Path,
    *,
    derivatives: list[str | Path] | None = None,
    participant_label: list[str] | None = None,
    task: list[str] | None = None,
    space: list[str] | None = None,
    prefer: str = "derivatives",
    volume_space: str | None = "MNI152NLin6Asym",
    volume_res: int | None = 2,
    storage_options: dict[str, Any] | None = None,
) -> list[RunSpec]:
    """Find every BOLD run under a BIDS dataset (raw and/or derivatives).

    Args:
        bids_root: folder of a raw BIDS dataset (its ``derivatives/`` are indexed too) or
            of a derivatives dataset (e.g. fMRIPrep output); a local path or an fsspec URL
            (``s3://bucket/ds000105``; source paths in the RunSpecs are then URLs).
        derivatives: extra derivatives datasets living outside ``bids_root``.
        participant_label: keep these subjects (with or without ``sub-``).
        task: keep these task labels.
        space: keep sources in these spaces (``"native"`` = no ``space`` entity).
        prefer: ``"derivatives"`` or ``"raw"``: which volume source wins for a run that
            has both.
        volume_space, volume_res: among derivative volumes, prefer this template space
            and ``res`` label (the recipe's target grid), so no needless resampling happens.
        storage_options: fsspec options for remote locations (e.g. ``{"anon": True}``);
            credentials otherwise come from each filesystem's standard environment/config.

    Returns:
        RunSpecs sorted by run_id.

    Raises:
        InputError: the root is missing or not a BIDS dataset, a participants table or a
            JSON sidecar is unreadable.
    """
    tree = _Tree(bids_root, storage_options)
    if not tree.is_dir():
        raise InputError(tree.root, "BIDS root is not a directory")
    files = [(d, r, p, e, tree) for d, r, p, e in _index(tree, participant_label)]
    for extra in derivatives or []:
        extra_tree = _Tree(extra, storage_options)
        if not extra_tree.is_dir():
            raise InputError(extra_tree.root, "derivatives folder is not a directory")
        files += [(True, r, p, e, extra_tree) for _, r, p, e in _index(extra_tree, participant_label, True)]

    tasks = set(task) if task else None
    spaces = set(space) if space else None
    participants = _read_participants(tree)

    bold: dict[tuple, list] = {}
    masks, confounds, events = [], {}, {}
    for derivative, ds_root, path, ent, where in files:
        if tasks is not None and ent.get("task") not in tasks:
            continue
        kind = _source_kind(ent)
        if kind is not None:
            bold.setdefault(_key(ent, with_echo=False), []).append((derivative, ds_root, path, ent, where))
        elif ent.get("suffix") == "mask" and ent.get("desc") == "brain" and ent.get("ext") in _VOLUME_EXTS:
            masks.append((path, ent))
        elif ent.get("suffix") in ("timeseries", "regressors") and ent.get("desc") == "confounds":
            confounds[_key(ent, with_echo=False)] = str(path)
        elif ent.get("suffix") == "events" and ent.get("ext") == ".tsv":
            events[_key(ent, with_echo=True)] = str(path)

    runs: list[RunSpec] = []
    for key, members in bold.items():
        try:
            runs.extend(
                _assemble(key, members, masks, confounds, events, participants, spaces, prefer, volume_space, volume_res)
            )
        except InputError as exc:
            runs.append(RunSpec(run_id=make_run_id(dict(key)), entities=dict(key), error=str(exc)))
    runs.sort(key=lambda r: r.run_id)
    return runs


def _make_source(
    derivative: bool, ds_root: str, path: str, ent: dict[str, str], tree: _Tree, raw_meta: dict[str, Any]
) -> Source:
    meta = dict(raw_meta)
    meta.update(sidecar_metadata(path, ds_root, tree))
    return Source(
        path=str(path),
        kind=_source_kind(ent) or "volume",
        derivative=derivative,
        space=ent.get("space", NATIVE),
        entities={k: v for k, v in ent.items() if k not in ("datatype",)},
        metadata=meta,
    )


def _volume_rank(src: Source, prefer: str, volume_space: str | None, volume_res: int | None) -> tuple:
    preferred_origin = src.derivative if prefer == "derivatives" else not src.derivative
    in_target = volume_space is not None and src.space == volume_space
    res_match = volume_res is not None and src.res is not None and _res_equal(src.res, volume_res)
    return (not preferred_origin, not in_target, not res_match, src.entities.get("echo") or "", src.path)


def _res_equal(label: str, res: int) -> bool:
    try:
        return math.isclose(float(label), float(res))
    except ValueError:
        return False


def _assemble(key, members, masks, confounds, events, participants, spaces, prefer, volume_space, volume_res):
    for name, label in key:
        if not re.fullmatch(r"[A-Za-z0-9]+", label):
            raise InputError(members[0][2], f"BIDS {name} label {label!r} is not alphanumeric (BIDS labels are [a-zA-Z0-9]+)")
    raw_files = [m for m in members if not m[0]]
    raw_meta = sidecar_metadata(raw_files[0][2], raw_files[0][1], raw_files[0][4]) if raw_files else {}
    sources = [_make_source(d, r, p, e, t, raw_meta if d else {}) for d, r, p, e, t in members]
    if spaces is not None:
        sources = [s for s in sources if s.space in spaces]
    if not sources:
        return []

    volumes = sorted(
        (s for s in sources if s.kind == "volume"), key=lambda s: _volume_rank(s, prefer, volume_space, volume_res)
    )
    # Raw multi-echo acquisitions have one file per echo; a preprocessed (echo-combined)
    # derivative replaces them all. When raw wins, every echo becomes its own run.
    groups: list[list[Source]]
    if volumes and not volumes[0].derivative and len({v.entities.get("echo") for v in volumes if not v.derivative}) > 1:
        echoes = sorted({v.entities.get("echo") for v in volumes if not v.derivative})
        groups = [[v for v in volumes if not v.derivative and v.entities.get("echo") == e] for e in echoes]
    else:
        groups = [volumes]

    entities = dict(key)
    out = []
    for group in groups:
        chosen = group[0] if group else None
        run_entities = dict(entities)
        if chosen is not None and chosen.entities.get("echo") and not chosen.derivative:
            run_entities["echo"] = chosen.entities["echo"]
        spec = RunSpec(run_id=make_run_id(run_entities), entities=run_entities)
        spec.volume = chosen
        spec.alternatives = [v.path for v in volumes if v is not chosen]
        other_origin = [v for v in volumes if chosen is not None and v.derivative != chosen.derivative]
        if other_origin:
            kind = "raw" if chosen.derivative else "derivative"
            spec.notes.append(
                f"{kind} volume {posixpath.basename(other_origin[0].path)} not used: "
                f"{posixpath.basename(chosen.path)} is (recipe inputs.prefer={prefer})"
            )
        gifti = [s for s in sources if s.kind == "gifti"]
        by_space: dict[tuple, dict[str, Source]] = {}
        for s in gifti:
            by_space.setdefault((s.space, s.entities.get("den")), {})[s.entities.get("hemi", "")] = s
        pairs = [v for v in by_space.values() if set(v) >= {"L", "R"}]
        spec.surface = {"L": pairs[0]["L"], "R": pairs[0]["R"]} if pairs else None
        dense = [s for s in sources if s.kind == "cifti_dense"]
        spec.cifti_dense = dense[0] if dense else None
        spec.parcellated = sorted((s for s in sources if s.kind == "cifti_parcels"), key=lambda s: s.path)
        if not spec.sources():
            continue
        if chosen is not None and chosen.derivative:
            spec.mask = _find_mask(chosen, masks)
        spec.confounds = confounds.get(key)
        spec.events = events.get(_key(run_entities, with_echo=True)) or events.get(key)
        spec.participant = dict(participants.get(entities.get("sub", ""), {}))
        spec.metadata = dict(spec.primary.metadata)
        out.append(spec)
    return out


def _find_mask(volume: Source, masks: list[tuple[Path, dict[str, str]]]) -> str | None:
    """The ``desc-brain_mask`` sharing the run entities, space and res of ``volume``."""
    want = {k: volume.entities.get(k) for k in RUN_ENTITIES[:-1] + ("space", "res")}
    for path, ent in masks:
        if all(ent.get(k) == v for k, v in want.items()) and posixpath.dirname(path) == posixpath.dirname(volume.path):
            return str(path)
    return None


class _CallableModule(types.ModuleType):
    """This module, callable as its function of the same name (see ``fmri_data/__init__.py``)."""

    def __call__(self, *args, **kwargs):
        return discover(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
