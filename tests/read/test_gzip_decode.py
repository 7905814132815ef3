"""`.nii.gz` voxels decoded with the fastest available gzip decoder (python-isal's igzip)
through nibabel's file-object hook: same values as nibabel's default path, same errors.

Real files of ../shared/data only; the corruptions below are made from them.
"""

import itertools
import zlib
from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import numpy as np
import pytest
from conftest import DS_REAL, haxby_run

from fmri_data.errors import InputError
from fmri_data.read import common
from fmri_data.read.nifti import open_volume

ME1_PREPROC = DS_REAL / "derivatives/preproc/sub-me1/func/sub-me1_task-visual_desc-preproc_bold.nii.gz"
ME1_RAW = DS_REAL / "sub-me1/func/sub-me1_task-visual_bold.nii.gz"
REAL_RUNS = [ME1_PREPROC, ME1_RAW, haxby_run(1), haxby_run(7)]


def _nibabel_default(path, start, stop):
    """nibabel's own path (``nib.load``, the standard library's gzip), in RAS+ as VolumeSeries gives it."""
    canonical = nib.as_closest_canonical(nib.load(path))
    return np.asarray(canonical.dataobj[..., start:stop], dtype=np.float32)


def test_fastest_decoder_is_used():
    assert common.gzip_decoder() == "isal"  # a core dependency
    vol = open_volume(ME1_PREPROC)
    from isal.igzip import IGzipFile

    assert isinstance(vol._img.dataobj.file_like, IGzipFile)  # one persistent isal stream, not a path


@pytest.mark.parametrize("path", REAL_RUNS, ids=lambda p: p.name)
def test_blocks_in_random_order_are_bit_identical_to_nibabel(path):
    vol = open_volume(path)
    whole = _nibabel_default(path, 0, vol.n_frames)
    rng = np.random.default_rng(16)
    edges = np.unique(np.r_[0, rng.integers(1, vol.n_frames, 6), vol.n_frames])
    blocks = list(itertools.pairwise(edges))
    for i in rng.permutation(len(blocks)):  # backward seeks restart the stream; forward ones skip ahead
        start, stop = blocks[i]
        block = vol.read(int(start), int(stop))
        assert block.dtype == np.float32
        np.testing.assert_array_equal(block, whole[..., start:stop])
    np.testing.assert_array_equal(vol.read(3, 5), _nibabel_default(path, 3, 5))  # the same again, after the last block


def test_concurrent_reads_of_one_series_are_serialised():
    vol = open_volume(ME1_PREPROC)
    expected = _nibabel_default(ME1_PREPROC, 0, vol.n_frames)
    spans = [(a, a + 20) for a in range(0, vol.n_frames - 20, 10)][::-1]
    with ThreadPoolExecutor(2) as pool:
        blocks = list(pool.map(lambda s: vol.read(*s), spans))
    for (a, b), block in zip(spans, blocks):
        np.testing.assert_array_equal(block, expected[..., a:b])


def test_standard_library_fallback(monkeypatch):
    monkeypatch.setattr(common, "_isal_igzip", None)
    monkeypatch.setattr(common, "_indexed_gzip", None)
    assert common.gzip_decoder() == "gzip"
    vol = open_volume(ME1_PREPROC)
    assert isinstance(vol._img.dataobj.file_like, str)  # nibabel's default opener on the path
    np.testing.assert_array_equal(vol.read(40, 60), _nibabel_default(ME1_PREPROC, 40, 60))


def _one_line_input_error(vol, name):
    with pytest.raises(InputError, match=f"{name}: truncated or corrupt") as info:
        vol.read()
    assert "\n" not in str(info.value)


def test_truncated_gz_is_one_line_input_error(tmp_path):
    raw = ME1_PREPROC.read_bytes()
    for cut in (len(raw) // 3, len(raw) - 9):  # mid-stream, and only the gzip trailer missing
        path = tmp_path / f"cut-{cut}.nii.gz"
        path.write_bytes(raw[:cut])
        vol = open_volume(path)  # the header is intact
        _one_line_input_error(vol, path.name)


def test_corrupt_deflate_data_is_one_line_input_error(tmp_path):
    raw = bytearray(ME1_PREPROC.read_bytes())
    raw[600260 : 600260 + 64] = b"\xff" * 64  # an invalid deflate block inside the voxel data (found by trying offsets)
    path = tmp_path / "corrupt.nii.gz"
    path.write_bytes(bytes(raw))
    with pytest.raises(zlib.error):  # the standard library agrees that the stream is corrupt
        zlib.decompress(bytes(raw), wbits=31)
    _one_line_input_error(open_volume(path), path.name)
