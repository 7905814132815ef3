"""Command line: ``fmri-data convert | inspect | validate | recipes | export | saliency | windows | flat | qa | stats | train | probe | version``.

Each command lives in the module of its stage (``cli/convert.py``, ``cli/store.py``, ...) as a
plain function or a sub-command group; this module assembles them, so no command module
imports another and nothing registers itself as an import side effect.
"""

from __future__ import annotations

import logging
import os

import typer

from . import convert, flat, load, qa, saliency, stats, store, train

app = typer.Typer(
    name="fmri-data",
    help="Turn BIDS fMRI datasets into Zarr v3 training stores for fMRI foundation models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"fmri-data {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the fmri-data version and exit."),
          verbose: bool = typer.Option(False, "--verbose", "-v",
                                       help="Log progress details, Dask's own messages and the tracebacks of unexpected errors.")) -> None:
    """Turn BIDS fMRI datasets into Zarr v3 training stores for fMRI foundation models."""
    if verbose:
        logging.getLogger().setLevel(logging.INFO)
        logging.getLogger("fmri_data").setLevel(logging.DEBUG)


app.command()(convert.convert)
app.command()(store.inspect)
app.command()(store.validate)
app.command()(store.recipes)
app.command()(store.export)
app.add_typer(saliency.app, name="saliency")
app.command()(load.windows)
app.add_typer(flat.app, name="flat")
app.command("qa")(qa.qa)
app.command()(stats.stats)
app.command()(train.train)
app.command()(train.probe)


def main() -> None:  # pragma: no cover - entry point
    """``fmri-data``: warnings and errors only (``--verbose`` or ``FMRI_DATA_LOG=debug`` add
    details and the tracebacks of unexpected per-run errors)."""
    level = os.environ.get("FMRI_DATA_LOG", "warning").upper()
    logging.basicConfig(level=getattr(logging, level, logging.WARNING), format="%(levelname)s %(name)s: %(message)s")
    app()

if __name__ == "__main__":  # pragma: no cover
    main()
