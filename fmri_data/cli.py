"""Command line: ``fmri-data convert | inspect | validate | recipes | saliency | windows | flat | qa | train | probe``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import FmriDataError

app = typer.Typer(
    name="fmri-data",
    help="Turn BIDS fMRI datasets into Zarr v3 training stores for fMRI foundation models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(width=None if sys.stdout.isatty() else 200, soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)  # one line per error, never wrapped


def _fail(exc: Exception) -> None:
    err_console.print(f"[red]error:[/red] {escape(str(exc))}")
    raise typer.Exit(2)


def _options(pairs: list[str]) -> dict | None:
    """``["anon=true", "endpoint_url=http://..."]`` -> ``{"anon": True, ...}`` (values parsed as YAML)."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"'{pair}' is not key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out or None


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return str(nbytes)


@app.command()
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
) -> None:
    """Convert a BIDS dataset into a Zarr v3 store; finished runs are skipped on a rerun."""
    from .convert import convert as run_convert

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
            storage_options=_options(output_option),
            input_options=_options(input_option),
            cluster=cluster,
            cluster_options=_options(cluster_option),
        )
    except (FmriDataError, ValueError) as exc:
        _fail(exc)
    counts = {s: report.count(s) for s in ("complete", "exists", "skipped", "failed")}
    console.print(
        f"{report.store_url}: {counts['complete']} converted, {counts['exists']} already present, "
        f"{counts['skipped']} skipped, {counts['failed']} failed"
    )
    for r in report.results:
        if r.status == "skipped":
            console.print(f"[yellow]skipped[/yellow] {r.run_id}: {escape(r.error or '')}")
    for r in report.failed:
        err_console.print(f"[red]failed[/red] {r.run_id}: {escape(r.error or '')}")
    if report.failed:
        raise typer.Exit(1)


@app.command()
def inspect(
    store: str = typer.Argument(..., help="Store path or URL."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    option: list[str] = typer.Option([], "--option", help="fsspec option for a remote store, key=value."),
) -> None:
    """List the runs of a store with their TR, frames, arrays and size."""
    from .inspect import summarize, to_json
    from .store import Store

    try:
        summary = summarize(Store.open(store, _options(option)))
    except FmriDataError as exc:
        _fail(exc)
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
            run["run_id"], f"{run['tr_s']:g}", f"{run['source_tr_s']:g}", str(run["n_frames"]), _human(run["nbytes"]),
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


@app.command()
def validate(
    store: str = typer.Argument(..., help="Store path or URL."),
    deep: bool = typer.Option(False, "--deep", help="Also re-read every array and verify its checksums."),
    option: list[str] = typer.Option([], "--option", help="fsspec option for a remote store, key=value."),
) -> None:
    """Check a store against its schema (attributes, array shapes, chunking; --deep: contents)."""
    from .validate import validate_store

    problems = validate_store(store, _options(option), deep=deep)
    for problem in problems:
        err_console.print(f"[red]invalid[/red] {escape(problem)}")
    if problems:
        raise typer.Exit(1)
    console.print(f"{store}: valid")


@app.command()
def recipes() -> None:
    """List the bundled recipes."""
    from .recipe import available_recipes, load_recipe

    for name in available_recipes():
        console.print(f"[bold]{name}[/bold]: {escape(load_recipe(name).get('description', ''))}")


from . import cli_train  # noqa: E402,F401  (registers train, probe)
from .cli_flat import app as _flat_app  # noqa: E402
from .cli_load import windows as _windows  # noqa: E402
from .cli_qa import qa as _qa_command  # noqa: E402
from .cli_saliency import app as _saliency_app  # noqa: E402

app.add_typer(_saliency_app, name="saliency")
app.add_typer(_flat_app, name="flat")
app.command()(_windows)
app.command("qa")(_qa_command)


def main() -> None:  # pragma: no cover - entry point
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
