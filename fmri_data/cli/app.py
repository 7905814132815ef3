"""What every command shares: the consoles, the one-line failure, byte sizes, ``key=value`` options."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from ..config.overrides import OverrideError, parse_pairs, yaml_value
from ..errors import one_line
from ..imports import load_module


console = Console(width=None if sys.stdout.isatty() else 200, soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)  # one line per error, never wrapped


def fail(exc: Exception) -> None:
    err_console.print(f"[red]error:[/red] {escape(one_line(str(exc)))}")
    raise typer.Exit(2)


@contextmanager
def progress_callback(enabled: bool | None = None) -> Iterator[Callable[[int, int, str], None]]:
    """A progress bar on stderr driven by ``update(done, total, what)`` (one bar per ``what``);
    drawn only when stderr is a terminal (``enabled`` forces it)."""
    rp = load_module("rich.progress")

    enabled = sys.stderr.isatty() if enabled is None else enabled
    columns = (rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(), rp.TimeElapsedColumn(),
               rp.TimeRemainingColumn())
    with rp.Progress(*columns, console=err_console, disable=not enabled, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def update(done: int, total: int, what: str) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done, total=total)

        yield update


def interrupted(what: str) -> None:
    """Ctrl-C: one line, exit 130 at once. Every store file is written atomically, so runs
    still in flight on worker threads are simply abandoned (their staged writes are discarded
    by the next conversion) instead of finishing into a shutting-down interpreter."""
    sys.stdout.flush()
    err_console.print(f"interrupted: {what}")
    sys.stderr.flush()
    os._exit(130)


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
