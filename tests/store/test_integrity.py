"""Nothing vanishes silently (issue 17, items 4 and 5): run groups whose ``zarr.json`` is
unreadable or lost its ``status``, run attributes edited after the commit, and a corrupt
``brain_mask`` are each reported by ``validate`` (naming the run and the file, never
stopping at the first finding), listed in ``build_index``'s ``dropped``, and named or
skipped by the loader.

Two real Haxby runs (../shared/data) are converted once into a small store (a 40x48x40
grid, no ROI series: a few seconds); each test corrupts its own copy.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import haxby_run, make_bids

from fmri_data.errors import StoreError
from fmri_data.load import ChunkError, WindowDataset, build_index
from fmri_data.store.inspect import summarize
from fmri_data.store.root import Store
from fmri_data.store.validate import validate_store

RUN1, RUN2 = "sub-01_task-a_run-01", "sub-01_task-a_run-02"
# 121 frames in shards of 32 frames (chunks of 16), 7 windows of 16 frames per run
OVERRIDES = ["volume.shape=[40,48,40]", "roi=null", "store.chunk_frames=16", "store.shard_chunks=2"]
CRC = "ValueError: Stored and computed checksum do not match."


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, atlas_dir) -> str:
    from fmri_data.convert import convert

    root = tmp_path_factory.mktemp("integrity")
    files: dict[str, Path | str] = {}
    for n in (1, 2):
        files[f"sub-01/func/sub-01_task-a_run-{n:02d}_bold.nii.gz"] = haxby_run(n)
        files[f"sub-01/func/sub-01_task-a_run-{n:02d}_bold.json"] = '{"RepetitionTime": 2.5}'
    dataset = make_bids(root / "ds", files)
    out = str(root / "out.zarr")
    report = convert(dataset, out, overrides=OVERRIDES, atlas_dir=atlas_dir, progress=False)
    assert report.count("complete") == 2, [r.error for r in report.failed]
    assert validate_store(out, deep=True) == []
    return out


@pytest.fixture
def url(small_store, tmp_path) -> str:
    copy = tmp_path / "copy.zarr"
    shutil.copytree(small_store, copy)
    return str(copy)


def _meta(url: str, run_id: str) -> Path:
    return Path(url, "runs", run_id, "zarr.json")


def _edit_attrs(url: str, run_id: str, edit) -> None:
    """Rewrite a run's attributes by hand, as a user with a text editor would."""
    path = _meta(url, run_id)
    meta = json.loads(path.read_text())
    edit(meta["attributes"])
    path.write_text(json.dumps(meta, indent=2))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- item 4: runs that vanish
def _garble(url: str) -> None:
    _meta(url, RUN1).write_text('{"zarr_format": 3, "node_type": "gro')  # cut short


def _lose_status(url: str) -> None:
    _edit_attrs(url, RUN1, lambda attrs: attrs.pop("status"))


def _remove_group(url: str) -> None:
    shutil.rmtree(Path(url, "runs", RUN1))


VANISHED = {
    "garbled": (_garble, "unreadable, not JSON (JSONDecodeError: Unterminated string starting at: line 1 column 33 (char 32))"),
    "no status": (_lose_status, "no 'status' attribute"),
    "group removed": (_remove_group, "missing"),
}


@pytest.mark.parametrize("kind", list(VANISHED))
def test_a_run_that_readers_cannot_see_is_reported_and_dropped_by_name(url, kind):
    corrupt, what = VANISHED[kind]
    corrupt(url)
    invisible = "an interrupted commit? rerun convert" if kind == "group removed" else ""
    expected = (f"{url}/runs/{RUN1}/zarr.json: {what}; run {RUN1} is invisible to readers"
                + (f" ({invisible})" if invisible else "") + "; index.parquet lists it as complete")
    assert Store.open(url).run_ids() == [RUN2]
    assert validate_store(url) == [expected]
    assert validate_store(url, deep=True) == [expected]
    assert summarize(Store.open(url))["unreadable"] == [{"run_id": RUN1, "reason": expected}]
    index = build_index(url, length=16)
    assert index.dropped == {RUN1: expected}
    assert {index.run_id(i) for i in range(len(index))} == {RUN2} and len(index) == 7
    with pytest.raises(StoreError) as err:
        build_index(url, length=16, run_ids=[RUN1])
    assert str(err.value) == expected.removesuffix("; index.parquet lists it as complete")


def test_an_unreadable_index_is_reported_and_the_runs_still_checked(url):
    Path(url, "index.parquet").write_bytes(b"PAR1 cut short")
    _lose_status(url)
    problems = validate_store(url)
    assert problems[0].startswith(f"{url}/index.parquet: unreadable (")
    assert problems[1:] == [f"{url}/runs/{RUN1}/zarr.json: no 'status' attribute; run {RUN1} is invisible to readers"]


# ----------------------------------------------------------------------------- item 4: attribute checksum
def test_attributes_edited_after_the_commit_are_reported(url):
    _edit_attrs(url, RUN1, lambda attrs: attrs.update(tr_s=25.0))  # was 2.5
    expected = (f"{url}/runs/{RUN1}/zarr.json: attributes differ from the checksum recorded at commit "
                "(attrs_sha256): edited after the commit")
    assert validate_store(url) == [expected]
    assert validate_store(url, deep=True) == [expected]
    store = Store.open(url)
    with pytest.raises(StoreError, match=rf"runs/{RUN1}/zarr.json: attributes differ from the checksum.*reconvert"):
        store.write_run_attrs(RUN1, store.run_attrs(RUN1))  # never re-signed
    assert store.run_attrs(RUN1)["tr_s"] == 25.0


def test_a_run_without_an_attribute_checksum_is_a_note_not_a_problem(url, caplog):
    _edit_attrs(url, RUN2, lambda attrs: attrs.pop("attrs_sha256"))
    notes: list[str] = []
    assert validate_store(url, deep=True, notes=notes) == []
    assert notes == [f"{url}/runs/{RUN2}/zarr.json: no attribute checksum (written by an older version)"]
    with caplog.at_level(logging.WARNING, logger="fmri_data.store.validate"):
        assert validate_store(url) == []
    assert [r.getMessage() for r in caplog.records] == notes[:1]


def test_qa_recompute_keeps_the_attribute_checksum_valid(url):
    from fmri_data.qa.recompute import recompute_qa

    before = Store.open(url).run_attrs(RUN1)
    assert recompute_qa(url, qa={"fd_threshold_mm": 0.2}) == {RUN1: "updated", RUN2: "updated"}
    after = Store.open(url).run_attrs(RUN1)
    assert after["qa"]["settings"] != before["qa"]["settings"]
    assert after["attrs_sha256"] != before["attrs_sha256"]
    assert validate_store(url) == []


# ----------------------------------------------------------------------------- value checksums
def _re_sign(url: str, run_id: str, edit) -> None:
    """Edit a run's attributes and sign them again (as fmri-data would have written them)."""
    from fmri_data.store.layout import ATTRS_CHECKSUM, attrs_digest

    def change(attrs):
        edit(attrs)
        attrs[ATTRS_CHECKSUM] = attrs_digest({k: v for k, v in attrs.items() if k != ATTRS_CHECKSUM})

    _edit_attrs(url, run_id, change)


def test_value_checksums_catch_a_validly_encoded_change_in_xxh3_and_in_older_sha256_runs(url):
    import hashlib

    from fmri_data.store.layout import ContentDigest

    bold = Store.open(url).run(RUN1)["bold"]
    values = bold[...]
    recorded = Store.open(url).run_attrs(RUN1)["checksums"]
    assert set(recorded) == {"bold", "brain_mask"} and all(v.startswith("xxh3_128:") for v in recorded.values())
    digest = ContentDigest()
    digest.update(values[:50])
    digest.update(values[50:])  # blocks along axis 0 hash as the whole array
    assert digest.value() == recorded["bold"]
    # RUN2 as written by an older version: a bare SHA-256 of the values, verified as such
    sha = hashlib.sha256(np.ascontiguousarray(Store.open(url).run(RUN2)["bold"][...]).tobytes()).hexdigest()
    _re_sign(url, RUN2, lambda attrs: attrs["checksums"].update(bold=sha))
    assert validate_store(url, deep=True) == []
    # one value changed and re-encoded by zarr (chunk CRC-32C valid): only the value checksum sees it
    for run_id in (RUN1, RUN2):
        array = zarr.open_array(str(Path(url, "runs", run_id, "bold")), mode="r+")
        array[3, 20, 24, 20] = array[3, 20, 24, 20] + np.float16(1.0)
    assert validate_store(url) == []
    assert validate_store(url, deep=True) == [
        f"{url}/runs/{run_id}/bold: contents differ from the checksum recorded at write time" for run_id in (RUN1, RUN2)]


# ----------------------------------------------------------------------------- item 5: a corrupt brain_mask
def test_a_corrupt_brain_mask_is_reported_and_the_check_goes_on(url):
    _flip_byte(Path(url, "runs", RUN1, "brain_mask", "c", "0", "0", "0"))
    _flip_byte(Path(url, "runs", RUN2, "bold", "c", "1", "0", "0", "0"))  # frames [32, 64)
    _edit_attrs(url, RUN2, lambda attrs: attrs.update(tr_s=25.0))
    mask = f"{url}/runs/{RUN1}/brain_mask: corrupt, file runs/{RUN1}/brain_mask/c/0/0/0 unreadable ({CRC}"
    edited = f"{url}/runs/{RUN2}/zarr.json: attributes differ from the checksum recorded at commit (attrs_sha256): edited after the commit"
    bold = f"{url}/runs/{RUN2}/bold: frames [32, 64) unreadable in shard file runs/{RUN2}/bold/c/1/0/0/0 ({CRC}"

    shallow = validate_store(url)
    assert len(shallow) == 2 and shallow[0].startswith(mask) and shallow[1] == edited
    deep = validate_store(url, deep=True)
    assert len(deep) == 3 and deep[0].startswith(mask) and deep[1] == edited and deep[2].startswith(bold)


def test_the_loader_names_a_corrupt_brain_mask_or_skips_its_windows(url, caplog):
    _flip_byte(Path(url, "runs", RUN1, "brain_mask", "c", "0", "0", "0"))
    index = build_index(url, length=16, array="bold")
    assert len(index) == 14 and [index.run_id(i) for i in (0, 7)] == [RUN1, RUN2]

    with pytest.raises(ChunkError) as err:
        list(WindowDataset(index, batch_size=2, shuffle=False, prefetch=0, mask="brain_mask"))
    e = err.value
    assert (e.run_id, e.array, e.frames, e.shard) == (RUN1, "brain_mask", None, f"runs/{RUN1}/brain_mask/c/0/0/0")
    assert str(e).startswith(f"{url}/runs/{RUN1}/brain_mask: file runs/{RUN1}/brain_mask/c/0/0/0: unreadable ({CRC}")

    expected_mask = Store.open(url).run(RUN2)["brain_mask"][...]
    for prefetch in (0, 2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fmri_data.load"):
            batches = list(WindowDataset(index, batch_size=2, shuffle=False, prefetch=prefetch, mask="brain_mask",
                                         on_error="skip"))
        assert [i for b in batches for i in b["index"].tolist()] == list(range(7, 14))
        assert all(np.array_equal(m.numpy(), expected_mask) for b in batches for m in b["mask"])
        skipped = [r.getMessage() for r in caplog.records]
        assert len(skipped) == 7 and all(f"runs/{RUN1}/brain_mask/c/0/0/0: unreadable ({CRC}" in m for m in skipped)


def test_a_missing_brain_mask_file_is_named_not_read_as_an_empty_mask(url):
    Path(url, "runs", RUN1, "brain_mask", "c", "0", "0", "0").unlink()
    index = build_index(url, length=16, array="bold", run_ids=[RUN1])
    with pytest.raises(ChunkError, match=rf"runs/{RUN1}/brain_mask: file runs/{RUN1}/brain_mask/c/0/0/0: file missing"):
        list(WindowDataset(index, batch_size=2, shuffle=False, prefetch=0, mask="brain_mask"))


def test_a_corrupt_saliency_array_is_named_by_validate_and_build_index(url):
    from fmri_data.saliency import score_store

    score_store(url, ["dvars"], window=16, stride=8, k=3, source=["bold"])
    assert validate_store(url) == []
    _flip_byte(Path(url, "runs", RUN1, "saliency", "dvars", "starts", "c", "0"))
    _edit_attrs(url, RUN2, lambda attrs: attrs.update(n_frames_source=12))  # was 121
    starts = f"{url}/runs/{RUN1}/saliency/dvars/starts: corrupt, file runs/{RUN1}/saliency/dvars/starts/c/0 unreadable ({CRC}"
    problems = validate_store(url)
    assert len(problems) == 2 and problems[0].startswith(starts)
    assert problems[1] == (f"{url}/runs/{RUN2}/zarr.json: attributes differ from the checksum recorded at commit "
                           "(attrs_sha256): edited after the commit")
    with pytest.raises(StoreError) as err:
        build_index(url, length=16, source="saliency", scorer="dvars")
    assert str(err.value).startswith(starts)
