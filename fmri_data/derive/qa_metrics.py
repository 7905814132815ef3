"""BOLD image-quality metrics (IQMs) of one run: small pure functions, MRIQC definitions.

Every function takes arrays with time first: ``x`` of shape ``(T, N)`` (``T`` frames,
``N`` channels: brain voxels of the source image, surface vertices or parcels), or a 3D
image ``(X, Y, Z)`` in RAS+ voxel order with a boolean brain mask of the same shape.
Sums are accumulated in float64. The series metrics work over column slabs of about
:data:`SLAB_ELEMENTS` values (:func:`column_slabs`; every per-channel step gives the same
values whatever the slab), so their temporaries stay bounded, and accept an out-of-core
``(T, N)`` series as well as an array. The definitions follow MRIQC (Esteban et al. 2017, PLoS
ONE 12:e0184661; ``mriqc.qc.functional`` / ``mriqc.qc.anatomical`` and the nipype/AFNI
tools its functional workflow calls), which in turn cite:

* tSNR (Krüger & Glover 2001): voxel-wise ``mean_t / std_t``; the IQM is the median over the brain.
* DVARS (Power et al. 2012, NeuroImage 59:2142; standardisation Nichols 2013, "Notes on
  creating a standardized version of DVARS", arXiv:1704.01469), as nipype
  ``confounds.compute_dvars`` computes them for MRIQC.
* FD (Power et al. 2012): ``sum |Δ translations| + 50 mm * sum |Δ rotations|``
  (:func:`fmri_data.derive.motion.framewise_displacement`).
* GCOR (Saad et al. 2013, Brain Connectivity 3:339; AFNI ``@compute_gcor``).
* AOR (AFNI ``3dToutcount -fraction``), AQI (AFNI ``3dTqual``).
* EFC (Atkinson et al. 1997, IEEE TMI 16:903), FBER (Shehzad et al. 2015, QAP), GSR
  (Giannelli et al. 2010, J Appl Clin Med Phys 11:170), as MRIQC implements them.
* Non-steady-state volumes: nipype ``NonSteadyStateDetector`` (modified z-score of the
  global signal, Iglewicz & Hoaglin 1993).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from ..errors import SettingError
from .motion import framewise_displacement

__all__ = [
    "automask",
    "average_ranks",
    "clip_level",
    "column_slabs",
    "dvars",
    "efc",
    "fber",
    "fd_summary",
    "frames_dropped",
    "framewise_displacement",
    "gcor",
    "ghost_to_signal",
    "global_median",
    "non_steady_state",
    "outlier_fraction",
    "quality_index",
    "temporal_median",
    "temporal_moments",
    "tsnr",
    "tsnr_map",
]

#: nipype TSNR: voxels whose temporal std is at most this get tSNR 0.
TSNR_STD_FLOOR = 1e-3
#: nipype compute_dvars: data are scaled so that their median is this (``intensity_normalization``).
DVARS_INTENSITY = 1000.0
#: nipype compute_dvars: voxels whose robust std is at most this are left out (``variance_tol``).
DVARS_VARIANCE_TOL = 1e-7
#: IQR of a standard normal distribution (robust std = IQR / 1.349).
IQR_TO_SD = 1.349
#: AFNI 3dToutcount: outlier tail probability ``q`` of ``alpha = Qinv(q / T)``.
OUTLIER_Q = 0.001
#: AFNI 3dToutcount refuses datasets with fewer frames than this.
AOR_MIN_FRAMES = 5
#: nipype NonSteadyStateDetector: frames inspected and modified z-score threshold.
NSS_FRAMES, NSS_THRESHOLD = 50, 3.5
#: AFNI THD_cliplevel: fraction of the median above the cut (``3dAutomask -clfrac`` default).
CLIP_FRACTION = 0.5


def _series(x: np.ndarray) -> np.ndarray:
    """``x`` as a ``(T, N)`` series: an array, or an out-of-core series (``shape``, ``dtype``
    and numpy indexing ``x[:, a:b]``, ``x[t]``, ``x[t, columns]`` returning arrays), e.g.
    :class:`fmri_data.convert.outputs.qa.SpilledSeries`, which the slab-wise metrics read
    without loading it whole."""
    if not isinstance(x, np.ndarray) and hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "__getitem__"):
        if len(x.shape) != 2:
            raise SettingError(f"series must be (T, N), got shape {x.shape}")
        return x
    x = np.asarray(x)
    if x.ndim != 2:
        raise SettingError(f"series must be (T, N), got shape {x.shape}")
    return x


#: Elements (frames x channels) per column slab: the float64 temporaries of the series metrics
#: stay near 8 * SLAB_ELEMENTS bytes each, whatever the run's size.
SLAB_ELEMENTS = 1 << 22


def column_slabs(x: np.ndarray):
    """Yield ``(a, b)`` column ranges of ``x (T, N)`` holding about :data:`SLAB_ELEMENTS` elements."""
    width = max(1, SLAB_ELEMENTS // max(1, x.shape[0]))
    for a in range(0, x.shape[1], width):
        yield a, min(a + width, x.shape[1])


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """``a . b`` of two vectors without BLAS (einsum): BLAS ``ddot`` threads badly on small shared machines."""
    return float(np.einsum("i,i->", a, b))


def temporal_median(x: np.ndarray) -> np.ndarray:
    """``np.median(x, axis=0)`` of ``x (T, N)``, computed slab by slab (no ``(T, N)`` copy)."""
    x = _series(x)
    out = np.empty(x.shape[1], dtype=np.result_type(x.dtype, np.float32))
    for a, b in column_slabs(x):
        out[a:b] = np.median(x[:, a:b], axis=0)
    return out


def _sortable(values: np.ndarray) -> np.ndarray:
    """float32 -> uint32 keys in the same order (IEEE 754 sign flip)."""
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return np.where(u & np.uint32(0x80000000), ~u, u | np.uint32(0x80000000))


def _unsortable(key: int) -> np.float32:
    key = np.uint32(key)
    u = key & np.uint32(0x7FFFFFFF) if key & np.uint32(0x80000000) else ~key
    return np.array([u], dtype=np.uint32).view(np.float32)[0]


def global_median(x: np.ndarray) -> float:
    """``np.median(x)`` of a float32 ``(T, N)`` array, exactly, without a copy of it.

    Two passes of 65536-bin histograms over column slabs: the high 16 bits of each value's
    order-preserving 32-bit key find the bins of the middle ranks, the low 16 bits within
    them the exact values; the two middle values are averaged as numpy does (float32).
    Non-finite values must have been replaced.

    Returns:
        float; NaN for an empty array.
    """
    x = _series(x)
    n = x.shape[0] * x.shape[1]
    if n == 0:
        return math.nan
    hist = np.zeros(1 << 16, dtype=np.int64)
    for a, b in column_slabs(x):
        hist += np.bincount((_sortable(x[:, a:b]) >> np.uint32(16)).ravel(), minlength=1 << 16)
    cum = np.cumsum(hist)
    ranks = ((n - 1) // 2, n // 2)
    high = [int(np.searchsorted(cum, r, side="right")) for r in ranks]
    low = {h: np.zeros(1 << 16, dtype=np.int64) for h in set(high)}
    for a, b in column_slabs(x):
        keys = _sortable(x[:, a:b]).ravel()
        top = keys >> np.uint32(16)
        for h, counts in low.items():
            counts += np.bincount((keys[top == h] & np.uint32(0xFFFF)), minlength=1 << 16)
    values = []
    for r, h in zip(ranks, high):
        before = int(cum[h - 1]) if h else 0
        k = int(np.searchsorted(np.cumsum(low[h]), r - before, side="right"))
        values.append(_unsortable((h << 16) | k))
    return float(np.mean(np.array(values, dtype=np.float32)))


def tsnr_map(x: np.ndarray) -> np.ndarray:
    """Temporal SNR of each channel: ``mean_t x / std_t x`` (std with ``ddof=0``).

    Source: nipype ``algorithms.confounds.TSNR`` (as called by MRIQC, no detrending):
    channels with ``std <= 1e-3`` get 0.

    Args:
        x: ``(T, N)`` series, time first, in scanner units.

    Returns:
        ``(N,)`` float64 (unitless).
    """
    x = _series(x)
    mean, std = temporal_moments(x)
    return np.divide(mean, std, out=np.zeros_like(mean), where=std > TSNR_STD_FLOOR)


def temporal_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (``ddof=0``) over time of each channel of ``x (T, N)``,
    float64, computed slab by slab (no ``(T, N)`` float64 temporary)."""
    x = _series(x)
    mean = np.empty(x.shape[1], dtype=np.float64)
    std = np.empty(x.shape[1], dtype=np.float64)
    for a, b in column_slabs(x):
        slab = x[:, a:b]
        mean[a:b] = slab.mean(axis=0, dtype=np.float64)
        std[a:b] = slab.std(axis=0, dtype=np.float64)
    return mean, std


def tsnr(x: np.ndarray) -> float:
    """MRIQC ``tsnr``: the median over channels (brain voxels) of :func:`tsnr_map`.

    Args:
        x: ``(T, N)`` series of the brain channels.

    Returns:
        float (unitless); NaN for ``N == 0``.
    """
    values = tsnr_map(x)
    return float(np.median(values)) if values.size else math.nan


def _ar1(d: np.ndarray) -> np.ndarray:
    """Lag-1 autocorrelation of each demeaned column of ``d (T, N)``: ``sum d_t d_{t+1} / sum d_t^2``.

    The Yule-Walker AR(1) estimate (biased autocovariance, both lags divided by ``T``),
    which is what nipype obtains from ``nitime.algorithms.AR_est_YW(x, 1)``.
    """
    num = np.einsum("tn,tn->n", d[1:], d[:-1], dtype=np.float64)
    den = np.einsum("tn,tn->n", d, d, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def dvars(x: np.ndarray, intensity: float | None = DVARS_INTENSITY, median: float | None = None) -> dict[str, np.ndarray]:
    """DVARS of every frame transition: raw, standardized and voxel-wise standardized.

    As nipype ``confounds.compute_dvars`` (MRIQC's ``ComputeDVARS``, defaults
    ``intensity_normalization=1000``, ``remove_zerovariance=True``, ``variance_tol=1e-7``):

    1. scale: ``y = x * intensity / median(x)`` (the median over all channels and frames);
       skipped when ``intensity`` is None (e.g. demeaned data, median ~ 0);
    2. robust std per channel ``s_v = (Q75_t y - Q25_t y) / 1.349`` (``"lower"``
       percentiles, as FSL); channels with ``s_v <= 1e-7`` are left out;
    3. lag-1 autocorrelation ``r_v`` of the demeaned channel (Yule-Walker);
    4. predicted std of the temporal difference ``σ_v = sqrt(2 (1 - r_v)) s_v`` (Nichols 2013);
    5. ``D(t) = y(t) - y(t-1)``; ``nstd(t) = sqrt(mean_v D_v(t)^2)`` (Power et al. 2012 DVARS),
       ``std(t) = nstd(t) / mean_v σ_v``, ``vstd(t) = sqrt(mean_v (D_v(t) / σ_v)^2)``.

    MRIQC's IQMs ``dvars_nstd``, ``dvars_std``, ``dvars_vstd`` are the means of these series.

    Args:
        x: ``(T, N)`` series (T >= 2), time first.
        intensity: target median of step 1, or None.
        median: ``median(x)``, if already known.

    Returns:
        ``{"nstd", "std", "vstd"}``, each ``(T - 1,)`` float64 (``nstd`` in the units of
        the scaled data; ``std``/``vstd`` unitless); all-NaN when no channel varies.
    """
    x = _series(x)
    if x.shape[0] < 2:
        raise SettingError(f"DVARS needs at least 2 frames, got {x.shape[0]}")
    scale = None
    if intensity is not None:
        median = global_median(x) if median is None else float(median)
        if median == 0:
            raise SettingError("DVARS intensity normalization needs a non-zero median (pass intensity=None)")
        scale = np.float32(intensity / median)
    sum_d2 = np.zeros(x.shape[0] - 1)
    sum_v2 = np.zeros(x.shape[0] - 1)
    sum_sd, n_keep = 0.0, 0
    for a, b in column_slabs(x):  # every step is per channel: slabs of channels give the same values
        y = np.asarray(x[:, a:b], dtype=np.float32)
        if scale is not None:
            y = y * scale
        q25, q75 = np.percentile(y, [25, 75], axis=0, method="lower")
        sd = (q75 - q25).astype(np.float64) / IQR_TO_SD
        keep = sd > DVARS_VARIANCE_TOL
        if not keep.any():
            continue
        y, sd = y[:, keep], sd[keep]
        d = y - y.mean(axis=0, dtype=np.float64).astype(np.float32)
        diff_sd = np.sqrt(2.0 * (1.0 - _ar1(d))) * sd
        del d
        diff = np.diff(y, axis=0).astype(np.float64)
        sum_d2 += np.einsum("tn,tn->t", diff, diff)
        with np.errstate(divide="ignore", invalid="ignore"):
            diff /= diff_sd
        sum_v2 += np.einsum("tn,tn->t", diff, diff)
        sum_sd += float(diff_sd.sum())
        n_keep += int(keep.sum())
    if n_keep == 0:
        nan = np.full(x.shape[0] - 1, np.nan)
        return {"nstd": nan, "std": nan.copy(), "vstd": nan.copy()}
    nstd = np.sqrt(sum_d2 / n_keep)
    return {"nstd": nstd, "std": nstd / (sum_sd / n_keep), "vstd": np.sqrt(sum_v2 / n_keep)}


def fd_summary(fd: np.ndarray, threshold_mm: float) -> dict[str, float | int]:
    """MRIQC ``fd_mean``, ``fd_num``, ``fd_perc`` of a framewise-displacement series.

    MRIQC reads nipype's FD file, which holds the ``T - 1`` frame transitions:
    ``fd_mean = mean(FD(1..T-1))``, ``fd_num = #{t >= 1: FD(t) > threshold}``,
    ``fd_perc = 100 * fd_num / T``.

    Args:
        fd: ``(T,)`` FD in mm with ``FD(0) = 0`` (:func:`framewise_displacement`).
        threshold_mm: FD threshold (mm; MRIQC's default is 0.2, Power et al. 2012 used 0.5).

    Returns:
        ``{"fd_mean": mm, "fd_num": frames, "fd_perc": percent}``.
    """
    fd = np.asarray(fd, dtype=np.float64)
    if fd.size < 2:
        raise SettingError(f"FD summary needs at least 2 frames, got {fd.size}")
    moves = fd[1:]
    num = int((moves > threshold_mm).sum())
    return {"fd_mean": float(moves.mean()), "fd_num": num, "fd_perc": 100.0 * num / fd.size}


def gcor(x: np.ndarray) -> float:
    """Global correlation: the mean of the ``N x N`` Pearson correlation matrix.

    Computed without the matrix (Saad et al. 2013; AFNI ``@compute_gcor``): each channel is
    demeaned and scaled to unit L2 norm, ``u_v``; ``g = mean_v u_v``; ``GCOR = g . g``.
    Constant channels stay in the average as zeros, as ``@compute_gcor`` does (its
    ``3dTnorm`` leaves an all-constant voxel at 0 and ``3dmaskave`` averages over the whole
    mask): ``g = (1 / N) sum_v u_v`` over all ``N`` channels.

    Args:
        x: ``(T, N)`` series.

    Returns:
        float in ``[0, 1]`` (unitless); NaN when no channel varies.
    """
    x = _series(x)
    g = np.zeros(x.shape[0])
    varying = False
    for a, b in column_slabs(x):
        slab = x[:, a:b]
        d = slab - slab.mean(axis=0, dtype=np.float64)
        norm = np.sqrt(np.einsum("tn,tn->n", d, d))
        keep = norm > 0
        if keep.any():
            varying = True
            g += np.einsum("tn,n->t", d, np.divide(1.0, norm, out=np.zeros_like(norm), where=keep))
    if not varying:
        return math.nan
    g /= x.shape[1]
    return float(_dot(g, g))


def outlier_fraction(x: np.ndarray, q: float = OUTLIER_Q, median: np.ndarray | None = None) -> np.ndarray:
    """Fraction of channels that are outliers in each frame (AFNI ``3dToutcount -fraction``).

    AFNI's definition with its default ``-polort 0`` (the trend is the median): for each
    channel, ``m = median_t x``, ``MAD = median_t |x - m|``; a value is an outlier when
    ``|x - m| > alpha * sqrt(pi / 2) * MAD`` with ``alpha = Qinv(q / T)``, ``Qinv`` the
    inverse of the upper Gaussian tail. A channel counts only where its ``MAD > 0``
    (``3dToutcount.c``: a flat channel has no outliers, even with one deviating value).
    MRIQC's ``aor`` is the mean of this series.

    Args:
        x: ``(T, N)`` series of the brain channels, ``T >= 5``.
        q: tail probability (AFNI ``-qthr``, default 0.001).
        median: ``(N,)`` temporal median of each channel, if already known.

    Returns:
        ``(T,)`` float64 in ``[0, 1]``.

    Raises:
        SettingError: fewer than :data:`AOR_MIN_FRAMES` frames (``3dToutcount`` refuses them).
    """
    x = _series(x)
    t = x.shape[0]
    if t < AOR_MIN_FRAMES:
        raise SettingError(f"3dToutcount needs at least {AOR_MIN_FRAMES} frames, got {t}")
    alpha = float(stats.norm.isf(q / t))
    median = temporal_median(x) if median is None else np.asarray(median)
    count = np.zeros(t, dtype=np.int64)
    for a, b in column_slabs(x):
        dev = np.abs(x[:, a:b] - median[a:b])
        mad = np.median(dev, axis=0)
        count += ((dev > (alpha * math.sqrt(math.pi / 2.0)) * mad) & (mad > 0)).sum(axis=1)
    return count / x.shape[1]


def average_ranks(v: np.ndarray) -> np.ndarray:
    """Ranks 1..N of ``v (N,)`` with ties given their average rank (``scipy.stats.rankdata``'s
    default), via an unstable argsort (stability does not matter once ties are averaged)."""
    order = np.argsort(v)
    ordered = v[order]
    starts = np.r_[0, np.flatnonzero(ordered[1:] != ordered[:-1]) + 1]
    counts = np.diff(np.r_[starts, v.size])
    ranks = np.empty(v.size, dtype=np.float64)
    ranks[order] = np.repeat(starts + (counts + 1) / 2.0, counts)
    return ranks


def quality_index(x: np.ndarray, median: np.ndarray | None = None, columns: np.ndarray | None = None) -> np.ndarray:
    """AFNI ``3dTqual`` quality index of each frame: ``1 - Spearman rho(frame, median frame)``.

    The median frame is the voxel-wise temporal median; rho is computed over the channels
    given (MRIQC runs ``3dTqual -automask``: pass the voxels of :func:`automask`), ties at
    their average rank. Small
    is good. MRIQC's ``aqi`` is the mean of this series.

    Args:
        x: ``(T, N)`` series of the brain channels (N >= 2).
        median: ``(N,)`` temporal median of each channel (of the ``columns``), if already known.
        columns: ``(M,)`` indices or ``(N,)`` bool: use ``x[:, columns]`` (taken frame by
            frame, no ``(T, M)`` copy); default all.

    Returns:
        ``(T,)`` float64 in ``[0, 2]``.
    """
    x = _series(x)
    if columns is not None:
        columns = np.flatnonzero(columns) if np.asarray(columns).dtype == bool else np.asarray(columns)
    if median is None:
        median = temporal_median(x)
        median = median if columns is None else median[columns]
    ref = average_ranks(np.asarray(median))
    ref -= ref.mean()
    ref_norm = math.sqrt(_dot(ref, ref))
    out = np.empty(x.shape[0], dtype=np.float64)
    for t in range(x.shape[0]):
        r = average_ranks(x[t] if columns is None else x[t, columns])
        r -= r.mean()
        denom = ref_norm * math.sqrt(_dot(r, r))
        out[t] = 1.0 - (_dot(r, ref) / denom if denom > 0 else 0.0)
    return out


def clip_level(image: np.ndarray, mfrac: float = CLIP_FRACTION) -> float:
    """AFNI ``THD_cliplevel`` of a float image: the level that is ``mfrac`` times the median
    of the values above it (negative values ignored).

    Source: AFNI ``src/thd_cliplevel.c`` (float branch, 10000-bin histogram of
    ``round(10000 x / max)``; start at the level keeping the upper 65 % of positive voxels,
    then iterate ``cut = mfrac * median(bins >= cut)`` at most 66 times).

    Args:
        image: any-shaped float image; mfrac: fraction (0.5 as ``3dAutomask``).

    Returns:
        float, in the image's units; 0.0 for 222 or fewer positive voxels (as AFNI).
    """
    x = np.asarray(image, dtype=np.float64).ravel()
    nhist = 10000
    top = float(x.max()) if x.size else 0.0
    if top < 1e-100:
        return 0.0
    sfac = nhist / top
    positive = x[x > 0]
    bins = (sfac * positive + 0.499).astype(np.int64)
    bins = bins[bins <= nhist]
    if bins.size <= 222:
        return 0.0
    hist = np.bincount(bins, minlength=nhist + 1)
    qq = int(0.65 * bins.size)
    ib = int(np.rint(0.5 * math.sqrt(float(np.sum(bins.astype(np.float64) ** 2)) / bins.size)))
    kk, ii = 0, nhist - 1
    while ii >= ib and kk < qq:
        kk += int(hist[ii])
        ii -= 1
    ncut = ii
    for _ in range(66):
        above = hist[ncut:nhist]
        nhalf = int(above.sum()) // 2
        cum = np.cumsum(above)
        # AFNI's loop stops at the first bin where the running count reaches nhalf, one past it
        idx = int(np.searchsorted(cum, nhalf, side="left")) + 1 if nhalf > 0 else 0
        median_bin = ncut + min(idx, above.size)
        nold, ncut = ncut, int(mfrac * median_bin)
        if ncut == nold:
            break
    return ncut / sfac


def automask(aveabs_image: np.ndarray) -> np.ndarray:
    """Brain mask of a BOLD run from its voxelwise temporal mean of ``|x|``, after AFNI's automask.

    An approximation of AFNI ``THD_automask`` (``src/thd_automask.c``), which ``3dTqual
    -automask`` (MRIQC's AQI) calls on ``THD_aveabs_brick``: voxels at or above
    :func:`clip_level` of that image, the largest face-connected cluster, holes filled. AFNI's version also adapts the
    clip level per octant and peels/regrows one voxel layer; those refinements are not
    reproduced (AFNI is not a dependency), so the mask can differ at the brain's edge.

    Args:
        aveabs_image: ``(X, Y, Z)`` float temporal mean of the absolute values (the
            temporal mean for non-negative data).

    Returns:
        ``(X, Y, Z)`` bool; all False when nothing passes the clip level.
    """
    from scipy import ndimage

    image = np.nan_to_num(np.asarray(aveabs_image, dtype=np.float64))
    level = clip_level(image)
    above = image >= level if level > 0 else image > 0
    labels, n = ndimage.label(above)
    if n == 0:
        return np.zeros(image.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())[1:]
    largest = labels == (int(np.argmax(sizes)) + 1)
    return ndimage.binary_fill_holes(largest)


def efc(image: np.ndarray) -> float:
    """Entropy focus criterion of an image (Atkinson et al. 1997), normalised as MRIQC.

    ``b_max = sqrt(sum_j x_j^2)``, ``E = sum_j (x_j / b_max) ln((x_j + 1e-16) / b_max)``,
    ``E_max = N (1 / sqrt N) ln(1 / sqrt N)``; ``EFC = E / E_max`` over all ``N`` voxels of
    the field of view. Lower = sharper (more energy in fewer voxels). MRIQC computes it on
    the temporal mean of the BOLD run.

    Args:
        image: ``(X, Y, Z)`` non-negative image (negative values are clipped to 0).

    Returns:
        float (unitless); NaN for an all-zero image.
    """
    x = np.clip(np.asarray(image, dtype=np.float64).ravel(), 0, None)
    n = x.size
    b_max = math.sqrt(_dot(x, x))
    if b_max == 0:
        return math.nan
    e_max = n * (1.0 / math.sqrt(n)) * math.log(1.0 / math.sqrt(n))
    return float(np.sum((x / b_max) * np.log((x + 1e-16) / b_max)) / e_max)


def fber(image: np.ndarray, mask: np.ndarray) -> float:
    """Foreground-to-background energy ratio (QAP; MRIQC ``fber``).

    ``median(|x|^2 in the mask) / median(|x|^2 outside the mask)``. Undefined (NaN; MRIQC
    writes a sentinel) when the background median energy is below ``1e-3``, e.g. for
    skull-stripped images whose background is 0.

    Args:
        image: ``(X, Y, Z)`` temporal mean image; mask: ``(X, Y, Z)`` bool brain mask.

    Returns:
        float (unitless) or NaN.
    """
    image, mask = np.asarray(image, dtype=np.float64), np.asarray(mask, dtype=bool)
    if image.shape != mask.shape:
        raise SettingError(f"image {image.shape} and mask {mask.shape} differ in shape")
    if not mask.any() or mask.all():
        return math.nan
    fg = float(np.median(np.abs(image[mask]) ** 2))
    bg = float(np.median(np.abs(image[~mask]) ** 2))
    return fg / bg if bg >= 1e-3 else math.nan


def ghost_to_signal(image: np.ndarray, mask: np.ndarray, axis: int) -> float:
    """Ghost-to-signal ratio along one axis (Giannelli et al. 2010; MRIQC ``gsr``).

    The N/2 (Nyquist) ghost region is the brain mask shifted by half the field of view
    along ``axis`` (``np.roll`` by ``shape[axis] // 2``), minus the brain; the rest of the
    background is the non-ghost region. ``GSR = (mean(ghost) - mean(non-ghost)) / median(brain)``.
    MRIQC computes it on the temporal mean image along x and y; the phase-encoding axis is
    the one where ghosts appear.

    Args:
        image: ``(X, Y, Z)`` temporal mean image; mask: ``(X, Y, Z)`` bool brain mask;
        axis: voxel axis (0, 1 or 2) of the phase-encoding direction.

    Returns:
        float (unitless); NaN when a region is empty or the brain median is 0.
    """
    image, mask = np.asarray(image, dtype=np.float64), np.asarray(mask, dtype=bool)
    ghost = np.roll(mask, mask.shape[axis] // 2, axis=axis) & ~mask
    rest = ~ghost & ~mask
    if not ghost.any() or not rest.any() or not mask.any():
        return math.nan
    signal = float(np.median(image[mask]))
    if signal == 0:
        return math.nan
    return float((image[ghost].mean() - image[rest].mean()) / signal)


def non_steady_state(global_signal: np.ndarray, frames: int = NSS_FRAMES, threshold: float = NSS_THRESHOLD) -> int:
    """Number of initial non-steady-state (dummy) frames (nipype ``NonSteadyStateDetector``).

    On the global signal ``g`` (mean over all voxels of each of the first ``frames``
    frames): ``m = median g``, ``MAD = median |g - m|``, modified z-score
    ``z = 0.6745 |g - m| / MAD`` (Iglewicz & Hoaglin 1993); the count of leading frames
    with ``z > threshold``. 0 when ``MAD = 0``.

    Args:
        global_signal: ``(T,)`` mean intensity of each frame.
        frames: frames inspected (50 as nipype); threshold: 3.5 as nipype.

    Returns:
        int, frames to discard from the start.
    """
    g = np.asarray(global_signal, dtype=np.float64)[:frames]
    if g.size == 0:
        return 0
    dev = np.abs(g - np.median(g))
    mad = float(np.median(dev))
    if mad == 0:
        return 0
    z = 0.6745 * dev / mad
    above = z > threshold
    return int(np.argmin(above)) if not above.all() else int(g.size)


def frames_dropped(n_source: int, tr_in: float, n_out: int, tr_out: float) -> int:
    """Source frames after the last stored frame's time (not represented in the store).

    Stored frame ``j`` is at ``j * tr_out`` s, source frame ``i`` at ``i * tr_in`` s.

    Returns:
        int >= 0.
    """
    last = (n_out - 1) * tr_out
    covered = math.floor(last / tr_in + 1e-6) + 1
    return max(0, int(n_source) - covered)
