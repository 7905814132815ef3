"""The model grids of temporal resampling against what each reference really computes.

Synthetic series with known answers (random data where the reference itself is run in the
same process: torch's ``interpolate``; closed forms for frame counts, linear ramps and the
Chebyshev filter's DC gain).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmri_data.errors import SettingError
from fmri_data.resample.temporal import n_output_frames, output_times, resample_tr, temporal_operator


@pytest.mark.parametrize(("n", "tr", "expected"), [(64, 2.0, 160), (121, 2.5, 378), (160, 2.0, 400), (1200, 0.72, 1080)])
def test_neurostorm_frame_count_is_round_t_tr_over_0_8(n, tr, expected):
    """NeuroSTORM preprocessing_volume.py: new_t = max(int(np.round(T * TR / 0.8)), 1)."""
    assert n_output_frames(n, tr, 0.8, "neurostorm") == expected == max(int(np.round(n * tr / 0.8)), 1)


@pytest.mark.parametrize(("n", "tr"), [(64, 2.0), (121, 2.5), (50, 0.72), (7, 0.5)])
def test_neurostorm_grid_equals_torch_linear_interpolate_align_corners_false(n, tr):
    """The series NeuroSTORM feeds its model: F.interpolate(mode='linear', align_corners=False)
    along time, voxel by voxel, to round(T * TR / 0.8) frames."""
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, 37)).astype(np.float32)
    n_out = max(int(np.round(n * tr / 0.8)), 1)
    expected = torch.nn.functional.interpolate(torch.from_numpy(x.T[None]), size=n_out, mode="linear",
                                               align_corners=False)[0].numpy().T
    for method in ("reference", "numba"):
        got = resample_tr(x, tr, 0.8, "linear", False, method=method, grid="neurostorm")
        # torch computes the source positions in float32 (~T * 6e-8 frames off): 5e-5 on unit-variance data
        np.testing.assert_allclose(got, expected, atol=5e-5)


def test_fmri_lm_grid_on_the_hcp_series_length():
    """fMRI-LM temporal_resample.py: dur = TR * (T - 1); linspace(0, dur, int(np.round(dur / 2)) + 1);
    interp1d linear, no anti-aliasing. 1200 frames at 0.72 s -> 433 frames."""
    assert n_output_frames(1200, 0.72, 2.0, "fmri_lm") == 433
    times = output_times(1200, 0.72, 2.0, "fmri_lm")
    np.testing.assert_allclose(times, np.linspace(0, 0.72 * 1199, 433))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1200, 5))
    expected = np.stack([np.interp(times, np.arange(1200) * 0.72, col) for col in x.T], axis=1)
    for method in ("reference", "numba"):
        np.testing.assert_allclose(resample_tr(x, 0.72, 2.0, "linear", False, method=method, grid="fmri_lm"),
                                   expected, atol=1e-5)


def test_fmri_fm_grid_pchip_and_frame_count():
    """fmri-fm resample_timeseries: int(T * tr / new_tr) frames at j * new_tr, PCHIP (exact on a
    line, extrapolating past the source span); 652 frames at 1.4 s -> 912 frames at 1.0 s."""
    assert n_output_frames(652, 1.4, 1.0, "fmri_fm") == 912
    t = np.arange(652) * 1.4
    x = np.stack([3.0 * t + 1.0, -0.5 * t], axis=1)
    got = resample_tr(x, 1.4, 1.0, "pchip", "cheby1", grid="fmri_fm")  # upsampling: no filter
    tt = np.arange(912) * 1.0
    np.testing.assert_allclose(got, np.stack([3.0 * tt + 1.0, -0.5 * tt], axis=1), rtol=1e-6, atol=1e-3)


def test_fmri_fm_cheby1_dc_gain():
    """Going from 0.72 s to 1.0 s, fmri-fm low-passes with cheby1(8, 0.05 dB) forward and
    backward: an even-order Chebyshev I passes DC at the bottom of its ripple, so a constant
    series comes out scaled by 10 ** (-2 * 0.05 / 20) (~0.9886), as the reference's does."""
    x = np.full((1200, 3), 5.0)
    got = resample_tr(x, 0.72, 1.0, "pchip", "cheby1", grid="fmri_fm")
    assert got.shape == (864, 3)
    np.testing.assert_allclose(got[100:-100], 5.0 * 10 ** (-2 * 0.05 / 20), rtol=1e-4)


def test_pchip_has_no_operator_and_settings_are_checked():
    with pytest.raises(SettingError, match="pchip"):
        temporal_operator(10, 1.0, 2.0, "pchip", False, "exact")
    with pytest.raises(SettingError, match="unknown temporal grid"):
        resample_tr(np.zeros((10, 2)), 1.0, 2.0, grid="nope")
    with pytest.raises(SettingError, match="antialias"):
        resample_tr(np.zeros((10, 2)), 1.0, 2.0, antialias="butter")
