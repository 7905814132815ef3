"""Run independent per-run tasks on Dask: threads, a local cluster, or an existing cluster.

Each run is one Dask task (``dask.delayed``); runs share nothing but the store, so the
same graph runs on the threaded scheduler of a laptop, on a ``LocalCluster`` of worker
processes, or on a running distributed scheduler (``tcp://host:8786``) of a lab cluster,
without code changes. A progress bar counts finished runs.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import dask
import dask.local
import dask.threaded
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..errors import ComputeError
from ..imports import load_module

LOCAL_SCHEDULERS = ("threads", "synchronous", "processes")


def default_workers() -> int:
    """Concurrent runs by default: the CPU count, at most 4 (each run holds its series in memory)."""
    return max(1, min(4, os.cpu_count() or 1))


def check_compute(scheduler: str = "threads", cluster: str | None = None, timeout_s: float = 5.0) -> None:
    """Fail at once, before anything is written, when runs cannot execute where asked.

    Checks that the scheduler name is known, that a ``tcp://HOST:PORT`` scheduler accepts a
    TCP connection within ``timeout_s`` seconds, and that ``cluster="slurm"`` has
    dask-jobqueue installed and SLURM's ``sbatch`` on ``PATH``.

    Raises:
        ComputeError: one line naming the scheduler or cluster and the cause.
    """
    if cluster is not None:
        if cluster != "slurm":
            raise ComputeError(f"unknown cluster kind {cluster!r}; use 'slurm'")
        if shutil.which("sbatch") is None:
            raise ComputeError("--cluster slurm: SLURM's `sbatch` is not on PATH (run fmri-data on a SLURM login node)")
        return
    if scheduler in LOCAL_SCHEDULERS:
        return
    parts = urlsplit(scheduler)
    if parts.scheme not in ("tcp", "tls") or not parts.hostname:
        raise ComputeError(f"unknown scheduler {scheduler!r}; use threads, processes, synchronous or tcp://HOST:PORT")
    try:
        port = parts.port or 8786
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise ComputeError(f"Dask scheduler {scheduler} is not reachable ({exc}); start it or fix the address") from None


def _verbose() -> bool:
    """The root logger shows INFO (``fmri-data --verbose``): Dask's own messages stay on."""
    return logging.getLogger().getEffectiveLevel() <= logging.INFO


@contextmanager
def _quiet_distributed():
    """The in-process scheduler and nannies of ``distributed`` log every connection at INFO:
    keep the terminal to fmri-data's own lines (warnings and errors still show) unless the
    root logger is at INFO or below (``fmri-data --verbose``)."""
    load_module("distributed")  # its import sets the "distributed" logger to INFO: set ours after it

    logger = logging.getLogger("distributed")
    level = logger.level
    if not _verbose():
        logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _progress(label: str, total: int, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


class _TaskCounter(dask.callbacks.Callback):
    """Advance a progress bar whenever one of the watched task keys finishes."""

    def __init__(self, keys: set, advance: Callable[[], None]):
        super().__init__()
        self.keys = keys
        self.advance = advance

    def _posttask(self, key, result, dsk, state, id):  # noqa: A002 - dask's signature
        if key in self.keys:
            self.advance()


def map_runs(
    func: Callable[..., Any],
    items: Sequence[Any],
    *,
    scheduler: str = "threads",
    workers: int | None = None,
    progress: bool = True,
    label: str = "runs",
    kwargs: dict[str, Any] | None = None,
    cluster: str | None = None,
    cluster_options: dict[str, Any] | None = None,
    memory_limit: str | None = None,
) -> list[Any]:
    """Apply ``func(item, **kwargs)`` to every item as independent Dask tasks.

    Args:
        func: the per-run function; must not raise for bad input (it returns a result).
        items: one entry per run.
        scheduler: ``"threads"``, ``"synchronous"``, ``"processes"`` (a
            ``distributed.LocalCluster`` with ``workers`` single-threaded processes), or a
            scheduler address ``"tcp://host:port"``.
        workers: concurrent tasks (threads or processes); default :func:`default_workers`.
        progress: draw a progress bar on the terminal.
        label: progress bar title.
        kwargs: keyword arguments passed to every call.
        cluster: ``"slurm"``: start a ``dask_jobqueue.SLURMCluster`` from ``cluster_options``
            and scale it to ``workers`` jobs (overrides ``scheduler``).
        cluster_options: SLURMCluster settings (:func:`slurm_cluster`).
        memory_limit: memory limit of each local worker process (``"6GB"``); Dask pauses and
            restarts workers that exceed it.

    Returns:
        Results in the order of ``items``.
    """
    kwargs = kwargs or {}
    if not items:
        return []
    workers = workers or default_workers()
    tasks = [dask.delayed(func, pure=False)(item, **kwargs) for item in items]
    with _progress(label, len(tasks), progress) as bar:
        task_id = bar.add_task(label, total=len(tasks))
        advance = lambda: bar.advance(task_id)  # noqa: E731
        if cluster is None and scheduler in ("threads", "synchronous"):
            keys = {t.key for t in tasks}
            with _TaskCounter(keys, advance):
                # the scheduler function itself: a scheduler's name makes dask import
                # distributed (0.2 s) to look for a Client it would not use
                get = dask.threaded.get if scheduler == "threads" else dask.local.get_sync
                return list(dask.compute(*tasks, scheduler=get, num_workers=workers))
        with _quiet_distributed():
            return _distributed(tasks, scheduler, workers, advance, cluster, cluster_options or {}, memory_limit)


#: SLURMCluster settings fmri-data passes through (dask_jobqueue names).
SLURM_KEYS = (
    "cores", "processes", "memory", "walltime", "queue", "account", "job_extra_directives",
    "local_directory", "log_directory", "job_script_prologue", "interface", "python",
)


def slurm_cluster(options: dict[str, Any]):
    """A ``dask_jobqueue.SLURMCluster`` from fmri-data settings (not yet scaled).

    Args:
        options: ``cores`` (per job), ``processes`` (Dask workers per job), ``memory`` (per
            job, e.g. ``"24GB"``; each worker gets memory / processes), ``walltime``
            (``"02:00:00"``), ``queue`` (partition), ``account``, ``job_extra_directives``
            (extra ``#SBATCH`` lines), ... (:data:`SLURM_KEYS`).

    Raises:
        ValueError: unknown keys.
    """
    SLURMCluster = load_module("dask_jobqueue").SLURMCluster

    unknown = set(options) - set(SLURM_KEYS) - {"jobs"}
    if unknown:
        raise ValueError(f"unknown SLURM settings {sorted(unknown)}; known: {', '.join(SLURM_KEYS)}")
    settings = {"cores": 1, "processes": 1, "memory": "8GB", "walltime": "04:00:00"}
    settings.update({k: v for k, v in options.items() if k in SLURM_KEYS and v is not None})
    return SLURMCluster(**settings)


def _distributed(tasks, scheduler, workers, advance, cluster_kind, cluster_options, memory_limit) -> list[Any]:
    distributed = load_module("distributed")
    Client, LocalCluster, as_completed = distributed.Client, distributed.LocalCluster, distributed.as_completed

    check_compute(scheduler, cluster_kind)
    cluster = None
    try:
        if cluster_kind == "slurm":
            cluster = slurm_cluster(cluster_options)
            cluster.scale(jobs=int(cluster_options.get("jobs") or workers))
            client = Client(cluster)
        elif scheduler == "processes":
            cluster = LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                memory_limit=memory_limit or "auto", silence_logs=False if _verbose() else logging.WARNING,
            )
            client = Client(cluster)
        else:
            client = Client(scheduler, timeout="10s")
    except (OSError, TimeoutError) as exc:
        if cluster is not None:
            cluster.close()
        where = "SLURM cluster" if cluster_kind else f"Dask scheduler {scheduler}"
        raise ComputeError(f"{where} could not be started or reached ({type(exc).__name__}: {exc})") from None
    try:
        futures = client.compute(tasks)
        order = {f.key: i for i, f in enumerate(futures)}
        results: list[Any] = [None] * len(futures)
        for future in as_completed(futures):
            results[order[future.key]] = future.result()
            advance()
        return results
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
