"""Command line: ``fmri-data convert`` (a BIDS dataset into a store)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from ..errors import FmriDataError
from ..imports import load_module

from .app import console, err_console, fail, interrupted, parse_options

#: distinct warnings printed after a conversion (all are in each run's attributes and index.parquet)
SHOWN_WARNINGS = 10


def print_warnings(results) -> None:
    """The warnings of the runs converted now, one line per distinct message with the number
    of runs and the first of them (a dataset of 1,000 runs with one systematic problem
    prints one line)."""
    seen: dict[str, list[str]] = {}
    for r in results:
        if r.status in ("complete", "skipped"):
            for w in r.warnings:
                seen.setdefault(w, []).append(r.run_id)
    for message, runs in list(seen.items())[:SHOWN_WARNINGS]:
        where = runs[0] if len(runs) == 1 else f"{len(runs)} runs, e.g. {runs[0]}"
        console.print(f"[yellow]warning[/yellow] ({where}): {escape(message)}")
    if len(seen) > SHOWN_WARNINGS:
        console.print(f"... and {len(seen) - SHOWN_WARNINGS} more distinct warnings "
                      "(each run's `warnings` in index.parquet / `fmri-data inspect`)")


def tune_process() -> None:
    """Settings of this conversion process (the command's own; the Python API leaves its
    caller's process alone):

    * the objects of the imported libraries live as long as the process: ``gc.freeze`` keeps
      them out of the cyclic collector's full passes (each traverses every object: 0.05 s,
      4-5 per run);
    * numpy's transparent-huge-page advice for large arrays is turned off, here and in
      worker processes started from here (``NUMPY_MADVISE_HUGEPAGE=0``), unless the user set
      that variable: with the kernel's THP ``defrag=madvise`` policy a fault in an advised
      region compacts memory synchronously. On the 2-core dev VM, first touching 1 GiB took
      1.3-2.3 s advised and 0.4-0.6 s not; an HCP-sized conversion with QA took 13.8 s
      instead of 14.4 s (medians of 6 alternating runs each, 1.5 s less system time;
      without QA no difference). Set ``NUMPY_MADVISE_HUGEPAGE=1`` to keep numpy's advice.
    """
    import gc

    gc.freeze()
    if "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        return
    os.environ["NUMPY_MADVISE_HUGEPAGE"] = "0"
    try:
        _set_madvise_hugepage = load_module("numpy._core.multiarray")._set_madvise_hugepage
    except (ImportError, AttributeError):  # another numpy layout: its default stays
        return
    _set_madvise_hugepage(False)


def convert(
    bids_root: str = typer.Argument(..., help="Raw BIDS dataset (its derivatives/ are used) or a derivatives dataset; path or fsspec URL."),
    output: str = typer.Argument(..., help="Output store: a local path (OUT.zarr) or an fsspec URL."),
    recipe: str = typer.Option("default", "--recipe", "-r", help="Bundled recipe name or path to a YAML recipe."),
    set_: list[str] = typer.Option([], "--set", help="Recipe override key.path=value (repeatable)."),
    participant_label: list[str] = typer.Option([], "--participant-label", help="Subjects to convert (repeatable)."),
    task: list[str] = typer.Option([], "--task", help="Tasks to convert (repeatable)."),
    space: list[str] = typer.Option([], "--space", help="Use only sources in these spaces ('native' = no space entity)."),
    derivatives: list[str] = typer.Option([], "--derivatives", help="Extra derivatives datasets (repeatable; path or URL)."),
    atlas_dir: Optional[Path] = typer.Option(None, "--atlas-dir", help="Folder with atlas files (else $FMRI_DATA_ATLAS_DIR)."),
    scheduler: str = typer.Option("threads", "--scheduler", help="threads | processes | synchronous | tcp://HOST:PORT"),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", help="Concurrent runs (threads, processes, or SLURM jobs)."),
    cluster: Optional[str] = typer.Option(None, "--cluster", help="'slurm': start a dask-jobqueue SLURMCluster."),
    cluster_option: list[str] = typer.Option([], "--cluster-option", help="SLURM setting key=value (cores, memory, walltime, queue, ...)."),
    input_option: list[str] = typer.Option([], "--input-option", help="fsspec option for a remote BIDS root, key=value (e.g. anon=true)."),
    output_option: list[str] = typer.Option([], "--output-option", help="fsspec option for a remote store, key=value."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete an existing store first."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    device: Optional[str] = typer.Option(None, "--device", help="Resampling on auto | cpu | cuda (recipe compute.device; auto = CUDA when present)."),
    stats: bool = typer.Option(False, "--stats", help="Then compute the recipe's dataset statistics (fmri-data stats)."),
) -> None:
    """Convert a BIDS dataset into a Zarr v3 store; finished runs are skipped on a rerun."""
    from ..convert import convert as run_convert

    tune_process()
    try:
        report = run_convert(
            bids_root,
            output,
            recipe,
            overrides=set_ + ([f"compute.device={device}"] if device else []),
            participant_label=participant_label or None,
            task=task or None,
            space=space or None,
            derivatives=list(derivatives) or None,
            atlas_dir=str(atlas_dir) if atlas_dir else None,
            scheduler=scheduler,
            workers=workers,
            overwrite=overwrite,
            progress=progress and sys.stderr.isatty(),
            storage_options=parse_options(output_option),
            input_options=parse_options(input_option),
            cluster=cluster,
            cluster_options=parse_options(cluster_option),
        )
    except (FmriDataError, ValueError) as exc:
        fail(exc)
    except KeyboardInterrupt:
        interrupted(f"finished runs are kept in {output}; run the same command again to resume")
    counts = {s: report.count(s) for s in ("complete", "exists", "claimed", "skipped", "failed")}
    console.print(
        f"{report.store_url}: {counts['complete']} converted, {counts['exists']} already present, "
        f"{counts['claimed']} claimed by another converter, {counts['skipped']} skipped, {counts['failed']} failed"
    )
    for r in report.results:
        if r.status == "skipped":
            console.print(f"[yellow]skipped[/yellow] {r.run_id}: {escape(r.error or '')}")
    print_warnings(report.results)
    for r in report.failed:
        err_console.print(f"[red]failed[/red] {r.run_id}: {escape(r.error or '')}")
    for line in report.errors:
        err_console.print(f"[red]error:[/red] {escape(line)}")
    if report.failed or report.errors:
        raise typer.Exit(1)
    if stats:
        from ..stats import compute_stats

        try:
            record = compute_stats(report.store_url, storage_options=parse_options(output_option))
        except (FmriDataError, ValueError) as exc:
            fail(exc)
        console.print(f"{report.store_url}: {record['kind']} statistics of {record['array']} over {record['n_runs']} runs")

