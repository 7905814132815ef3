"""Dataset statistics of a whole store: the normalization constants a model's inputs need.

Some models normalize their inputs with constants computed over the training dataset, not
per window. :data:`KINDS` is the registry, one :class:`StatsKind` per reference:

=====================  ==========================================================  =========================
kind                   parameters (computed with Dask over the complete runs)      the loader applies
=====================  ==========================================================  =========================
``median_iqr_scalar``  fMRI-LM (compute_norm.py): every run's per-ROI temporal     ``(x - median) / iqr``
                       mean -> ``(N, R)``; ``median`` and ``iqr = p75 - p25`` of
                       all ``N*R`` values (two scalars)
``median_iqr_roi``     Brain-JEPA (ukbiobank_scale.py): the same ``(N, R)``        ``(x - median[r]) / iqr[r]``
                       means; per ROI median and ``p75 - p25`` across runs
``brainlm``            BrainLM (BrainLM_Toolkit.py): each run demeaned per         ``x - median[r] / iqr[r]``
                       parcel, its first 200 frames stacked -> ``(N*200, R)``;     (BrainLM subtracts the
                       ``median`` per parcel (zeros included), ``iqr`` the         ratio; it never divides)
                       nan-percentiles with exact zeros as NaN
``mean_std``           mean and (population) standard deviation of every value     ``(x - mean) / std``
                       of the array over all runs
=====================  ==========================================================  =========================

Percentiles are numpy's (linear interpolation), as the references compute them.

They are stored in the store as ``stats/<array>.json`` (``$defs/stats`` of
``schemas/store.schema.json``), written atomically through :meth:`Store.write_file`, with
the run ids they cover and the store's recipe hash. :func:`read_stats` refuses them when
the store's complete runs with that array are no longer exactly those ("statistics are
stale: N runs added since; rerun fmri-data stats"). The loader
(:meth:`fmri_data.load.WindowDataset.to_device` with ``normalize="dataset"``) applies them
on the device, vectorized (``apply`` is plain arithmetic on broadcastable tensors).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .config.schema import to_json, validate
from .errors import SettingError, StoreError
from .imports import load_module
from .store.layout import now, software_versions
from .store.root import Store

#: Folder below the store root holding one ``<array>.json`` per array with statistics.
STATS_DIR = "stats"
#: BrainLM stacks the first 200 TRs of every (demeaned) run.
BRAINLM_FRAMES = 200


@dataclass(frozen=True)
class StatsKind:
    """One kind of dataset statistics.

    Attributes:
        name: the recipe's ``stats.kind``.
        description: what is computed, and the reference it follows.
        compute: ``compute(arrays) -> {name: float | (R,) array}`` from one Dask array per
            complete run (time first).
        apply: ``apply(x, params) -> x'`` elementwise with ``params`` broadcast against ``x``
            (torch tensors on the device, or numpy arrays).
    """

    name: str
    description: str
    compute: Callable[[list], dict[str, Any]]
    apply: Callable[[Any, dict[str, Any]], Any]


def _temporal_means(arrays: list) -> np.ndarray:
    """``(N, *frame)`` float64: each run's mean over time (one Dask graph for all runs)."""
    dask = load_module("dask")
    da = load_module("dask.array")

    means = dask.compute(*[da.mean(a.astype("float64"), axis=0) for a in arrays])
    return np.stack([np.asarray(m) for m in means])


def _median_iqr_scalar(arrays: list) -> dict[str, Any]:
    means = _temporal_means(arrays)
    p25, median, p75 = np.percentile(means, [25, 50, 75])
    return {"median": float(median), "iqr": float(p75 - p25)}


def _median_iqr_roi(arrays: list) -> dict[str, Any]:
    means = _temporal_means(arrays)
    p25, median, p75 = np.percentile(means, [25, 50, 75], axis=0)
    return {"median": median, "iqr": p75 - p25}


def _brainlm(arrays: list) -> dict[str, Any]:
    dask = load_module("dask")
    da = load_module("dask.array")

    parts = []
    for a in arrays:
        a = a.astype("float64")
        parts.append((a - da.mean(a, axis=0))[:BRAINLM_FRAMES])
    stacked = np.concatenate(dask.compute(*parts), axis=0)
    median = np.median(stacked, axis=0)
    nan = np.where(stacked == 0, np.nan, stacked)
    iqr = np.nanpercentile(nan, 75, axis=0) - np.nanpercentile(nan, 25, axis=0)
    return {"median": median, "iqr": iqr}


def _mean_std(arrays: list) -> dict[str, Any]:
    """Pooled over runs from each run's count, mean and variance (Dask's stable moments)."""
    dask = load_module("dask")
    da = load_module("dask.array")

    moments = dask.compute(*[(da.mean(a.astype("float64")), da.var(a.astype("float64"))) for a in arrays])
    n = np.array([a.size for a in arrays], dtype=np.float64)
    m = np.array([float(mm) for mm, _ in moments])
    v = np.array([float(vv) for _, vv in moments])
    mean = float((n * m).sum() / n.sum())
    var = float((n * (v + (m - mean) ** 2)).sum() / n.sum())
    return {"mean": mean, "std": float(np.sqrt(var))}


KINDS: dict[str, StatsKind] = {k.name: k for k in (
    StatsKind("median_iqr_scalar", "fMRI-LM: median and p75-p25 of all runs' per-ROI temporal means (two scalars)",
              _median_iqr_scalar, lambda x, p: (x - p["median"]) / p["iqr"]),
    StatsKind("median_iqr_roi", "Brain-JEPA: per-ROI median and p75-p25 across runs of the per-ROI temporal means",
              _median_iqr_roi, lambda x, p: (x - p["median"]) / p["iqr"]),
    StatsKind("brainlm", f"BrainLM: per-parcel median and nan-IQR (zeros as NaN) of the first {BRAINLM_FRAMES} frames "
              "of every demeaned run; applied x - median / IQR", _brainlm, lambda x, p: x - p["median"] / p["iqr"]),
    StatsKind("mean_std", "mean and population standard deviation of every value of the array over all runs",
              _mean_std, lambda x, p: (x - p["mean"]) / p["std"]),
)}


def stats_kind(name: str) -> StatsKind:
    """A kind by name.

    Raises:
        SettingError: unknown kind.
    """
    if name not in KINDS:
        raise SettingError(f"unknown statistics kind '{name}'; one of {sorted(KINDS)}")
    return KINDS[name]


def stats_path(array: str) -> str:
    """``stats/<array>.json`` below the store root (``roi/<key>`` keeps its folder)."""
    return f"{STATS_DIR}/{array}.json"


def _resolve(store: Store, array: str) -> tuple[str, list[str]]:
    """The concrete array path (``roi`` -> each run's first ``roi/<key>``) and the complete
    runs that have it, sorted.

    Raises:
        StoreError: no complete run has the array, or ``roi`` names different keys across runs.
    """
    keys: dict[str, list[str]] = {}
    for run_id in store.run_ids():
        outputs = list(store.run_attrs(run_id).get("outputs") or [])
        if array == "roi":
            key = next((o for o in outputs if o.startswith("roi/")), None)
        else:
            key = array if array in outputs else None
        if key is not None:
            keys.setdefault(key, []).append(run_id)
    if not keys:
        raise StoreError(f"{store.url}: no complete run has an array '{array}'")
    if len(keys) > 1:
        raise StoreError(f"{store.url}: '{array}' means different arrays across runs ({sorted(keys)}); name one")
    (key, runs), = keys.items()
    return key, sorted(runs)


def _defaults(store: Store, kind: str | None, array: str | None) -> tuple[str, str]:
    section = store.recipe.get("stats") or {}
    kind = kind or section.get("kind")
    if not kind:
        raise ValueError(f"{store.url}: its recipe '{store.recipe.get('name')}' asks for no statistics; pass a kind "
                         f"({', '.join(sorted(KINDS))})")
    return kind, array or section.get("array") or "roi"


def compute_stats(url: str, kind: str | None = None, array: str | None = None, *,
                  storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compute a store's statistics over its complete runs and store them (``stats/<array>.json``).

    Args:
        url: store path or fsspec URL.
        kind: one of :data:`KINDS` (default: the recipe's ``stats.kind``).
        array: ``roi``, ``roi/<key>``, ``bold``, ``flat`` (default: the recipe's ``stats.array``, else ``roi``).
        storage_options: fsspec options.

    Returns:
        The stored record (``$defs/stats`` of store.schema.json).

    Raises:
        ValueError: no kind given and the recipe has none, or an unknown kind.
        StoreError: no run has the array.
    """
    da = load_module("dask.array")

    store = Store.open(url, storage_options)
    kind, array = _defaults(store, kind, array)
    spec = stats_kind(kind)
    key, run_ids = _resolve(store, array)
    arrays = []
    for run_id in run_ids:
        z = store.run(run_id)[key]
        arrays.append(da.from_array(z, chunks=z.shards or z.chunks, asarray=True))
    params = spec.compute(arrays)
    record = to_json({
        "kind": kind, "array": key, "run_ids": run_ids, "n_runs": len(run_ids),
        "recipe_hash": store.attrs["recipe_hash"], "description": spec.description,
        "params": {k: (np.asarray(v, dtype=np.float64) if np.ndim(v) else float(v)) for k, v in params.items()},
        "created": now(), "software": software_versions(),
    })
    validate(record, "store", f"{store.url}/{stats_path(key)}", definition="stats")
    store.write_bytes(stats_path(key), json.dumps(record, indent=1).encode())
    return record


def read_stats(url: str, array: str, *, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The stored statistics of ``array``, checked against the store as it is now.

    Raises:
        StoreError: none stored ("run fmri-data stats"), or stale: the store's complete runs
            with the array differ from those covered, or its recipe hash changed.
    """
    store = Store.open(url, storage_options)
    key, runs = _resolve(store, array)
    path = f"{store.path}/{stats_path(key)}"
    try:
        record = json.loads(store.fs.cat_file(path))
    except FileNotFoundError:
        raise StoreError(f"{store.url}: no statistics of '{key}'; run fmri-data stats {store.url}") from None
    validate(record, "store", f"{store.url}/{stats_path(key)}", definition="stats")
    added = sorted(set(runs) - set(record["run_ids"]))
    removed = sorted(set(record["run_ids"]) - set(runs))
    if added or removed:
        what = ", ".join(s for s in (f"{len(added)} runs added since" if added else "",
                                     f"{len(removed)} runs removed since" if removed else "") if s)
        raise StoreError(f"{store.url}/{stats_path(key)}: statistics are stale: {what}; rerun fmri-data stats")
    if record["recipe_hash"] != store.attrs["recipe_hash"]:
        raise StoreError(f"{store.url}/{stats_path(key)}: statistics are stale: computed for recipe "
                         f"{record['recipe_hash']}, the store is {store.attrs['recipe_hash']}; rerun fmri-data stats")
    return record
