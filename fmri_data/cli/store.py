"""Command line: ``fmri-data inspect | validate | recipes | export`` (read a store, list recipes, write a run back)."""

from __future__ import annotations


import typer
from rich.markup import escape
from rich.table import Table

from ..errors import FmriDataError

from .app import console, err_console, fail, human, parse_options, progress_callback



def inspect(
    store: str = typer.Argument(..., help="Store path or URL."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    option: list[str] = typer.Option([], "--option", help="fsspec option for a remote store, key=value."),
) -> None:
    """List the runs of a store with their TR, frames, arrays and size."""
    from ..store.inspect import summarize, to_json
    from ..store.root import Store

    try:
        summary = summarize(Store.open(store, parse_options(option)))
    except FmriDataError as exc:
        fail(exc)
    if as_json:
        typer.echo(to_json(summary))
        return
    console.print(
        f"[bold]{escape(summary['store'])}[/bold]  recipe={summary['recipe']}  schema={summary['schema_version']}  "
        f"created={summary['created']}  runs={len(summary['runs'])}"
    )
    table = Table(show_lines=False, box=None, pad_edge=False)
    table.add_column("run", no_wrap=True)
    for column in ("TR (s)", "source TR (s)", "frames", "size"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("arrays")
    for run in summary["runs"]:
        arrays = ", ".join(
            f"{name} {'x'.join(str(n) for n in a['shape'])} {a['dtype']}" for name, a in run["arrays"].items()
        )
        table.add_row(
            run["run_id"], f"{run['tr_s']:g}", f"{run['source_tr_s']:g}", str(run["n_frames"]), human(run["nbytes"]),
            escape(arrays),
        )
    console.print(table)
    for row in summary["not_converted"]:
        console.print(f"[yellow]{row['status']}[/yellow] {row['run_id']}: {escape(str(row['reason']))}")
    _print_saliency(summary["runs"])


def _print_saliency(runs: list[dict]) -> None:
    """Per run and scorer: the top-k window start frames (and times) or why it was skipped."""
    rows = [(run, name, s) for run in runs for name, s in run.get("saliency", {}).items()]
    if not rows:
        return
    console.print("[bold]saliency[/bold] top-k windows, best first: start frame (start time s)")
    for run, name, s in rows:
        if "skipped" in s:
            console.print(f"  {escape(run['run_id'])}  {escape(name)}: [yellow]skipped[/yellow] {escape(s['skipped'])}")
            continue
        windows = ", ".join(f"{f} ({t:g} s)" for f, t in zip(s["topk_starts"], s["topk_times_s"]))
        line = (
            f"  {run['run_id']}  {name} [{s['source']}, window {s['window']}, stride {s['stride']}, "
            f"{s['k']} of {s['n_windows']}]: {windows or '-'}"
        )
        console.print(escape(line))


def validate(
    store: str = typer.Argument(..., help="Store path or URL."),
    deep: bool = typer.Option(False, "--deep", help="Also re-read every array and verify its checksums."),
    option: list[str] = typer.Option([], "--option", help="fsspec option for a remote store, key=value."),
) -> None:
    """Check a store against its schema (attributes, array shapes, chunking; --deep: contents)."""
    from ..store.validate import validate_store

    notes: list[str] = []
    with progress_callback() as progress:
        problems = validate_store(store, parse_options(option), deep=deep, notes=notes, progress=progress)
    for note in notes:
        console.print(f"[yellow]note[/yellow] {escape(note)}")
    for problem in problems:
        err_console.print(f"[red]invalid[/red] {escape(problem)}")
    if problems:
        raise typer.Exit(1)
    console.print(f"{store}: valid")


def recipes() -> None:
    """List the bundled recipes."""
    from ..config.recipe import available_recipes, load_recipe

    for name in available_recipes():
        console.print(f"[bold]{name}[/bold]: {escape(load_recipe(name).get('description', ''))}")


def export(
    store: str = typer.Argument(..., help="Store path or URL."),
    run: str = typer.Argument(..., help="Run id, e.g. sub-hcp1_task-rest (fmri-data inspect lists them)."),
    to: str = typer.Option(..., "--to", help="nifti (bold or a mask, for FSLeyes), cifti (.ptseries.nii, for "
                                            "Connectome Workbench) or tsv (roi/<atlas> or confounds, for pandas)."),
    array: str | None = typer.Option(None, "--array", help="Array of the run (default: bold for nifti, the "
                                                           "run's roi/ array for tsv and cifti)."),
    out: str | None = typer.Option(None, "--out", help="Output file (default: <run>_<array>.nii.gz | "
                                                       ".ptseries.nii | .tsv in the working directory)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    option: list[str] = typer.Option([], "--option", help="fsspec option for a remote store, key=value."),
) -> None:
    """Write one array of a run back as NIfTI, CIFTI or TSV (with the store's affine, TR and labels)."""
    from ..store.export import export_run

    try:
        path = export_run(store, run, to, array=array, out=out, overwrite=overwrite,
                          storage_options=parse_options(option))
    except FmriDataError as exc:
        fail(exc)
    console.print(f"wrote {escape(path)}")
