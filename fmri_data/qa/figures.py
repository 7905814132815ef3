"""QA figures of a store's runs (matplotlib, Agg backend), returned as base64-encoded PNG.

* carpet plot (Power 2017, NeuroImage 154:150): rows = brain voxels of the stored volume
  (an even subsample, in C order of the grid, i.e. grouped by x-plane) or parcels of an
  ROI series (atlas order, so networks stay together), each row z-scored over time;
* mean and tSNR mosaics: axial slices of the stored volume after undoing its
  normalisation (``bold * std + mean``), on the stored grid;
* traces: FD with its threshold, standardized DVARS, outlier fraction, global signal
  (from the run's ``qa.series``, source TR);
* flat-map frame: the middle frame of ``flat (T, H, W)`` where ``flat_mask (H, W)``.
* distributions: each metric across runs, outliers (robust z) in red.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 90
CARPET_ROWS = 1500


def to_base64(fig) -> str:
    """Render a figure as PNG, base64 (ASCII); closes the figure."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _zscore_rows(x: np.ndarray) -> np.ndarray:
    """``x (T, R)`` -> ``(R, T)`` with each row z-scored (constant rows 0)."""
    x = np.asarray(x, dtype=np.float64)
    sd = x.std(axis=0)
    z = np.divide(x - x.mean(axis=0), sd, out=np.zeros_like(x), where=sd > 0)
    return z.T


def carpet(x: np.ndarray, tr_s: float, title: str, ylabel: str) -> str:
    """Carpet plot of ``x (T, R)`` (rows z-scored, clipped to +-2)."""
    z = _zscore_rows(x)
    fig, ax = plt.subplots(figsize=(9, 3.2))
    ax.imshow(z, aspect="auto", cmap="gray", vmin=-2, vmax=2, interpolation="nearest",
              extent=(0, x.shape[0] * tr_s, z.shape[0], 0))
    ax.set_xlabel("time (s)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return to_base64(fig)


def _slices(mask: np.ndarray, n: int) -> list[int]:
    z = np.flatnonzero(mask.any(axis=(0, 1)))
    if z.size == 0:
        return []
    return sorted(set(np.linspace(z[0], z[-1], num=min(n, z.size)).round().astype(int).tolist()))


def mosaic(volume: np.ndarray, mask: np.ndarray, title: str, cmap: str = "gray", n: int = 12) -> str:
    """Axial-slice mosaic of ``volume (X, Y, Z)`` (RAS+: x to the right, y up), outside ``mask`` dark."""
    picks = _slices(mask, n)
    cols = 6
    rows = max(1, -(-len(picks) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(9, 1.8 * rows + 0.4), squeeze=False)
    inside = volume[mask] if mask.any() else volume.ravel()
    vmin, vmax = np.percentile(inside, [2, 98]) if inside.size else (0, 1)
    colors = plt.get_cmap(cmap).with_extremes(bad="black")
    box = [np.flatnonzero(mask.any(axis=a)) for a in ((1, 2), (0, 2))]
    (x0, x1), (y0, y1) = [(b[0], b[-1] + 1) if b.size else (0, m) for b, m in zip(box, mask.shape[:2])]
    image = None
    for ax, k in zip(axes.ravel(), picks):
        data = np.where(mask[x0:x1, y0:y1, k], volume[x0:x1, y0:y1, k], np.nan)
        image = ax.imshow(data.T, origin="lower", cmap=colors, vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(f"z={k}", fontsize=7)
    for ax in axes.ravel():
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, pad=0.01)
    fig.suptitle(title, fontsize=10)
    return to_base64(fig)


def traces(series: dict[str, list], tr_s: float, fd_threshold_mm: float | None) -> tuple[str, list[str]] | None:
    """FD, DVARS (standardized), outlier fraction and global signal against time (source TR).

    Returns:
        ``(png, labels of the panels drawn)``, or None when the run has none of these series.
    """
    panels = [
        ("fd", "FD (mm)"), ("dvars_std", "DVARS std"), ("aor", "outlier fraction"), ("global_signal", "global signal"),
    ]
    panels = [(k, label) for k, label in panels if series.get(k)]
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 1.3 * len(panels) + 0.4), sharex=True, squeeze=False)
    for ax, (key, label) in zip(axes[:, 0], panels):
        values = np.array([np.nan if v is None else v for v in series[key]], dtype=np.float64)
        start = 1 if key.startswith("dvars") else 0  # DVARS(t) belongs to the transition into frame t
        t = (np.arange(values.size) + start) * tr_s
        ax.plot(t, values, lw=0.9, color="#1f5f8b")
        if key == "fd" and fd_threshold_mm is not None:
            ax.axhline(fd_threshold_mm, color="#c0392b", lw=0.8, ls="--")
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("time (s)")
    return to_base64(fig), [label for _, label in panels]


def flat_frame(frame: np.ndarray, mask: np.ndarray, title: str) -> str:
    """One flat-map frame ``(H, W)`` inside ``flat_mask (H, W)`` (row 0 at the top)."""
    data = np.where(mask, np.asarray(frame, dtype=np.float64), np.nan)
    inside = data[mask]
    vmax = float(np.percentile(np.abs(inside), 98)) if inside.size else 1.0
    fig, ax = plt.subplots(figsize=(7, 3.6))
    image = ax.imshow(data, cmap="RdBu_r", vmin=-vmax, vmax=vmax or 1.0, interpolation="nearest")
    ax.axis("off")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_title(title, fontsize=10)
    return to_base64(fig)


def distributions(table: dict[str, np.ndarray], flags: dict[str, np.ndarray], labels: dict[str, str]) -> str | None:
    """Strip plot of each metric across runs; flagged runs (robust-z outliers) in red."""
    keys = [k for k, v in table.items() if np.isfinite(v).any()]
    if not keys:
        return None
    cols = 4
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(10, 1.9 * rows), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, key in zip(axes.ravel(), keys):
        v = table[key]
        ok = np.isfinite(v)
        jitter = rng.uniform(-0.25, 0.25, size=v.size)
        flag = flags[key] & ok
        ax.scatter(v[ok & ~flag], jitter[ok & ~flag], s=14, color="#1f5f8b", alpha=0.8)
        ax.scatter(v[flag], jitter[flag], s=22, color="#c0392b")
        ax.axvline(np.nanmedian(v), color="#555", lw=0.8, ls=":")
        ax.set_yticks([])
        ax.set_ylim(-0.6, 0.6)
        ax.set_title(labels.get(key, key), fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    return to_base64(fig)


def run_figures(group, attrs: dict[str, Any], carpet_rows: int = CARPET_ROWS) -> list[dict[str, str]]:
    """Every figure of one run of a store: ``[{"title", "png"}]`` (base64 PNG).

    Args:
        group: the run's Zarr group (read only).
        attrs: the run's attributes.
    """
    out: list[dict[str, str]] = []
    qa = attrs.get("qa") or {}
    names = set(attrs.get("outputs", []))
    if "bold" in names and "brain_mask" in names:
        out += _volume_figures(group, attrs, carpet_rows)
    roi_keys = [n for n in attrs.get("outputs", []) if n.startswith("roi/")]
    if roi_keys:
        x = np.asarray(group[roi_keys[0]][:], dtype=np.float32)
        out.append({"title": f"Carpet plot: {roi_keys[0]} (parcels in atlas order x time)",
                    "png": carpet(x, attrs["tr_s"], roi_keys[0], "parcel")})
    if qa.get("series"):
        drawn = traces(qa["series"], attrs["source_tr_s"], (qa.get("settings") or {}).get("fd_threshold_mm"))
        if drawn:
            out.append({"title": f"{', '.join(drawn[1])} against time (source TR; dashed: FD threshold)", "png": drawn[0]})
    if "flat" in group and "flat_mask" in group:
        flat, mask = group["flat"], np.asarray(group["flat_mask"][:], dtype=bool)
        t = flat.shape[0] // 2
        out.append({"title": f"Flat map, frame {t}", "png": flat_frame(flat[t], mask, f"flat frame {t} ({t * attrs['tr_s']:g} s)")})
    return out


def _unnormalize(z: np.ndarray, params: dict[str, Any], center, scale) -> np.ndarray:
    kind = params.get("kind")
    if kind == "global_zscore":
        return z * params["std"] + params["mean"]
    if center is not None and scale is not None:
        return z * scale + center
    return z


def _volume_figures(group, attrs, carpet_rows: int) -> list[dict[str, str]]:
    """Mean and tSNR mosaics and a voxel carpet from the stored volume (streamed by chunk blocks)."""
    bold, mask = group["bold"], np.asarray(group["brain_mask"][:], dtype=bool)
    params = attrs["volume"]["normalization"]
    index = np.flatnonzero(mask.reshape(-1))
    center = np.asarray(group["norm_center"][:]).reshape(-1)[index] if "norm_center" in group else None
    scale = np.asarray(group["norm_scale"][:]).reshape(-1)[index] if "norm_scale" in group else None
    picks = np.linspace(0, index.size - 1, num=min(carpet_rows, index.size)).round().astype(int)
    n_frames = bold.shape[0]
    total = np.zeros(index.size)
    total_sq = np.zeros(index.size)
    sample = np.empty((n_frames, picks.size), dtype=np.float32)
    step = bold.chunks[0] * 4
    for start in range(0, n_frames, step):
        stop = min(start + step, n_frames)
        block = np.asarray(bold[start:stop], dtype=np.float32).reshape(stop - start, -1)[:, index]
        block = _unnormalize(block, params, center, scale)
        total += block.sum(axis=0, dtype=np.float64)
        total_sq += np.square(block, dtype=np.float64).sum(axis=0)
        sample[start:stop] = block[:, picks]
    mean = total / n_frames
    std = np.sqrt(np.maximum(total_sq / n_frames - mean**2, 0))
    tsnr = np.divide(mean, std, out=np.zeros_like(mean), where=std > 1e-3)
    volumes = {}
    for name, values in (("mean", mean), ("tsnr", tsnr)):
        vol = np.zeros(mask.size)
        vol[index] = values
        volumes[name] = vol.reshape(mask.shape)
    if attrs["volume"].get("orientation", "RAS") == "LAS":  # stored x runs right -> left: show as RAS+
        mask = mask[::-1]
        volumes = {name: vol[::-1] for name, vol in volumes.items()}
    grid = "x".join(str(s) for s in mask.shape)
    return [
        {"title": f"Temporal mean (stored grid {grid})", "png": mosaic(volumes["mean"], mask, "mean")},
        {"title": f"tSNR map (stored grid {grid})", "png": mosaic(volumes["tsnr"], mask, "tSNR", cmap="viridis")},
        {"title": f"Carpet plot: {picks.size} of {index.size} brain voxels (grid order) x time",
         "png": carpet(sample, attrs["tr_s"], "bold", "voxel")},
    ]
