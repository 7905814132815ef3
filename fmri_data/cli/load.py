"""Command line: ``fmri-data windows`` (the training windows a loader would read from a store)."""

from __future__ import annotations

from collections import Counter
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table


def windows(
    store: str = typer.Argument(..., help="Store path or URL."),
    length: int = typer.Option(..., "--length", "-L", help="Frames per window."),
    stride: Optional[int] = typer.Option(None, "--stride", "-S", help="Frames between sliding-window starts (default: length)."),
    array: str = typer.Option("bold", "--array", help="Time-first array: bold, flat, roi/<key>, or roi (each run's first)."),
    source: str = typer.Option("sliding", "--source", help="sliding | saliency | events"),
    scorer: Optional[str] = typer.Option(None, "--scorer", help="Saliency scorer (--source saliency)."),
    hrf_delay: float = typer.Option(5.0, "--hrf-delay", help="Seconds added to event onsets (--source events)."),
    label: Optional[str] = typer.Option(None, "--label", help="Also count windows per value of this label (e.g. trial_type)."),
    option: list[str] = typer.Option([], "--option", help="fsspec option for a remote store, key=value."),
) -> None:
    """Count the windows of each run that the loader would read (and why runs are left out)."""
    from .app import fail, parse_options, console
    from ..errors import FmriDataError
    from ..load import build_index

    try:
        index = build_index(store, length, stride, array=array, source=source, scorer=scorer, hrf_delay_s=hrf_delay,
                            storage_options=parse_options(option))
    except (FmriDataError, ValueError) as exc:
        fail(exc)
    per_run = Counter(int(r) for r in index.run)
    table = Table(box=None, pad_edge=False)
    for column in ("run", "array", "frames", "TR (s)", "windows", "first starts"):
        table.add_column(column, no_wrap=True, justify="left" if column in ("run", "array") else "right")
    for r, entry in enumerate(index.runs):
        starts = index.start[index.run == r][:6].tolist()
        table.add_row(escape(entry.run_id), escape(entry.array), str(entry.n_frames), f"{entry.tr_s:g}", str(per_run[r]),
                      ", ".join(map(str, starts)) + (", ..." if per_run[r] > 6 else ""))
    console.print(table)
    console.print(f"{len(index)} windows of {length} frames ({source}) in {len(index.runs)} runs")
    for run_id, reason in index.dropped.items():
        console.print(f"  [yellow]left out[/yellow] {escape(run_id)}: {escape(reason)}")
    if label:
        counts = Counter(index.labels(i).get(label) for i in range(len(index)))
        console.print(f"{escape(label)}: " + ", ".join(f"{escape(str(k))}={v}" for k, v in sorted(counts.items(), key=lambda kv: str(kv[0]))))
