"""Command line: ``fmri-data saliency fit | score`` (saliency-window indices of a store)."""

from __future__ import annotations

from typing import Optional

import typer
from rich.markup import escape

from .app import fail

app = typer.Typer(
    help="Rank each run's windows by saliency and store the top-k (SLIM-Brain style).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def fit(
    store: str = typer.Argument(..., help="Store path or URL."),
    roi: str = typer.Option(..., "--roi", help="ROI series the network models: <key> or roi/<key>."),
    name: str = typer.Option("masked_conv", "--name", help="Scorer name of the network."),
    window: Optional[int] = typer.Option(None, "--window", help="Training window in frames (default: recipe saliency window, else chunk_frames)."),
    steps: int = typer.Option(300, "--steps", help="Optimisation steps."),
    batch: int = typer.Option(16, "--batch", help="Windows per step."),
    lr: float = typer.Option(3e-3, "--lr", help="Adam learning rate."),
    hidden: int = typer.Option(32, "--hidden", help="Hidden channels."),
    seed: int = typer.Option(0, "--seed", help="Seed of weights, window sampling and masks."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda (auto: CUDA when torch sees a GPU, as train and probe)."),
) -> None:
    """Train a masked-frame network on the store's ROI series; save it in the store."""
    from .app import console
    from ..errors import FmriDataError
    from ..saliency import fit_store

    try:
        record = fit_store(store, roi, name=name, window=window, steps=steps, batch=batch, lr=lr, seed=seed, hidden=hidden, device=device)
    except (FmriDataError, ValueError) as exc:
        fail(exc)
    training = record["training"]
    console.print(
        f"{escape(store)}: fitted '{name}' on {record['roi']} of {training['n_runs']} runs, window {record['window']}: "
        f"loss {training['loss_first']:.4f} -> {training['loss_last']:.4f}; {record['path']} sha256 {record['sha256'][:12]}"
    )


@app.command()
def score(
    store: str = typer.Argument(..., help="Store path or URL."),
    scorer: list[str] = typer.Option([], "--scorer", "-s", help="Scorer (built-in, *_motion_penalized, or a fitted network's name); repeatable. Default: the recipe's."),
    window: Optional[int] = typer.Option(None, "--window", help="Frames per window."),
    stride: Optional[int] = typer.Option(None, "--stride", help="Frames between window starts."),
    k: Optional[int] = typer.Option(None, "--k", help="Windows kept per run."),
    source: list[str] = typer.Option([], "--source", help="roi/<key> | roi | bold, in order of preference (repeatable)."),
    fd_threshold: Optional[float] = typer.Option(None, "--fd-threshold", help="FD scrubbing threshold (mm) of motion-penalised scorers."),
    run: list[str] = typer.Option([], "--run", help="Only these run ids (repeatable)."),
) -> None:
    """Score the windows of every run of an existing store (no reconversion); write saliency/<scorer>."""
    from .app import console
    from ..errors import FmriDataError
    from ..saliency import score_store

    try:
        reports = score_store(
            store, scorer or None, window=window, stride=stride, k=k, source=source or None,
            fd_threshold_mm=fd_threshold, run_ids=run or None,
        )
    except (FmriDataError, ValueError) as exc:
        fail(exc)
    written = sum(len(r.written) for r in reports)
    console.print(f"{escape(store)}: {len(reports)} runs scored, {written} scorer groups written")
    for r in reports:
        for name, reason in r.skipped.items():
            console.print(f"[yellow]skipped[/yellow] {r.run_id} {name}: {escape(reason)}")
