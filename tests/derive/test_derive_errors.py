"""Invalid arguments of derive/ raise :class:`fmri_data.errors.SettingError` (still a ValueError)."""

from __future__ import annotations

import pytest

from fmri_data.derive.windows import window_starts
from fmri_data.errors import FmriDataError, SettingError


def test_bad_window_setting_is_a_setting_error():
    with pytest.raises(SettingError, match="stride >= 1") as info:
        window_starts(100, 10, 0)
    assert isinstance(info.value, ValueError) and isinstance(info.value, FmriDataError)
