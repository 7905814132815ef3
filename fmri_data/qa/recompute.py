"""Recompute the QA metrics of a store's complete runs from their sources (``fmri-data qa --recompute``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..convert.outputs.base import Timing
from ..convert.outputs.qa import QAInputs, compute_qa
from ..imports import load_module


def recompute_qa(
    store_url: str,
    *,
    bids_root: str | None = None,
    derivatives: list[str] | None = None,
    qa: dict[str, Any] | None = None,
    run_ids: list[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, str]:
    """(Re)compute the ``qa`` attributes of a store's complete runs from their sources, without reconversion.

    The BIDS dataset (local files) is discovered again (``bids_root``, default: the one the
    store was converted from) and each run's source files are checked against the sha256 recorded
    in its attributes first, so the metrics always describe the data that was converted.
    Only the ``qa`` attribute changes (replaced atomically); arrays are not touched.
    ``qa.parquet`` is rebuilt.

    Args:
        store_url: the store.
        bids_root, derivatives: where the sources are (default: the store's ``bids_root``).
        qa: settings overriding the store recipe's ``qa`` section (e.g. ``{"fd_threshold_mm": 0.2}``).
        run_ids: only these runs (default: every complete run).
        storage_options: fsspec options of the store.
        progress: draw a progress bar.

    Returns:
        ``{run_id: "updated" | reason it was not}``.

    Raises:
        StoreError: not a store; FmriDataError: the dataset cannot be discovered.
    """
    Progress = load_module("rich.progress").Progress

    from ..discover import discover
    from ..reference.grids import Grid
    from .table import write_qa_table
    from ..read.common import file_sha256
    from ..read.tables import read_confounds
    from ..store.root import Store

    store = Store.open(store_url, storage_options)
    recipe = store.recipe
    recipe["qa"] = {**(recipe.get("qa") or {}), **(qa or {}), "enabled": True}
    root = bids_root or store.attrs.get("bids_root")
    if not root:
        raise ValueError(f"{store.url}: the store does not record its BIDS dataset; pass bids_root")
    volume_cfg = recipe.get("volume") or {}
    specs = {
        s.run_id: s
        for s in discover(root, derivatives=derivatives, space=recipe["inputs"].get("spaces"), prefer=recipe["inputs"]["prefer"],
                          volume_space=volume_cfg.get("space"), volume_res=volume_cfg.get("resolution"))
    }
    wanted = run_ids or store.run_ids()
    out: dict[str, str] = {}
    with Progress(disable=not progress) as bar:
        task = bar.add_task(f"QA of {len(wanted)} runs", total=len(wanted))
        for run_id in wanted:
            bar.advance(task)
            attrs = store.run_attrs(run_id)
            spec = specs.get(run_id)
            if spec is None:
                out[run_id] = f"not found in {root}"
                continue
            files = [s.path for s in spec.sources()] + [p for p in (spec.mask, spec.confounds) if p]
            recorded = {s["path"]: s["sha256"] for s in attrs["sources"]}
            changed = [p for p in files if p in recorded and file_sha256(p) != recorded[p]]
            if changed or not any(p in recorded for p in files):
                out[run_id] = f"sources differ from the converted ones: {', '.join(changed) or 'none of the files was converted'}"
                continue
            mask = grid = None
            if "brain_mask" in attrs["outputs"] and "volume" in attrs:
                mask = np.asarray(store.run(run_id)["brain_mask"][:], dtype=bool)
                grid = Grid.from_affine(mask.shape, attrs["volume"]["affine"])
            confounds = read_confounds(spec.confounds) if spec.confounds else None
            inputs = QAInputs(spec, recipe, float(attrs["source_tr_s"]), mask, grid, confounds)
            timing = Timing(attrs["tr_s"], attrs["source_tr_s"], attrs["n_frames"], attrs["n_frames_source"])
            notes: list[str] = []
            result = compute_qa(inputs, timing, notes)
            if not result:
                out[run_id] = "; ".join(notes) or "QA disabled"
                continue
            store.write_run_attrs(run_id, {**attrs, **result})
            out[run_id] = "updated"
    write_qa_table(store)
    return out

