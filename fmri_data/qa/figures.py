"""QA figures of a store's runs (matplotlib, Agg backend), returned as ``data:`` URIs.

* voxel carpet (Power 2017, NeuroImage 154:150; ordered by tissue class as MRIQC's and
  fMRIPrep's ``plot_carpet``, nipreps/niworkflows ``viz/plots.py``): rows = brain voxels of
  the stored volume grouped into grey matter, white matter and CSF / outside the template
  brain (argmax of the MNI152 2009 tissue probability maps nilearn bundles, resampled
  to the stored grid by world coordinates), an even subsample within each class, each row
  z-scored over time;
* parcel carpet: parcels of an ROI series grouped by Schaefer network (then subcortex /
  other), parcels without signal left out and listed in the caption;
* mean and tSNR mosaics: axial slices of the stored volume after undoing its
  normalisation (``bold * std + mean``), on the stored grid, with the outline of the
  template brain mask (MNI152NLin6Asym from a local TemplateFlow copy when there is one,
  else the MNI152 2009 brain mask bundled with nilearn) so runs resampled without
  registration can be judged; no tSNR map where the run's tSNR is undefined (demeaned);
* traces: FD with its threshold, standardized DVARS, outlier fraction, global signal
  (from the run's ``qa.series``, source TR);
* flat-map frame: the middle frame of ``flat (T, H, W)`` where ``flat_mask (H, W)``;
* distributions: each metric across the runs of one comparison group, outliers in red.

Images are encoded small: carpets and flat maps as lossy WebP, line and strip plots as
palette PNG (32 colours), mosaics as palette PNG (64 colours, so the outline stays sharp).
"""

from __future__ import annotations

import base64
import io
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from ..imports import load_module

DPI = 72
CARPET_ROWS = 400
WEBP_QUALITY = 70
PNG_COLOURS = 32
MOSAIC_COLOURS = 64
OUTLINE_COLOUR = "#ff3b30"
TISSUES = ("grey matter", "white matter", "CSF / outside template brain")
_GROUP_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
                  "#17becf")


def to_data_uri(fig, photo: bool = False, colours: int = PNG_COLOURS) -> str:
    """Render a figure as a ``data:`` URI and close it.

    Args:
        fig: a matplotlib figure.
        photo: True for figures of pixels (lossy WebP, quality 70), False for line art
            and mosaics (PNG with an adaptive palette, optimised: lossy WebP's chroma
            subsampling would wash out a thin coloured outline).
        colours: palette size of the PNG.

    Returns:
        ``data:image/webp;base64,...`` or ``data:image/png;base64,...``.
    """
    Image = load_module("PIL.Image")

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    buffer.seek(0)
    image = Image.open(buffer).convert("RGB")
    out = io.BytesIO()
    if photo:
        image.save(out, format="WEBP", quality=WEBP_QUALITY, method=4)
        mime = "image/webp"
    else:
        image.quantize(colors=colours, method=Image.Quantize.MEDIANCUT).save(out, format="PNG", optimize=True)
        mime = "image/png"
    return f"data:{mime};base64," + base64.b64encode(out.getvalue()).decode("ascii")


def _zscore_rows(x: np.ndarray) -> np.ndarray:
    """``x (T, R)`` -> ``(R, T)`` with each row z-scored (constant rows 0)."""
    x = np.asarray(x, dtype=np.float64)
    sd = x.std(axis=0)
    z = np.divide(x - x.mean(axis=0), sd, out=np.zeros_like(x), where=sd > 0)
    return z.T


def carpet(x: np.ndarray, tr_s: float, title: str, ylabel: str,
           groups: list[tuple[str, int, int]] | None = None) -> str:
    """Carpet plot of ``x (T, R)`` (rows z-scored, clipped to +-2), rows grouped.

    Args:
        x: ``(T, R)`` frames x rows (voxels or parcels), float.
        tr_s: seconds between frames.
        title, ylabel: axis texts.
        groups: ``[(name, first row, last row + 1)]`` drawn as a coloured bar with the
            names at the left and white lines between groups (default: one group).

    Returns:
        a WebP ``data:`` URI.
    """
    z = _zscore_rows(x)
    fig, ax = plt.subplots(figsize=(9, 2.8))
    ax.imshow(z, aspect="auto", cmap="gray", vmin=-2, vmax=2, interpolation="nearest",
              extent=(0, x.shape[0] * tr_s, z.shape[0], 0))
    if groups:
        bar = ax.inset_axes((-0.02, 0, 0.015, 1))
        bar.set_ylim(z.shape[0], 0)
        for k, (name, start, stop) in enumerate(groups):
            bar.axhspan(start, stop, color=_GROUP_COLOURS[k % len(_GROUP_COLOURS)])
            if k:
                ax.axhline(start, color="white", lw=0.8)
        bar.set_xticks([])
        bar.set_yticks([(a + b) / 2 for _, a, b in groups], [n for n, _, _ in groups], fontsize=7)
        bar.tick_params(length=0)
        for side in bar.spines.values():
            side.set_visible(False)
        ax.set_yticks([])
        ax.set_ylabel(ylabel, labelpad=70 if len(groups) > 1 else 18)
    else:
        ax.set_ylabel(ylabel)
    ax.set_xlabel("time (s)")
    ax.set_title(title, fontsize=10)
    return to_data_uri(fig, photo=True)


def _slices(mask: np.ndarray, n: int) -> list[int]:
    z = np.flatnonzero(mask.any(axis=(0, 1)))
    if z.size == 0:
        return []
    return sorted(set(np.linspace(z[0], z[-1], num=min(n, z.size)).round().astype(int).tolist()))


def mosaic(volume: np.ndarray, mask: np.ndarray, title: str, cmap: str = "gray", n: int = 12,
           outline: np.ndarray | None = None) -> str:
    """Axial-slice mosaic of ``volume (X, Y, Z)`` (RAS+: x to the right, y up), outside ``mask`` dark.

    Args:
        volume: ``(X, Y, Z)`` float on the stored grid (RAS+ order).
        mask: ``(X, Y, Z)`` bool, the run's brain mask.
        title: figure title.
        cmap: matplotlib colour map.
        n: at most this many slices.
        outline: ``(X, Y, Z)`` bool template brain mask on the same grid: its edge is drawn
            in red on every slice (slices and crop cover the union of both masks).

    Returns:
        a palette PNG ``data:`` URI.
    """
    extent = mask | outline if outline is not None else mask
    picks = _slices(extent, n)
    cols = 6
    rows = max(1, -(-len(picks) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(9, 1.8 * rows + 0.4), squeeze=False)
    inside = volume[mask] if mask.any() else volume.ravel()
    vmin, vmax = np.percentile(inside, [2, 98]) if inside.size else (0, 1)
    colors = plt.get_cmap(cmap).with_extremes(bad="black")
    box = [np.flatnonzero(extent.any(axis=a)) for a in ((1, 2), (0, 2))]
    (x0, x1), (y0, y1) = [(b[0], b[-1] + 1) if b.size else (0, m) for b, m in zip(box, mask.shape[:2])]
    image = None
    for ax, k in zip(axes.ravel(), picks):
        data = np.where(mask[x0:x1, y0:y1, k], volume[x0:x1, y0:y1, k], np.nan)
        image = ax.imshow(data.T, origin="lower", cmap=colors, vmin=vmin, vmax=vmax, interpolation="nearest")
        if outline is not None and 0 < outline[x0:x1, y0:y1, k].sum() < outline[x0:x1, y0:y1, k].size:
            ax.contour(outline[x0:x1, y0:y1, k].T.astype(float), levels=[0.5], colors=OUTLINE_COLOUR,
                       linewidths=0.8, origin="lower")
        ax.set_title(f"z={k}", fontsize=7)
    for ax in axes.ravel():
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, pad=0.01)
    fig.suptitle(title, fontsize=10)
    return to_data_uri(fig, colours=MOSAIC_COLOURS)


def traces(series: dict[str, list], tr_s: float, fd_threshold_mm: float | None) -> tuple[str, list[str]] | None:
    """FD, DVARS (standardized), outlier fraction and global signal against time (source TR).

    Returns:
        ``(PNG data URI, labels of the panels drawn)``, or None when the run has none of these series.
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
    return to_data_uri(fig), [label for _, label in panels]


def flat_frame(frame: np.ndarray, mask: np.ndarray, title: str) -> str:
    """One flat-map frame ``(H, W)`` inside ``flat_mask (H, W)`` (row 0 at the top); a WebP data URI."""
    data = np.where(mask, np.asarray(frame, dtype=np.float64), np.nan)
    inside = data[mask]
    vmax = float(np.percentile(np.abs(inside), 98)) if inside.size else 1.0
    fig, ax = plt.subplots(figsize=(7, 3.6))
    image = ax.imshow(data, cmap="RdBu_r", vmin=-vmax, vmax=vmax or 1.0, interpolation="nearest")
    ax.axis("off")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_title(title, fontsize=10)
    return to_data_uri(fig, photo=True)


def distributions(table: dict[str, np.ndarray], flags: dict[str, np.ndarray], labels: dict[str, str],
                  groups: np.ndarray | None = None, min_runs: int = 1) -> list[dict[str, str]]:
    """Strip plots of each metric across runs, one figure per comparison group (never pooled).

    Args:
        table: ``{metric: (n_runs,) float}`` (NaN where undefined).
        flags: ``{metric: (n_runs,) bool}`` robust-z outliers (drawn red).
        labels: ``{metric: label}``.
        groups: ``(n_runs,)`` str, the comparison group of each run (kind of run; default one group).
        min_runs: groups with fewer runs get ``{"title", "note"}`` instead of a figure.

    Returns:
        ``[{"title", "src"}]`` (PNG data URIs) or ``{"title", "note"}``, one per group with
        at least one defined metric.
    """
    n = len(next(iter(table.values()))) if table else 0
    groups = np.asarray(groups if groups is not None else [""] * n)
    out = []
    rng = np.random.default_rng(0)
    for group in sorted(set(groups.tolist())):
        same = groups == group
        keys = [k for k, v in table.items() if np.isfinite(v[same]).any()]
        if not keys:
            continue
        if same.sum() < min_runs:
            out.append({"title": group, "note": f"{group}: {int(same.sum())} run(s), fewer than {min_runs}; "
                                                "no distribution drawn and no outlier test."})
            continue
        cols = 4
        rows = -(-len(keys) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(10, 1.6 * rows + 0.3), squeeze=False)
        for ax, key in zip(axes.ravel(), keys):
            v = table[key][same]
            ok = np.isfinite(v)
            jitter = rng.uniform(-0.25, 0.25, size=v.size)
            flag = flags[key][same] & ok
            ax.scatter(v[ok & ~flag], jitter[ok & ~flag], s=14, color="#1f5f8b", alpha=0.8)
            ax.scatter(v[flag], jitter[flag], s=22, color="#c0392b")
            ax.axvline(np.nanmedian(v), color="#555", lw=0.8, ls=":")
            ax.set_yticks([])
            ax.set_ylim(-0.6, 0.6)
            ax.set_title(labels.get(key, key), fontsize=9)
            ax.tick_params(labelsize=7)
        for ax in axes.ravel()[len(keys):]:
            ax.axis("off")
        fig.suptitle(f"{group or 'all runs'} ({int(same.sum())} runs)", fontsize=10)
        fig.tight_layout()
        out.append({"title": f"{group or 'all runs'}: {int(same.sum())} runs", "group": group,
                    "src": to_data_uri(fig)})
    return out


# ----------------------------------------------------------------------------- templates on the stored grid


def _templateflow_mask() -> Path | None:
    """A local TemplateFlow copy of the MNI152NLin6Asym brain mask (``TEMPLATEFLOW_HOME``, else
    ``~/.cache/templateflow``), or None; never downloads."""
    from ..reference.atlases import templateflow_home

    for res in ("02", "01"):
        path = templateflow_home() / "tpl-MNI152NLin6Asym" / f"tpl-MNI152NLin6Asym_res-{res}_desc-brain_mask.nii.gz"
        if path.is_file() and path.stat().st_size > 0:  # TemplateFlow's skeleton holds empty placeholders
            return path
    return None


def _on_grid(img, shape: tuple[int, ...], affine: tuple[float, ...], interpolation: str) -> np.ndarray:
    resample_img = load_module("nilearn.image").resample_img
    out = resample_img(img, target_affine=np.array(affine).reshape(4, 4), target_shape=shape,
                       interpolation=interpolation, force_resample=True, copy_header=True)
    return np.asarray(out.get_fdata(), dtype=np.float32)


@lru_cache(maxsize=4)
def template_outline(shape: tuple[int, int, int], affine: tuple[float, ...]) -> tuple[np.ndarray, str]:
    """The template brain mask on a stored grid, by world coordinates (nearest neighbour).

    Args:
        shape: ``(X, Y, Z)`` of the stored grid.
        affine: its 4x4 voxel -> mm affine (stored voxel order), flattened.

    Returns:
        ``((X, Y, Z) bool, what it is)``: TemplateFlow's MNI152NLin6Asym brain mask when a
        local copy exists, else nilearn's bundled MNI152 (ICBM 2009, symmetric) brain mask,
        which lies within a few mm of MNI152NLin6Asym.
    """
    nib = load_module("nibabel")

    path = _templateflow_mask()
    if path is not None:
        img, what = nib.load(path), f"MNI152NLin6Asym brain mask (TemplateFlow, {path.name})"
    else:
        img = load_module("nilearn.datasets").load_mni152_brain_mask(resolution=1)
        what = "MNI152 ICBM 2009 brain mask bundled with nilearn (within a few mm of MNI152NLin6Asym)"
    return _on_grid(img, shape, affine, "nearest") > 0.5, what


@lru_cache(maxsize=4)
def tissue_classes(shape: tuple[int, int, int], affine: tuple[float, ...]) -> np.ndarray:
    """Tissue class of every voxel of a stored grid: 0 grey matter, 1 white matter, 2 CSF /
    outside the template brain (argmax of GM, WM and ``1 - GM - WM`` of nilearn's bundled
    MNI152 2009 tissue probability maps, linearly resampled by world coordinates).

    Returns:
        ``(X, Y, Z)`` uint8.
    """
    datasets = load_module("nilearn.datasets")
    gm = _on_grid(datasets.load_mni152_gm_template(resolution=1), shape, affine, "linear")
    wm = _on_grid(datasets.load_mni152_wm_template(resolution=1), shape, affine, "linear")
    return np.argmax(np.stack([gm, wm, 1.0 - gm - wm]), axis=0).astype(np.uint8)


# ----------------------------------------------------------------------------- per run


_NETWORK = re.compile(r"^(?:\d+Networks_)?(?:LH|RH)_([A-Za-z]+)")


def parcel_groups(labels: list[str]) -> list[str]:
    """The group of each parcel label: its Schaefer network (``LH_Vis_1`` and
    ``17Networks_RH_DefaultA_PFCm_1`` -> ``Vis``, ``DefaultA``), else ``subcortex / other``."""
    out = []
    for label in labels:
        match = _NETWORK.match(str(label))
        out.append(match.group(1) if match else "subcortex / other")
    return out


def _parcel_carpet(array, tr_s: float, key: str) -> dict[str, str]:
    """A parcel carpet grouped by network; parcels without signal dropped and explained."""
    x = np.asarray(array[:], dtype=np.float32)
    attrs = dict(array.attrs)
    labels = list(attrs.get("labels") or [f"parcel {k + 1}" for k in range(x.shape[1])])
    missing = set(attrs.get("missing_parcels") or [])
    with np.errstate(invalid="ignore"):
        sd = np.nanstd(x, axis=0)
    no_voxel = np.array([label in missing for label in labels])
    flat = ~no_voxel & ~(sd > 0)
    keep = np.flatnonzero(~no_voxel & ~flat)
    names = parcel_groups(labels)
    order_of = {name: k for k, name in enumerate(dict.fromkeys(names))}
    keep = keep[np.argsort([order_of[names[k]] for k in keep], kind="stable")]
    groups, start = [], 0
    for name in dict.fromkeys(names[k] for k in keep):
        stop = start + sum(1 for k in keep if names[k] == name)
        groups.append((name, start, stop))
        start = stop
    caption = f"Carpet plot: {key}, {keep.size} parcels grouped by network (atlas order within each) x time"
    dropped = []
    if no_voxel.any():
        dropped.append(f"{int(no_voxel.sum())} parcels have no voxel in the field of view")
    if flat.any():
        dropped.append(f"{int(flat.sum())} parcels have no signal (constant, e.g. outside the data's brain mask)")
    if dropped:
        examples = ", ".join(labels[k] for k in np.flatnonzero(no_voxel | flat)[:8])
        caption += f". Not drawn: {'; '.join(dropped)} ({examples}{', ...' if (no_voxel | flat).sum() > 8 else ''})"
    if keep.size == 0:
        return {"title": caption, "note": f"{key}: no parcel has signal; no carpet drawn."}
    return {"title": caption, "src": carpet(x[:, keep], tr_s, key, "parcel", groups)}


def run_figures(group, attrs: dict[str, Any], carpet_rows: int = CARPET_ROWS) -> list[dict[str, str]]:
    """Every figure of one run of a store.

    Args:
        group: the run's Zarr group (read only).
        attrs: the run's attributes.
        carpet_rows: at most this many voxel rows in the voxel carpet.

    Returns:
        ``[{"title", "src"}]`` (``src`` a ``data:`` URI), or ``{"title", "note"}`` where a
        figure is not drawn and why.
    """
    out: list[dict[str, str]] = []
    qa = attrs.get("qa") or {}
    names = set(attrs.get("outputs", []))
    if "bold" in names and "brain_mask" in names:
        out += _volume_figures(group, attrs, carpet_rows)
    roi_keys = [n for n in attrs.get("outputs", []) if n.startswith("roi/")]
    if roi_keys:
        out.append(_parcel_carpet(group[roi_keys[0]], attrs["tr_s"], roi_keys[0]))
    if qa.get("series"):
        drawn = traces(qa["series"], attrs["source_tr_s"], (qa.get("settings") or {}).get("fd_threshold_mm"))
        if drawn:
            out.append({"title": f"{', '.join(drawn[1])} against time (source TR; dashed: FD threshold)", "src": drawn[0]})
    if "flat" in group and "flat_mask" in group:
        flat, mask = group["flat"], np.asarray(group["flat_mask"][:], dtype=bool)
        t = flat.shape[0] // 2
        out.append({"title": f"Flat map, frame {t}", "src": flat_frame(flat[t], mask, f"flat frame {t} ({t * attrs['tr_s']:g} s)")})
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
    qa = attrs.get("qa") or {}
    index = np.flatnonzero(mask.reshape(-1))
    center = np.asarray(group["norm_center"][:]).reshape(-1)[index] if "norm_center" in group else None
    scale = np.asarray(group["norm_scale"][:]).reshape(-1)[index] if "norm_scale" in group else None
    key = (tuple(mask.shape), tuple(np.asarray(attrs["volume"]["affine"], dtype=np.float64).ravel().tolist()))
    outline, outline_what = template_outline(*key)
    tissue = tissue_classes(*key).reshape(-1)[index]
    order = np.argsort(tissue, kind="stable")  # grid order within each class
    picks = order[np.linspace(0, index.size - 1, num=min(carpet_rows, index.size)).round().astype(int)]
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
        mask, outline = mask[::-1], outline[::-1]
        volumes = {name: vol[::-1] for name, vol in volumes.items()}
    grid = "x".join(str(s) for s in mask.shape)
    space = attrs["volume"].get("space", "")
    how = attrs["volume"].get("alignment")
    aligned = f"; this run was placed by {how}" if how else ""
    edge = f"red: edge of the {outline_what}{aligned}"
    demeaned = qa and qa.get("tsnr") is None and (qa.get("demeaned") or any("demeaned" in n for n in qa.get("notes", [])))
    noise = "; the series are demeaned, so the mean is ~0 and shows noise" if demeaned else ""
    out = [{"title": f"Temporal mean (stored grid {grid}, {space}); {edge}{noise}",
            "src": mosaic(volumes["mean"], mask, "mean", outline=outline)}]
    if qa and qa.get("tsnr") is None:
        why = [n for n in qa.get("notes", []) if "tSNR" in n]
        out.append({"title": "tSNR map", "note": "No tSNR map: tSNR is undefined for this run"
                    + (f" ({why[0]})." if why else " (see the QA notes).")})
    else:
        out.append({"title": f"tSNR map (stored grid {grid}, {space}); {edge}",
                    "src": mosaic(volumes["tsnr"], mask, "tSNR", cmap="viridis", outline=outline)})
    counts = np.bincount(tissue[picks], minlength=len(TISSUES))
    groups, start = [], 0
    for name, count in zip(TISSUES, counts):
        if count:
            groups.append((name, start, start + int(count)))
            start += int(count)
    out.append({"title": f"Carpet plot: {picks.size} of {index.size} brain voxels grouped by tissue class "
                         "(MNI152 2009 tissue probability maps bundled with nilearn, on the stored grid), grid order "
                         "within each class x time",
                "src": carpet(sample, attrs["tr_s"], "bold", "voxel", groups)})
    return out
