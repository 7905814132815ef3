"""Events and confounds of a run: events into the run attributes, confounds as an array."""

from __future__ import annotations

from typing import Any

from ...read.tables import read_confounds, read_events
from ...store.writer import RunWriter
from ..context import RunContext


def table_outputs(ctx: RunContext, writer: RunWriter, n_frames_source: int) -> dict[str, Any]:
    spec = ctx.spec
    attrs: dict[str, Any] = {}
    if spec.events:
        attrs["events"] = read_events(spec.events)
        ctx.add_source(spec.events, "events", None, False)
    if spec.confounds:
        columns, values = read_confounds(spec.confounds)
        ctx.add_source(spec.confounds, "confounds", None, True)
        ctx.confounds = (columns, values)
        if values.shape[0] != n_frames_source:
            ctx.warnings.append(f"confounds have {values.shape[0]} rows for {n_frames_source} frames; not stored")
        else:
            writer.write_array(
                "confounds", values, ctx.recipe["store"]["compression"],
                attrs={"columns": columns, "tr_s": ctx.spec.metadata.get("RepetitionTime")},
                dimension_names=("time", "confound"),
            )
    return attrs


