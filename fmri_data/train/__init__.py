"""Thin training layer: the four fMRI foundation-model families on a store's windows.

::

    from fmri_data.train import get_config, build_model, StoreBatches, Trainer

    cfg = get_config("neurostorm", "tiny", ["train.steps=40"])
    model = build_model(cfg)
    batches = StoreBatches("OUT.zarr", cfg, device="cpu")
    Trainer(model, batches, cfg, "runs/ns", device="cpu").fit()

Modules: :mod:`.registry` (the families: one entry each), :mod:`.configs` (tiny/base configs), :mod:`.blocks` (transformer blocks),
:mod:`.ssm` (selective scan), :mod:`.models` (one module per family), :mod:`.data` (the
adapter to :mod:`fmri_data.load`), :mod:`.descriptors` (fMRI-LM text), :mod:`.trainer`,
:mod:`.probe` (frozen linear/attentive probes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .configs import Config, TrainSettings
from .registry import FAMILIES, Family, get_config, get_family

__all__ = ["FAMILIES", "Config", "Family", "StoreBatches", "TensorBatches", "TrainSettings", "Trainer", "build_model",
           "get_config", "get_family", "load_pretrained", "read_checkpoint"]

_LAZY = {"StoreBatches": "data", "TensorBatches": "data", "Trainer": "trainer", "build_model": "trainer",
         "load_pretrained": "trainer", "read_checkpoint": "trainer"}


def __getattr__(name: str) -> Any:  # lazy: the registry and configs import without torch (for the CLI)
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .data import StoreBatches, TensorBatches
    from .trainer import Trainer, build_model, load_pretrained, read_checkpoint
