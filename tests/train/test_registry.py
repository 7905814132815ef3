"""The family registry: exactly the four families, each builds its tiny config and model, and an
unknown family is one clear error naming the registered ones (no store needed)."""

from __future__ import annotations

import dataclasses

import pytest
from torch import nn

from fmri_data.errors import FmriDataError, SettingError
from fmri_data.train import FAMILIES, build_model, get_config, get_family
from fmri_data.train.registry import from_dict

NAMES = ("neurostorm", "slim_brain", "flat_mae", "fmri_lm")


def test_registry_holds_exactly_the_four_families():
    assert tuple(FAMILIES) == NAMES
    assert all(spec.name == name for name, spec in FAMILIES.items())


def test_cli_families_come_from_the_registry():
    from fmri_data.cli.train import FAMILIES as CLI_FAMILIES

    assert tuple(CLI_FAMILIES) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_every_entry_builds_its_tiny_config_and_model(name):
    spec = get_family(name)
    cfg = get_config(name, "tiny")
    assert cfg.family == name and isinstance(cfg.model, spec.config)
    assert set(spec.tiny) <= {f.name for f in dataclasses.fields(spec.config)}
    assert isinstance(get_config(name, "base").model, spec.config)
    assert isinstance(spec.store_array(cfg.model), str) and spec.window_frames(cfg.model) == cfg.model.frames
    assert isinstance(spec.layout, str)
    model = build_model(cfg)
    assert isinstance(model, nn.Module) and sum(p.numel() for p in model.parameters()) > 0
    assert from_dict(cfg.to_dict()) == cfg


def test_family_specifics():
    assert [get_family(n).store_array(get_config(n).model) for n in NAMES] == \
        ["bold", "bold", "flat", get_config("fmri_lm").model.roi_array]
    assert [get_family(n).layout for n in NAMES] == ["neurostorm", "neurostorm", "flat", "roi"]
    assert [get_family(n).mask for n in NAMES] == [None, None, "flat_mask", None]
    assert [n for n in NAMES if get_family(n).prompt_tuning] == ["neurostorm"]
    assert [n for n in NAMES if not get_family(n).frame_zscore] == ["fmri_lm"]
    lm = get_family("fmri_lm")
    assert not lm.text(get_config("fmri_lm").model) and lm.text(get_config("fmri_lm", overrides=["model.stage=2"]).model)


@pytest.mark.parametrize("call", [lambda: get_family("nope"), lambda: get_config("nope"),
                                  lambda: from_dict({"family": "nope", "model": {}, "train": {}})])
def test_unknown_family_is_one_clear_error(call):
    with pytest.raises(SettingError) as info:
        call()
    assert str(info.value) == "unknown family 'nope'; one of neurostorm, slim_brain, flat_mae, fmri_lm"
    assert isinstance(info.value, ValueError) and isinstance(info.value, FmriDataError)
