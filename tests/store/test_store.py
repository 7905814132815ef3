"""Atomic changes to a committed store (:mod:`fmri_data.store.replace` through :class:`Store`).

A store of the real Haxby runs (ROI series only: a few seconds) is converted once; each test
works on its own copy. Failures are simulated by raising inside a write.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import DS_REAL, require_data
from fmri_data.errors import StoreError
from fmri_data.store.root import Store
from fmri_data.store.validate import validate_store

PACKAGE = Path(__file__).resolve().parents[2] / "fmri_data"
RUN_IDS = ("sub-01_task-rest_run-01", "sub-01_task-rest_run-02")


@pytest.fixture(scope="module")
def haxby_store(tmp_path_factory) -> str:
    """A small store written through the store API (no conversion): two complete runs, each
    with a ``confounds`` array of real Haxby motion parameters."""
    from fmri_data.config.recipe import load_recipe, recipe_hash
    from fmri_data.read.tables import read_confounds
    from fmri_data.store.layout import now, software_versions

    require_data()
    confounds = sorted(DS_REAL.glob("derivatives/**/sub-haxby1*_desc-confounds_timeseries.tsv"))
    assert confounds, f"no Haxby confounds under {DS_REAL}"
    columns, values = read_confounds(str(confounds[0]))
    recipe = load_recipe("slim_brain", ["volume=null"])
    out = str(tmp_path_factory.mktemp("store") / "haxby.zarr")
    store = Store.create(out, recipe, recipe_hash(recipe))
    for number, run_id in enumerate(RUN_IDS, 1):
        writer = store.begin_run(run_id)
        writer.write_array("confounds", values.astype(np.float32), recipe["store"]["compression"],
                           attrs={"columns": columns, "tr_s": 2.5}, dimension_names=("time", "confound"))
        writer.commit({
            "run_id": run_id, "entities": {"sub": "01", "task": "rest", "run": f"{number:02d}"},
            "tr_s": 2.5, "source_tr_s": 2.5, "n_frames": len(values), "n_frames_source": len(values),
            "sources": [{"path": str(confounds[0]), "kind": "confounds", "space": None, "derivative": True,
                         "sha256": "0" * 64}],
            "recipe_hash": recipe_hash(recipe), "software": software_versions(), "created": now(), "warnings": [],
        })
    assert store.run_ids() == list(RUN_IDS) and validate_store(out) == []
    return out


@pytest.fixture
def store(haxby_store, tmp_path) -> Store:
    copy = tmp_path / "copy.zarr"
    shutil.copytree(haxby_store, copy)
    return Store.open(str(copy))


def _array_writer(values):
    def write(group):
        group.create_array("values", shape=values.shape, dtype=values.dtype)[...] = values
        group.attrs.put({"n": int(len(values))})

    return write


def _failing_writer(values):
    def write(group):  # writes part of the group, then fails (disk full, killed converter, ...)
        group.create_array("values", shape=values.shape, dtype=values.dtype)[: len(values) // 2] = values[: len(values) // 2]
        raise OSError("disk full (simulated)")

    return write


def _staging_leftovers(store: Store) -> list[str]:
    return sorted(p.name for p in (Path(store.path) / "_staging").iterdir() if p.name != "zarr.json")


def _tmp_files(folder: str) -> list[str]:
    return sorted(p.name for p in Path(folder).rglob("*.tmp"))


# ----------------------------------------------------------------------------- replace_in_run
def test_replace_in_run_adds_replaces_and_removes_groups(store):
    run_id = store.run_ids()[0]
    old = np.arange(5, dtype=np.int64)
    store.replace_in_run(run_id, {"extra/a": _array_writer(old), "extra/b": _array_writer(old)},
                         group_attrs={"extra": {"note": "first"}})
    group = store.run(run_id)
    np.testing.assert_array_equal(group["extra/a/values"][...], old)
    assert dict(group["extra"].attrs) == {"note": "first"} and dict(group["extra/a"].attrs) == {"n": 5}

    store.replace_in_run(run_id, {"extra/a": _array_writer(old * 10)}, remove=["extra/b"],
                         group_attrs={"extra": {"note": "second"}})
    group = store.run(run_id)
    np.testing.assert_array_equal(group["extra/a/values"][...], old * 10)
    assert "extra/b" not in group and dict(group["extra"].attrs) == {"note": "second"}
    assert store.run_attrs(run_id)["status"] == "complete"  # the run's own attributes are untouched
    assert _staging_leftovers(store) == []


def test_replace_in_run_keeps_the_old_groups_when_a_write_fails(store):
    run_id = store.run_ids()[0]
    old = np.arange(8, dtype=np.int64)
    store.replace_in_run(run_id, {"extra/a": _array_writer(old), "extra/b": _array_writer(old + 1)},
                         group_attrs={"extra": {"note": "old"}})
    with pytest.raises(OSError, match="simulated"):
        # the first group is written whole, the second fails midway: neither may replace the old one
        store.replace_in_run(run_id, {"extra/a": _array_writer(old * 0), "extra/b": _failing_writer(old * 0)},
                             remove=["extra/c"], group_attrs={"extra": {"note": "new"}})
    group = store.run(run_id)
    np.testing.assert_array_equal(group["extra/a/values"][...], old)
    np.testing.assert_array_equal(group["extra/b/values"][...], old + 1)
    assert dict(group["extra"].attrs) == {"note": "old"}
    assert _staging_leftovers(store) == []
    assert validate_store(store.url) == []


def test_replace_in_run_with_a_failing_write_creates_nothing(store):
    run_id = store.run_ids()[0]
    with pytest.raises(OSError, match="simulated"):
        store.replace_in_run(run_id, {"extra/a": _failing_writer(np.arange(4))}, group_attrs={"extra": {}})
    assert "extra" not in store.run(run_id)
    assert _staging_leftovers(store) == []


def test_replace_in_run_clears_leftovers_of_an_interrupted_replacement(store):
    run_id = store.run_ids()[0]
    stale = Path(store.path) / "_staging" / f"{run_id}.extra-a.deadbeef.old"
    stale.mkdir(parents=True)
    (stale / "zarr.json").write_text("{}")
    store.replace_in_run(run_id, {"extra/a": _array_writer(np.arange(3))})
    assert _staging_leftovers(store) == []


def test_replace_in_run_refuses_to_remove_what_it_writes(store):
    run_id = store.run_ids()[0]
    with pytest.raises(ValueError, match="both write and remove"):
        store.replace_in_run(run_id, {"extra/a": _array_writer(np.arange(3))}, remove=["extra"])
    assert "extra" not in store.run(run_id)


def test_replace_in_run_needs_a_complete_run(store):
    with pytest.raises(StoreError, match="no complete run"):
        store.replace_in_run("sub-nobody_task-none", {"extra/a": _array_writer(np.arange(3))})


# ----------------------------------------------------------------------------- attributes
def test_write_run_attrs_replaces_the_attributes(store):

    run_id = store.run_ids()[0]
    attrs = store.run_attrs(run_id)
    store.write_run_attrs(run_id, {**attrs, "warnings": ["rewritten"]})
    assert store.run_attrs(run_id)["warnings"] == ["rewritten"]
    meta = json.loads((Path(store.path) / "runs" / run_id / "zarr.json").read_text())
    assert meta["node_type"] == "group" and meta["attributes"]["warnings"] == ["rewritten"]
    assert _tmp_files(store.path) == []


def test_write_run_attrs_cut_short_leaves_the_old_attributes(store, monkeypatch):
    import fmri_data.store.replace as replace_module

    run_id = store.run_ids()[0]
    path = Path(store.path) / "runs" / run_id / "zarr.json"
    before = path.read_bytes()
    real_open = open

    class CutShort:
        """A file whose write stores half the bytes, then fails (disk full)."""

        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            self.fh.write(data[: len(data) // 2])
            self.fh.flush()
            raise OSError("disk full (simulated)")

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.fh.__exit__(*exc)

    def cut_short_open(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        return CutShort(fh) if "w" in mode else fh

    monkeypatch.setattr(replace_module, "open", cut_short_open, raising=False)
    attrs = store.run_attrs(run_id)
    with pytest.raises(OSError, match="simulated"):
        store.write_run_attrs(run_id, {**attrs, "warnings": ["never written"]})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert store.run_attrs(run_id) == attrs
    assert _tmp_files(store.path) == []


def test_write_run_attrs_rename_failure_leaves_the_old_attributes(store, monkeypatch):
    import fmri_data.store.replace as replace_module

    run_id = store.run_ids()[0]
    attrs = store.run_attrs(run_id)

    def fail(src, dst):
        raise OSError("rename failed (simulated)")

    monkeypatch.setattr(replace_module.os, "replace", fail)
    with pytest.raises(OSError, match="simulated"):
        store.write_run_attrs(run_id, {**attrs, "warnings": ["never written"]})
    monkeypatch.undo()
    assert store.run_attrs(run_id) == attrs
    assert _tmp_files(store.path) == []


def test_write_run_attrs_refuses_attributes_off_contract(store):
    run_id = store.run_ids()[0]
    attrs = store.run_attrs(run_id)
    with pytest.raises(StoreError):
        store.write_run_attrs(run_id, {**attrs, "n_frames": "many"})
    assert store.run_attrs(run_id) == attrs
    with pytest.raises(StoreError, match="no complete run"):
        store.write_run_attrs("sub-nobody_task-none", attrs)


def test_write_root_attrs(store):
    attrs = store.attrs
    store.write_root_attrs({**attrs, "bids_root": "/elsewhere"})
    assert Store.open(store.url).attrs["bids_root"] == "/elsewhere"
    with pytest.raises(StoreError):
        store.write_root_attrs({**attrs, "schema_version": None})
    assert Store.open(store.url).attrs["bids_root"] == "/elsewhere"


# ----------------------------------------------------------------------------- parquet tables
def _parquet_then_fail(self, fh, *args, **kwargs):
    fh.write(b"PAR1 half a parquet file")
    raise OSError("disk full (simulated)")


def test_write_index_cut_short_leaves_the_previous_index(store, monkeypatch):
    rows = [{"run_id": "a", "status": "complete", "error": None}, {"run_id": "b", "status": "failed", "error": "x"}]
    store.write_index(rows)
    before = store.read_index()
    assert list(before["run_id"]) == ["a", "b"]
    monkeypatch.setattr(pd.DataFrame, "to_parquet", _parquet_then_fail)
    with pytest.raises(OSError, match="simulated"):
        store.write_index(rows[:1])
    monkeypatch.undo()
    pd.testing.assert_frame_equal(store.read_index(), before)
    assert _tmp_files(store.path) == []


def test_write_index_cut_short_leaves_no_file_when_there_was_none(store, monkeypatch):
    (Path(store.path) / "index.parquet").unlink(missing_ok=True)
    monkeypatch.setattr(pd.DataFrame, "to_parquet", _parquet_then_fail)
    with pytest.raises(OSError, match="simulated"):
        store.write_index([{"run_id": "a", "status": "complete"}])
    monkeypatch.undo()
    assert not (Path(store.path) / "index.parquet").exists() and _tmp_files(store.path) == []
    assert store.read_index().empty


def test_write_qa_table_cut_short_leaves_the_previous_table(store, monkeypatch):
    from fmri_data.qa.table import read_qa_table, write_qa_table

    assert write_qa_table(store) == len(store.run_ids())
    before = read_qa_table(store)
    monkeypatch.setattr(pd.DataFrame, "to_parquet", _parquet_then_fail)
    with pytest.raises(OSError, match="simulated"):
        write_qa_table(store)
    monkeypatch.undo()
    pd.testing.assert_frame_equal(read_qa_table(store), before)
    assert _tmp_files(store.path) == []


def test_write_file_on_object_storage_writes_nothing_when_cut_short(monkeypatch):
    """Other fsspec filesystems (here ``memory://``): the content goes in one PUT, after ``write`` returned."""
    import fsspec

    store = Store("memory://atomic-test.zarr")
    store.write_bytes("index.parquet", b"old")

    def half_then_fail(fh):
        fh.write(b"ne")
        raise OSError("disk full (simulated)")

    with pytest.raises(OSError, match="simulated"):
        store.write_file("index.parquet", half_then_fail)
    fs = fsspec.filesystem("memory")
    assert fs.cat_file(f"{store.path}/index.parquet") == b"old"
    store.write_file("index.parquet", lambda fh: fh.write(b"new"))
    assert fs.cat_file(f"{store.path}/index.parquet") == b"new"
    fs.rm(store.path, recursive=True)


# ----------------------------------------------------------------------------- one place for writes
def test_no_store_write_outside_the_store_package():
    """Opening groups for writing and moving or removing store paths happen in fmri_data/store/ only."""
    pattern = re.compile(r"open_group\([^)]*mode=\"(w|w-|a|r\+)\"|\bfs\.(mv|rm|pipe_file|pipe|put|copy)\(")
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "store" and path.parent.parent == PACKAGE:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
