"""Saliency-window indices in the store: score each run's windows, store the top-k.

SLIM-Brain style (arXiv 2512.21881): each run's windows are ranked by a saliency score and
a training loop reads only the ``k`` best. Scorers: the training-free ones of
:mod:`fmri_data.derive.saliency` (and their ``*_motion_penalized`` variants), and learned
masked-frame networks (:mod:`fmri_data.derive.saliency_net`) fitted on a store with
:func:`fit_store` and referred to by their name.

Layout (``schemas/run.schema.json`` ``$defs/saliency_attrs`` is the contract; the loader
reads it)::

    runs/<run_id>/saliency/             group; attrs {"skipped": {scorer: reason}}
        <scorer>/                       group; attrs scorer, source, window, stride, k, ...
            scores  (n_windows,) float32    higher = more salient
            starts  (n_windows,) int64      first frame of each window (stored time axis)
            topk    (k,) int64              indices into starts/scores, best first
            censored (n_windows,) int64     motion-penalised scorers only: censored source frames
    models/saliency/<name>.safetensors  learned networks (root attrs ``saliency_models``)

Window ``i`` is frames ``[starts[i], starts[i] + window)`` of every time series of the run
(``bold``, ``roi/*``), at ``tr_s``. ``k = min(k_requested, n_windows)``; ties are broken
towards the earlier window, so ``topk == top_k(scores, k)`` exactly.

Writes: during conversion the groups go into the run's staging group and are committed
with the run. Rescoring a committed run (:func:`score_store`) goes through
:meth:`Store.replace_in_run <fmri_data.store.root.Store.replace_in_run>`: every scorer group
is written under ``_staging/`` and then moved into place (a directory rename); a group it
replaces is first moved aside, so a reader sees the old group, no group, or the new one —
never a half-written group. Fitted networks are written with
:meth:`Store.write_bytes <fmri_data.store.root.Store.write_bytes>` and registered with
:meth:`Store.write_root_attrs <fmri_data.store.root.Store.write_root_attrs>` (both atomic).
Reading and checking the groups is :mod:`fmri_data.store.saliency_group`.
"""

from __future__ import annotations

import functools
import json
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import zarr

from .derive.scorers import BUILTIN, builtin_names, check_window, cube_means, finite_or_zero, top_k
from .derive.motion import (
    MOTION_DESCRIPTION, MOTION_SUFFIX, censored_frames, framewise_displacement, motion_penalize, split_motion,
    window_source_frames,
)
from .derive.windows import window_starts
from .errors import StoreError
from .imports import load_module
from .config.schema import to_json
from .store.layout import RUNS, SALIENCY, SALIENCY_MODELS, compressors, now, software_versions
from .store.root import Store
from .store.saliency_group import check_run_saliency, read_run_saliency

__all__ = ["check_run_saliency", "read_run_saliency"]  # re-exported: the readers live in the store package

warnings.filterwarnings("ignore", message="Object at models is not recognized")

GROUP = SALIENCY
MODELS_DIR = SALIENCY_MODELS
DEFAULT_K = 4
DEFAULT_SOURCES = ("roi", "bold")
DEFAULT_FD_THRESHOLD_MM = 0.5
DEFAULT_CUBE_VOXELS = 6
CENSOR_BEFORE, CENSOR_AFTER, FD_RADIUS_MM = 1, 2, 50.0


@dataclass(frozen=True)
class SaliencySettings:
    """What to score and how (the recipe's ``saliency`` section, resolved).

    Attributes:
        scorers: scorer names (built-in, ``*_motion_penalized``, or a fitted model's name).
        window: frames per window; stride: frames between window starts; k: windows kept.
        sources: candidate inputs in order of preference: ``"roi/<key>"``, ``"roi"`` (the
            run's first ROI series) or ``"bold"`` (brain voxels of the stored volume).
        fd_threshold_mm: FD scrubbing threshold of the motion-penalised scorers.
        cube_voxels: cube edge (voxels) for dynamic FC on ``bold``.
    """

    scorers: tuple[str, ...]
    window: int
    stride: int
    k: int = DEFAULT_K
    sources: tuple[str, ...] = DEFAULT_SOURCES
    fd_threshold_mm: float = DEFAULT_FD_THRESHOLD_MM
    cube_voxels: int = DEFAULT_CUBE_VOXELS

    def __post_init__(self):
        check_window(self.window, self.stride, self.k)
        if self.fd_threshold_mm <= 0 or self.cube_voxels < 1:
            raise ValueError(f"saliency needs fd_threshold_mm > 0 and cube_voxels >= 1 (got {self.fd_threshold_mm}, {self.cube_voxels})")
        for source in self.sources:
            if not (source in ("roi", "bold") or source.startswith("roi/")):
                raise ValueError(f"saliency source '{source}' is not roi/<key>, roi or bold")


def settings_from_recipe(recipe: dict[str, Any], **overrides: Any) -> SaliencySettings | None:
    """Resolve the recipe's ``saliency`` section (None when absent and no scorers given).

    Defaults: ``window`` = ``store.chunk_frames``, ``stride`` = ``window`` (windows are then
    whole chunks), ``k`` = 4, ``source`` = ``[roi, bold]``. ``overrides`` (e.g. from the
    command line) replace recipe values when not None; ``source`` may be a string or a list.
    """
    cfg = dict(recipe.get("saliency") or {})
    cfg.update({k: v for k, v in overrides.items() if v not in (None, [], ())})
    if not cfg.get("scorers"):
        return None

    def get(key: str, default: Any) -> Any:
        return default if cfg.get(key) is None else cfg[key]

    window = int(get("window", recipe["store"]["chunk_frames"]))
    source = get("source", list(DEFAULT_SOURCES))
    return SaliencySettings(
        scorers=tuple(cfg["scorers"]),
        window=window,
        stride=int(get("stride", window)),
        k=int(get("k", DEFAULT_K)),
        sources=(source,) if isinstance(source, str) else tuple(source),
        fd_threshold_mm=float(get("fd_threshold_mm", DEFAULT_FD_THRESHOLD_MM)),
        cube_voxels=int(get("cube_voxels", DEFAULT_CUBE_VOXELS)),
    )


# ---------------------------------------------------------------------------- run data
@dataclass
class RunData:
    """What scoring needs from one run; series are loaded on first use.

    Attributes:
        n_frames, tr_s: stored time axis; n_frames_source, source_tr_s: the source's.
        roi_keys: ROI series of the run in output order; load_roi(key) -> ``(T, R)`` float32.
        load_bold: None without volume output, else ``() -> (x (T, N) float32, mask (X, Y, Z))``
            brain voxels of the stored ``bold`` (as stored: normalized, float16 -> float32).
        confounds: ``(columns, (n_frames_source, C))`` or None.
    """

    n_frames: int
    tr_s: float
    n_frames_source: int
    source_tr_s: float
    roi_keys: list[str]
    load_roi: Callable[[str], np.ndarray]
    load_bold: Callable[[], tuple[np.ndarray, np.ndarray]] | None
    confounds: tuple[list[str], np.ndarray] | None
    _cache: dict[str, Any] = field(default_factory=dict)

    def series(self, source: str) -> np.ndarray:
        if source not in self._cache:
            if source == "bold":
                self._cache["bold"], self._cache["mask"] = self.load_bold()
            else:
                self._cache[source] = np.asarray(self.load_roi(source.removeprefix("roi/")), dtype=np.float32)
        return self._cache[source]

    def mask(self) -> np.ndarray:
        self.series("bold")
        return self._cache["mask"]

    @classmethod
    def from_group(cls, group: zarr.Group, attrs: dict[str, Any]) -> "RunData":
        """A committed (or staging) run group and its attributes."""
        roi_keys = [name.removeprefix("roi/") for name in attrs["outputs"] if name.startswith("roi/")]
        confounds = None
        if "confounds" in group:
            array = group["confounds"]
            confounds = (list(array.attrs.get("columns", [])), array[...])
        return cls(
            n_frames=int(attrs["n_frames"]),
            tr_s=float(attrs["tr_s"]),
            n_frames_source=int(attrs["n_frames_source"]),
            source_tr_s=float(attrs["source_tr_s"]),
            roi_keys=roi_keys,
            load_roi=lambda key: group[f"roi/{key}"][...],
            load_bold=(lambda: bold_brain_series(group)) if "bold" in group and "brain_mask" in group else None,
            confounds=confounds,
        )


def bold_brain_series(group: zarr.Group) -> tuple[np.ndarray, np.ndarray]:
    """Brain voxels of a run's stored ``bold``, read shard by shard.

    Returns:
        ``(x (T, N) float32, mask (X, Y, Z) bool)``; ``x[:, i]`` is voxel ``np.argwhere(mask)[i]``.
    """
    mask = np.asarray(group["brain_mask"][...], dtype=bool)
    bold = group["bold"]
    step = bold.shards[0] if bold.shards else bold.chunks[0]
    out = np.empty((bold.shape[0], int(mask.sum())), dtype=np.float32)
    for a in range(0, bold.shape[0], step):
        b = min(a + step, bold.shape[0])
        out[a:b] = bold[a:b][:, mask]
    return out, mask


def choose_source(candidates: tuple[str, ...], roi_keys: list[str], has_bold: bool) -> str | None:
    """First available candidate: ``"roi/<key>"``, ``"roi"`` (first ROI series) or ``"bold"``."""
    for c in candidates:
        if c == "bold" and has_bold:
            return "bold"
        if c == "roi" and roi_keys:
            return f"roi/{roi_keys[0]}"
        if c.startswith("roi/") and c.removeprefix("roi/") in roi_keys:
            return c
    return None


# ---------------------------------------------------------------------------- scoring
@dataclass
class WindowScores:
    """One scorer's result for one run, ready to write."""

    scorer: str
    starts: np.ndarray
    scores: np.ndarray
    topk: np.ndarray
    attrs: dict[str, Any]
    censored: np.ndarray | None = None


@dataclass
class LearnedScorer:
    """A fitted network and its registry record (root attrs ``saliency_models[name]``)."""

    name: str
    net: Any
    config: Any
    record: dict[str, Any]


def _motion_reason(data: RunData) -> tuple[np.ndarray | None, str | None]:
    if data.confounds is None:
        return None, "the run has no confounds table with one row per source frame: no framewise displacement"
    columns, values = data.confounds
    if values.shape[0] != data.n_frames_source:
        return None, f"confounds have {values.shape[0]} rows for {data.n_frames_source} source frames: no framewise displacement"
    try:
        return framewise_displacement(columns, values, FD_RADIUS_MM), None
    except ValueError as exc:
        shown = ", ".join(columns[:3]) + (f", ... ({len(columns)} columns)" if len(columns) > 3 else "")
        return None, (
            f"no framewise displacement: {exc} (columns: {shown}); FD is computed only from fMRIPrep's "
            "trans_x..rot_z, never from unnamed or undocumented columns"
        )


def score_run(
    data: RunData, settings: SaliencySettings, learned: dict[str, LearnedScorer] | None = None
) -> tuple[list[WindowScores], dict[str, str]]:
    """Score one run's windows with every scorer of ``settings``.

    Args:
        data: the run (:class:`RunData`).
        settings: what to score.
        learned: fitted networks by name (scorers that are not built-in).

    Returns:
        ``(results, skipped)``: one :class:`WindowScores` per scorer that applies, and
        ``{scorer: reason}`` for the others (no usable source, no framewise displacement,
        the run lacks the network's ROI series, a series a scorer cannot use).

    Raises:
        ValueError: an unknown scorer name.
    """
    learned = learned or {}
    starts = window_starts(data.n_frames, settings.window, settings.stride)
    builtin_source = choose_source(settings.sources, data.roi_keys, data.load_bold is not None)
    fd = reason_fd = None
    results: list[WindowScores] = []
    skipped: dict[str, str] = {}
    for name in settings.scorers:
        base, motion = split_motion(name)
        params: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        if base in BUILTIN:
            scorer = BUILTIN[base]
            source = builtin_source
            if source is None:
                skipped[name] = f"none of the saliency sources {list(settings.sources)} is in the run"
                continue
            x = data.series(source)
            if source == "bold" and scorer.needs_cubes:
                x = cube_means(x, data.mask(), settings.cube_voxels)
                params["cube_voxels"] = settings.cube_voxels
                params["n_cubes"] = int(x.shape[1])
            try:
                raw = scorer.fn(x, starts, settings.window)
            except ValueError as exc:  # e.g. dynamic FC of a single-parcel series
                skipped[name] = f"cannot score {source}: {exc}"
                continue
            description = scorer.description
        elif base in learned:
            model = learned[base]
            source = model.record["roi"]
            if source.removeprefix("roi/") not in data.roi_keys:
                skipped[name] = f"network '{base}' models {source}, which the run does not have"
                continue
            x = data.series(source)
            if x.shape[1] != model.config.n_channels:
                skipped[name] = f"network '{base}' models {model.config.n_channels} parcels; {source} has {x.shape[1]}"
                continue
            from .derive.saliency_net import reconstruction_error

            raw = reconstruction_error(model.net, model.config, x, starts, settings.window)
            description = (
                "mean squared masked-frame reconstruction error of a Conv1d network trained self-supervised on the "
                "store's ROI series (every frame masked once, period "
                f"{model.config.period}; series z-scored per parcel over the run)"
            )
            extra["model"] = {"name": base, "path": model.record["path"], "sha256": model.record["sha256"]}
        else:
            raise ValueError(
                f"unknown saliency scorer '{name}'; built-in: {', '.join(builtin_names())}"
                + (f"; fitted: {', '.join(learned)}" if learned else "")
            )
        censored = None
        if motion:
            if fd is None and reason_fd is None:
                fd, reason_fd = _motion_reason(data)
            if fd is None:
                skipped[name] = reason_fd
                continue
            ranges = window_source_frames(starts, settings.window, data.tr_s, data.source_tr_s, data.n_frames_source)
            flags = censored_frames(fd, settings.fd_threshold_mm, CENSOR_BEFORE, CENSOR_AFTER)
            raw, censored = motion_penalize(raw, flags, ranges)
            description += MOTION_DESCRIPTION.format(threshold=settings.fd_threshold_mm)
            params.update(
                fd_threshold_mm=settings.fd_threshold_mm, censor_before=CENSOR_BEFORE, censor_after=CENSOR_AFTER,
                fd_radius_mm=FD_RADIUS_MM, fd_mean_mm=float(fd.mean()), censored_source_frames=int(flags.sum()),
            )
        scores = finite_or_zero(raw)
        topk = top_k(scores, settings.k)
        attrs = {
            "scorer": name,
            "source": source,
            "window": settings.window,
            "stride": settings.stride,
            "k": int(len(topk)),
            "k_requested": settings.k,
            "n_windows": int(len(starts)),
            "n_frames": data.n_frames,
            "tr_s": data.tr_s,
            "description": description,
            "params": params,
            "created": now(),
            "software": dict(_software(bool(extra.get("model")))),
            **extra,
        }
        results.append(WindowScores(name, starts, scores, topk, attrs, censored))
    return results, skipped


@functools.lru_cache(maxsize=2)
def _software(with_torch: bool) -> dict[str, str | None]:
    versions = software_versions()
    out = {"fmri_data": versions.get("fmri_data"), "numpy": versions.get("numpy")}
    if with_torch:
        out["torch"] = load_module("torch").__version__
    return out


# ---------------------------------------------------------------------------- writing
def write_scores(group: zarr.Group, result: WindowScores, compression: dict[str, Any]) -> None:
    """Write one scorer's arrays and attributes into ``group`` (the ``<scorer>`` group itself)."""
    arrays = {"scores": result.scores.astype(np.float32), "starts": result.starts.astype(np.int64), "topk": result.topk.astype(np.int64)}
    if result.censored is not None:
        arrays["censored"] = result.censored.astype(np.int64)
    for name, values in arrays.items():
        group.create_array(
            name, shape=values.shape, chunks=(max(1, len(values)),), dtype=values.dtype,
            compressors=compressors(compression, values.dtype.itemsize), fill_value=0,
            dimension_names=("rank",) if name == "topk" else ("window",),  # top-k ranks vs every window
        )[...] = values
    group.attrs.put(to_json(result.attrs))


def write_into_run(run_group: zarr.Group, results: list[WindowScores], skipped: dict[str, str], compression: dict[str, Any]) -> None:
    """Write scorer groups into a run group being converted (its staging group)."""
    parent = run_group.require_group(GROUP)
    parent.attrs.put(to_json({"skipped": skipped}))
    for result in results:
        write_scores(parent.create_group(result.scorer), result, compression)


def replace_in_committed_run(store: Store, run_id: str, results: list[WindowScores], skipped: dict[str, str]) -> None:
    """Write scorer groups into a committed run atomically (:meth:`Store.replace_in_run`).

    Every scorer group is written into ``_staging/`` first and moved into place only when
    all were written; if one fails the run keeps its previous groups. A scorer now skipped
    loses its previous group (it would describe other settings); the ``saliency`` group's
    attribute ``skipped`` is updated.

    Raises:
        StoreError: no complete run ``run_id``. OSError: the store cannot be written.
    """
    compression = store.recipe["store"]["compression"]
    group = store.run(run_id)
    previous = dict(group[GROUP].attrs.get("skipped") or {}) if GROUP in group else {}
    for r in results:
        previous.pop(r.scorer, None)
    previous.update(skipped)

    def writer(result: WindowScores) -> Callable[[zarr.Group], None]:
        return lambda g: write_scores(g, result, compression)

    store.replace_in_run(
        run_id,
        {f"{GROUP}/{r.scorer}": writer(r) for r in results},
        remove=[f"{GROUP}/{name}" for name in skipped],
        group_attrs={GROUP: to_json({"skipped": previous})},
    )


# ---------------------------------------------------------------------------- stores
@dataclass
class RunScoreReport:
    """Scorers written and skipped (with the reason) for one run."""

    run_id: str
    written: list[str]
    skipped: dict[str, str]


def load_learned(store: Store, names: list[str]) -> dict[str, LearnedScorer]:
    """Fitted networks of the store by name, checked against their recorded sha256.

    Raises:
        StoreError: a name is not registered, or its file is missing or changed.
    """
    from .derive.saliency_net import from_bytes, sha256

    registry = store.attrs.get("saliency_models") or {}
    out = {}
    for name in names:
        if name not in registry:
            continue
        record = registry[name]
        path = f"{store.path}/{record['path']}"
        try:
            data = store.fs.cat_file(path)
        except (FileNotFoundError, OSError) as exc:
            raise StoreError(f"{store.url}/{record['path']}: saliency network '{name}' is missing ({exc})") from exc
        if sha256(data) != record["sha256"]:
            raise StoreError(f"{store.url}/{record['path']}: sha256 differs from the one recorded when '{name}' was fitted")
        try:
            net, config, _ = from_bytes(data, f"{store.url}/{record['path']}")
        except ValueError as exc:
            raise StoreError(str(exc)) from exc
        out[name] = LearnedScorer(name, net, config, record)
    return out


def score_store(
    url: str,
    scorers: list[str] | None = None,
    *,
    window: int | None = None,
    stride: int | None = None,
    k: int | None = None,
    source: list[str] | None = None,
    fd_threshold_mm: float | None = None,
    run_ids: list[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[RunScoreReport]:
    """(Re)score the committed runs of an existing store without converting again.

    Settings not given come from the store recipe's ``saliency`` section, then the
    defaults of :func:`settings_from_recipe`.

    Args:
        url: store path or URL.
        scorers: scorer names (built-in or fitted); default: the recipe's.
        window, stride, k, source, fd_threshold_mm: override the recipe.
        run_ids: only these runs (default: every complete run).
        storage_options: fsspec options.
        progress: called with each run id once it is scored.

    Returns:
        One :class:`RunScoreReport` per run.

    Raises:
        StoreError: the store cannot be opened, a fitted network is missing or changed.
        ValueError: no scorer given and none in the recipe, or an unknown scorer name.
    """
    store = Store.open(url, storage_options)
    settings = settings_from_recipe(
        store.recipe, scorers=scorers, window=window, stride=stride, k=k, source=source, fd_threshold_mm=fd_threshold_mm
    )
    if settings is None:
        raise ValueError(f"{store.url}: no saliency scorer given and the store's recipe has no saliency section")
    learned = load_learned(store, [split_motion(s)[0] for s in settings.scorers if split_motion(s)[0] not in BUILTIN])
    unknown = [s for s in settings.scorers if split_motion(s)[0] not in BUILTIN and split_motion(s)[0] not in learned]
    if unknown:
        raise ValueError(
            f"unknown saliency scorer(s) {', '.join(unknown)}; built-in: {', '.join(builtin_names())}; "
            f"fitted in this store: {', '.join(store.attrs.get('saliency_models') or {}) or 'none'}"
        )
    reports = []
    for run_id in run_ids or store.run_ids():
        attrs = store.run_attrs(run_id)
        data = RunData.from_group(store.run(run_id), attrs)
        results, skipped = score_run(data, settings, learned)
        replace_in_committed_run(store, run_id, results, skipped)
        reports.append(RunScoreReport(run_id, [r.scorer for r in results], skipped))
        if progress is not None:
            progress(run_id)
    return reports


def fit_store(
    url: str,
    roi: str,
    *,
    name: str = "masked_conv",
    window: int | None = None,
    steps: int = 300,
    batch: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    hidden: int = 32,
    device: str = "cpu",
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fit a masked-frame network on every run's ``roi/<roi>`` series and register it.

    The weights go to ``<store>/models/saliency/<name>.safetensors`` and the record
    (path, sha256, ROI, config, training settings and loss) to the root attribute
    ``saliency_models[name]`` (``schemas/store.schema.json``). Refitting a name replaces it.

    Args:
        url: store path or URL.
        roi: ROI key (``roi/<key>`` or ``<key>``) the network models.
        name: scorer name of the network (not a built-in name).
        window: training window (frames); default the recipe's saliency window, else
            ``store.chunk_frames``.
        steps, batch, lr, seed, hidden, device: training settings (:func:`fit`).
        storage_options: fsspec options.

    Returns:
        The registry record.

    Raises:
        StoreError: no run has the ROI series, or runs disagree on its parcel labels.
        ValueError: a reserved or malformed name.
    """
    import re

    torch = load_module("torch")

    from .derive import saliency_net as net_mod

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name) or name.endswith(MOTION_SUFFIX) or name in BUILTIN:
        raise ValueError(f"'{name}' cannot name a fitted scorer (letters, digits, _ and -; not a built-in or *{MOTION_SUFFIX})")
    key = roi.removeprefix("roi/")
    store = Store.open(url, storage_options)
    series, labels = [], None
    for run_id in store.run_ids():
        attrs = store.run_attrs(run_id)
        if f"roi/{key}" not in attrs["outputs"]:
            continue
        array = store.run(run_id)[f"roi/{key}"]
        run_labels = list(array.attrs["labels"])
        if labels is not None and run_labels != labels:
            raise StoreError(f"{store.url}/{RUNS}/{run_id}/roi/{key}: parcel labels differ from the other runs'")
        labels = run_labels
        series.append(array[...])
    if not series:
        raise StoreError(f"{store.url}: no run has roi/{key}")
    window = int(window or (store.recipe.get("saliency") or {}).get("window") or store.recipe["store"]["chunk_frames"])
    result = net_mod.fit(
        series, window, steps=steps, batch=batch, lr=lr, seed=seed, device=device,
        config=net_mod.NetConfig(series[0].shape[1], hidden=hidden),
    )
    data = net_mod.to_bytes(result, {"roi": f"roi/{key}", "store": store.url})
    rel = f"{MODELS_DIR}/{name}.safetensors"
    store.write_bytes(rel, data)
    losses = result.losses
    head = max(1, min(10, len(losses) // 4))
    record = to_json(
        {
            "path": rel,
            "sha256": net_mod.sha256(data),
            "format": net_mod.FORMAT,
            "roi": f"roi/{key}",
            "n_parcels": int(series[0].shape[1]),
            "labels_sha256": net_mod.sha256("\n".join(labels).encode()),
            "window": window,
            "config": json.loads(result.config.to_json()),
            "training": {
                "objective": "masked-frame prediction (MSE on masked frames)",
                "steps": steps, "batch": batch, "lr": lr, "seed": seed, "device": net_mod.resolve_device(device),
                "n_runs": len(series), "loss_first": float(np.mean(losses[:head])), "loss_last": float(np.mean(losses[-head:])),
            },
            "created": now(),
            "software": {"fmri_data": software_versions().get("fmri_data"), "torch": torch.__version__},
        }
    )
    attrs = dict(store.attrs)
    models = dict(attrs.get("saliency_models") or {})
    models[name] = record
    attrs["saliency_models"] = models
    store.write_root_attrs(attrs)
    return record
