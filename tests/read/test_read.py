import gzip

import nibabel as nib
import numpy as np
import pytest

from conftest import DS_REAL, HCP_PTSERIES, haxby_run
from fmri_data.errors import InputError
from fmri_data.read.cifti import open_cifti
from fmri_data.read.gifti import open_gifti_series
from fmri_data.read.nifti import open_volume, read_image_3d
from fmri_data.read.tables import read_confounds, read_events
from fmri_data.read.common import resolve_tr

GIFTI_L = (
    DS_REAL
    / "derivatives/preproc/sub-010188/ses-02/func/sub-010188_ses-02_task-rest_acq-AP_run-01_hemi-L_space-fsaverage5_bold.func.gii"
)


def test_volume_reads_lazily_in_ras_order():
    vol = open_volume(haxby_run(1))  # stored LAS on disk
    canonical = nib.as_closest_canonical(nib.load(haxby_run(1)))
    assert vol.shape == canonical.shape and nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    np.testing.assert_array_equal(vol.affine, canonical.affine)
    np.testing.assert_array_equal(vol.read(10, 17), canonical.get_fdata(dtype=np.float32)[..., 10:17])
    blocks = list(vol.iter_frames(50))
    assert [(a, b) for a, b, _ in blocks] == [(0, 50), (50, 100), (100, 121)]


def test_left_right_flip_is_resolved(tmp_path):
    """An LAS and an RAS file of the same data must read identically; a real flip must not."""
    img = nib.load(haxby_run(2))
    data = np.asarray(img.dataobj)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = data.shape[0] - 1
    ras = nib.Nifti1Image(data[::-1], img.affine @ flip, img.header)
    nib.save(ras, tmp_path / "ras.nii.gz")
    a, b = open_volume(haxby_run(2)), open_volume(tmp_path / "ras.nii.gz")
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S") and nib.aff2axcodes(ras.affine) == ("R", "A", "S")
    np.testing.assert_allclose(a.affine, b.affine)
    np.testing.assert_array_equal(a.read(), b.read())
    # the same voxels with the LAS affine claimed as RAS is a genuine flip: data must differ
    wrong = nib.Nifti1Image(data, img.affine @ flip, img.header)
    nib.save(wrong, tmp_path / "wrong.nii.gz")
    assert not np.array_equal(open_volume(tmp_path / "wrong.nii.gz").read(), a.read())


def test_scaling_is_applied(tmp_path):
    # synthetic: a precise slope/intercept must come back exactly
    raw = np.arange(2 * 3 * 4 * 5, dtype=np.int16).reshape(2, 3, 4, 5)
    img = nib.Nifti1Image(raw, np.eye(4))
    img.header.set_slope_inter(0.5, 10.0)
    nib.save(img, tmp_path / "scaled.nii")
    np.testing.assert_allclose(open_volume(tmp_path / "scaled.nii").read(), raw * 0.5 + 10.0)


@pytest.mark.parametrize("units, value, expected", [("sec", 2.0, 2.0), ("msec", 2000.0, 2.0), ("usec", 720000.0, 0.72)])
def test_header_tr_units(tmp_path, units, value, expected):
    img = nib.Nifti1Image(np.zeros((2, 2, 2, 3), dtype=np.float32), np.eye(4))
    img.header.set_xyzt_units("mm", units)
    img.header["pixdim"][4] = value
    nib.save(img, tmp_path / "tr.nii")
    vol = open_volume(tmp_path / "tr.nii")
    assert vol.header_tr_s == pytest.approx(expected)
    tr, warnings = resolve_tr(vol.path, {}, vol.header_tr_s, vol.header_time_unit)
    assert tr == pytest.approx(expected) and warnings


def test_resolve_tr_rules():
    assert resolve_tr("f", {"RepetitionTime": 2.5}, 2.5) == (2.5, [])
    tr, warnings = resolve_tr("f", {"RepetitionTime": 2.0}, 3.0)
    assert tr == 2.0 and "disagrees" in warnings[0]
    assert resolve_tr("f", {}, 2000.0, "unknown")[0] == 2.0
    with pytest.raises(InputError, match="f: no repetition time"):
        resolve_tr("f", {}, None)
    with pytest.raises(InputError, match="BIDS requires seconds"):
        resolve_tr("f", {"RepetitionTime": 2000}, None)


def test_corrupt_inputs_name_the_file(tmp_path):
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(haxby_run(1).read_bytes()[:30000])
    vol = open_volume(truncated)  # the header is intact ...
    with pytest.raises(InputError, match="truncated.nii.gz: truncated or corrupt"):
        vol.read()  # ... the data is not
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"not a nifti" * 100))
    with pytest.raises(InputError, match="garbage.nii.gz: cannot read image header"):
        open_volume(garbage)
    three_d = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((3, 3, 3), np.float32), np.eye(4)), three_d)
    with pytest.raises(InputError, match="3D image .* expected a 4D BOLD series"):
        open_volume(three_d)
    with pytest.raises(InputError, match="file not found"):
        open_volume(tmp_path / "nope.nii.gz")
    data, affine = read_image_3d(three_d)
    assert data.shape == (3, 3, 3)


def test_nifti2_is_read(tmp_path):
    data = np.random.default_rng(0).normal(size=(4, 5, 6, 7)).astype(np.float32)
    nib.save(nib.Nifti2Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "n2.nii")
    np.testing.assert_array_equal(open_volume(tmp_path / "n2.nii").read(), data)


def test_gifti_lazy_reader_matches_nibabel():
    series = open_gifti_series(GIFTI_L)
    reference = np.stack([d.data for d in nib.load(GIFTI_L).darrays], axis=1)
    assert (series.n_vertices, series.n_frames) == reference.shape == (10242, 652)
    np.testing.assert_array_equal(series.read(300, 310), reference[:, 300:310])
    np.testing.assert_array_equal(series.read(), reference)


@pytest.mark.parametrize("encoding", ["ASCII", "Base64Binary", "GZipBase64Binary"])
def test_gifti_encodings_and_single_array(tmp_path, encoding):
    # synthetic: a known (vertices x frames) matrix stored as one 2D data array
    values = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    darray = nib.gifti.GiftiDataArray(values, intent="NIFTI_INTENT_TIME_SERIES", datatype="NIFTI_TYPE_FLOAT32", encoding=encoding)
    nib.save(nib.GiftiImage(darrays=[darray]), tmp_path / "one.func.gii")
    np.testing.assert_array_equal(open_gifti_series(tmp_path / "one.func.gii").read(1, 4), values[:, 1:4])


def test_gifti_truncated(tmp_path):
    bad = tmp_path / "bad.func.gii"
    bad.write_bytes(GIFTI_L.read_bytes()[:200000])
    with pytest.raises(InputError, match="bad.func.gii: truncated GIFTI"):
        open_gifti_series(bad)


def test_cifti_parcels():
    cifti = open_cifti(HCP_PTSERIES)
    assert (cifti.kind, cifti.n_frames, cifti.tr_s, len(cifti.names)) == ("parcels", 1200, 0.72, 419)
    assert cifti.names[0] == "17Networks_LH_VisCent_ExStr_1" and cifti.names[-1] == "DIENCEPHALON_VENTRAL_RIGHT"
    np.testing.assert_array_equal(cifti.read(5, 9), np.asarray(nib.load(HCP_PTSERIES).dataobj[5:9], dtype=np.float32))


def test_tables():
    events = read_events(DS_REAL / "sub-haxby1/func/sub-haxby1_task-objectviewing_run-01_events.tsv")
    assert events[1] == {"onset": 52.5, "duration": 22.5, "trial_type": "face"}
    columns, values = read_confounds(
        DS_REAL / "derivatives/preproc/sub-haxby1/func/sub-haxby1_task-objectviewing_run-01_desc-confounds_timeseries.tsv"
    )
    assert columns == ["rot_x", "rot_y", "rot_z", "trans_x", "trans_y", "trans_z"] and values.shape == (121, 6)


def test_events_onsets_must_be_numbers(tmp_path):
    """Synthetic events tables (a known bad cell): a non-numeric onset fails at read time
    naming the file, column and row, instead of later in the loader naming no run."""
    good = tmp_path / "good_events.tsv"
    good.write_text("onset\tduration\ttrial_type\n0\tn/a\tface\n2.5\t1\thouse\n")
    assert read_events(good) == [{"onset": 0.0, "duration": None, "trial_type": "face"},
                                 {"onset": 2.5, "duration": 1.0, "trial_type": "house"}]
    bad = tmp_path / "bad_events.tsv"
    bad.write_text("onset\tduration\ttrial_type\n0\t1\tface\nten\t1\thouse\n")
    with pytest.raises(InputError, match=r"bad_events\.tsv: events column 'onset' is not a number .* row 3: 'ten'"):
        read_events(bad)
    missing = tmp_path / "missing_events.tsv"
    missing.write_text("onset\tduration\nn/a\t1\n")
    with pytest.raises(InputError, match="onset"):
        read_events(missing)
