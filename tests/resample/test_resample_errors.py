"""Invalid arguments of resample/ raise :class:`fmri_data.errors.SettingError` (still a ValueError)."""

from __future__ import annotations

import numpy as np
import pytest

from fmri_data.errors import FmriDataError, SettingError
from fmri_data.resample.temporal import resample_tr


def test_non_positive_tr_is_a_setting_error():
    with pytest.raises(SettingError, match="TRs must be positive") as info:
        resample_tr(np.zeros((10, 3), np.float32), 0.0, 1.0)
    assert isinstance(info.value, ValueError) and isinstance(info.value, FmriDataError)
