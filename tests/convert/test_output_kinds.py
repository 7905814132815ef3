"""The output-kind registry: declared needs and provides, checked before a run is built (no real data)."""

from types import SimpleNamespace

import pytest

from fmri_data.convert.context import RunInputs
from fmri_data.convert.outputs import OUTPUT_KINDS
from fmri_data.convert.outputs.base import OutputKind, Produced, build_outputs, check_order


def _kind(name, needs=(), provides=(), produce=None, after_series=False):
    return OutputKind(name, tuple(needs), tuple(provides), lambda run, inputs: True,
                      lambda run, inputs: produce(run, inputs) if produce else Produced(), after_series)


def _run(outputs=()):
    writer = SimpleNamespace(outputs=list(outputs))
    return RunInputs(spec=None, recipe={}, recipe_hash="h", atlas_dir=None, writer=writer)


def test_registry_order_satisfies_every_kinds_needs():
    check_order(OUTPUT_KINDS)
    provided: set[str] = set()
    for kind in OUTPUT_KINDS:
        assert set(kind.needs) <= provided, kind.name
        provided |= set(kind.provides)
    assert [k.name for k in OUTPUT_KINDS] == ["volume", "cifti", "gifti", "flat", "tables", "saliency", "qa"]


def test_a_kind_needing_an_unknown_input_is_refused_by_name():
    kinds = (_kind("first", provides=["timing"]), _kind("second", needs=["timing", "mystery"]))
    with pytest.raises(ValueError, match="output kind 'second' needs mystery"):
        check_order(kinds)
    with pytest.raises(ValueError, match="output kind 'second' needs mystery"):
        build_outputs(_run(), kinds)
    with pytest.raises(ValueError, match="'first' needs timing"):  # a later provider does not count
        check_order((_kind("first", needs=["timing"]), _kind("second", provides=["timing"])))


def test_values_flow_by_name_and_undeclared_values_are_refused():
    seen = {}

    def first(run, inputs):
        run.writer.outputs.append("x")
        return Produced({"a": 1}, {"timing": "T"})

    def second(run, inputs):
        seen.update(inputs)
        with pytest.raises(TypeError):
            inputs["timing"] = "changed"  # read-only
        return Produced({"b": 2})

    run = _run()
    kinds = (_kind("first", provides=["timing", "other"], produce=first),
             _kind("second", needs=["timing", "other"], produce=second))
    assert build_outputs(run, kinds) == {"a": 1, "b": 2}
    assert seen == {"timing": "T", "other": None}  # not produced for this run: None
    sneaky = _kind("sneaky", provides=["timing"], produce=lambda run, inputs: Produced({}, {"roi_series": {}}))
    with pytest.raises(ValueError, match="'sneaky' produced roi_series, not in its provides"):
        build_outputs(_run(), (sneaky,))


def test_a_run_without_stored_series_is_skipped_before_the_describing_kinds():
    ran = []
    describe = _kind("describe", after_series=True, produce=lambda run, inputs: ran.append(1) or Produced())
    kinds = (_kind("series"), describe)
    assert build_outputs(_run(), kinds) is None and not ran
    assert build_outputs(_run(["bold"]), kinds) == {} and ran == [1]
