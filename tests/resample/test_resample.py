"""Resampling agrees with the references (scipy.ndimage, nilearn, scipy.signal/interpolate)."""

import nibabel as nib
import numpy as np
import pytest
from nilearn.image import resample_img
from scipy import interpolate, ndimage, signal

from conftest import HCP_PTSERIES, ME1_PREPROC, haxby_run
from fmri_data.reference.grids import template_grid
from fmri_data.read.cifti import open_cifti
from fmri_data.read.nifti import open_volume
from fmri_data.resample import grid_indices, resample_tr, resample_volume, resampling_matrix, source_coordinates

TARGET = template_grid("MNI152NLin6Asym", 2).crop_or_pad((96, 96, 96))


def _reference(data, affine, shape, target_affine, order):
    coords = source_coordinates(affine, target_affine, grid_indices(shape)).T
    return ndimage.map_coordinates(data.astype(np.float64), coords, order=order, mode="constant", cval=0.0).reshape(shape)


def _tolerance(data):
    return 1e-4 * float(data.max() - data.min())


@pytest.mark.parametrize("path", [haxby_run(4), ME1_PREPROC / "sub-me1_task-visual_desc-preproc_bold.nii.gz"])
def test_trilinear_matches_scipy_and_nilearn_on_real_runs(path):
    vol = open_volume(path)
    frames = vol.read(0, 3)
    ours = resample_volume(frames, vol.affine, TARGET.shape, TARGET.affine, order=1)
    img = nib.Nifti1Image(frames, vol.affine)
    nilearn = resample_img(img, target_affine=TARGET.affine, target_shape=TARGET.shape, interpolation="linear", force_resample=True, copy_header=True)
    nilearn = nilearn.get_fdata()
    tol = _tolerance(frames)
    for t in range(frames.shape[3]):
        reference = _reference(frames[..., t], vol.affine, TARGET.shape, TARGET.affine, 1)
        assert np.abs(ours[..., t] - reference).max() <= tol
        assert np.abs(ours[..., t] - nilearn[..., t]).max() <= tol
    assert np.count_nonzero(ours) > 0.05 * ours.size


def _oblique_affines():
    rng = np.random.default_rng(7)
    out = []
    for zooms, flips in [((2.0, 2.0, 2.0), (1, 1, 1)), ((3.5, 3.5, 4.2), (-1, 1, 1)), ((1.7, 2.9, 3.3), (-1, -1, 1))]:
        angles = rng.uniform(-0.4, 0.4, size=3)
        rx = np.array([[1, 0, 0], [0, np.cos(angles[0]), -np.sin(angles[0])], [0, np.sin(angles[0]), np.cos(angles[0])]])
        ry = np.array([[np.cos(angles[1]), 0, np.sin(angles[1])], [0, 1, 0], [-np.sin(angles[1]), 0, np.cos(angles[1])]])
        rz = np.array([[np.cos(angles[2]), -np.sin(angles[2]), 0], [np.sin(angles[2]), np.cos(angles[2]), 0], [0, 0, 1]])
        affine = np.eye(4)
        affine[:3, :3] = rx @ ry @ rz @ np.diag(np.array(zooms) * np.array(flips))
        affine[:3, 3] = rng.uniform(-70, -50, size=3) * np.array(flips)
        out.append(affine)
    return out


@pytest.mark.parametrize("affine", _oblique_affines())
@pytest.mark.parametrize("order", [0, 1])
def test_oblique_anisotropic_and_flipped_affines(affine, order):
    # real voxel values from a real run, placed on rotated / LAS / anisotropic grids
    data = open_volume(ME1_PREPROC / "sub-me1_task-visual_desc-preproc_bold.nii.gz").read(0, 1)[..., 0]
    ours = resample_volume(data, affine, TARGET.shape, TARGET.affine, order=order)
    reference = _reference(data, affine, TARGET.shape, TARGET.affine, order)
    mismatch = np.abs(ours - reference) > _tolerance(data)
    # nearest neighbour may round exact .5 ties differently only through float noise
    assert mismatch.mean() < (1e-5 if order == 0 else 1e-9)
    assert np.count_nonzero(ours) > 1000


def test_matrix_rows_are_partitions_of_unity_inside_the_source():
    vol = open_volume(haxby_run(1))
    ijk = grid_indices(TARGET.shape)
    matrix = resampling_matrix(vol.shape[:3], vol.affine, ijk, TARGET.affine, order=1)
    sums = np.asarray(matrix.sum(axis=1)).ravel()
    assert np.all((np.abs(sums - 1) < 1e-9) | (sums == 0)) and (sums > 0).any()
    assert matrix.getnnz(axis=1).max() <= 8


@pytest.fixture(scope="module")
def hcp():
    return open_cifti(HCP_PTSERIES).read()  # (1200, 419) real HCP parcel series, TR 0.72 s


def test_temporal_linear_and_cubic_match_scipy(hcp):
    t_in = np.arange(hcp.shape[0]) * 0.72
    out = resample_tr(hcp, 0.72, 0.5, "linear")  # upsampling: no anti-aliasing
    t_out = np.arange(out.shape[0]) * 0.5
    np.testing.assert_allclose(out, interpolate.interp1d(t_in, hcp, axis=0)(t_out), rtol=0, atol=1e-4 * np.ptp(hcp))
    out = resample_tr(hcp, 0.72, 0.5, "cubic")
    np.testing.assert_allclose(out, interpolate.CubicSpline(t_in, hcp, axis=0)(t_out), rtol=0, atol=1e-4 * np.ptp(hcp))
    assert out.shape[0] == int((1199 * 0.72) // 0.5) + 1


def test_antialiased_decimation_matches_resample_poly(hcp):
    # TR 0.72 -> 1.44 (factor 2): output samples sit on input samples, so the result is
    # the FIR-filtered series decimated; away from the edges it equals scipy's polyphase
    # resampler with the same Kaiser filter.
    ours = resample_tr(hcp, 0.72, 1.44, "linear", antialias=True)
    theirs = signal.resample_poly(hcp.astype(np.float64), 1, 2, axis=0, window=("kaiser", 5.0))
    edge = 20
    np.testing.assert_allclose(ours[edge:-edge], theirs[edge : ours.shape[0] - edge], rtol=0, atol=1e-4 * np.ptp(hcp))
    # without anti-aliasing it is plain decimation
    np.testing.assert_allclose(resample_tr(hcp, 0.72, 1.44, antialias=False), hcp[::2], atol=1e-5)


def test_antialiasing_removes_frequencies_above_the_new_nyquist():
    # synthetic: a 0.4 Hz sine sampled at TR 0.72 s is above the 0.25 Hz Nyquist of TR 2.0 s
    t = np.arange(1000) * 0.72
    slow, fast = np.sin(2 * np.pi * 0.05 * t), np.sin(2 * np.pi * 0.4 * t)
    out = resample_tr(np.c_[slow, fast], 0.72, 2.0)
    interior = slice(20, -20)
    assert np.std(out[interior, 1]) < 0.02  # aliased energy removed
    assert np.std(out[interior, 0]) > 0.65  # passband kept (std of a unit sine = 0.707)
    assert np.std(resample_tr(fast[:, None], 0.72, 2.0, antialias=False)[interior]) > 0.3  # would alias


def test_same_tr_is_identity(hcp):
    np.testing.assert_array_equal(resample_tr(hcp, 0.72, 0.72), hcp)
