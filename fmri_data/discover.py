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

import csv
import functools
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import bids2table

from .errors import InputError

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


def _read_participants(root: Path) -> dict[str, dict[str, Any]]:
    path = root / "participants.tsv"
    if not path.is_file():
        return {}
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot parse participants table ({exc})") from exc
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        pid = row.get("participant_id")
        if not pid:
            continue
        out[_clean_label(pid, "sub-")] = {
            k: (None if v in ("n/a", "", None) else v) for k, v in row.items() if k != "participant_id"
        }
    return out


@functools.lru_cache(maxsize=4096)
def _json_files(folder: Path) -> tuple[Path, ...]:
    return tuple(sorted(folder.glob("*.json")))


@functools.lru_cache(maxsize=4096)
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(path, f"sidecar is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise InputError(path, "sidecar is not a JSON object")
    return data


def sidecar_metadata(path: Path, dataset_root: Path) -> dict[str, Any]:
    """JSON sidecar fields of a BIDS file after the BIDS inheritance principle.

    Every ``*.json`` from ``dataset_root`` down to the file's folder whose entities are a
    subset of the file's entities (same suffix) applies; deeper files override shallower
    ones. Names are parsed with bids2table.

    Raises:
        InputError: an applicable sidecar is not valid JSON (bids2table's own loader
            skips such a file silently, which would hide a missing TR).
    """
    ent = bids2table.parse_bids_entities(path)
    want = {k: v for k, v in ent.items() if k not in ("datatype", "ext")}
    chain: list[Path] = []
    folder = path.parent
    while True:
        chain.append(folder)
        if folder == dataset_root or folder.parent == folder:
            break
        folder = folder.parent
    meta: dict[str, Any] = {}
    for folder in reversed(chain):
        for candidate in _json_files(folder):
            cand = bids2table.parse_bids_entities(candidate)
            cand = {k: v for k, v in cand.items() if k not in ("datatype", "ext")}
            if cand.get("suffix") == want.get("suffix") and all(want.get(k) == v for k, v in cand.items()):
                meta.update(_read_json(candidate))
    return meta


def _index(root: Path, participant_label: list[str] | None) -> list[tuple[bool, Path, Path, dict[str, str]]]:
    """Return ``(is_derivative, dataset_root, path, entities)`` for every file under root."""
    datasets = list(bids2table.find_bids_datasets(root))
    if not datasets:
        raise InputError(root, "not a BIDS dataset (no dataset_description.json and no sub-* folders)")
    include = [f"sub-{_clean_label(p, 'sub-')}" for p in participant_label] if participant_label else None
    out = []
    for ds_root in datasets:
        ds_root = Path(ds_root)
        derivative = ds_root != root and "derivatives" in ds_root.relative_to(root).parts
        derivative = derivative or _is_derivative_dataset(ds_root)
        table = bids2table.index_dataset(ds_root, include_subjects=include)
        for rel in table.column("path").to_pylist():
            path = ds_root / rel
            out.append((derivative, ds_root, path, bids2table.parse_bids_entities(path)))
    return out


def _is_derivative_dataset(root: Path) -> bool:
    desc = root / "dataset_description.json"
    try:
        return json.loads(desc.read_text()).get("DatasetType") == "derivative"
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
) -> list[RunSpec]:
    """Find every BOLD run under a BIDS dataset (raw and/or derivatives).

    Args:
        bids_root: folder of a raw BIDS dataset (its ``derivatives/`` are indexed too) or
            of a derivatives dataset (e.g. fMRIPrep output).
        derivatives: extra derivatives datasets living outside ``bids_root``.
        participant_label: keep these subjects (with or without ``sub-``).
        task: keep these task labels.
        space: keep sources in these spaces (``"native"`` = no ``space`` entity).
        prefer: ``"derivatives"`` or ``"raw"``: which volume source wins for a run that
            has both.
        volume_space, volume_res: among derivative volumes, prefer this template space
            and ``res`` label (the recipe's target grid), so no needless resampling happens.

    Returns:
        RunSpecs sorted by run_id.

    Raises:
        InputError: the root is missing or not a BIDS dataset, a participants table or a
            JSON sidecar is unreadable.
    """
    root = Path(bids_root).expanduser().resolve()
    if not root.is_dir():
        raise InputError(root, "BIDS root is not a directory")
    files = _index(root, participant_label)
    for extra in derivatives or []:
        extra_root = Path(extra).expanduser().resolve()
        if not extra_root.is_dir():
            raise InputError(extra_root, "derivatives folder is not a directory")
        files += [(True, r, p, e) for _, r, p, e in _index(extra_root, participant_label)]

    tasks = set(task) if task else None
    spaces = set(space) if space else None
    participants = _read_participants(root)

    bold: dict[tuple, list[tuple[bool, Path, Path, dict[str, str]]]] = {}
    masks, confounds, events = [], {}, {}
    for derivative, ds_root, path, ent in files:
        if tasks is not None and ent.get("task") not in tasks:
            continue
        kind = _source_kind(ent)
        if kind is not None:
            bold.setdefault(_key(ent, with_echo=False), []).append((derivative, ds_root, path, ent))
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
    derivative: bool, ds_root: Path, path: Path, ent: dict[str, str], raw_meta: dict[str, Any]
) -> Source:
    meta = dict(raw_meta)
    meta.update(sidecar_metadata(path, ds_root))
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
    raw_files = [m for m in members if not m[0]]
    raw_meta = sidecar_metadata(raw_files[0][2], raw_files[0][1]) if raw_files else {}
    sources = [_make_source(d, r, p, e, raw_meta if d else {}) for d, r, p, e in members]
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
        if all(ent.get(k) == v for k, v in want.items()) and Path(path).parent == Path(volume.path).parent:
            return str(path)
    return None
