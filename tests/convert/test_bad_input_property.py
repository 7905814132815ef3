"""Property test: malformed inputs never crash a conversion nor corrupt the store.

Every example adds one malformed run (built from a real Haxby run, then broken in a
generated way: header fields overwritten, gzip stream truncated, wrong number of
dimensions, zero/NaN/inf data, absurd TRs, broken JSON sidecars) next to a good run. The
conversion must finish; the bad run must either fail with a one-line error naming its file
or convert into a valid run; the good run and the store must stay intact.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import struct

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import haxby_run, make_bids
from fmri_data.convert import convert
from fmri_data.store.root import Store
from fmri_data.store.validate import validate_run, verify_run_contents

RECIPE_OVERRIDES = ["volume.shape=[40,48,40]", "roi=null", "store.chunk_frames=16", "store.shard_chunks=2"]

_SOURCE = nib.load(haxby_run(9))
_DATA = np.asarray(_SOURCE.dataobj)
_AFFINE = _SOURCE.affine

# NIfTI-1 header fields (offset, struct format) that a broken writer may get wrong
HEADER_FIELDS = {
    "sizeof_hdr": (0, "<i"),
    "dim": (40, "<8h"),
    "datatype": (70, "<h"),
    "bitpix": (72, "<h"),
    "pixdim": (76, "<8f"),
    "vox_offset": (108, "<f"),
    "scl_slope": (112, "<f"),
    "scl_inter": (116, "<f"),
    "xyzt_units": (123, "<B"),
    "qform_code": (252, "<h"),
    "sform_code": (254, "<h"),
    "srow_x": (280, "<4f"),
    "magic": (344, "4s"),
}

floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, -1.0, 1e30, 1e-30]))
ints16 = st.integers(min_value=-(2**15), max_value=2**15 - 1)


@st.composite
def header_corruption(draw):
    name = draw(st.sampled_from(sorted(HEADER_FIELDS)))
    offset, fmt = HEADER_FIELDS[name]
    n = struct.calcsize(fmt)
    if fmt.endswith("s"):
        value = struct.pack(fmt, draw(st.binary(min_size=4, max_size=4)))
    elif fmt[-1] in "hiB":
        count = int(fmt[1:-1] or 1)
        lo, hi = (0, 255) if fmt[-1] == "B" else (-(2**15), 2**15 - 1)
        value = struct.pack(fmt, *[draw(st.integers(lo, hi)) for _ in range(count)])
    else:
        count = int(fmt[1:-1] or 1)
        value = struct.pack(fmt, *[draw(floats) for _ in range(count)])
    return ("header", name, offset, value[:n])


malformation = st.one_of(
    header_corruption(),
    st.tuples(st.just("truncate"), st.floats(0.0, 0.99)),
    st.tuples(st.just("dims"), st.sampled_from([1, 2, 3, 5])),
    st.tuples(st.just("values"), st.sampled_from(["zeros", "nan", "inf", "constant", "huge"])),
    st.tuples(st.just("tr"), st.one_of(floats, st.text(max_size=5), st.just(None), st.lists(st.integers(), max_size=2))),
    st.tuples(st.just("sidecar"), st.floats(0.0, 0.95), st.text(max_size=20)),
)


def _nifti_bytes(data: np.ndarray, gz: bool) -> bytes:
    img = nib.Nifti1Image(data, _AFFINE)
    img.header.set_xyzt_units("mm", "sec")
    buffer = io.BytesIO()
    file_map = img.make_file_map({"image": buffer, "header": buffer})
    img.to_file_map(file_map)
    raw = buffer.getvalue()
    return gzip.compress(raw, mtime=0) if gz else raw


def _bad_files(kind) -> tuple[str, bytes, bytes | None]:
    """``(bold file suffix, bold bytes, sidecar bytes or None)`` for one malformation."""
    sidecar = json.dumps({"RepetitionTime": 2.5}).encode()
    if kind[0] == "header":
        _, _, offset, value = kind
        raw = bytearray(_nifti_bytes(_DATA, gz=False))
        raw[offset : offset + len(value)] = value
        return ".nii", bytes(raw), sidecar
    if kind[0] == "truncate":
        raw = _nifti_bytes(_DATA, gz=True)
        return ".nii.gz", raw[: int(len(raw) * kind[1])], sidecar
    if kind[0] == "dims":
        shapes = {1: _DATA[:, 0, 0, 0], 2: _DATA[:, :, 0, 0], 3: _DATA[..., 0], 5: _DATA[..., None]}
        return ".nii.gz", _nifti_bytes(np.ascontiguousarray(shapes[kind[1]]), gz=True), sidecar
    if kind[0] == "values":
        data = _DATA.astype(np.float32)
        if kind[1] == "zeros":
            data[:] = 0
        elif kind[1] == "constant":
            data[:] = 7.0
        elif kind[1] == "huge":
            data *= 1e30
        else:
            data[1, 2, 3, 4] = np.nan if kind[1] == "nan" else np.inf
        return ".nii.gz", _nifti_bytes(data, gz=True), sidecar
    if kind[0] == "tr":
        return ".nii.gz", _nifti_bytes(_DATA, gz=True), json.dumps({"RepetitionTime": kind[1]}).encode()
    _, cut, junk = kind
    text = json.dumps({"RepetitionTime": 2.5, "TaskName": "a"})
    return ".nii.gz", _nifti_bytes(_DATA, gz=True), (text[: int(len(text) * cut)] + junk).encode()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, atlas_dir):
    root = tmp_path_factory.mktemp("property")
    dataset = make_bids(
        root / "ds",
        {"sub-good/func/sub-good_task-a_bold.nii.gz": haxby_run(9), "sub-good/func/sub-good_task-a_bold.json": '{"RepetitionTime": 2.5}'},
    )
    out = str(root / "out.zarr")
    report = convert(dataset, out, overrides=RECIPE_OVERRIDES, atlas_dir=atlas_dir, progress=False)
    assert report.results[0].status == "complete"
    checksums = Store.open(out).run_attrs("sub-good_task-a")["checksums"]
    return {"dataset": dataset, "out": out, "checksums": checksums, "count": [0]}


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(kind=malformation)
def test_malformed_input_yields_a_clear_error_or_a_valid_run(workspace, atlas_dir, kind):
    workspace["count"][0] += 1
    sub = f"bad{workspace['count'][0]:03d}"
    suffix, bold, sidecar = _bad_files(kind)
    folder = workspace["dataset"] / f"sub-{sub}" / "func"
    folder.mkdir(parents=True)
    bold_path = folder / f"sub-{sub}_task-a_bold{suffix}"
    bold_path.write_bytes(bold)
    sidecar_path = folder / f"sub-{sub}_task-a_bold.json"
    if sidecar is not None:
        sidecar_path.write_bytes(sidecar)

    report = convert(workspace["dataset"], workspace["out"], overrides=RECIPE_OVERRIDES, atlas_dir=atlas_dir, progress=False)

    results = {r.run_id: r for r in report.results}
    assert results["sub-good_task-a"].status == "exists"
    result = results[f"sub-{sub}_task-a"]
    store = Store.open(workspace["out"])
    if result.status == "failed":
        assert "\n" not in result.error
        assert re.match(rf"^({re.escape(str(bold_path))}|{re.escape(str(sidecar_path))}): \S", result.error), result.error
        assert "unexpected" not in result.error, result.error
        assert f"sub-{sub}_task-a" not in store.run_ids()
    else:
        assert result.status == "complete", (kind, result)
        assert not validate_run(store, result.run_id) and not verify_run_contents(store, result.run_id)
        assert np.isfinite(store.run(result.run_id)["bold"][...].astype(np.float32)).all()
    assert store.run_attrs("sub-good_task-a")["checksums"] == workspace["checksums"]
    assert not verify_run_contents(store, "sub-good_task-a")
    leftovers = [p for p in (workspace["dataset"].parent / "out.zarr" / "_staging").iterdir() if p.name != "zarr.json"]
    assert not leftovers
