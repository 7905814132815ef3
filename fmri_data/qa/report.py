"""The dataset QA report: one self-contained HTML file (figures embedded as WebP / PNG data URIs).

Reads a store (never writes to it except ``qa.parquet``); covers its complete runs only
(:meth:`Store.run_ids`), so a store still being converted can be reported on.

Contents: a sortable table of runs and their metrics (first column sticky, a column
listing each run's outliers); the distribution of each metric across runs, one plot per
comparison group, with outliers flagged by the robust z-score ``z = (x - median) / scale``
(Iglewicz & Hoaglin 1993) across runs of the same kind — volume, GIFTI, dense or
parcellated CIFTI, demeaned series apart — when at least 3 have a value; the scale is
``1.4826 MAD``, else ``1.2533`` mean absolute deviation, else ``IQR / 1.349``, each only
when above ``max(resolution, 1 % of |median|)`` (:func:`robust_scale`), else no z ("n/a"
with the reason) and no flag; the runs the recipe's ``qa.exclude`` thresholds suggest
excluding, with the reasons; one section per run with its metrics, notes, warnings,
figures, sidecar and events. Every string from the dataset is HTML-escaped (jinja2
autoescape), so file names, sidecar values or event labels are shown as text and never
run as markup or script.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, FileSystemLoader, select_autoescape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from ..store.layout import now
from ..store.root import Store
from . import figures
from .table import METRICS, qa_rows, write_qa_table

TEMPLATES = Path(__file__).resolve().parent / "templates"
MAD_TO_SD = 1.4826
MEANAD_TO_SD = 1.2533
IQR_TO_SD = 1.349
REL_FLOOR = 0.01  # spreads below 1 % of the median are no spread (robust_scale)
COUNT_METRICS = ("fd_num", "dummy_trs", "frames_dropped")  # frame counts: resolution one frame
MIN_RUNS = 3
DEFAULT_EXCLUDE = {"fd_mean_mm": 0.5, "fd_perc": 20.0, "tsnr_min": 30.0}
DEFAULT_ROBUST_Z = 3.5


@dataclass
class Thresholds:
    """Exclusion thresholds (None: not applied) and the outlier robust-z cut."""

    fd_mean_mm: float | None = DEFAULT_EXCLUDE["fd_mean_mm"]
    fd_perc: float | None = DEFAULT_EXCLUDE["fd_perc"]
    tsnr_min: float | None = DEFAULT_EXCLUDE["tsnr_min"]
    robust_z: float = DEFAULT_ROBUST_Z

    @classmethod
    def from_recipe(cls, recipe: dict[str, Any], **overrides: float | None) -> Thresholds:
        """The recipe's ``qa.exclude`` and ``qa.robust_z`` (defaults where absent), then ``overrides`` not None."""
        qa = recipe.get("qa") or {}
        exclude = {**DEFAULT_EXCLUDE, **(qa.get("exclude") or {})} if qa.get("exclude", {}) is not None else {}
        out = cls(
            fd_mean_mm=exclude.get("fd_mean_mm"), fd_perc=exclude.get("fd_perc"), tsnr_min=exclude.get("tsnr_min"),
            robust_z=float(qa.get("robust_z") or DEFAULT_ROBUST_Z),
        )
        for key, value in overrides.items():
            if value is not None:
                setattr(out, key, value)
        return out


def robust_scale(values: np.ndarray, resolution: float = 0.0) -> tuple[float | None, str]:
    """The spread robust z divides by, or None with the reason no z is computed.

    Candidates, in order, each scaled to a Gaussian's standard deviation: ``1.4826 MAD``
    (median absolute deviation; Iglewicz & Hoaglin 1993), ``1.2533 mean |x - median|``
    (the modified z-score's fallback when more than half the values are equal), ``IQR /
    1.349``. The first one larger than the floor ``max(resolution, 0.01 |median|)`` is
    used. The floor keeps z from exploding on a degenerate spread: a spread below the
    metric's resolution (one frame for frame counts) or below 1 % of the typical value is
    no spread to measure outliers against, so a run one frame over the FD threshold when
    the others have none, or an EFC 0.5 % off the median, is not flagged. When no
    candidate clears the floor there is no z (and no outlier flag).

    Args:
        values: ``(n_runs,)`` float; NaN (metric undefined for a run) is ignored.
        resolution: the smallest meaningful difference of the metric, in its unit (0: none).

    Returns:
        ``(scale, name of the estimator)`` or ``(None, reason)``.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None, "no run has a value"
    median = float(np.median(v))
    dev = np.abs(v - median)
    floor = max(float(resolution), REL_FLOOR * abs(median))
    q25, q75 = np.percentile(v, [25, 75])
    for scale, name in ((MAD_TO_SD * np.median(dev), "1.4826 MAD"),
                        (MEANAD_TO_SD * dev.mean(), "1.2533 mean absolute deviation"),
                        ((q75 - q25) / IQR_TO_SD, "IQR / 1.349")):
        if scale > floor:
            return float(scale), name
    if dev.max() == 0:
        return None, "every run has the same value"
    what = f"the metric's resolution ({resolution:.3g})" if resolution >= REL_FLOOR * abs(median) else "1 % of the median"
    return None, f"the runs' spread is below {what}: no meaningful deviation"


def robust_z(values: np.ndarray, resolution: float = 0.0) -> np.ndarray:
    """Robust z-score of each value across runs: ``(x - median) / scale``.

    ``scale`` is :func:`robust_scale`'s (``1.4826 MAD``, else ``1.2533`` mean absolute
    deviation, else ``IQR / 1.349``, each only when above ``max(resolution, 0.01
    |median|)``); when none is, every z is NaN (no z, no outlier). NaN stays NaN.

    Args:
        values: ``(n_runs,)`` float.
        resolution: the metric's smallest meaningful difference (e.g. 1 for a frame count).

    Returns:
        ``(n_runs,)`` float64.
    """
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    out = np.full(v.shape, np.nan)
    scale, _ = robust_scale(v, resolution)
    if scale is not None:
        out[ok] = (v[ok] - np.median(v[ok])) / scale
    return out


def metric_resolution(key: str, n_frames: np.ndarray) -> float:
    """The smallest meaningful difference of a metric: one frame for frame counts, one
    frame's share for ``fd_perc`` (``100 / median n_frames``), else 0 (1 % of the median applies)."""
    if key in COUNT_METRICS:
        return 1.0
    if key == "fd_perc" and np.size(n_frames):
        return 100.0 / float(np.median(n_frames))
    return 0.0


def comparison_group(row: dict[str, Any], qa: dict[str, Any]) -> str:
    """The runs a run is compared with: its kind (``volume``, ``gifti``, ``cifti_dense``,
    ``cifti_parcels``), split by demeaned series (the run's ``qa.demeaned``): intensity
    metrics (AQI, EFC, DVARS nstd) of percent-signal-change data do not compare with raw intensities."""
    kind = row.get("kind") or "unknown"
    demeaned = qa.get("demeaned")
    if demeaned is None:  # runs converted before the flag was recorded
        demeaned = any("series look demeaned" in str(n) for n in qa.get("notes") or [])
    return f"{kind}, demeaned" if demeaned else kind


def exclusion_reasons(row: dict[str, Any], t: Thresholds, fd_threshold_mm: float | None) -> list[str]:
    """Why the recipe's thresholds suggest excluding a run (empty: keep)."""
    reasons = []
    if t.fd_mean_mm is not None and row.get("fd_mean") is not None and row["fd_mean"] > t.fd_mean_mm:
        reasons.append(f"mean FD {row['fd_mean']:.3g} mm > {t.fd_mean_mm:g} mm")
    if t.fd_perc is not None and row.get("fd_perc") is not None and row["fd_perc"] > t.fd_perc:
        thr = f" {fd_threshold_mm:g} mm" if fd_threshold_mm is not None else ""
        reasons.append(f"{row['fd_perc']:.3g} % of frames with FD >{thr} > {t.fd_perc:g} %")
    if t.tsnr_min is not None and row.get("tsnr") is not None and row["tsnr"] < t.tsnr_min:
        reasons.append(f"tSNR {row['tsnr']:.3g} < {t.tsnr_min:g}")
    return reasons


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _events_summary(events: list[dict[str, Any]]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for e in events:
        key = str(e.get("trial_type", "n/a"))
        counts[key] = counts.get(key, 0) + 1
    columns = sorted({k for e in events for k in e})
    return {"n": len(events), "counts": sorted(counts.items()), "columns": columns,
            "rows": [[_fmt(e.get(c)) for c in columns] for e in events[:20]]}


@dataclass
class ReportResult:
    """What :func:`render_report` wrote."""

    path: str
    n_runs: int
    excluded: dict[str, list[str]] = field(default_factory=dict)
    outliers: dict[str, list[str]] = field(default_factory=dict)


def render_report(
    store_url: str,
    output: str | Path,
    *,
    thresholds: Thresholds | None = None,
    with_figures: bool = True,
    progress: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> ReportResult:
    """Render the QA report of a store into one self-contained HTML file.

    Args:
        store_url: the store (path or fsspec URL).
        output: the HTML file to write.
        thresholds: exclusion thresholds; default: the store recipe's ``qa`` section.
        with_figures: draw per-run figures (reads each run's series once).
        progress: draw a progress bar (rich) over the runs.
        storage_options: fsspec options of the store.

    Returns:
        :class:`ReportResult` (runs, suggested exclusions with reasons, outliers per run).

    Raises:
        StoreError: not a readable store.
    """
    store = Store.open(store_url, storage_options)
    recipe = store.recipe
    thresholds = thresholds or Thresholds.from_recipe(recipe)
    run_ids = store.run_ids()
    attrs = {r: store.run_attrs(r) for r in run_ids}
    rows = qa_rows(store, run_ids, attrs)
    try:
        write_qa_table(store, rows)  # keep qa.parquet in step with the runs reported
    except OSError:
        pass  # a read-only store (e.g. a public bucket) is reported on without its table
    labels = {key: label for key, label, _ in METRICS}
    table = {key: np.array([np.nan if r[key] is None else float(r[key]) for r in rows]) for key, _, _ in METRICS}
    groups = np.array([comparison_group(r, attrs[r["run_id"]].get("qa") or {}) for r in rows])
    n_frames = np.array([r["n_frames"] for r in rows], dtype=np.float64)
    zscores = {key: np.full(len(rows), np.nan) for key in table}
    z_reason = {key: [""] * len(rows) for key in table}  # why a run has no z for a metric
    scales: list[dict[str, Any]] = []  # per comparison group: the scale of each metric (shown in the report)
    for group in sorted(set(groups)):  # runs are compared with runs of the same kind only
        same = groups == group
        entry = {"group": group, "n_runs": int(same.sum()), "metrics": []}
        for key, v in table.items():
            vals = v[same]
            if not np.isfinite(vals).any():
                continue
            if np.isfinite(vals).sum() < MIN_RUNS:
                scale, how = None, f"fewer than {MIN_RUNS} runs of this kind ({group}) have a value"
            else:
                scale, how = robust_scale(vals, metric_resolution(key, n_frames[same]))
            if scale is not None:
                zscores[key][same] = robust_z(vals, metric_resolution(key, n_frames[same]))
            for i in np.flatnonzero(same & np.isfinite(v)):
                z_reason[key][i] = "" if scale is not None else how
            entry["metrics"].append({"label": labels[key], "median": _fmt(float(np.nanmedian(vals))),
                                     "scale": _fmt(scale) if scale is not None else "n/a", "how": how})
        scales.append(entry)
    flags = {key: np.abs(np.nan_to_num(z, nan=0.0)) > thresholds.robust_z for key, z in zscores.items()}
    result = ReportResult(str(output), len(run_ids))
    runs = []
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not progress, transient=False) as bar:
        task = bar.add_task(f"QA report of {len(run_ids)} runs", total=len(run_ids))
        for i, (run_id, row) in enumerate(zip(run_ids, rows)):
            a = attrs[run_id]
            qa = a.get("qa") or {}
            fd_thr = (qa.get("settings") or {}).get("fd_threshold_mm")
            reasons = exclusion_reasons(row, thresholds, fd_thr)
            outliers = [f"{labels[k]} (z = {zscores[k][i]:+.1f})" for k in table if flags[k][i]]
            if reasons:
                result.excluded[run_id] = reasons
            if outliers:
                result.outliers[run_id] = outliers
            metrics = [{"key": k, "label": labels[k], "value": _fmt(row[k]), "sort": "" if row[k] is None else row[k],
                        "z": f"{zscores[k][i]:+.1f}" if np.isfinite(zscores[k][i]) else ("n/a" if z_reason[k][i] else ""),
                        "z_reason": z_reason[k][i], "flag": bool(flags[k][i])}
                       for k in table]
            runs.append({
                "run_id": run_id,
                "anchor": "run-" + run_id,
                "kind": row["kind"] or "–",
                "group": str(groups[i]),
                "tr_s": _fmt(a["tr_s"]),
                "n_frames": a["n_frames"],
                "metrics": metrics,
                "excluded": reasons,
                "outliers": outliers,
                "qa": {k: _fmt(qa.get(k)) for k in ("computed_on", "mask", "n_channels", "gsr_axis", "gsr_axis_source")},
                "notes": qa.get("notes", []),
                "warnings": a.get("warnings", []),
                "sources": a.get("sources", []),
                "metadata": [(k, json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v)
                             for k, v in sorted((a.get("metadata") or {}).items())],
                "events": _events_summary(a.get("events") or []),
                "figures": figures.run_figures(store.run(run_id), a) if with_figures else [],
            })
            bar.advance(task)
    index = store.read_index()
    not_converted = []
    if len(index) and "status" in index:
        for rec in index[index["status"].isin(["failed", "skipped"])].to_dict(orient="records"):
            not_converted.append({"run_id": rec["run_id"], "status": rec["status"], "reason": rec.get("error")})
    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(default=True, default_for_string=True))
    html = env.get_template("report.html.j2").render(
        store=store.url,
        recipe_name=recipe.get("name"),
        created=now(),
        thresholds=thresholds,
        metric_columns=[{"key": k, "label": labels[k]} for k in table],
        runs=runs,
        excluded=result.excluded,
        outliers=result.outliers,
        not_converted=not_converted,
        distributions=figures.distributions(table, flags, labels, groups, MIN_RUNS) if with_figures and runs else [],
        scales=scales,
        rel_floor=f"{REL_FLOOR:.0%}",
    )
    Path(output).write_text(html, encoding="utf-8")
    return result
