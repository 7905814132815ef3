"""A whole dataset: discover runs, create/reopen the store, map runs over Dask, write the index."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import engine
from ..discover import discover
from ..errors import InputError, StoreError, one_line
from ..store.layout import QA_TABLE, is_local
from ..qa.table import write_qa_table
from ..config.recipe import Recipe, load_recipe, recipe_hash, with_compression
from ..store.root import Store
from .context import cached_atlas
from .run import RunResult, convert_run

log = logging.getLogger(__name__)


@dataclass
class ConvertReport:
    """All run results of one ``convert`` call, and the store written."""

    store_url: str
    results: list[RunResult]
    errors: list[str] = field(default_factory=list)  # store-level failures after the runs (index tables)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def failed(self) -> list[RunResult]:
        return [r for r in self.results if r.status == "failed"]


def convert(
    bids_root: str | Path,
    output: str,
    recipe: str | Path | Recipe = "default",
    *,
    overrides: list[str] | None = None,
    participant_label: list[str] | None = None,
    task: list[str] | None = None,
    space: list[str] | None = None,
    derivatives: list[str | Path] | None = None,
    atlas_dir: str | None = None,
    scheduler: str = "threads",
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    storage_options: dict[str, Any] | None = None,
    input_options: dict[str, Any] | None = None,
    cluster: str | None = None,
    cluster_options: dict[str, Any] | None = None,
) -> ConvertReport:
    """Convert every run of a BIDS dataset into one Zarr v3 store.

    Args:
        bids_root: raw BIDS dataset (its ``derivatives/`` are used) or a derivatives dataset.
        output: store location (local path or fsspec URL).
        recipe: bundled recipe name, YAML path, or an already resolved recipe dict.
        overrides: ``key.path=value`` recipe overrides.
        participant_label, task, space: discovery filters (``space`` defaults to the
            recipe's ``inputs.spaces``).
        derivatives: extra derivatives datasets outside ``bids_root``.
        atlas_dir: folder holding atlas files (else ``$FMRI_DATA_ATLAS_DIR``).
        scheduler: ``"threads"`` (default), ``"processes"`` (a local distributed cluster),
            ``"synchronous"``, or the address of a running Dask scheduler (``tcp://host:8786``).
        workers: concurrent runs (threads or worker processes; SLURM: jobs).
        overwrite: delete an existing store first.
        progress: show a progress bar.
        storage_options: fsspec options for ``output``.
        input_options: fsspec options for a remote ``bids_root`` (e.g. ``{"anon": True}``).
        cluster: ``"slurm"`` to start a ``dask_jobqueue.SLURMCluster`` (settings from the
            recipe's ``compute.slurm`` updated by ``cluster_options``).
        cluster_options: overrides of the cluster settings (cores, memory, walltime, queue, ...).

    Returns:
        :class:`ConvertReport`; failed runs are listed there, not raised.

    Raises:
        ComputeError: the scheduler or cluster cannot be reached or started (checked first).
        InputError: the dataset cannot be indexed, or no run matches the filters (the
            message lists the subjects, tasks and spaces the dataset has).
        FmriDataError: the recipe is invalid, or the store cannot be created or written.
    """
    resolved = recipe if isinstance(recipe, dict) else load_recipe(recipe, overrides)
    digest = recipe_hash(resolved)
    engine.check_compute(scheduler, cluster)  # an unreachable scheduler fails before anything is written
    volume_cfg = resolved.get("volume") or {}
    spaces = space or resolved["inputs"].get("spaces")

    def found(**filters):
        return discover(bids_root, derivatives=derivatives, prefer=resolved["inputs"]["prefer"],
                        volume_space=volume_cfg.get("space"), volume_res=volume_cfg.get("resolution"),
                        storage_options=input_options, **filters)

    runs = found(participant_label=participant_label, task=task, space=spaces)
    if not runs:
        raise InputError(str(bids_root), _nothing_matches(found(), participant_label, task, space, spaces))
    for name in (resolved["roi"] or {}).get("atlases", []):
        cached_atlas(name, atlas_dir)  # a missing or off-grid atlas fails the whole conversion up front
    store = Store.create(output, resolved, digest, overwrite=overwrite, bids_root=str(bids_root), storage_options=storage_options)
    existing = store.attrs
    if existing["recipe_hash"] != digest:  # the same recipe but for an earlier default codec: keep the store's
        resolved = with_compression(resolved, existing["recipe"]["store"]["compression"])
        log.info("%s: keeps its codec %s", store.url, resolved["store"]["compression"])
    done = set(store.run_ids())
    results = [RunResult(r.run_id, "exists", entities=dict(r.entities)) for r in runs if r.run_id in done]
    todo = [r for r in runs if r.run_id not in done]
    if todo and is_local(store.fs) and not os.access(store.path, os.W_OK):
        raise StoreError(f"{store.url}: cannot write the store (read-only or no permission); {len(todo)} runs left to convert")
    compute = resolved.get("compute") or {}
    results += engine.map_runs(
        convert_run,
        todo,
        scheduler=scheduler,
        workers=workers,
        progress=progress,
        label=f"converting {len(todo)} runs",
        kwargs={
            "recipe": resolved,
            "store_url": store.url,
            "atlas_dir": atlas_dir,
            "storage_options": storage_options,
            "input_options": input_options,
        },
        cluster=cluster,
        cluster_options={**(compute.get("slurm") or {}), **(cluster_options or {})},
        memory_limit=compute.get("memory_per_worker"),
    )
    results.sort(key=lambda r: r.run_id)
    report = ConvertReport(store.url, results)
    try:
        if _tables_current(store, results):
            return report  # a rerun that found every run present writes nothing (a read-only store is fine)
        _write_index(store, results)
        write_qa_table(store)
    except Exception as exc:  # noqa: BLE001 - a full disk, a read-only or unreachable store: the runs are
        # committed, only the tables are stale (the next convert rebuilds them)
        cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
        report.errors.append(one_line(f"{store.url}: index.parquet / qa.parquet not updated ({cause}); "
                                      "rerun the same command to rebuild them"))
    return report


def _tables_current(store: Store, results: list[RunResult]) -> bool:
    """Every run was already present and ``index.parquet`` lists each as complete, with
    ``qa.parquet`` beside it."""
    if any(r.status != "exists" for r in results) or not store.fs.exists(f"{store.path}/{QA_TABLE}"):
        return False
    index = store.read_index()
    if not len(index):
        return False
    complete = set(index.loc[index["status"] == "complete", "run_id"])
    return {r.run_id for r in results} <= complete


def _nothing_matches(every: list, participant_label, task, space, recipe_spaces) -> str:
    """Why no run was found: the filters given and the values the dataset has."""
    if not every:
        return "no BOLD runs found (no *_bold.nii[.gz], *_bold.func.gii, *_bold.dtseries.nii or *_bold.ptseries.nii)"
    have = {
        "--participant-label": sorted({r.entities.get("sub", "") for r in every}),
        "--task": sorted({r.entities.get("task", "") for r in every}),
        "--space": sorted({s.space for r in every for s in r.sources()}),
    }
    asked = {"--participant-label": participant_label, "--task": task, "--space": space or recipe_spaces}
    given = [f"{flag if flag != '--space' or space else 'recipe inputs.spaces'} {' '.join(values)}"
             for flag, values in asked.items() if values]
    present = "; ".join(f"{flag}: {', '.join(v for v in have[flag] if v)}" for flag, values in asked.items() if values)
    return f"no BOLD run matches {' '.join(given)} (the dataset has {present})"


def _write_index(store: Store, results: list[RunResult]) -> None:
    previous = store.read_index()
    rows: dict[str, dict[str, Any]] = {}
    if len(previous):
        for row in previous.to_dict(orient="records"):
            rows[row["run_id"]] = row
    for r in results:
        if r.status == "exists" and r.run_id in rows:
            continue
        rows[r.run_id] = {k: v for k, v in r.row().items()}
    for run_id in store.run_ids():
        attrs = store.run_attrs(run_id)
        row = rows.setdefault(run_id, {"run_id": run_id})
        row.update(
            status="complete",
            entities=attrs["entities"],
            error=None,
            tr_s=attrs["tr_s"],
            n_frames=attrs["n_frames"],
            outputs=attrs["outputs"],
            warnings=attrs["warnings"],
        )
        row.setdefault("seconds", 0.0)
    store.write_index(sorted(rows.values(), key=lambda r: r["run_id"]))
