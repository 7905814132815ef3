"""Run independent per-run tasks on Dask: threads, a local cluster, or an existing cluster.

Each run is one Dask task (``dask.delayed``); runs share nothing but the store, so the
same graph runs on the threaded scheduler of a laptop, on a ``LocalCluster`` of worker
processes, or on a running distributed scheduler (``tcp://host:8786``) of a lab cluster,
without code changes. A progress bar counts finished runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import dask
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def default_workers() -> int:
    """Concurrent runs by default: the CPU count, at most 4 (each run holds its series in memory)."""
    return max(1, min(4, os.cpu_count() or 1))


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
                return list(dask.compute(*tasks, scheduler=scheduler, num_workers=workers))
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
    from dask_jobqueue import SLURMCluster

    unknown = set(options) - set(SLURM_KEYS) - {"jobs"}
    if unknown:
        raise ValueError(f"unknown SLURM settings {sorted(unknown)}; known: {', '.join(SLURM_KEYS)}")
    settings = {"cores": 1, "processes": 1, "memory": "8GB", "walltime": "04:00:00"}
    settings.update({k: v for k, v in options.items() if k in SLURM_KEYS and v is not None})
    return SLURMCluster(**settings)


def _distributed(tasks, scheduler, workers, advance, cluster_kind, cluster_options, memory_limit) -> list[Any]:
    from distributed import Client, LocalCluster, as_completed

    if cluster_kind == "slurm":
        cluster = slurm_cluster(cluster_options)
        cluster.scale(jobs=int(cluster_options.get("jobs") or workers))
        client = Client(cluster)
    elif cluster_kind is not None:
        raise ValueError(f"unknown cluster kind {cluster_kind!r}; use 'slurm'")
    elif scheduler == "processes":
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None, memory_limit=memory_limit or "auto"
        )
        client = Client(cluster)
    else:
        cluster, client = None, Client(scheduler)
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
