"""The output-kind interface: each kind declares the values it reads and the values it hands on.

A run's outputs are produced by :class:`OutputKind` steps composed in a fixed, declared
order (the registry :data:`fmri_data.convert.outputs.OUTPUT_KINDS`). A step reads the
run's read-only :class:`~fmri_data.convert.context.RunInputs` and the named values that
earlier steps produced (only those it declares in ``needs``), writes its arrays, and
returns :class:`Produced`: run attributes and named values (only those it declares in
``provides``). :func:`build_outputs` checks the declarations before running anything
(:func:`check_order`) and hands every step a fresh, read-only mapping of the values so far.

Values handed from one kind to the next:

* ``timing`` :class:`Timing`: stored and source TR and frame counts (a later provider replaces it).
* ``roi_series``: ROI series as stored by array key (``roi/<key>``), ``(T_out, R)`` float32.
* ``atlas_parcels``: bool, atlas parcel series were already written (later ROI sources defer to them).
* ``brain_mask``: ``(X, Y, Z)`` bool brain mask on the target grid; ``grid`` that
  :class:`~fmri_data.reference.grids.Grid` (volume output only).
* ``source_frames``: what the volume QA metrics need from the source frames
  (:class:`fmri_data.convert.outputs.qa.SourceFrames`), gathered in the volume streaming pass.
* ``confounds``: ``(columns, (T_in, C) float32)`` of the run's confounds file.

A needed value whose provider did not apply to the run is passed as None.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

from ...errors import SettingError
from ..context import RunInputs


@dataclass(frozen=True)
class Timing:
    """Stored and source timing of a run's series.

    Attributes:
        tr_s, source_tr_s: stored and source repetition times (s).
        n_frames, n_frames_source: stored (``T_out``) and source (``T_in``) frame counts.
    """

    tr_s: float
    source_tr_s: float
    n_frames: int
    n_frames_source: int


@dataclass(frozen=True)
class Produced:
    """What one output kind returns: run attributes to merge, and named values for later kinds."""

    attrs: dict[str, Any] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputKind:
    """One kind of output of a run.

    Attributes:
        name: short name (used in error messages).
        needs: names of the values it reads; each must be provided by an earlier kind.
        provides: names of the values it may produce.
        applies: ``(run, inputs) -> bool``, whether it runs for this run (``inputs`` as for ``run``).
        run: ``(run, inputs) -> Produced``; ``inputs`` maps each name of ``needs`` to its
            value (None when no earlier kind produced it for this run).
        after_series: runs only once some series is stored; a run whose series kinds
            stored nothing is skipped before it.
    """

    name: str
    needs: tuple[str, ...]
    provides: tuple[str, ...]
    applies: Callable[[RunInputs, Mapping[str, Any]], bool]
    run: Callable[[RunInputs, Mapping[str, Any]], Produced]
    after_series: bool = False


def check_order(kinds: Sequence[OutputKind]) -> None:
    """Check that every kind's ``needs`` are provided by a kind before it.

    Raises:
        SettingError: names the first kind that needs a value no earlier kind provides.
    """
    provided: set[str] = set()
    for kind in kinds:
        missing = [name for name in kind.needs if name not in provided]
        if missing:
            raise SettingError(
                f"output kind '{kind.name}' needs {', '.join(missing)}, which no earlier output kind provides"
            )
        provided.update(kind.provides)


def build_outputs(run: RunInputs, kinds: Sequence[OutputKind]) -> dict[str, Any] | None:
    """Run every applicable kind in order; the merged run attributes, or None when no series is stored.

    Raises:
        SettingError: the order of ``kinds`` does not satisfy their ``needs`` (:func:`check_order`),
            or a kind produced a value it does not declare in ``provides``.
        FmriDataError: from the kinds (bad input).
    """
    check_order(kinds)
    values: Mapping[str, Any] = MappingProxyType({})
    attrs: dict[str, Any] = {}
    for kind in kinds:
        if kind.after_series and not run.writer.outputs:
            return None
        inputs = MappingProxyType({name: values.get(name) for name in kind.needs})
        if not kind.applies(run, inputs):
            continue
        produced = kind.run(run, inputs)
        undeclared = sorted(set(produced.values) - set(kind.provides))
        if undeclared:
            raise SettingError(f"output kind '{kind.name}' produced {', '.join(undeclared)}, not in its provides")
        attrs = {**attrs, **produced.attrs}
        values = MappingProxyType({**values, **produced.values})
    return attrs if run.writer.outputs else None
