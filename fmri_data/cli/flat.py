"""Command line: ``fmri-data flat preview`` (PNG of stored flat-map frames and mask)."""

from __future__ import annotations

from typing import Optional

import typer
from rich.markup import escape

app = typer.Typer(help="Cortical flat-map videos of a store.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)


def write_preview(store: str, run_id: str, frames: list[int], out: str) -> bytes:
    """Write a PNG of frames ``frames`` of ``runs/<run_id>/flat`` and its mask to ``out``; returns the bytes.

    Raises:
        StoreError: missing store or run; KeyError: the run has no flat map; IndexError: frame out of range.
    """
    from ..qa.preview import flat_png
    from ..store.root import Store

    opened = Store.open(store)
    group = opened.run(run_id)
    if "flat" not in group:
        raise KeyError(f"run {run_id} has no flat map")
    video = group["flat"]
    for k in frames:
        if not 0 <= k < video.shape[0]:
            raise IndexError(f"frame {k} outside 0..{video.shape[0] - 1}")
    tr = opened.run_attrs(run_id)["tr_s"]
    png = flat_png(video.oindex[frames, :, :], group["flat_mask"][:],
                   titles=[f"{run_id}  frame {k} ({k * tr:.1f} s)" for k in frames])
    with open(out, "wb") as fh:
        fh.write(png)
    return png


@app.command()
def preview(
    store: str = typer.Argument(..., help="Store path or URL."),
    run_id: str = typer.Argument(..., help="Run id, e.g. sub-01_task-rest."),
    frame: list[int] = typer.Option([0], "--frame", help="Frame index (repeatable)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="PNG path (default <run_id>_flat.png)."),
) -> None:
    """PNG of flat-map frames (left hemisphere on the left) and of the valid-pixel mask."""
    from .app import fail, console
    from ..errors import FmriDataError

    path = out or f"{run_id}_flat.png"
    try:
        write_preview(store, run_id, frame, path)
    except (FmriDataError, KeyError, IndexError) as exc:
        fail(exc)
    console.print(f"wrote {escape(path)}")
