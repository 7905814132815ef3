"""The dataset-level QA table ``qa.parquet``: one row per complete run, the scalar ``qa`` metrics.

Written next to ``index.parquet`` after every conversion and by ``fmri-data qa``; rebuilt
from the run attributes each time, so it always matches the complete runs of the store
(runs still being written are not listed: :meth:`Store.run_ids` lists complete runs only).
"""

from __future__ import annotations

from typing import Any

from ..imports import load_module
from ..store.layout import QA_TABLE
from ..store.root import Store

TABLE = QA_TABLE

#: Scalar metrics: (key in run attrs ``qa``, label, direction: +1 higher is better, -1 lower is better, 0 neither).
METRICS: tuple[tuple[str, str, int], ...] = (
    ("tsnr", "tSNR", +1),
    ("fd_mean", "mean FD (mm)", -1),
    ("fd_num", "FD > thr (frames)", -1),
    ("fd_perc", "FD > thr (%)", -1),
    ("dvars_std", "DVARS std", -1),
    ("dvars_vstd", "DVARS vstd", -1),
    ("dvars_nstd", "DVARS nstd", -1),
    ("gcor", "GCOR", -1),
    ("aor", "AOR", -1),
    ("aqi", "AQI", -1),
    ("efc", "EFC", -1),
    ("fber", "FBER", +1),
    ("gsr", "GSR", -1),
    ("dummy_trs", "dummy TRs", -1),
    ("nan_fraction", "NaN fraction", -1),
    ("constant_fraction", "constant fraction", -1),
    ("frames_dropped", "frames dropped", -1),
)
ENTITIES = ("sub", "ses", "task", "acq", "run", "echo")


def qa_rows(store: Store, run_ids: list[str] | None = None, attrs: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One flat dict per complete run: ``run_id``, entities, ``tr_s``, ``n_frames``, kind and every metric.

    Runs without ``qa`` attributes (converted with QA disabled) get nulls.
    """
    rows = []
    for run_id in run_ids if run_ids is not None else store.run_ids():
        a = attrs[run_id] if attrs is not None else store.run_attrs(run_id)
        qa = a.get("qa") or {}
        row: dict[str, Any] = {"run_id": run_id}
        row.update({e: a["entities"].get(e) for e in ENTITIES})
        row.update(tr_s=a["tr_s"], source_tr_s=a["source_tr_s"], n_frames=a["n_frames"], n_frames_source=a["n_frames_source"])
        row.update(kind=qa.get("kind"), n_channels=qa.get("n_channels"), gsr_axis=qa.get("gsr_axis"))
        row.update({key: qa.get(key) for key, _, _ in METRICS})
        rows.append(row)
    return rows


def write_qa_table(store: Store, rows: list[dict[str, Any]] | None = None) -> int:
    """(Re)write ``qa.parquet`` at the store root; returns the number of rows.

    Columns: ``run_id``, BIDS entities, ``tr_s``, ``source_tr_s``, ``n_frames``,
    ``n_frames_source``, ``kind``, ``n_channels``, ``gsr_axis`` and the metrics of
    :data:`METRICS` (float, null where a metric does not apply). Written atomically
    (:meth:`Store.write_file <fmri_data.store.root.Store.write_file>`): a write cut short
    leaves the previous table.
    """
    pd = load_module("pandas")

    rows = qa_rows(store) if rows is None else rows
    columns = ["run_id", *ENTITIES, "tr_s", "source_tr_s", "n_frames", "n_frames_source", "kind", "n_channels", "gsr_axis"]
    columns += [key for key, _, _ in METRICS]
    table = pd.DataFrame(rows, columns=columns)
    for key, _, _ in METRICS:
        table[key] = pd.to_numeric(table[key], errors="coerce").astype("float64")
    store.write_file(TABLE, lambda fh: table.to_parquet(fh, index=False))
    return len(table)


def read_qa_table(store: Store):
    """``qa.parquet`` as a pandas DataFrame (empty when it was never written)."""
    pd = load_module("pandas")

    path = f"{store.path}/{TABLE}"
    if not store.fs.exists(path):
        return pd.DataFrame()
    with store.fs.open(path, "rb") as fh:
        return pd.read_parquet(fh)
