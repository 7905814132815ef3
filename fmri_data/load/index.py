"""The window index of a store: every (run, start) training window, its labels and split.

A *window* is ``L`` consecutive frames ``[start, start + L)`` of one time-first array of a
run (``bold``, ``flat``, ``roi/<key>``; frames at the run's ``tr_s``). Windows come from
one of three sources:

- ``"sliding"``: starts ``0, S, 2S, ...`` while ``start + L <= T`` (``S`` = stride);
- ``"saliency"``: the top-k windows of a saliency scorer (``runs/<id>/saliency/<scorer>/``:
  ``starts[topk]``, best first; attributes ``window``/``stride``; see
  :mod:`fmri_data.saliency`); the scorer's window must equal ``L``;
- ``"events"``: one window per row of the run's ``events`` attribute (from
  ``events.tsv``), starting at ``round((onset + hrf_delay_s) / tr_s)``; events whose
  window would pass the end of the run are left out (and counted in ``dropped``).

How a window's frames are cut (``window``; sliding windows only):

- ``"contiguous"`` (default): frames ``[start, start + L)``;
- ``"first"`` (fMRI-LM): one window per run, its first ``L`` frames; a run shorter than
  ``L`` is upsampled to ``L`` frames by nearest neighbour as ``F.interpolate(x, size=L,
  mode="nearest")`` does: frame ``i`` is source frame ``floor(i * T / L)``;
- ``"evenly"`` (Brain-JEPA): one window per run, ``L`` frames evenly spaced over a clip of
  ``clip`` frames: of the run's first ``keep`` frames (``T' = min(T, keep)``), frame ``i`` is
  ``min(trunc(start + i * (clip - 1) / (L - 1)), T' - 1)``, i.e. ``torch.linspace(start,
  start + clip - 1, L).clamp(0, T' - 1).long()``. The reference draws ``start`` uniformly in
  ``[0, max(keep - clip, 0))`` at every read; here it is deterministic: ``0`` without
  ``seed``, else ``u * max(keep - clip, 0)`` with ``u = sha256(f"{seed}:{run_id}") / 2**256``
  (one start per run and seed; build the index with another seed to draw other clips).

Such windows carry their frame numbers (:attr:`WindowIndex.frames`, ``(N, L)``); the reader
reads the contiguous frames they span and gathers them (the store is never rewritten).

Labels of a window: the run's BIDS entities (``sub``, ``ses``, ``task``, ``run``, ...),
the subject's ``participants.tsv`` row (``sex``, ``age``, ``diagnosis``, ...; ``n/a`` is
``None``) and, for event-locked windows, the event's columns (``trial_type``, ``onset``,
``duration``, ...).

Splits are deterministic and never mix a subject across splits: each subject (or, with
``split_by="run"``, each run — for within-subject decoding such as Haxby's single
subject) gets ``u = sha256(f"{seed}:{key}") / 2**256`` in ``[0, 1)`` and goes to the
first split whose cumulative fraction exceeds ``u``. The assignment of a key never
changes when other subjects are added to the store.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..derive.windows import window_starts
from ..errors import StoreError
from ..store.layout import RUNS
from ..store.root import Store
from ..store.validate import read_run_array, run_group_problem, survey_runs

#: Default delay of the haemodynamic response added to event onsets (seconds).
DEFAULT_HRF_DELAY_S = 5.0
DEFAULT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
SOURCES = ("sliding", "saliency", "events")
WINDOWS = ("contiguous", "first", "evenly")
#: Entities that identify a run (in run_id order) for ``split_by="run"``.
RUN_KEY_ENTITIES = ("sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "echo")


@dataclass(frozen=True)
class RunEntry:
    """One run of the index.

    Attributes:
        run_id: the run's id in the store.
        array: the windowed array's path inside the run (``"bold"``, ``"roi/<key>"``, ...).
        n_frames: length of its time axis; tr_s: repetition time of that axis (s).
        frame_shape: shape of one frame (``(96, 96, 96)``, ``(H, W)``, ``(R,)``).
        dtype: stored dtype name; chunk_frames / shard_frames: frames per chunk / shard.
        labels: run-level labels (entities + participant row).
    """

    run_id: str
    array: str
    n_frames: int
    tr_s: float
    frame_shape: tuple[int, ...]
    dtype: str
    chunk_frames: int
    shard_frames: int
    labels: dict[str, Any]


@dataclass
class WindowIndex:
    """All windows of a store selection, in (run, start) order.

    Attributes:
        url, storage_options: where the store is (opened lazily by readers).
        length: frames per window (``L``).
        runs: the runs, :class:`RunEntry`.
        run: ``(N,) int32`` index into ``runs`` of each window.
        start: ``(N,) int64`` first frame of each window.
        event_labels: per-window event columns (event-locked windows), else empty dicts.
        dropped: ``{run_id: reason}`` for runs (or events) left out, with the reason; runs
            whose group cannot be read as complete (unreadable ``zarr.json``, no ``status``,
            listed as complete in ``index.parquet`` but absent) are listed too.
        source: ``"sliding"``, ``"saliency"`` or ``"events"``.
        frames: ``(N, L) int64`` frame numbers of each window when they are not
            ``[start, start + L)`` (``window="first"`` / ``"evenly"``), else None.
    """

    url: str
    storage_options: dict[str, Any]
    length: int
    runs: list[RunEntry]
    run: np.ndarray
    start: np.ndarray
    event_labels: list[dict[str, Any]]
    source: str
    dropped: dict[str, str] = field(default_factory=dict)
    frames: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.start)

    def labels(self, i: int) -> dict[str, Any]:
        """Labels of window ``i``: run labels, then (event-locked windows) the event's columns."""
        return {**self.runs[int(self.run[i])].labels, **self.event_labels[i]}

    def run_id(self, i: int) -> str:
        return self.runs[int(self.run[i])].run_id

    def classes(self, name: str) -> list[Any]:
        """Sorted distinct non-null values of label ``name`` over the index (class ``c`` = position)."""
        values = {self.labels(i).get(name) for i in range(len(self))}
        values.discard(None)
        return sorted(values, key=lambda v: (str(type(v)), v))

    def blocks(self) -> np.ndarray:
        """``(N,) int64`` shuffle block of each window: windows starting in the same shard of
        the same run share a block (block ids increase in (run, start) order)."""
        if not len(self):
            return np.zeros(0, dtype=np.int64)
        shard = np.array([self.runs[r].shard_frames for r in self.run], dtype=np.int64)
        key = np.stack([self.run.astype(np.int64), self.start // shard], axis=1)
        change = np.any(np.diff(key, axis=0) != 0, axis=1)
        return np.concatenate([[0], np.cumsum(change)]).astype(np.int64)

    def fingerprint(self) -> str:
        """SHA-256 (16 hex digits) of the windows (run ids, array, starts, length): a resume
        state is only valid for the index it was taken on."""
        digest = hashlib.sha256()
        digest.update(json.dumps([self.length, [(r.run_id, r.array) for r in self.runs]]).encode())
        digest.update(self.run.astype(np.int64).tobytes())
        digest.update(self.start.astype(np.int64).tobytes())
        if self.frames is not None:
            digest.update(self.frames.astype(np.int64).tobytes())
        return digest.hexdigest()[:16]

    def select(self, keep: np.ndarray) -> WindowIndex:
        """A sub-index of the windows where the boolean ``keep`` is true (order kept)."""
        keep = np.asarray(keep, dtype=bool)
        return WindowIndex(
            self.url, self.storage_options, self.length, self.runs, self.run[keep], self.start[keep],
            [e for e, k in zip(self.event_labels, keep) if k], self.source, dict(self.dropped),
            None if self.frames is None else self.frames[keep],
        )

    def split(self, name: str, *, by: str = "subject", seed: int = 0, fractions: dict[str, float] | None = None) -> WindowIndex:
        """The windows of one split (see :func:`split_of`): ``by`` is ``"subject"`` or ``"run"``."""
        fractions = fractions or DEFAULT_FRACTIONS
        if name not in fractions:
            raise ValueError(f"split '{name}' is not one of {list(fractions)}")
        of_run = [split_of(split_key(r.labels, by), seed, fractions) for r in self.runs]
        return self.select(np.array([of_run[r] == name for r in self.run], dtype=bool))


def split_key(labels: dict[str, Any], by: str) -> str:
    """The key that decides a run's split: ``sub`` (``by="subject"``) or its entities (``by="run"``)."""
    if by == "subject":
        return str(labels["sub"])
    if by == "run":
        return "_".join(f"{e}-{labels[e]}" for e in RUN_KEY_ENTITIES if labels.get(e) is not None)
    raise ValueError(f"split by '{by}': use 'subject' or 'run'")


def split_of(key: str, seed: int, fractions: dict[str, float]) -> str:
    """Deterministic split of a subject/run key: ``u = sha256("seed:key") / 2**256``, first
    split (in ``fractions`` order) whose cumulative fraction exceeds ``u``.

    Raises:
        ValueError: fractions negative or not summing to 1.
    """
    values = np.array(list(fractions.values()), dtype=float)
    if (values < 0).any() or abs(values.sum() - 1.0) > 1e-9:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
    u = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest(), 16) / 2.0**256
    edges = np.cumsum(values)
    for name, edge in zip(fractions, edges):
        if u < edge:
            return name
    return list(fractions)[-1]


def sliding_starts(n_frames: int, length: int, stride: int) -> np.ndarray:
    """``(n,) int64`` starts ``0, stride, ...`` with ``start + length <= n_frames``: the
    saliency scorers' window grid (:func:`fmri_data.derive.windows.window_starts`), where
    a window may also be a single frame.

    Raises:
        ValueError: ``length < 1`` or ``stride < 1``.
    """
    return window_starts(n_frames, length, stride, min_window=1)


def event_starts(events: list[dict[str, Any]], tr_s: float, n_frames: int, length: int, hrf_delay_s: float) -> tuple[np.ndarray, list[dict[str, Any]], int]:
    """Event-locked windows: start frame ``round((onset + hrf_delay_s) / tr_s)`` per event.

    Args:
        events: rows of ``events.tsv`` (``onset``, ``duration`` in s, other columns).
        tr_s: repetition time of the windowed series (s); n_frames: its length.
        length: frames per window; hrf_delay_s: delay added to each onset (s).

    Returns:
        ``(starts (n,) int64, event rows kept, number of events left out)``; an event is left
        out when it has no onset or its window does not fit in ``[0, n_frames)``.
    """
    starts, rows, dropped = [], [], 0
    for row in events:
        onset = row.get("onset")
        if onset is None or not np.isfinite(float(onset)):
            dropped += 1
            continue
        start = int(np.round((float(onset) + hrf_delay_s) / tr_s))
        if start < 0 or start + length > n_frames:
            dropped += 1
            continue
        starts.append(start)
        rows.append(dict(row))
    return np.asarray(starts, dtype=np.int64), rows, dropped


def first_frames(n_frames: int, length: int) -> np.ndarray:
    """fMRI-LM's window: the first ``length`` frames; a shorter run nearest-upsampled to
    ``length`` (``F.interpolate(mode="nearest")``: frame ``i`` <- ``floor(i * T / length)``)."""
    if n_frames < 1 or length < 1:
        raise ValueError(f"need n_frames >= 1 and length >= 1 (got {n_frames}, {length})")
    i = np.arange(length, dtype=np.int64)
    return i if n_frames >= length else (i * n_frames) // length


def evenly_frames(n_frames: int, length: int, clip: int, keep: int | None = None, start: float = 0.0) -> np.ndarray:
    """Brain-JEPA's window: ``linspace(start, start + clip - 1, length)`` truncated to integers
    and clamped to the first ``min(n_frames, keep)`` frames."""
    if n_frames < 1 or length < 2 or clip < 1:
        raise ValueError(f"need n_frames >= 1, length >= 2, clip >= 1 (got {n_frames}, {length}, {clip})")
    ncols = min(n_frames, keep) if keep else n_frames
    positions = np.linspace(start, start + clip - 1, length)
    return np.clip(np.trunc(positions), 0, ncols - 1).astype(np.int64)


def evenly_start(run_id: str, clip: int, keep: int | None, n_frames: int, seed: int | None) -> float:
    """The clip's start: 0 without seed, else ``u * max(keep - clip, 0)``, ``u`` from sha256(seed:run_id)."""
    if seed is None:
        return 0.0
    u = int(hashlib.sha256(f"{seed}:{run_id}".encode()).hexdigest(), 16) / 2.0**256
    return u * max((keep or n_frames) - clip, 0)


def _resolve_array(array: str, outputs: list[str], group) -> str | None:
    if array == "roi":
        return next((o for o in outputs if o.startswith("roi/")), None)
    return array if (array in outputs or array in group) else None


def build_index(
    url: str,
    length: int,
    stride: int | None = None,
    *,
    array: str = "bold",
    source: str = "sliding",
    scorer: str | None = None,
    hrf_delay_s: float = DEFAULT_HRF_DELAY_S,
    run_ids: Iterable[str] | None = None,
    where: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
    window: str = "contiguous",
    clip: int | None = None,
    keep: int | None = None,
    seed: int | None = None,
) -> WindowIndex:
    """Index the windows of a store.

    Args:
        url: store path or fsspec URL (``s3://...``, ``memory://...``).
        length: frames per window ``L`` (NeuroSTORM 20, SLIM-Brain 40, flat MAE 16, ...).
        stride: frames between sliding-window starts (default ``length``).
        array: time-first array of each run: ``"bold"``, ``"flat"``, ``"roi/<key>"`` or
            ``"roi"`` (each run's first ROI series). Runs without it are left out.
        source: ``"sliding"``, ``"saliency"`` (needs ``scorer``) or ``"events"``.
        scorer: saliency scorer whose top-k windows are used.
        hrf_delay_s: haemodynamic delay added to event onsets (s), ``source="events"``.
        run_ids: only these runs (default: every complete run).
        where: keep runs whose labels equal these values (``{"task": "objectviewing"}``;
            a list/tuple/set value means any of them).
        storage_options: fsspec options.
        window: ``"contiguous"`` (default), ``"first"`` (fMRI-LM: the first ``length``
            frames, shorter runs nearest-upsampled) or ``"evenly"`` (Brain-JEPA: ``length``
            frames evenly spaced over ``clip`` frames of the first ``keep``); the last two
            give one window per run and need ``source="sliding"`` (see the module doc).
        clip, keep, seed: ``window="evenly"`` only: clip length (default ``length``), frames
            kept (default all), and the seed of the clip's start (None: start 0).

    Returns:
        :class:`WindowIndex` (windows in run-id, then start order; saliency windows in
        start order too — the top-k rank is a label, ``saliency_rank``).

    Raises:
        StoreError: the store cannot be opened, an asked-for run is missing or unreadable
            (naming its ``zarr.json``), a saliency group's window differs from ``length`` or
            its ``starts``/``topk`` file is corrupt (naming the file).
        ValueError: an unknown source, or ``source="saliency"`` without ``scorer``.
    """
    if source not in SOURCES:
        raise ValueError(f"window source '{source}' is not one of {SOURCES}")
    if source == "saliency" and not scorer:
        raise ValueError("source='saliency' needs a scorer name")
    if window not in WINDOWS:
        raise ValueError(f"window '{window}' is not one of {WINDOWS}")
    if window != "contiguous" and source != "sliding":
        raise ValueError(f"window='{window}' cuts one window per run; use it with source='sliding'")
    stride = int(stride or length)
    sliding_starts(length, length, stride)  # checks length and stride
    store = Store.open(url, storage_options)
    # run groups (or index.parquet rows) that are not readable complete runs: named, not lost
    wanted, dropped = survey_runs(store) if run_ids is None else (list(run_ids), {})
    runs: list[RunEntry] = []
    run_col, start_col, events_col, frames_col = [], [], [], []
    for run_id in wanted:
        try:
            attrs = store.run_attrs(run_id)
        except StoreError:
            problem = run_group_problem(store, run_id)
            if problem is None:
                raise
            raise StoreError(problem) from None
        labels = {**attrs["entities"], **{k: v for k, v in (attrs.get("participant") or {}).items() if k != "participant_id"}}
        if where and not all((labels.get(k) in v) if isinstance(v, (list, tuple, set)) else labels.get(k) == v for k, v in where.items()):
            continue
        group = store.run(run_id)
        key = _resolve_array(array, list(attrs["outputs"]), group)
        if key is None:
            dropped[run_id] = f"no array '{array}'"
            continue
        arr = group[key]
        if arr.ndim < 1 or arr.shape[0] != attrs["n_frames"]:
            raise StoreError(f"{store.url}/{RUNS}/{run_id}/{key}: shape {arr.shape} is not time-first with {attrs['n_frames']} frames")
        n_frames, tr_s = int(arr.shape[0]), float(attrs["tr_s"])
        rows: list[dict[str, Any]] = []
        if window == "first":
            frames_col.append(first_frames(n_frames, length)[None])
            starts = frames_col[-1][:, 0].copy()
        elif window == "evenly":
            c = int(clip or length)
            frames_col.append(evenly_frames(n_frames, length, c, keep, evenly_start(run_id, c, keep, n_frames, seed))[None])
            starts = frames_col[-1][:, 0].copy()
        elif source == "sliding":
            starts = sliding_starts(n_frames, length, stride)
        elif source == "saliency":
            path = f"saliency/{scorer}"
            if path not in group:
                dropped[run_id] = f"no saliency scorer '{scorer}'"
                continue
            sal = group[path]
            if int(sal.attrs["window"]) != length:
                raise StoreError(
                    f"{store.url}/{RUNS}/{run_id}/{path}: windows of {sal.attrs['window']} frames, not {length}; "
                    f"rescore with --window {length} or ask for length={sal.attrs['window']}"
                )
            all_starts = np.asarray(read_run_array(store, run_id, f"{path}/starts"), dtype=np.int64)
            topk = np.asarray(read_run_array(store, run_id, f"{path}/topk"), dtype=np.int64)
            order = np.argsort(all_starts[topk], kind="stable")
            starts = all_starts[topk][order]
            rows = [{"saliency_rank": int(rank)} for rank in order]
        else:
            if not attrs.get("events"):
                dropped[run_id] = "no events"
                continue
            starts, rows, n_out = event_starts(attrs["events"], tr_s, n_frames, length, hrf_delay_s)
            order = np.argsort(starts, kind="stable")  # start order: windows of one shard stay together
            starts, rows = starts[order], [rows[k] for k in order]
            if n_out:
                dropped[run_id] = f"{n_out} event(s) without a full window of {length} frames after the onset + {hrf_delay_s} s"
        if not len(starts):
            dropped.setdefault(run_id, f"no window of {length} frames")
            continue
        shard_frames = int(arr.shards[0] if arr.shards else arr.chunks[0])
        runs.append(RunEntry(run_id, key, n_frames, tr_s, tuple(int(s) for s in arr.shape[1:]), str(arr.dtype),
                             int(arr.chunks[0]), shard_frames, labels))
        run_col.append(np.full(len(starts), len(runs) - 1, dtype=np.int32))
        start_col.append(starts)
        events_col += rows or [{} for _ in starts]
    return WindowIndex(
        store.url, dict(storage_options or {}), int(length), runs,
        np.concatenate(run_col) if run_col else np.zeros(0, dtype=np.int32),
        np.concatenate(start_col) if start_col else np.zeros(0, dtype=np.int64),
        events_col, source, dropped,
        (np.concatenate(frames_col) if frames_col else np.zeros((0, int(length)), dtype=np.int64)) if window != "contiguous" else None,
    )
