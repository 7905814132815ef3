"""The dataset QA report: one self-contained HTML file (figures embedded as base64 PNG).

Reads a store (never writes to it except ``qa.parquet``); covers its complete runs only
(:meth:`Store.run_ids`), so a store still being converted can be reported on.

Contents: a sortable table of runs and their metrics; the distribution of each metric
across runs with outliers flagged by the robust z-score ``z = (x - median) / (1.4826
MAD)`` (Iglewicz & Hoaglin 1993; MAD the median absolute deviation across runs of the
same kind — volume, GIFTI, dense or parcellated CIFTI — when there are at least 3); the
runs the recipe's ``qa.exclude`` thresholds suggest excluding, with the reasons; one
section per run with its metrics, notes, warnings, figures, sidecar and events. Every
string from the dataset is HTML-escaped (jinja2 autoescape), so file names, sidecar
values or event labels are shown as text and never run as markup or script.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, FileSystemLoader, select_autoescape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..store.root import Store
from ..store.layout import now
from . import figures
from .table import METRICS, qa_rows, write_qa_table

TEMPLATES = Path(__file__).resolve().parent / "templates"
MAD_TO_SD = 1.4826
MEANAD_TO_SD = 1.2533
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
    def from_recipe(cls, recipe: dict[str, Any], **overrides: float | None) -> "Thresholds":
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


def robust_z(values: np.ndarray) -> np.ndarray:
    """Robust z-score of each value across runs: ``(x - median) / (1.4826 MAD)``.

    NaN stays NaN. When ``MAD = 0`` (more than half the runs equal) the scale is
    ``1.2533 * mean |x - median|`` instead (the mean absolute deviation, scaled to a
    Gaussian's std; the usual fallback of the modified z-score); when that is 0 too,
    every z is 0.

    Args:
        values: ``(n_runs,)`` float.

    Returns:
        ``(n_runs,)`` float64.
    """
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    out = np.full(v.shape, np.nan)
    if not ok.any():
        return out
    centred = v[ok] - np.median(v[ok])
    dev = np.abs(centred)
    scale = np.median(dev) * MAD_TO_SD
    if scale == 0:
        scale = dev.mean() * MEANAD_TO_SD
    out[ok] = centred / scale if scale > 0 else 0.0
    return out


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
    kinds = np.array([r["kind"] or "" for r in rows])
    zscores = {key: np.full(len(rows), np.nan) for key in table}
    for kind in set(kinds):  # runs are compared with runs of the same kind (volume, gifti, CIFTI)
        same = kinds == kind
        if same.sum() >= 3:
            for key, v in table.items():
                zscores[key][same] = robust_z(v[same])
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
                        "z": "" if not np.isfinite(zscores[k][i]) else f"{zscores[k][i]:+.1f}", "flag": bool(flags[k][i])}
                       for k in table]
            runs.append({
                "run_id": run_id,
                "anchor": "run-" + run_id,
                "kind": row["kind"] or "–",
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
        distributions=figures.distributions(table, flags, labels) if with_figures and runs else None,
    )
    Path(output).write_text(html, encoding="utf-8")
    return result
