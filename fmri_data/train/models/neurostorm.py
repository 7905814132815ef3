"""NeuroSTORM-style 4D volume MAE (arXiv 2506.11167; its Swin-4D predecessor SwiFT, arXiv 2307.05916).

Input ``(B, 1, X, Y, Z, T)`` (NeuroSTORM: ``(B, 1, 96, 96, 96, 20)``). A frame-wise 3D
convolution cuts ``6x6x6x1`` patches; stages of blocks partition the token grid into 4D
windows (shifted by half a window in every other block, a cyclic roll as in Swin) and mix
each window's tokens with a Mamba (selective state-space) block, then an MLP; patch
merging halves the spatial grid between stages.

Pre-training is masked reconstruction (SimMIM-style, since windows need the full grid):
masked tokens are replaced by a learned mask token, a linear head predicts every voxel of
the coarsest tokens' footprint, and the loss is the MSE over voxels of masked tokens.
Masking as we read the paper: spatial mask *windows* (one stage-0 window of tokens, through
all frames) at ``mask_ratio``, plus whole frames at ``temporal_mask_ratio``. Spatiotemporal
redundancy dropout (optional, our reading): a fraction of the remaining visible tokens is
also replaced by the mask token but not scored, so the model cannot copy a voxel from the
same place in a neighbouring frame. Prompt tuning: ``n_prompts`` learnable tokens per block
are prepended to every window before mixing; :meth:`NeuroStorm.freeze_backbone` leaves only
them (and a task head) trainable.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import SettingError
from ..blocks import Mlp, trunc_normal_
from ..configs import NeuroStormConfig
from ..ssm import MambaMixer


def window_partition(x: torch.Tensor, w: tuple[int, ...]) -> torch.Tensor:
    """(B, X, Y, Z, T, C) -> (B * n_windows, wx*wy*wz*wt, C)."""
    b, X, Y, Z, T, c = x.shape
    x = x.view(b, X // w[0], w[0], Y // w[1], w[1], Z // w[2], w[2], T // w[3], w[3], c)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6, 8, 9).reshape(-1, w[0] * w[1] * w[2] * w[3], c)


def window_reverse(x: torch.Tensor, w: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`window_partition`; ``shape`` = (B, X, Y, Z, T, C)."""
    b, X, Y, Z, T, c = shape
    x = x.view(b, X // w[0], Y // w[1], Z // w[2], T // w[3], w[0], w[1], w[2], w[3], c)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4, 8, 9).reshape(shape)


class WindowMambaBlock(nn.Module):
    def __init__(self, dim: int, window: tuple[int, ...], shift: tuple[int, ...], d_state: int, mlp_ratio: float,
                 n_prompts: int, scan: str = "auto"):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mixer = MambaMixer(dim, d_state=d_state, scan=scan)
        self.mlp = Mlp(dim, mlp_ratio)
        self.prompts = nn.Parameter(torch.zeros(n_prompts, dim)) if n_prompts else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = (1, 2, 3, 4)
        h = self.norm1(x)
        if any(self.shift):
            h = torch.roll(h, tuple(-s for s in self.shift), dims)
        windows = window_partition(h, self.window)
        if self.prompts is not None:
            p = self.prompts.expand(windows.shape[0], -1, -1)
            windows = self.mixer(torch.cat([p, windows], 1))[:, p.shape[1]:]
        else:
            windows = self.mixer(windows)
        h = window_reverse(windows, self.window, x.shape)
        if any(self.shift):
            h = torch.roll(h, self.shift, dims)
        x = x + h
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """(B, X, Y, Z, T, C) -> (B, X/2, Y/2, Z/2, T, 2C): 2x2x2 spatial neighbours concatenated."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(8 * dim)
        self.reduce = nn.Linear(8 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, X, Y, Z, T, c = x.shape
        x = x.view(b, X // 2, 2, Y // 2, 2, Z // 2, 2, T, c).permute(0, 1, 3, 5, 7, 2, 4, 6, 8)
        return self.reduce(self.norm(x.reshape(b, X // 2, Y // 2, Z // 2, T, 8 * c)))


class NeuroStorm(nn.Module):
    """4D shifted-window Mamba encoder + masked-voxel reconstruction head.

    Args:
        cfg: :class:`NeuroStormConfig`. The spatial shape (after ``downsample``) must be a
            multiple of ``patch * 2**(stages-1)`` per axis, and frames of the window's ``t``.
    """

    def __init__(self, cfg: NeuroStormConfig):
        super().__init__()
        self.cfg = cfg
        px, py, pz, pt = cfg.patch
        if pt != 1:
            raise SettingError("NeuroSTORM patches are one frame deep (patch[3] == 1)")
        shape = tuple(s // cfg.downsample for s in cfg.shape)
        self.scale = 2 ** (len(cfg.depths) - 1)
        self.grid = tuple(s // p for s, p in zip(shape, cfg.patch[:3]))
        for s, p in zip(shape, cfg.patch[:3]):
            if s % (p * self.scale):
                raise SettingError(f"volume side {s} is not a multiple of patch {p} x {self.scale} (stages)")
        if cfg.frames % min(cfg.window[3], cfg.frames):
            raise SettingError(f"frames {cfg.frames} not a multiple of the temporal window {cfg.window[3]}")
        self.input_shape = (*shape, cfg.frames)
        self.embed = nn.Conv3d(1, cfg.embed_dim, cfg.patch[:3], stride=cfg.patch[:3])
        self.pos_t = nn.Parameter(torch.zeros(cfg.frames, cfg.embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(cfg.embed_dim))
        self.stages = nn.ModuleList()
        self.merges = nn.ModuleList()
        dim, grid = cfg.embed_dim, self.grid
        for s, depth in enumerate(cfg.depths):
            window = tuple(min(w, g) for w, g in zip(cfg.window, (*grid, cfg.frames)))
            blocks = []
            for i in range(depth):
                shift = tuple(w // 2 if (i % 2 and w < g) else 0 for w, g in zip(window, (*grid, cfg.frames)))
                blocks.append(WindowMambaBlock(dim, window, shift, cfg.d_state, cfg.mlp_ratio, cfg.n_prompts, cfg.scan))
            self.stages.append(nn.ModuleList(blocks))
            if s < len(cfg.depths) - 1:
                self.merges.append(PatchMerging(dim))
                dim, grid = 2 * dim, tuple(g // 2 for g in grid)
        self.out_dim = dim
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, px * py * pz * self.scale ** 3)
        trunc_normal_(self)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    # ------------------------------------------------------------------ encoder
    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y, Z, T) -> (B, gx, gy, gz, T, C)."""
        if tuple(x.shape[2:]) != self.input_shape:
            raise SettingError(f"NeuroSTORM input has shape {tuple(x.shape[1:])}, expected (1, {', '.join(map(str, self.input_shape))})")
        b, _, X, Y, Z, T = x.shape
        t = self.embed(x.permute(0, 5, 1, 2, 3, 4).reshape(b * T, 1, X, Y, Z))
        t = t.view(b, T, *t.shape[1:]).permute(0, 3, 4, 5, 1, 2)
        return t + self.pos_t[None, None, None, None]

    def _encode_tokens(self, t: torch.Tensor) -> torch.Tensor:
        for s, blocks in enumerate(self.stages):
            for block in blocks:
                t = block(t)
            if s < len(self.merges):
                t = self.merges[s](t)
        return self.norm(t)

    def encode(self, batch: dict) -> torch.Tensor:
        """Features ``(B, N, C)`` of unmasked input (for probes)."""
        t = self._encode_tokens(self._tokens(batch["data"]))
        return t.flatten(1, 4)

    # ------------------------------------------------------------------ masking
    def masks(self, b: int, generator: torch.Generator | None, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked, dropped) token masks ``(B, gx, gy, gz, T)`` bool: masked = scored, dropped
        = hidden but not scored (redundancy dropout)."""
        cfg = self.cfg
        w = tuple(min(a, g) for a, g in zip(cfg.window[:3], self.grid))
        units = tuple(g // a for g, a in zip(self.grid, w))
        n_units = units[0] * units[1] * units[2]
        n_mask = int(round(cfg.mask_ratio * n_units))
        order = torch.rand(b, n_units, generator=generator).argsort(1)
        spatial = torch.zeros(b, n_units, dtype=torch.bool)
        spatial.scatter_(1, order[:, :n_mask], True)
        spatial = spatial.view(b, *units)
        for axis, rep in enumerate(w):
            spatial = spatial.repeat_interleave(rep, dim=axis + 1)
        n_frames = int(round(cfg.temporal_mask_ratio * cfg.frames))
        frames = torch.zeros(b, cfg.frames, dtype=torch.bool)
        frames.scatter_(1, torch.rand(b, cfg.frames, generator=generator).argsort(1)[:, :n_frames], True)
        masked = spatial[..., None] | frames[:, None, None, None, :]
        dropped = (torch.rand(masked.shape, generator=generator) < cfg.redundancy_dropout) & ~masked
        return masked.to(device), dropped.to(device)

    # ------------------------------------------------------------------ pre-training
    def forward(self, batch: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        x = batch["data"]
        t = self._tokens(x)
        masked, dropped = self.masks(x.shape[0], generator, x.device)
        hide = (masked | dropped)[..., None]
        t = torch.where(hide, self.mask_token.to(t.dtype), t)
        y = self.head(self._encode_tokens(t))                        # (B, gx', gy', gz', T, f^3 p^3)
        b, gx, gy, gz, T, _ = y.shape
        f, (px, py, pz, _) = self.scale, self.cfg.patch
        y = y.view(b, gx, gy, gz, T, f * px, f * py, f * pz).permute(0, 1, 5, 2, 6, 3, 7, 4)
        y = y.reshape(b, gx * f * px, gy * f * py, gz * f * pz, T)
        vox = masked.repeat_interleave(px, 1).repeat_interleave(py, 2).repeat_interleave(pz, 3)
        err = (y.float() - x[:, 0].float()) ** 2
        loss = (err * vox).sum() / vox.sum().clamp_min(1)
        return loss, {"mask_fraction": float(masked.float().mean())}

    def freeze_backbone(self) -> list[nn.Parameter]:
        """Prompt tuning: freeze everything but the prompts; returns the trainable prompts."""
        if not self.cfg.n_prompts:
            raise SettingError("prompt tuning needs model.n_prompts > 0")
        prompts = [blk.prompts for blocks in self.stages for blk in blocks]
        for p in self.parameters():
            p.requires_grad_(False)
        for p in prompts:
            p.requires_grad_(True)
        return prompts
