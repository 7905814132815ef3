"""Command line: ``fmri-data train`` (pre-train a family on a store) and ``fmri-data probe``
(frozen linear / attentive probe of a checkpoint on window labels)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from ..config.overrides import comma_list
from ..errors import SettingError
from ..imports import load_module
from ..train.registry import NAMES as FAMILIES, get_family
from .app import console, fail, parse_options, progress_callback


def train(
    family: str = typer.Option(..., "--family", "-f", help=" | ".join(FAMILIES)),
    store: str = typer.Option(..., "--store", "-s", help="Store path or URL."),
    config: str = typer.Option("tiny", "--config", "-c", help="tiny (CPU tests) | base (paper sizes, GPU)."),
    set_: list[str] = typer.Option([], "--set", help="Config override section.key=value, e.g. train.steps=100, model.n_rois=419 (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder: checkpoints/, metrics.jsonl, metrics.csv (default runs/<family>)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the run folder's latest checkpoint."),
    split: Optional[str] = typer.Option(None, "--split", help="Train on one split of the windows (train | val | test, by subject)."),
    workers: int = typer.Option(0, "--workers", "-j", help="DataLoader worker processes."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads."),
) -> None:
    """Pre-train one model family on a store's windows; prints per-step loss, samples/s and peak memory."""
    torch = load_module("torch")

    from ..train import StoreBatches, Trainer, build_model, get_config
    from ..train.trainer import resolve_device

    try:
        get_family(family)
    except SettingError as exc:
        fail(exc)
    try:
        if threads:
            torch.set_num_threads(threads)
        cfg = get_config(family, config, set_)
        dev = resolve_device(device)
        folder = out or Path("runs") / family
        console.print(f"[bold]{family}[/bold] ({config}) on {escape(store)} -> {escape(str(folder))}, device {dev}")
        batches = StoreBatches(store, cfg, dev, split=split, num_workers=workers)
        console.print(f"{len(batches.index)} windows of {cfg.model.frames} frames from {len(batches.index.runs)} runs")
        model = build_model(cfg)
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        console.print(f"{n_params:,} trainable parameters")
        trainer = Trainer(model, batches, cfg, folder, device=str(dev), resume=resume,
                          log=lambda line: console.print(escape(line)))
        trainer.fit()
    except (ValueError, FileNotFoundError, FloatingPointError, OSError) as exc:
        fail(exc)


def probe(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="A checkpoint written by `fmri-data train`."),
    store: str = typer.Option(..., "--store", "-s", help="Store path or URL."),
    label: str = typer.Option("trial_type", "--label", help="Window label to classify (an events column, entity or participant column)."),
    test: list[str] = typer.Option(..., "--test", help="Held-out windows: label=value[,value...], e.g. run=10,11,12 (repeatable)."),
    where: list[str] = typer.Option([], "--where", help="Use only runs with label=value[,value...] (repeatable)."),
    kind: str = typer.Option("linear", "--kind", help="linear | attentive | prompt (NeuroSTORM prompt tuning)"),
    pool: str = typer.Option("mean", "--pool", help="Linear probe features: mean over tokens | flatten."),
    source: str = typer.Option("events", "--source", help="Windows: events (onset + HRF delay) | sliding."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
) -> None:
    """Probe a frozen pre-trained encoder on window labels with a held-out split; prints accuracy."""
    from ..train import load_pretrained
    from ..train.probe import run_probe
    from ..train.trainer import resolve_device

    try:
        dev = resolve_device(device)
        model, cfg = load_pretrained(checkpoint, str(dev))
        with progress_callback() as progress:
            result = run_probe(model, cfg, store, label=label, test=parse_options(test, "--test", comma_list) or {}, kind=kind,
                               pool=pool, source=source, where=parse_options(where, "--where", comma_list), device=dev,
                               progress=progress)
    except (ValueError, FileNotFoundError, OSError) as exc:
        fail(exc)
    console.print(f"[bold]{cfg.family}[/bold] {kind} probe of '{escape(label)}': {escape(str(result))}")
