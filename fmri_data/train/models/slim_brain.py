"""SLIM-Brain-style hierarchical 4D JEPA (arXiv 2512.21881; encoder after Hiera, arXiv 2306.00989;
objective after I-JEPA, arXiv 2301.08243).

Input ``(B, 1, X, Y, Z, T)`` (SLIM-Brain: 96^3 volumes, windows of 40 frames, the top-k
saliency windows of each run). A frame-wise convolution cuts ``1x4x4x4`` (t, x, y, z)
patches. Tokens are grouped into *mask units* of ``mask_unit`` tokens; ``mask_ratio`` of
the units are deleted before the context encoder runs, so its cost and activation memory
fall with the mask ratio. The encoder is hierarchical: stage ``s`` has ``depths[s]``
transformer blocks of width ``dims[s]``; between stages each unit's tokens are projected
and 2x2x2 max-pooled in space (Hiera's pooling). The first ``local_stages`` stages attend
within a mask unit (Hiera's mask-unit attention), the rest across all visible tokens.

JEPA: the target encoder is an EMA copy of the context encoder that sees every unit; its
final tokens of the deleted units, layer-normed, are the targets. A narrow predictor
transformer takes the context tokens plus a learned mask token (with positions) per target
token and regresses the targets (MSE). The EMA momentum rises linearly over training
(:meth:`SlimBrain.after_step`, called by the trainer after each optimiser step).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import SettingError
from ..blocks import Block, gather_tokens, trunc_normal_
from ..configs import SlimBrainConfig


class HieraEncoder(nn.Module):
    """Units ``(B, U, P, C0)`` (P tokens of a unit in (t, x, y, z) order) -> ``(B, U, P_last, C_last)``."""

    def __init__(self, cfg: SlimBrainConfig):
        super().__init__()
        self.unit = list(cfg.mask_unit)
        self.local_stages = cfg.local_stages
        self.stages = nn.ModuleList(
            nn.ModuleList(Block(d, h) for _ in range(n)) for d, n, h in zip(cfg.dims, cfg.depths, cfg.heads)
        )
        self.proj = nn.ModuleList(nn.Linear(a, b) for a, b in zip(cfg.dims[:-1], cfg.dims[1:]))
        self.norm = nn.LayerNorm(cfg.dims[-1])

    def unit_shape(self, stage: int) -> tuple[int, int, int, int]:
        t, x, y, z = self.unit
        f = 2 ** stage
        return t, x // f, y // f, z // f

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        b, n, _, _ = u.shape
        for s, blocks in enumerate(self.stages):
            p = u.shape[2]
            h = u.reshape(b * n, p, -1) if s < self.local_stages else u.reshape(b, n * p, -1)
            for blk in blocks:
                h = blk(h)
            u = h.reshape(b, n, p, -1)
            if s < len(self.proj):
                t, x, y, z = self.unit_shape(s)
                v = self.proj[s](u).reshape(b * n * t, x, y, z, -1).permute(0, 4, 1, 2, 3)
                v = F.max_pool3d(v, 2)
                u = v.permute(0, 2, 3, 4, 1).reshape(b, n, t * (x // 2) * (y // 2) * (z // 2), -1)
        return self.norm(u)


class SlimBrain(nn.Module):
    def __init__(self, cfg: SlimBrainConfig):
        super().__init__()
        self.cfg = cfg
        shape = tuple(s // cfg.downsample for s in cfg.shape)
        self.input_shape = (*shape, cfg.frames)
        pt, px, py, pz = cfg.patch
        if pt != 1:
            raise SettingError("patches are one frame deep here (patch[0] == 1)")
        self.grid = (cfg.frames, shape[0] // px, shape[1] // py, shape[2] // pz)        # (T, gx, gy, gz)
        f = 2 ** (len(cfg.dims) - 1)
        for g, m, name in zip(self.grid, cfg.mask_unit, "txyz"):
            if g % m or (name != "t" and m % f):
                raise SettingError(f"token grid {self.grid} not divisible by mask unit {cfg.mask_unit} "
                                 f"(spatial unit sides must also be multiples of {f})")
        self.units = tuple(g // m for g, m in zip(self.grid, cfg.mask_unit))
        self.n_units = self.units[0] * self.units[1] * self.units[2] * self.units[3]
        d0 = cfg.dims[0]
        self.embed = nn.Conv3d(1, d0, (px, py, pz), stride=(px, py, pz))
        self.pos = nn.ParameterList(nn.Parameter(torch.zeros(g, d0)) for g in self.grid)
        self.encoder = HieraEncoder(cfg)
        self.target = copy.deepcopy(self.encoder).requires_grad_(False)
        t, x, y, z = self.encoder.unit_shape(len(cfg.dims) - 1)
        self.p_last = t * x * y * z
        dp = cfg.predictor_dim
        self.pred_in = nn.Linear(cfg.dims[-1], dp)
        self.mask_token = nn.Parameter(torch.zeros(dp))
        self.unit_pos = nn.Parameter(torch.zeros(self.n_units, dp))
        self.in_unit_pos = nn.Parameter(torch.zeros(self.p_last, dp))
        self.predictor = nn.ModuleList(Block(dp, cfg.predictor_heads) for _ in range(cfg.predictor_depth))
        self.pred_norm = nn.LayerNorm(dp)
        self.pred_out = nn.Linear(dp, cfg.dims[-1])
        trunc_normal_(self)
        for p in [*self.pos, self.mask_token, self.unit_pos, self.in_unit_pos]:
            nn.init.trunc_normal_(p, std=0.02)
        self.target.load_state_dict(self.encoder.state_dict())
        self.register_buffer("momentum", torch.tensor(cfg.ema[0]))

    # ------------------------------------------------------------------ tokens
    def _units(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y, Z, T) -> (B, U, P, C0) with positions added."""
        if tuple(x.shape[2:]) != self.input_shape:
            raise SettingError(f"SLIM-Brain input has shape {tuple(x.shape[1:])}, expected (1, {', '.join(map(str, self.input_shape))})")
        b, _, X, Y, Z, T = x.shape
        tok = self.embed(x.permute(0, 5, 1, 2, 3, 4).reshape(b * T, 1, X, Y, Z))     # (B*T, C, gx, gy, gz)
        tok = tok.view(b, T, *tok.shape[1:]).permute(0, 1, 3, 4, 5, 2)               # (B, T, gx, gy, gz, C)
        pt, px, py, pz = self.pos
        tok = tok + pt[:, None, None, None] + px[None, :, None, None] + py[None, None, :, None] + pz[None, None, None]
        (ut, ux, uy, uz), (nt, nx, ny, nz) = self.cfg.mask_unit, self.units
        tok = tok.reshape(b, nt, ut, nx, ux, ny, uy, nz, uz, -1).permute(0, 1, 3, 5, 7, 2, 4, 6, 8, 9)
        return tok.reshape(b, self.n_units, ut * ux * uy * uz, -1)

    def encode(self, batch: dict) -> torch.Tensor:
        """Context-encoder features of the whole window, ``(B, U * P_last, C_last)``."""
        u = self.encoder(self._units(batch["data"]))
        return u.flatten(1, 2)

    # ------------------------------------------------------------------ JEPA
    def forward(self, batch: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        x = batch["data"]
        units = self._units(x)
        b = x.shape[0]
        n_keep = max(1, int(round((1 - self.cfg.mask_ratio) * self.n_units)))
        order = torch.rand(b, self.n_units, generator=generator).argsort(1).to(x.device)
        keep, drop = order[:, :n_keep], order[:, n_keep:]
        ctx = self.encoder(gather_tokens(units.flatten(2), keep).view(b, n_keep, *units.shape[2:]))
        with torch.no_grad():
            tgt = self.target(units)                                                   # (B, U, P_last, C)
            tgt = F.layer_norm(tgt, tgt.shape[-1:])
            tgt = gather_tokens(tgt.flatten(2), drop).view(b, drop.shape[1], self.p_last, -1)
        pos = self.unit_pos[:, None] + self.in_unit_pos[None]                          # (U, P_last, dp)
        h_ctx = self.pred_in(ctx) + pos[keep]
        h_tgt = self.mask_token + pos[drop]
        h = torch.cat([h_ctx.flatten(1, 2), h_tgt.flatten(1, 2)], 1)
        for blk in self.predictor:
            h = blk(h)
        pred = self.pred_out(self.pred_norm(h[:, n_keep * self.p_last:]))
        loss = F.mse_loss(pred.float(), tgt.flatten(1, 2).float())
        return loss, {"visible_tokens": n_keep * units.shape[2], "momentum": float(self.momentum)}

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """EMA update of the target encoder; momentum for the next step from ``cfg.ema``."""
        m = float(self.momentum)
        for pt, pc in zip(self.target.parameters(), self.encoder.parameters()):
            pt.mul_(m).add_(pc.detach(), alpha=1 - m)
        a, z = self.cfg.ema
        self.momentum.fill_(a + (z - a) * min(1.0, (step + 1) / max(1, total_steps)))
