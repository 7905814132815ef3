"""Model and training configurations of the four families: ``tiny`` (CPU tests) and ``base``.

``base`` configs keep each paper's input contract (shapes, patch sizes, mask ratios, window
lengths); their widths/depths are the standard sizes of the architecture each family builds
on (SwiFT for NeuroSTORM, Hiera-Tiny for SLIM-Brain, ViT-B/16 + MAE decoder for the flat-map
MAE). Where a paper's exact width differs, override it: every field can be changed with
``key=value`` (``model.embed_dim=48``, ``train.lr=3e-4``; values parsed as YAML).

``tiny`` configs shrink widths and inputs (volumes average-pooled by ``downsample``, fewer
frames) so a few dozen steps run on a CPU in seconds; they are for testing, not science.

Which dataclass belongs to which family, and the ``tiny`` overrides, are registered in
:mod:`.registry` (with :func:`~.registry.get_config` and :func:`~.registry.from_dict`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..config.overrides import split_pair, yaml_value
from ..errors import SettingError


@dataclass
class TrainSettings:
    """Optimisation and logging. ``amp``: ``bf16`` | ``fp16`` | ``none`` (only used on CUDA)."""

    steps: int = 1000
    batch_size: int = 8
    lr: float = 1.5e-4
    weight_decay: float = 0.05
    warmup_steps: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    amp: str = "bf16"
    log_every: int = 1
    checkpoint_every: int = 500
    clamp: float | None = 5.0  # |z| clip of the frame-z-scored input (volumes, flat maps)


@dataclass
class NeuroStormConfig:
    """NeuroSTORM (arXiv 2506.11167): input (B, 1, 96, 96, 96, 20); 6x6x6x1 patches;
    shifted 4D windows mixed by Mamba blocks; patch merging between stages."""

    shape: tuple[int, int, int] = (96, 96, 96)
    frames: int = 20
    downsample: int = 1          # average-pool the 96^3 volume by this factor first (tiny only)
    patch: tuple[int, int, int, int] = (6, 6, 6, 1)
    embed_dim: int = 36
    depths: tuple[int, ...] = (2, 2, 6, 2)
    window: tuple[int, int, int, int] = (4, 4, 4, 4)   # tokens (x, y, z, t) per window
    d_state: int = 16
    mlp_ratio: float = 4.0
    mask_ratio: float = 0.5             # of spatial mask windows (tubes through time)
    temporal_mask_ratio: float = 0.25   # frames masked everywhere, in addition
    redundancy_dropout: float = 0.0     # visible tokens replaced by the mask token, not scored
    n_prompts: int = 0                  # learnable prompt tokens per block (prompt tuning)
    scan: str = "auto"                  # selective scan: auto | chunked | sequential (fmri_data.train.ssm.scan)


@dataclass
class SlimBrainConfig:
    """SLIM-Brain (arXiv 2512.21881): windows of 40 frames of 96^3 volumes; Hiera-style
    hierarchical encoder, patch (t, x, y, z) = 1x4x4x4, mask units, JEPA with EMA target."""

    shape: tuple[int, int, int] = (96, 96, 96)
    frames: int = 40
    downsample: int = 1
    patch: tuple[int, int, int, int] = (1, 4, 4, 4)
    mask_unit: tuple[int, int, int, int] = (2, 8, 8, 8)   # tokens (t, x, y, z) per mask unit
    dims: tuple[int, ...] = (96, 192, 384, 768)
    depths: tuple[int, ...] = (1, 2, 7, 2)
    heads: tuple[int, ...] = (1, 2, 4, 8)
    local_stages: int = 2        # first stages attend within a mask unit (Hiera's mask-unit attention)
    mask_ratio: float = 0.7
    predictor_dim: int = 384
    predictor_depth: int = 4
    predictor_heads: int = 6
    ema: tuple[float, float] = (0.996, 1.0)   # EMA momentum, linearly from first to second over training
    saliency_scorer: str | None = "dfc_distance"   # top-k windows of this scorer (None: sliding windows)


@dataclass
class FlatMaeConfig:
    """Flat-map ViT MAE (arXiv 2510.13768): input (B, 1, 16, 224, 560) + valid mask; 16x16
    spatial x ``t_patch`` temporal patches; tube masking 0.9."""

    shape: tuple[int, int] = (224, 560)
    frames: int = 16
    patch: int = 16
    t_patch: int = 16
    embed_dim: int = 768
    depth: int = 12
    heads: int = 12
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    mask_ratio: float = 0.9


@dataclass
class FmriLmConfig:
    """fMRI-LM (arXiv 2511.21760): ROI input (B, 450, 160). ``stage`` 1 trains the VQ
    tokenizer (one token per ROI); stage 2 a causal LM (LoRA) over fMRI tokens + descriptor
    text, with the stage-1 tokenizer frozen (``tokenizer_checkpoint``)."""

    n_rois: int = 450
    frames: int = 160
    stage: int = 1
    dim: int = 256
    depth: int = 4
    heads: int = 8
    codebook_size: int = 1024
    code_dim: int = 64
    commitment: float = 0.25
    tokenizer_checkpoint: str | None = None
    lm_name: str | None = None          # Hugging Face id or path; None = tiny random GPT-2 (tests)
    lm_layers: int = 2                  # sizes of the tiny random LM
    lm_dim: int = 64
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] | None = None   # None: peft's default for the model type
    max_text_tokens: int = 256
    zscore_window: bool = False         # z-score each parcel over the window (for stores not z-scored per parcel)
    roi_array: str = "roi/tian_s3-schaefer400_7n"   # store array "roi/<key>" (the fmri_lm recipe's), or "roi" (each run's first)


@dataclass
class Config:
    family: str
    model: Any
    train: TrainSettings = field(default_factory=TrainSettings)

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "model": dataclasses.asdict(self.model), "train": dataclasses.asdict(self.train)}


TINY_TRAIN: dict[str, Any] = dict(steps=30, batch_size=2, lr=2e-3, weight_decay=0.0, warmup_steps=0, checkpoint_every=10)
"""Training settings of every ``tiny`` config (the model overrides are in :mod:`.registry`)."""


def apply_override(cfg: Config, item: str) -> None:
    """Set ``model.<field>=<yaml>`` or ``train.<field>=<yaml>`` (a bare field is looked up in both).

    Raises:
        SettingError: no such field in the config.
    """
    key, raw = split_pair(item, "override")
    section, _, name = key.strip().rpartition(".")
    targets = [getattr(cfg, section)] if section in ("model", "train") else [cfg.model, cfg.train] if not section else []
    target = next((t for t in targets if name in {f.name for f in dataclasses.fields(t)}), None)
    if target is None:
        raise SettingError(f"override '{item}': no field '{key}' in the {cfg.family} config")
    value = yaml_value(raw)
    current = getattr(target, name)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    setattr(target, name, value)
