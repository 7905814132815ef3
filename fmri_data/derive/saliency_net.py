"""Learned saliency: a small temporal network trained by masked-frame prediction.

A stand-in for the "lightweight temporal extractor" of SLIM-Brain (arXiv 2512.21881),
whose code is not public. The network sees an ROI series window with some frames masked
(set to 0, plus a mask channel) and predicts the masked frames; it is trained
self-supervised on the store's own runs (masked modelling along time, as BrainLM and
MAE-style fMRI models pretrain). The saliency of a window is its reconstruction
difficulty: the mean squared error over all frames and parcels when every frame is
masked once (``period`` interleaved passes, frames ``t % period == phase`` masked in
pass ``phase``). Frames that the network cannot infer from their neighbours — events
the run's typical dynamics do not explain — make a window salient.

Architecture (:class:`MaskedFrameNet`), on ``(B, R + 1, W)`` (batch, parcels + mask
channel, time): a pointwise Conv1d embedding to ``hidden`` channels, residual blocks of
dilated Conv1d (kernel ``kernel``, dilations ``dilations``, GELU), and a pointwise Conv1d
back to ``R`` parcels. It is fully convolutional in time, so it scores windows of any
length. Inputs are z-scored per parcel over the whole run (:func:`standardize`).

Training is seeded: the same series, settings and seed give the same weights on the same
machine (CPU convolutions are deterministic; CUDA is not guaranteed to be). On the CPU,
training and scoring run on one thread by default: the network is small enough that more
threads gain little, oversubscribe a machine already busy with other runs (8x slower on a
loaded 2-core machine), and change float summation order with the thread count.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..errors import SettingError
from ..imports import load_module

FORMAT = "fmri-data-saliency-net/1"


@dataclass(frozen=True)
class NetConfig:
    """Hyperparameters of :class:`MaskedFrameNet` and of its masking.

    Attributes:
        n_channels: parcels ``R`` of the ROI series it models.
        hidden: channels of the hidden layers.
        kernel: temporal kernel size (frames) of the dilated convolutions.
        dilations: one residual block per dilation; the receptive field is
            ``1 + (kernel - 1) * sum(dilations)`` frames.
        mask_ratio: fraction of frames masked in each training window.
        period: scoring masks frames ``t % period == phase`` for each phase.
    """

    n_channels: int
    hidden: int = 32
    kernel: int = 5
    dilations: tuple[int, ...] = (1, 2, 4)
    mask_ratio: float = 0.25
    period: int = 4

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "NetConfig":
        data = json.loads(text)
        data["dilations"] = tuple(data["dilations"])
        return cls(**data)


def _torch():
    return load_module("torch")


def build_net(config: NetConfig):
    """The :class:`MaskedFrameNet` ``torch.nn.Module`` for ``config`` (random weights)."""
    torch = _torch()
    nn = torch.nn

    class MaskedFrameNet(nn.Module):
        """``(B, R + 1, W)`` masked series + mask channel -> ``(B, R, W)`` reconstruction."""

        def __init__(self, cfg: NetConfig):
            super().__init__()
            self.embed = nn.Conv1d(cfg.n_channels + 1, cfg.hidden, 1)
            self.blocks = nn.ModuleList(
                nn.Conv1d(cfg.hidden, cfg.hidden, cfg.kernel, dilation=d, padding=d * (cfg.kernel - 1) // 2)
                for d in cfg.dilations
            )
            self.act = nn.GELU()
            self.head = nn.Conv1d(cfg.hidden, cfg.n_channels, 1)

        def forward(self, x, mask):
            h = self.embed(torch.cat([x * (1 - mask), mask], dim=1))
            for block in self.blocks:
                h = h + self.act(block(h))
            return self.head(h)

    return MaskedFrameNet(config)


def standardize(series: np.ndarray) -> np.ndarray:
    """Z-score each parcel over the whole run (a constant parcel becomes 0).

    Args:
        series: ``(T, R)`` ROI series, time first.

    Returns:
        ``(T, R)`` float32.
    """
    x = np.asarray(series, dtype=np.float64)
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    return ((x - mean) / np.where(std > 0, std, 1.0)).astype(np.float32)


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """Run torch CPU ops on ``n`` intra-op threads (None: leave torch's setting), then restore."""
    torch = _torch()
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when available else ``"cpu"``.

    Raises:
        SettingError: ``"cuda"`` requested but not available, or an unknown device.
    """
    torch = _torch()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SettingError("device 'cuda' requested but torch.cuda.is_available() is False")
    if device not in ("cpu", "cuda"):
        raise SettingError(f"unknown device '{device}' (cpu, cuda or auto)")
    return device


@dataclass
class FitResult:
    """A trained network, its configuration and its training curve (one loss per step)."""

    net: Any
    config: NetConfig
    window: int
    losses: list[float] = field(default_factory=list)
    seed: int = 0
    steps: int = 0
    batch: int = 0
    lr: float = 0.0


def fit(
    series: list[np.ndarray],
    window: int,
    *,
    steps: int = 300,
    batch: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    device: str = "cpu",
    config: NetConfig | None = None,
    threads: int | None = 1,
) -> FitResult:
    """Train :class:`MaskedFrameNet` by masked-frame prediction on ROI series.

    Each step draws ``batch`` windows of ``window`` frames uniformly among every window
    position of every run, masks each frame with probability ``mask_ratio`` (at least
    one per window), and minimises the mean squared error on the masked frames with
    Adam. Sampling and initialisation are seeded by ``seed``.

    Args:
        series: runs as ``(T, R)`` arrays (same ``R``), time first; runs shorter than
            ``window`` are not sampled.
        window: frames per training window.
        steps, batch, lr: optimisation settings.
        seed: seed of weights, window sampling and masks.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        config: network settings (``n_channels`` must match ``R``); default
            ``NetConfig(R)``.
        threads: torch CPU threads while training (None: torch's current setting).

    Returns:
        :class:`FitResult` with the network on the CPU and the loss of every step.

    Raises:
        SettingError: no run is at least ``window`` frames long, runs differ in ``R``, or
            the device is unavailable.
    """
    runs = [standardize(s) for s in series if s.shape[0] >= window]
    if not runs:
        raise SettingError(f"no run has at least {window} frames to train on")
    n_channels = runs[0].shape[1]
    if any(r.shape[1] != n_channels for r in runs):
        raise SettingError(f"runs have different numbers of parcels: {sorted({r.shape[1] for r in runs})}")
    config = config or NetConfig(n_channels)
    if config.n_channels != n_channels:
        raise SettingError(f"config.n_channels={config.n_channels} but the series have {n_channels} parcels")
    device = resolve_device(device)
    with cpu_threads(threads):
        return _train(runs, window, config, steps, batch, lr, seed, device)


def _train(runs, window, config, steps, batch, lr, seed, device) -> FitResult:
    torch = _torch()
    n_channels = config.n_channels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_net(config)
    net.to(device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    positions = np.concatenate([np.stack([np.full(r.shape[0] - window + 1, i), np.arange(r.shape[0] - window + 1)], 1) for i, r in enumerate(runs)])
    losses = []
    for _ in range(steps):
        picks = positions[rng.integers(0, len(positions), size=batch)]
        x = np.stack([runs[i][s : s + window].T for i, s in picks])  # (B, R, W)
        mask = rng.random((batch, window)) < config.mask_ratio
        empty = ~mask.any(axis=1)
        mask[empty, rng.integers(0, window, size=int(empty.sum()))] = True
        xt = torch.from_numpy(x).to(device)
        mt = torch.from_numpy(mask[:, None, :].astype(np.float32)).to(device)
        pred = net(xt, mt)
        loss = (((pred - xt) ** 2) * mt).sum() / (mt.sum() * n_channels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach().cpu()))
    net.to("cpu").eval()
    return FitResult(net, config, window, losses, seed=seed, steps=steps, batch=batch, lr=lr)


def reconstruction_error(
    net, config: NetConfig, series: np.ndarray, starts: np.ndarray, window: int, device: str = "cpu", threads: int | None = 1
) -> np.ndarray:
    """Saliency of each window: mean squared masked-frame reconstruction error.

    The run is z-scored per parcel (:func:`standardize`); each window is passed alone,
    with frames ``t % period == phase`` masked in pass ``phase``; the error is averaged
    over every frame (each masked exactly once) and parcel.

    Args:
        net: a trained :class:`MaskedFrameNet`.
        config: its :class:`NetConfig`.
        series: ``(T, R)`` ROI series, time first, ``R == config.n_channels``.
        starts: ``(n,)`` window start frames; window: frames per window.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        threads: torch CPU threads (None: torch's current setting).

    Returns:
        ``(n,)`` float64 (z-score units squared).

    Raises:
        SettingError: ``R`` differs from the network's, or windows exceed the run.
    """
    torch = _torch()
    if series.ndim != 2 or series.shape[1] != config.n_channels:
        raise SettingError(f"series has shape {series.shape}; the network models {config.n_channels} parcels")
    if len(starts) == 0:
        return np.zeros(0, dtype=np.float64)
    if starts.min() < 0 or starts.max() + window > series.shape[0]:
        raise SettingError(f"windows of {window} frames exceed the run's {series.shape[0]} frames")
    device = resolve_device(device)
    z = standardize(series)
    x = torch.from_numpy(np.stack([z[s : s + window].T for s in starts])).to(device)  # (n, R, W)
    net = net.to(device).eval()
    errors = torch.zeros(len(starts), dtype=torch.float64, device=device)
    t = torch.arange(window, device=device)
    with torch.no_grad(), cpu_threads(threads):
        for phase in range(config.period):
            mask = (t % config.period == phase).to(torch.float32)[None, None, :].expand(len(starts), 1, window)
            pred = net(x, mask)
            errors += ((((pred - x) ** 2) * mask).sum(dim=(1, 2))).double()
    net.to("cpu")
    return (errors / (window * config.n_channels)).cpu().numpy()


def to_bytes(result: FitResult, extra: dict[str, str] | None = None) -> bytes:
    """Serialize the weights as safetensors, with the config and training settings as metadata.

    Args:
        result: from :func:`fit`.
        extra: more string metadata (e.g. the ROI key it was trained on).

    Returns:
        The ``.safetensors`` file content.
    """
    save = load_module("safetensors.torch").save
    metadata = {
        "format": FORMAT,
        "config": result.config.to_json(),
        "window": str(result.window),
        "seed": str(result.seed),
        "steps": str(result.steps),
        "batch": str(result.batch),
        "lr": repr(result.lr),
        **(extra or {}),
    }
    state = {k: v.detach().cpu().contiguous() for k, v in result.net.state_dict().items()}
    return save(state, metadata=metadata)


def from_bytes(data: bytes, where: str = "<bytes>") -> tuple[Any, NetConfig, dict[str, str]]:
    """Read a network serialized by :func:`to_bytes`.

    The metadata is read from the safetensors header (8-byte little-endian length, then
    a JSON header whose ``__metadata__`` holds string pairs).

    Args:
        data: the ``.safetensors`` file content.
        where: file name for error messages.

    Returns:
        ``(net, config, metadata)`` with the network on the CPU in eval mode.

    Raises:
        SettingError: not an fmri-data saliency network.
    """
    load = load_module("safetensors.torch").load
    try:
        (length,) = struct.unpack("<Q", data[:8])
        metadata = json.loads(data[8 : 8 + length]).get("__metadata__") or {}
    except (struct.error, ValueError) as exc:
        raise SettingError(f"{where}: not a safetensors file ({exc})") from exc
    if metadata.get("format") != FORMAT:
        raise SettingError(f"{where}: not an fmri-data saliency network (format {metadata.get('format')!r})")
    config = NetConfig.from_json(metadata["config"])
    net = build_net(config)
    net.load_state_dict(load(data))
    return net.eval(), config, metadata


def sha256(data: bytes) -> str:
    """SHA-256 hex digest of bytes."""
    return hashlib.sha256(data).hexdigest()
