"""Saliency-window indices of a run during conversion (recipe ``saliency`` section)."""

from __future__ import annotations

from typing import Any

from ...saliency import RunData, bold_brain_series, score_run, settings_from_recipe, write_into_run
from ...store.writer import RunWriter
from ..context import RunContext


def saliency_outputs(ctx: RunContext, writer: RunWriter, attrs: dict[str, Any]) -> None:
    """Score the run's windows with the recipe's built-in scorers; write ``saliency/<scorer>``.

    Uses what the conversion already holds: the ROI series as stored (``ctx.roi``) and the
    confounds (``ctx.confounds``, used only when they have one row per source frame, i.e.
    when they are stored). The ``bold`` fallback reads the brain voxels back from the
    staging group, so that scores describe the stored (normalized, float16) windows a
    loader reads and ``fmri-data saliency score`` reproduces them exactly. Scorers that do
    not apply to the run are recorded as warnings (and in ``saliency`` attrs ``skipped``).
    """
    settings = settings_from_recipe(ctx.recipe)
    if settings is None:
        return
    group = writer.group
    data = RunData(
        n_frames=int(attrs["n_frames"]),
        tr_s=float(attrs["tr_s"]),
        n_frames_source=int(attrs["n_frames_source"]),
        source_tr_s=float(attrs["source_tr_s"]),
        roi_keys=list(ctx.roi),
        load_roi=lambda key: ctx.roi[key],
        load_bold=(lambda: bold_brain_series(group)) if "bold" in writer.outputs else None,
        confounds=ctx.confounds if "confounds" in writer.outputs else None,
    )
    results, skipped = score_run(data, settings)
    write_into_run(group, results, skipped, ctx.recipe["store"]["compression"])
    ctx.warnings += [f"saliency/{name}: not scored: {reason}" for name, reason in skipped.items()]
