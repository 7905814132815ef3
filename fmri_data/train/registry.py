"""The registry of model families: everything that differs between families, in one place.

Adding a family is one :class:`Family` entry in :data:`FAMILIES` plus its model module
(``fmri_data/train/models/<name>.py``) and config dataclass (:mod:`.configs`). Every other
module (:mod:`.trainer`, :mod:`.data`, :mod:`.probe`, ``fmri-data train``) looks a family up
here with :func:`get_family` instead of branching on its name.

Importing this module is cheap (no torch): model modules are imported when a model is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import SettingError
from .configs import (TINY_TRAIN, Config, FlatMaeConfig, FmriLmConfig, NeuroStormConfig, SlimBrainConfig,
                      TrainSettings, apply_override)


@dataclass(frozen=True)
class Family:
    """What a family decides.

    Attributes:
        name: the family's name (``--family``, ``Config.family``, checkpoints).
        config: its model config dataclass (defaults: the ``base`` config).
        tiny: field overrides of ``config`` for the ``tiny`` config (CPU tests).
        build: ``build(model_config) -> nn.Module`` (weights from the current torch seed).
        array: the store array its windows read (``bold``, ``flat``); ``None``: the model
            config's ``roi_array`` (``roi/<key>`` or ``roi``).
        layout: the loader layout of ``batch["data"]`` (:func:`fmri_data.load.dataset.layout`).
        mask: a store array given as ``batch["mask"]`` (``flat_mask``), or ``None``.
        frame_zscore: the loader z-scores each frame and clamps (volumes, flat maps; volumes are
            then average-pooled by ``model.downsample``); ``False``: values as stored (ROI
            series), z-scored per parcel over the window if ``model.zscore_window``, clamped.
        text: ``text(model_config)`` is true when batches also carry descriptor ``text``.
        prompt_tuning: the model takes learnable prompts (``probe --kind prompt``).
        missing_hint: appended to the "no windows" error of a store without the family's array.
    """

    name: str
    config: type
    tiny: dict[str, Any]
    build: Callable[[Any], Any]
    array: str | None
    layout: str
    mask: str | None = None
    frame_zscore: bool = True
    text: Callable[[Any], bool] = field(default=lambda model: False)
    prompt_tuning: bool = False
    missing_hint: str = ""

    def store_array(self, model: Any) -> str:
        """The store array the windows of ``model`` (a config of this family) read."""
        return self.array or model.roi_array

    @staticmethod
    def window_frames(model: Any) -> int:
        """Window length in frames of ``model`` (a config of this family): its ``frames``."""
        return model.frames


def _neurostorm(m: NeuroStormConfig):
    from .models.neurostorm import NeuroStorm
    return NeuroStorm(m)


def _slim_brain(m: SlimBrainConfig):
    from .models.slim_brain import SlimBrain
    return SlimBrain(m)


def _flat_mae(m: FlatMaeConfig):
    from .models.flat_mae import FlatMae
    return FlatMae(m)


def _fmri_lm(m: FmriLmConfig):
    """Stage 1: the VQ tokenizer; stage 2: the LM over the frozen stage-1 tokenizer.

    Raises:
        SettingError: stage 2 without ``model.tokenizer_checkpoint``.
    """
    from .models.fmri_lm import FmriLanguageModel, VqTokenizer
    if m.stage == 1:
        return VqTokenizer(m)
    if not m.tokenizer_checkpoint:
        raise SettingError("fMRI-LM stage 2 needs model.tokenizer_checkpoint (a stage-1 checkpoint)")
    from .trainer import read_checkpoint
    vq = VqTokenizer(m)
    vq.load_state_dict(read_checkpoint(m.tokenizer_checkpoint)[0])
    return FmriLanguageModel(m, vq)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("neurostorm", NeuroStormConfig, build=_neurostorm, array="bold", layout="neurostorm", prompt_tuning=True,
           tiny=dict(downsample=4, frames=4, embed_dim=12, depths=(2, 2), window=(2, 2, 2, 2), d_state=4)),
    Family("slim_brain", SlimBrainConfig, build=_slim_brain, array="bold", layout="neurostorm",
           tiny=dict(downsample=6, frames=8, mask_unit=(2, 2, 2, 2), dims=(16, 32), depths=(1, 1), heads=(1, 2),
                     local_stages=1, predictor_dim=32, predictor_depth=1, predictor_heads=2, ema=(0.9, 1.0),
                     saliency_scorer=None)),
    Family("flat_mae", FlatMaeConfig, build=_flat_mae, array="flat", layout="flat", mask="flat_mask",
           missing_hint=" (flat maps come from the flat_mae recipe)",
           tiny=dict(shape=(64, 160), t_patch=4, embed_dim=32, depth=2, heads=2, decoder_dim=32, decoder_depth=1,
                     decoder_heads=2)),
    Family("fmri_lm", FmriLmConfig, build=_fmri_lm, array=None, layout="roi", frame_zscore=False,
           text=lambda m: m.stage == 2,
           tiny=dict(frames=32, dim=32, depth=1, heads=2, codebook_size=64, code_dim=16, lm_layers=2, lm_dim=32,
                     lora_r=4, lora_alpha=8, max_text_tokens=160)),
)}

NAMES: tuple[str, ...] = tuple(FAMILIES)


def get_family(name: str) -> Family:
    """The registry entry of family ``name``.

    Raises:
        SettingError: no family of that name (the message lists the registered names).
    """
    try:
        return FAMILIES[name]
    except KeyError:
        raise SettingError(f"unknown family '{name}'; one of {', '.join(NAMES)}") from None


def get_config(family: str, name: str = "tiny", overrides: list[str] | None = None) -> Config:
    """The ``tiny`` or ``base`` config of a family, with ``section.key=value`` overrides.

    Raises:
        SettingError: unknown family, config name, or override key.
    """
    fam = get_family(family)
    if name not in ("tiny", "base"):
        raise SettingError(f"unknown config '{name}'; tiny or base")
    model = fam.config(**(fam.tiny if name == "tiny" else {}))
    train = TrainSettings(**(TINY_TRAIN if name == "tiny" else {}))
    cfg = Config(family, model, train)
    for item in overrides or []:
        apply_override(cfg, item)
    return cfg


def from_dict(data: dict[str, Any]) -> Config:
    """Inverse of :meth:`Config.to_dict` (lists back to tuples where the field is a tuple).

    Raises:
        SettingError: an unknown family.
    """
    config = get_family(data["family"]).config
    defaults = config()
    model = {k: tuple(v) if isinstance(getattr(defaults, k, None), tuple) and isinstance(v, list) else v
             for k, v in data["model"].items()}
    return Config(data["family"], config(**model), TrainSettings(**data["train"]))


__all__ = ["FAMILIES", "NAMES", "Family", "from_dict", "get_config", "get_family"]
