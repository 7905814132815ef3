"""The one window grid: which ``W``-frame windows, every ``S`` frames, a run of ``T`` frames has.

Windows (stored time axis, frame ``j`` at ``j * tr_s`` seconds): ``W`` frames starting
every ``S`` frames, ``starts = 0, S, 2S, ...`` while ``start + W <= T``. The last
``T - starts[-1] - W`` frames (fewer than ``S``) are in no window; a run shorter than
``W`` has no window. The loader's sliding windows and the saliency scorers both use it.
"""

from __future__ import annotations


import numpy as np

from ..errors import SettingError




def window_starts(n_frames: int, window: int, stride: int, *, min_window: int = 2) -> np.ndarray:
    """Start frames of the windows of a run (the one window grid of scorers and loaders).

    Args:
        n_frames: frames of the run ``T``.
        window: frames per window ``W`` (>= ``min_window``: 2 for saliency scores, which
            need frame differences; the loader's windows may be single frames).
        stride: frames between window starts ``S`` (>= 1).

    Returns:
        ``(n_windows,)`` int64: ``0, S, 2S, ...`` with ``start + W <= T`` (empty when ``T < W``).

    Raises:
        SettingError: ``window < min_window`` or ``stride < 1``.
    """
    if window < min_window or stride < 1:
        raise SettingError(f"window must be >= {min_window} and stride >= 1 frames (got window={window}, stride={stride})")
    if n_frames < window:
        return np.zeros(0, dtype=np.int64)
    return np.arange(0, n_frames - window + 1, stride, dtype=np.int64)

