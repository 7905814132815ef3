"""Saliency-window indices of a run during conversion (recipe ``saliency`` section)."""

from __future__ import annotations

from typing import Any, Mapping

from ...saliency import RunData, bold_brain_series, score_run, settings_from_recipe, write_into_run
from ..context import RunInputs
from .base import OutputKind, Produced


def saliency_outputs(run: RunInputs, inputs: Mapping[str, Any]) -> Produced:
    """Score the run's windows with the recipe's built-in scorers; write ``saliency/<scorer>``.

    Uses what the conversion already holds: the ROI series as stored (``roi_series``) and the
    confounds (``confounds``, used only when they have one row per source frame, i.e.
    when they are stored). The ``bold`` fallback reads the brain voxels back from the
    staging group, so that scores describe the stored (normalized, float16) windows a
    loader reads and ``fmri-data saliency score`` reproduces them exactly. Scorers that do
    not apply to the run are recorded as warnings (and in ``saliency`` attrs ``skipped``).

    Returns:
        nothing (the scores are arrays of their own).
    """
    settings = settings_from_recipe(run.recipe)
    if settings is None:
        return Produced()
    writer, timing = run.writer, inputs["timing"]
    roi = inputs["roi_series"] or {}
    group = writer.group
    data = RunData(
        n_frames=int(timing.n_frames),
        tr_s=float(timing.tr_s),
        n_frames_source=int(timing.n_frames_source),
        source_tr_s=float(timing.source_tr_s),
        roi_keys=list(roi),
        load_roi=lambda key: roi[key],
        load_bold=(lambda: bold_brain_series(group)) if "bold" in writer.outputs else None,
        confounds=inputs["confounds"] if "confounds" in writer.outputs else None,
    )
    results, skipped = score_run(data, settings)
    write_into_run(group, results, skipped, run.recipe["store"]["compression"])
    run.warnings.extend(f"saliency/{name}: not scored: {reason}" for name, reason in skipped.items())
    return Produced()


#: Saliency scores ``saliency/<scorer>`` (recipe ``saliency`` section), once the run has stored series.
KIND = OutputKind(
    name="saliency",
    needs=("timing", "roi_series", "confounds"),
    provides=(),
    applies=lambda run, inputs: True,
    run=saliency_outputs,
    after_series=True,
)
