"""Events and confounds of a run: events into the run attributes, confounds as an array."""

from __future__ import annotations

from typing import Any, Mapping

from ...read.tables import read_confounds, read_events
from ..context import RunInputs
from .base import OutputKind, Produced


def table_outputs(run: RunInputs, inputs: Mapping[str, Any]) -> Produced:
    """Events -> run attribute ``events``; confounds -> ``confounds`` ``(T_in, C)`` float32 when
    they have one row per source frame (``inputs["timing"].n_frames_source``), else a warning.

    Returns:
        run attributes (``events``) and value ``confounds`` ``(columns, (T_in, C) float32)``
        (also when not stored), when the run has a confounds file.

    Raises:
        InputError: an events or confounds file that cannot be read.
    """
    spec = run.spec
    n_frames_source = inputs["timing"].n_frames_source
    attrs: dict[str, Any] = {}
    values: dict[str, Any] = {}
    if spec.events:
        attrs["events"] = read_events(spec.events)
        run.add_source(spec.events, "events", None, False)
    if spec.confounds:
        columns, data = read_confounds(spec.confounds)
        run.add_source(spec.confounds, "confounds", None, True)
        values["confounds"] = (columns, data)
        if data.shape[0] != n_frames_source:
            run.warnings.append(f"confounds have {data.shape[0]} rows for {n_frames_source} frames; not stored")
        else:
            run.writer.write_array(
                "confounds", data, run.recipe["store"]["compression"],
                attrs={"columns": columns, "tr_s": spec.metadata.get("RepetitionTime")},
                dimension_names=("time", "confound"),
            )
    return Produced(attrs, values)


#: Events (run attribute) and confounds (array), once the run has stored series.
KIND = OutputKind(
    name="tables",
    needs=("timing",),
    provides=("confounds",),
    applies=lambda run, inputs: True,
    run=table_outputs,
    after_series=True,
)
