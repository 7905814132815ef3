"""Thin training layer: the four fMRI foundation-model families on a store's windows.

::

    from fmri_data.train import get_config, build_model, StoreBatches, Trainer

    cfg = get_config("neurostorm", "tiny", ["train.steps=40"])
    model = build_model(cfg)
    batches = StoreBatches("OUT.zarr", cfg, device="cpu")
    Trainer(model, batches, cfg, "runs/ns", device="cpu").fit()

Modules: :mod:`.configs` (tiny/base configs), :mod:`.blocks` (transformer blocks),
:mod:`.ssm` (selective scan), :mod:`.models` (one module per family), :mod:`.data` (the
adapter to :mod:`fmri_data.load`), :mod:`.descriptors` (fMRI-LM text), :mod:`.trainer`,
:mod:`.probe` (frozen linear/attentive probes).
"""

from .configs import Config, TrainSettings, get_config
from .data import StoreBatches, TensorBatches
from .trainer import Trainer, build_model, load_pretrained, read_checkpoint

__all__ = ["Config", "StoreBatches", "TensorBatches", "TrainSettings", "Trainer", "build_model", "get_config",
           "load_pretrained", "read_checkpoint"]
