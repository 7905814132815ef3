"""Creating, joining and overwriting a store: nothing the user owns is deleted, and
converters started together on a new path share one store (synthetic folders; no real data)."""

from __future__ import annotations

import json
import threading

import pytest

from fmri_data.config.recipe import load_recipe, recipe_hash
from fmri_data.errors import StoreError
from fmri_data.store.root import Store

RECIPE = load_recipe("default")
HASH = recipe_hash(RECIPE)


def test_overwrite_refuses_a_folder_that_only_looks_like_a_store(tmp_path):
    """A zarr group whose attributes hold schema_version is not a store: --overwrite keeps it
    (it used to be deleted) and the refusal says why in one line."""
    out = tmp_path / "o.zarr"
    (out / "labels").mkdir(parents=True)
    (out / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                               "attributes": {"schema_version": "0.5"}}))
    (out / "labels" / "notes.txt").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(StoreError, match=r"exists and is not an fmri-data store \(its root attributes"):
            Store.create(str(out), RECIPE, HASH, overwrite=overwrite)
    assert (out / "labels" / "notes.txt").read_text() == "x"


def test_overwrite_refuses_a_store_holding_files_fmri_data_did_not_write(tmp_path):
    out = tmp_path / "s.zarr"
    Store.create(str(out), RECIPE, HASH)
    (out / "my_notes.md").write_text("keep me")
    (out / "runs" / "stray.txt").write_text("keep me too")
    other = load_recipe("fmri_lm")
    with pytest.raises(StoreError, match=r"not overwritten: it holds my_notes\.md, runs/stray\.txt"):
        Store.create(str(out), other, recipe_hash(other), overwrite=True)
    assert (out / "my_notes.md").read_text() == "keep me" and (out / "runs" / "stray.txt").exists()
    (out / "my_notes.md").unlink()
    (out / "runs" / "stray.txt").unlink()
    store = Store.create(str(out), other, recipe_hash(other), overwrite=True)  # only fmri-data files: replaced
    assert store.attrs["recipe_hash"] == recipe_hash(other)


def test_converters_started_together_share_one_new_store(tmp_path):
    """Creators racing on a fresh path: one creates, the others join; nobody wipes anybody
    (it used to be check-then-create with mode 'w': 'Directory not empty' or a wiped group)."""
    for trial in range(10):
        out = str(tmp_path / f"race{trial}.zarr")
        barrier = threading.Barrier(3)
        errors, stores = [], []

        def create():
            barrier.wait()
            try:
                store = Store.create(out, RECIPE, HASH)
                store.root.require_group(f"runs/mine-{threading.get_ident()}")
                stores.append(store)
            except Exception as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)

        threads = [threading.Thread(target=create) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        reopened = Store.open(out)
        assert reopened.attrs["recipe_hash"] == HASH
        assert len([k for k in reopened.root["runs"].group_keys() if k.startswith("mine-")]) == 3
