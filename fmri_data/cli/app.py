"""What every command shares: the consoles, the one-line failure, byte sizes, ``key=value`` options."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape

from ..config.overrides import OverrideError, parse_pairs, yaml_value


console = Console(width=None if sys.stdout.isatty() else 200, soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)  # one line per error, never wrapped


def fail(exc: Exception) -> None:
    err_console.print(f"[red]error:[/red] {escape(str(exc))}")
    raise typer.Exit(2)


def parse_options(pairs: list[str], what: str = "option", value=yaml_value) -> dict | None:
    """``["anon=true", "endpoint_url=http://..."]`` -> ``{"anon": True, ...}``; ``None`` when empty.

    Raises:
        typer.BadParameter: a pair is malformed.
    """
    try:
        return parse_pairs(pairs, what, value) or None
    except OverrideError as exc:
        raise typer.BadParameter(str(exc)) from None


def human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return str(nbytes)
