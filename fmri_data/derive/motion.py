"""Head motion: framewise displacement, censoring (scrubbing) and the motion penalty of window scores.

Framewise displacement ``FD(t)`` (Power et al. 2012, NeuroImage 59:2142: ``|d trans_x| +
|d trans_y| + |d trans_z| + 50 mm * (|d rot_x| + |d rot_y| + |d rot_z|)``, rotations in
radians, ``FD(0) = 0``) from the fMRIPrep confounds at the source TR; frames with
``FD > 0.5 mm`` are censored together with the frame before and the two after (Power et
al. 2012 scrubbing). A window's score is divided by ``1 + n_censored``, ``n_censored`` the
censored source frames whose times fall within the window's time span
(:func:`window_source_frames`).
"""

from __future__ import annotations


import numpy as np

from ..errors import SettingError



#: fMRIPrep confounds columns FD is computed from (rotations in radians, translations in mm).
MOTION_COLUMNS = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")
#: Suffix of a motion-penalised scorer name: ``dvars_motion_penalized``.
MOTION_SUFFIX = "_motion_penalized"


def framewise_displacement(columns: list[str], confounds: np.ndarray, radius_mm: float = 50.0) -> np.ndarray:
    """Framewise displacement (Power et al. 2012) from fMRIPrep motion parameters.

    ``FD(t) = sum |Δ trans| + radius * sum |Δ rot|`` (rotations in radians projected on a
    sphere of ``radius_mm``), ``FD(0) = 0``.

    Args:
        columns: confounds column names; must include ``trans_x trans_y trans_z rot_x
            rot_y rot_z`` (fMRIPrep names; translations in mm, rotations in radians).
        confounds: ``(T_source, C)`` values at the source TR.
        radius_mm: head radius (mm).

    Returns:
        ``(T_source,)`` float64 FD in mm.

    Raises:
        SettingError: a motion column is missing, or motion values are not finite.
    """
    missing = [c for c in MOTION_COLUMNS if c not in columns]
    if missing:
        raise SettingError(f"confounds have no {', '.join(missing)} column(s)")
    idx = [list(columns).index(c) for c in MOTION_COLUMNS]
    motion = np.asarray(confounds, dtype=np.float64)[:, idx]
    if not np.isfinite(motion).all():
        raise SettingError("motion parameters contain NaN/inf")
    delta = np.abs(np.diff(motion, axis=0))
    fd = delta[:, :3].sum(axis=1) + radius_mm * delta[:, 3:].sum(axis=1)
    return np.concatenate([[0.0], fd])


def censored_frames(fd: np.ndarray, threshold_mm: float = 0.5, before: int = 1, after: int = 2) -> np.ndarray:
    """Frames censored by FD scrubbing (Power et al. 2012): ``FD > threshold`` plus neighbours.

    Args:
        fd: ``(T,)`` framewise displacement in mm.
        threshold_mm: FD threshold (Power et al. 2012 used 0.5 mm).
        before, after: frames censored before and after each flagged frame (1 and 2 there).

    Returns:
        ``(T,)`` bool.
    """
    flagged = np.flatnonzero(np.asarray(fd) > threshold_mm)
    out = np.zeros(len(fd), dtype=bool)
    for t in flagged:
        out[max(0, t - before) : t + after + 1] = True
    return out


def window_source_frames(starts: np.ndarray, window: int, tr_s: float, source_tr_s: float, n_source: int) -> np.ndarray:
    """Source frames whose times fall within each window's time span.

    Frame ``j`` of the stored axis is at ``j * tr_s``, source frame ``i`` at
    ``i * source_tr_s`` (both start at 0 s). Window ``[s, s + W)`` spans
    ``[s * tr_s, (s + W - 1) * tr_s]``.

    Args:
        starts: ``(n,)`` window starts (stored frames); window: frames per window.
        tr_s: stored TR (s); source_tr_s: source TR (s); n_source: source frames.

    Returns:
        ``(n, 2)`` int64 ``[first, stop)`` source frame ranges (clipped to the run).
    """
    eps = 1e-6
    first = np.ceil(starts * tr_s / source_tr_s - eps).astype(np.int64)
    last = np.floor((starts + window - 1) * tr_s / source_tr_s + eps).astype(np.int64)
    first = np.clip(first, 0, n_source)
    stop = np.clip(last + 1, first, n_source)
    return np.stack([first, stop], axis=1) if len(starts) else np.zeros((0, 2), dtype=np.int64)


def motion_penalize(scores: np.ndarray, censored: np.ndarray, ranges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Divide each window's score by ``1 + n_censored`` (see module docstring).

    Args:
        scores: ``(n,)`` scores ``>= 0``.
        censored: ``(T_source,)`` bool from :func:`censored_frames`.
        ranges: ``(n, 2)`` source frame ranges from :func:`window_source_frames`.

    Returns:
        ``(penalised (n,) float64, n_censored (n,) int64)``.

    Raises:
        SettingError: a negative score (the penalty would promote it).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if (scores < 0).any():
        raise SettingError("motion penalty needs scores >= 0")
    n_censored = np.array([int(censored[a:b].sum()) for a, b in ranges], dtype=np.int64)
    return scores / (1.0 + n_censored), n_censored

MOTION_DESCRIPTION = (
    "; divided by 1 + the number of source frames in the window censored by FD scrubbing (FD > {threshold} mm "
    "plus 1 frame before and 2 after; FD from trans_x..rot_z, rotations x 50 mm; Power et al. 2012)"
)


def split_motion(name: str) -> tuple[str, bool]:
    """``"dvars_motion_penalized"`` -> ``("dvars", True)``; ``"dvars"`` -> ``("dvars", False)``."""
    if name.endswith(MOTION_SUFFIX):
        return name[: -len(MOTION_SUFFIX)], True
    return name, False

