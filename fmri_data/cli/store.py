"""Command line: ``fmri-data inspect | validate | recipes`` (read a store or list recipes)."""

from __future__ import annotations


import typer
from rich.markup import escape
from rich.table import Table

from ..errors import FmriDataError

from .app import console, err_console, fail, human, parse_options



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

    problems = validate_store(store, parse_options(option), deep=deep)
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

