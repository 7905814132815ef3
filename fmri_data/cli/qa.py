"""Command line: ``fmri-data qa STORE --report report.html`` (dataset QA report and qa.parquet)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape


def qa(
    store: str = typer.Argument(..., help="Store path or URL."),
    report: Path = typer.Option(Path("qa_report.html"), "--report", help="HTML file to write."),
    fd_mean: Optional[float] = typer.Option(None, "--fd-mean", help="Suggest excluding runs with mean FD above this (mm); default: recipe qa.exclude."),
    fd_perc: Optional[float] = typer.Option(None, "--fd-perc", help="... with more than this percent of frames above the FD threshold."),
    tsnr_min: Optional[float] = typer.Option(None, "--tsnr-min", help="... with tSNR below this."),
    robust_z: Optional[float] = typer.Option(None, "--robust-z", help="Flag metrics with |robust z| above this across runs (default 3.5)."),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="Draw per-run figures (reads each run's series)."),
    recompute: bool = typer.Option(False, "--recompute", help="First (re)compute each run's metrics from its source files (checked against their sha256), without reconversion."),
    bids_root: Optional[str] = typer.Option(None, "--bids-root", help="With --recompute: where the sources are (default: the store's bids_root)."),
    fd_threshold: Optional[float] = typer.Option(None, "--fd-threshold", help="With --recompute: FD threshold (mm) of fd_num / fd_perc."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    option: list[str] = typer.Option([], "--option", help="fsspec option for a remote store, key=value."),
) -> None:
    """Write a self-contained HTML QA report of a store's complete runs (and rebuild qa.parquet)."""
    from .app import fail, parse_options, console
    from ..errors import FmriDataError
    from ..qa.report import Thresholds, render_report
    from ..store.root import Store

    try:
        options = parse_options(option)
        if recompute:
            from ..qa.recompute import recompute_qa

            done = recompute_qa(store, bids_root=bids_root, storage_options=options, progress=progress and sys.stderr.isatty(),
                                qa={"fd_threshold_mm": fd_threshold} if fd_threshold is not None else None)
            for run_id, status in done.items():
                if status != "updated":
                    console.print(f"[yellow]not recomputed[/yellow] {escape(run_id)}: {escape(status)}")
            console.print(f"{escape(store)}: metrics recomputed for {sum(s == 'updated' for s in done.values())} of {len(done)} runs")
        thresholds = Thresholds.from_recipe(
            Store.open(store, options).recipe, fd_mean_mm=fd_mean, fd_perc=fd_perc, tsnr_min=tsnr_min, robust_z=robust_z
        )
        result = render_report(store, report, thresholds=thresholds, with_figures=figures,
                               progress=progress and sys.stderr.isatty(), storage_options=options)
    except (FmriDataError, OSError, ValueError) as exc:
        fail(exc)
    console.print(
        f"{escape(str(report))}: {result.n_runs} runs, {len(result.excluded)} suggested for exclusion, "
        f"{len(result.outliers)} with outlier metrics"
    )
    for run_id, reasons in result.excluded.items():
        console.print(f"[yellow]exclude?[/yellow] {escape(run_id)}: {escape('; '.join(reasons))}")
