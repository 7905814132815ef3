"""Command line: ``fmri-data stats`` (dataset statistics of a store, for model-exact normalization)."""

from __future__ import annotations

from typing import Optional

import typer
from rich.markup import escape

from .app import console, fail, parse_options


def stats(
    store: str = typer.Argument(..., help="Store path or URL."),
    kind: Optional[str] = typer.Option(None, "--kind", help="median_iqr_scalar | median_iqr_roi | brainlm | mean_std (default: the recipe's stats.kind)."),
    array: Optional[str] = typer.Option(None, "--array", help="roi | roi/<key> | bold | flat (default: the recipe's stats.array, else roi)."),
    option: list[str] = typer.Option([], "--option", help="fsspec option of a remote store, key=value."),
) -> None:
    """Compute dataset statistics over the store's complete runs and store them in stats/<array>.json."""
    from ..errors import FmriDataError
    from ..stats import compute_stats

    try:
        record = compute_stats(store, kind, array, storage_options=parse_options(option))
    except (FmriDataError, ValueError) as exc:
        fail(exc)
    shown = {k: (v if isinstance(v, float) else f"{len(v)} values") for k, v in record["params"].items()}
    console.print(f"{escape(store)}: {record['kind']} of {record['array']} over {record['n_runs']} runs: {escape(str(shown))}")
