"""Read and check the ``saliency/`` group of a stored run (layout in :mod:`fmri_data.store.layout`).

Pure reads: scoring and rescoring live in :mod:`fmri_data.saliency`, which writes through
:meth:`fmri_data.store.root.Store.replace_in_run`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from ..config.schema import validate
from ..derive.scorers import top_k
from ..derive.windows import window_starts
from ..errors import StoreError
from .layout import SALIENCY as GROUP

if TYPE_CHECKING:  # pragma: no cover
    from .root import Store


def read_run_saliency(group: zarr.Group) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Every scorer group of a run: ``({scorer: {attrs..., scores, starts, topk}}, skipped)``."""
    if GROUP not in group:
        return {}, {}
    parent = group[GROUP]
    out = {}
    for name, g in sorted(parent.groups()):
        out[name] = {**dict(g.attrs), "scores": g["scores"][...], "starts": g["starts"][...], "topk": g["topk"][...]}
    return out, dict(parent.attrs.get("skipped") or {})


def check_run_saliency(store: Store, group: zarr.Group, run_attrs: dict[str, Any], where: str) -> list[str]:
    """Problems of a run's saliency groups against the contract (empty = valid).

    Checks: attributes per ``run.schema.json``; array dtypes and shapes; ``starts`` is the
    window grid of ``(n_frames, window, stride)`` (so every window lies within the run);
    ``topk`` is exactly ``top_k(scores, k)`` (in bounds, best first, earlier window on
    ties) with ``k = min(k_requested, n_windows)``; scores finite; the source exists;
    a fitted network's file exists with its recorded sha256.
    """
    if GROUP not in group:
        return []
    problems: list[str] = []
    parent = group[GROUP]
    try:
        validate(dict(parent.attrs), "run", f"{where}/{GROUP}", definition="saliency_group_attrs")
    except StoreError as exc:
        problems.append(str(exc))
    for name, g in sorted(parent.groups()):
        here = f"{where}/{GROUP}/{name}"
        attrs = dict(g.attrs)
        try:
            validate(attrs, "run", here, definition="saliency_attrs")
        except StoreError as exc:
            problems.append(str(exc))
            continue
        if attrs["scorer"] != name:
            problems.append(f"{here}: attribute scorer '{attrs['scorer']}' differs from the group name")
        missing = [a for a in ("scores", "starts", "topk") if a not in g]
        if missing:
            problems.append(f"{here}: missing array(s) {', '.join(missing)}")
            continue
        scores, starts, topk = g["scores"][...], g["starts"][...], g["topk"][...]
        bad = [
            f"{here}/{label}: {array.dtype} {array.shape}, expected 1-D {np.dtype(dtype)}"
            for label, array, dtype in (("scores", scores, np.float32), ("starts", starts, np.int64), ("topk", topk, np.int64))
            if array.dtype != dtype or array.ndim != 1
        ]
        if bad:
            problems += bad
            continue
        expected_starts = window_starts(run_attrs["n_frames"], attrs["window"], attrs["stride"])
        if attrs["n_frames"] != run_attrs["n_frames"]:
            problems.append(f"{here}: n_frames {attrs['n_frames']}, the run has {run_attrs['n_frames']}")
        if not np.array_equal(starts, expected_starts):
            problems.append(f"{here}/starts: not the windows of {attrs['window']} frames every {attrs['stride']} within {run_attrs['n_frames']} frames")
        if len(scores) != len(starts) or attrs["n_windows"] != len(starts):
            problems.append(f"{here}: {len(scores)} scores, {len(starts)} starts, n_windows={attrs['n_windows']}")
            continue
        if not np.isfinite(scores).all():
            problems.append(f"{here}/scores: not all finite")
            continue
        if len(topk) != attrs["k"] or attrs["k"] != min(attrs["k_requested"], len(scores)):
            problems.append(f"{here}/topk: {len(topk)} indices, k={attrs['k']}, k_requested={attrs['k_requested']}, {len(scores)} windows")
        elif not np.array_equal(topk, top_k(scores, attrs["k"])):
            if len(topk) and (topk.min() < 0 or topk.max() >= len(scores)):
                problems.append(f"{here}/topk: indices outside [0, {len(scores)})")
            else:
                problems.append(f"{here}/topk: not the {attrs['k']} highest scores, best first (earlier window on ties)")
        source = attrs["source"]
        if source not in group:
            problems.append(f"{here}: source '{source}' is not an array of the run")
        model = attrs.get("model")
        if model:
            path = f"{store.path}/{model['path']}"
            from ..derive.saliency_net import sha256

            if not store.fs.exists(path):
                problems.append(f"{here}: network file {model['path']} is missing")
            elif sha256(store.fs.cat_file(path)) != model["sha256"]:
                problems.append(f"{here}: network file {model['path']} changed since scoring (sha256)")
    return problems
