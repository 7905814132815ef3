"""Summaries of a store: runs, shapes, TRs, sizes (``fmri-data inspect``)."""

from __future__ import annotations

import json
import logging
from typing import Any

from .layout import INDEX
from .root import Store
from .saliency_group import read_run_saliency
from .validate import broken_runs

log = logging.getLogger("fmri_data.store.inspect")


def summarize(store: Store) -> dict[str, Any]:
    """Store summary as plain data.

    Returns:
        ``{"store", "recipe", "schema_version", "created", "runs": [...], "not_converted": [...],
        "unreadable": [...]}`` where each run has ``run_id``, ``tr_s``, ``n_frames``,
        ``arrays`` (name -> shape, dtype), ``nbytes`` (stored), ``warnings``, ``saliency``
        (top-k windows per scorer, :func:`saliency_summary`); ``not_converted`` lists failed
        or skipped runs from the index with their reason; ``unreadable`` lists run groups
        (or runs the index says are complete) that readers cannot see, ``{run_id, reason}``
        (:func:`fmri_data.store.validate.broken_runs`). An unreadable ``index.parquet`` is
        logged at WARNING on ``fmri_data.store.inspect`` and the runs are still listed.
    """
    attrs = store.attrs
    runs = []
    for run_id in store.run_ids():
        run_attrs = store.run_attrs(run_id)
        group = store.run(run_id)
        arrays = {}
        for name in run_attrs["outputs"]:
            array = group[name]
            arrays[name] = {"shape": list(array.shape), "dtype": str(array.dtype)}
        runs.append(
            {
                "run_id": run_id,
                "tr_s": run_attrs["tr_s"],
                "source_tr_s": run_attrs["source_tr_s"],
                "n_frames": run_attrs["n_frames"],
                "arrays": arrays,
                "nbytes": store.nbytes_stored(run_id),
                "warnings": run_attrs["warnings"],
                "saliency": saliency_summary(group, run_attrs["tr_s"]),
            }
        )
    try:
        rows = store.read_index().to_dict(orient="records")
    except Exception as exc:  # noqa: BLE001 - pyarrow, fsspec and StoreError alike: say so, list the runs
        log.warning("%s/%s: unreadable (%s: %s)", store.url, INDEX, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        rows = []
    not_converted = []
    for row in rows:
        if row.get("status") in ("failed", "skipped"):
            not_converted.append({"run_id": row["run_id"], "status": row["status"], "reason": row.get("error")})
    listed = [str(row["run_id"]) for row in rows if row.get("status") == "complete"]
    unreadable = [{"run_id": run_id, "reason": reason} for run_id, reason in broken_runs(store, listed).items()]
    return {
        "store": store.url,
        "recipe": attrs["recipe"].get("name"),
        "schema_version": attrs["schema_version"],
        "created": attrs["created"],
        "runs": runs,
        "not_converted": not_converted,
        "unreadable": unreadable,
    }


def saliency_summary(group, tr_s: float) -> dict[str, Any]:
    """Top-k windows of each saliency scorer of a run.

    Returns:
        ``{scorer: {source, window, stride, k, n_windows, topk_starts, topk_times_s,
        topk_scores}}`` (best window first; ``topk_times_s`` = start frame * TR), plus
        ``{scorer: {"skipped": reason}}`` for scorers that did not apply.
    """
    scored, skipped = read_run_saliency(group)
    out: dict[str, Any] = {}
    for name, s in scored.items():
        starts = s["starts"][s["topk"]]
        out[name] = {
            "source": s["source"],
            "window": s["window"],
            "stride": s["stride"],
            "k": s["k"],
            "n_windows": s["n_windows"],
            "topk_starts": [int(v) for v in starts],
            "topk_times_s": [round(float(v) * tr_s, 3) for v in starts],
            "topk_scores": [float(v) for v in s["scores"][s["topk"]]],
        }
    for name, reason in skipped.items():
        out.setdefault(name, {"skipped": reason})
    return out


def to_json(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2)
