"""PNG previews of stored flat maps (for the QA report): pure functions returning PNG bytes."""

from __future__ import annotations

import io

import numpy as np

from ..imports import load_module


def flat_png(frames: np.ndarray, mask: np.ndarray, *, titles: list[str] | None = None, vmax: float | None = None,
             cmap: str = "RdBu_r", dpi: int = 100) -> bytes:
    """Render flat-map frames and the valid-pixel mask as one PNG.

    Args:
        frames: ``(H, W)`` or ``(K, H, W)`` flat maps (row 0 = top; left hemisphere on the left).
        mask: ``(H, W)`` bool valid pixels; outside it is drawn grey.
        titles: one per frame (default ``frame k``).
        vmax: symmetric colour limit; default the 99th percentile of ``|values|`` inside the mask.
        cmap: matplotlib colour map of the frames.
        dpi: output resolution (one image pixel per flat pixel at ``dpi=100`` is not guaranteed).

    Returns:
        PNG bytes: the K frames stacked vertically, then the mask.

    Raises:
        ValueError: frames and mask shapes differ.
    """
    matplotlib = load_module("matplotlib")

    matplotlib.use("Agg", force=False)
    Figure = load_module("matplotlib.figure").Figure

    frames = np.asarray(frames, dtype=np.float32)
    frames = frames[None] if frames.ndim == 2 else frames
    mask = np.asarray(mask, dtype=bool)
    if frames.shape[1:] != mask.shape:
        raise ValueError(f"frames {frames.shape[1:]} and mask {mask.shape} differ")
    inside = frames[:, mask]
    if vmax is None:
        vmax = float(np.percentile(np.abs(inside), 99)) if inside.size else 1.0
        vmax = vmax if vmax > 0 else 1.0
    h, w = mask.shape
    n = len(frames) + 1
    fig = Figure(figsize=(w / 80 + 1.2, n * (h / 80 + 0.5)), dpi=dpi)
    axes = fig.subplots(n, 1, squeeze=False)[:, 0]
    colormap = matplotlib.colormaps[cmap].with_extremes(bad="0.85")
    for k, (ax, frame) in enumerate(zip(axes, frames)):
        image = ax.imshow(np.ma.masked_array(frame, ~mask), cmap=colormap, vmin=-vmax, vmax=vmax, interpolation="nearest")
        ax.set_title(titles[k] if titles else f"frame {k}", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01)
    axes[-1].imshow(mask, cmap="gray", interpolation="nearest")
    axes[-1].set_title(f"valid mask ({mask.mean():.1%} of {h}x{w})", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()
