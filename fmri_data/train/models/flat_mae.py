"""Flat-map ViT MAE (arXiv 2510.13768; MAE after He et al. 2022, arXiv 2111.06377).

Input ``data`` ``(B, 1, T, H, W)`` (paper: ``(B, 1, 16, 224, 560)``) and ``mask`` ``(B, H, W)``
or ``(H, W)`` bool (True = pixel on the cortex). Patches are ``t_patch x 16 x 16``
(t, h, w). A spatial patch with no valid pixel is never visible and never predicted. Tube
masking: per sample, ``mask_ratio`` of the valid spatial patches are hidden through every
temporal patch. The encoder sees only visible tokens; the decoder sees them plus a mask
token at every hidden valid position and predicts their pixels; the loss is the MSE over
valid pixels of hidden patches only. Samples with different numbers of valid patches are
padded; padded tokens are excluded from attention keys and from the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import SettingError
from ..blocks import Block, gather_tokens, trunc_normal_
from ..configs import FlatMaeConfig


class FlatMae(nn.Module):
    def __init__(self, cfg: FlatMaeConfig):
        super().__init__()
        self.cfg = cfg
        h, w = cfg.shape
        if h % cfg.patch or w % cfg.patch or cfg.frames % cfg.t_patch:
            raise SettingError(f"input (T={cfg.frames}, H={h}, W={w}) not divisible by patch "
                             f"({cfg.t_patch}, {cfg.patch}, {cfg.patch})")
        self.grid = (cfg.frames // cfg.t_patch, h // cfg.patch, w // cfg.patch)
        self.n_spatial = self.grid[1] * self.grid[2]
        k = (cfg.t_patch, cfg.patch, cfg.patch)
        self.embed = nn.Conv3d(1, cfg.embed_dim, k, stride=k)
        self.pos_t = nn.Parameter(torch.zeros(self.grid[0], cfg.embed_dim))
        self.pos_s = nn.Parameter(torch.zeros(self.n_spatial, cfg.embed_dim))
        self.blocks = nn.ModuleList(Block(cfg.embed_dim, cfg.heads) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim)
        self.dec_in = nn.Linear(cfg.embed_dim, cfg.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(cfg.decoder_dim))
        self.dec_pos_t = nn.Parameter(torch.zeros(self.grid[0], cfg.decoder_dim))
        self.dec_pos_s = nn.Parameter(torch.zeros(self.n_spatial, cfg.decoder_dim))
        self.decoder = nn.ModuleList(Block(cfg.decoder_dim, cfg.decoder_heads) for _ in range(cfg.decoder_depth))
        self.dec_norm = nn.LayerNorm(cfg.decoder_dim)
        self.dec_out = nn.Linear(cfg.decoder_dim, cfg.t_patch * cfg.patch * cfg.patch)
        trunc_normal_(self)
        for p in (self.pos_t, self.pos_s, self.dec_pos_t, self.dec_pos_s, self.mask_token):
            nn.init.trunc_normal_(p, std=0.02)

    # ------------------------------------------------------------------ helpers
    def _check(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        x, valid = batch["data"], batch.get("mask")
        if tuple(x.shape[1:]) != (1, self.cfg.frames, *self.cfg.shape):
            raise SettingError(f"flat MAE input has shape {tuple(x.shape[1:])}, expected (1, {self.cfg.frames}, "
                             f"{self.cfg.shape[0]}, {self.cfg.shape[1]})")
        if valid is None:
            raise SettingError("flat MAE needs batch['mask'] (valid pixels of the flat map)")
        valid = valid.to(x.device, torch.bool)
        valid = valid.expand(x.shape[0], -1, -1) if valid.ndim == 2 else valid
        return x * valid[:, None, None], valid   # off-cortex pixels never reach the model

    def patchify(self, v: torch.Tensor) -> torch.Tensor:
        """(B, T, H, W) -> (B, N, t_patch*p*p), tokens in (t, h, w) order."""
        b = v.shape[0]
        (gt, gh, gw), p, q = self.grid, self.cfg.patch, self.cfg.t_patch
        v = v.reshape(b, gt, q, gh, p, gw, p).permute(0, 1, 3, 5, 2, 4, 6)
        return v.reshape(b, gt * gh * gw, q * p * p)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)                                   # (B, N, D)
        return t + (self.pos_t[:, None] + self.pos_s[None]).flatten(0, 1)

    def _tube_ids(self, spatial_ids: torch.Tensor) -> torch.Tensor:
        """(B, M) spatial patch ids -> (B, gt*M) token ids (every temporal patch of each)."""
        t = torch.arange(self.grid[0], device=spatial_ids.device) * self.n_spatial
        return (t[None, :, None] + spatial_ids[:, None, :]).flatten(1)

    def _encode(self, tokens: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            tokens = blk(tokens, pad)
        return self.norm(tokens)

    def encode(self, batch: dict) -> torch.Tensor:
        """Encoder features of every valid patch, ``(B, N_valid, D)`` (invalid patches zeroed)."""
        x, valid = self._check(batch)
        pad = self.patch_valid(valid).repeat(1, self.grid[0])
        return self._encode(self._embed(x), pad) * pad[..., None]

    # ------------------------------------------------------------------ pre-training
    def patch_valid(self, valid: torch.Tensor) -> torch.Tensor:
        """(B, H, W) valid pixels -> (B, S) spatial patches holding at least one valid pixel."""
        return F.max_pool2d(valid[:, None].float(), self.cfg.patch).flatten(1) > 0

    def tube_mask(self, patch_valid: torch.Tensor, generator: torch.Generator | None = None):
        """Tube masking of valid spatial patches.

        Args:
            patch_valid: (B, S) bool.

        Returns:
            ``(keep_ids, keep_pad, pred_ids, pred_pad)``: token ids (B, gt*K) / (B, gt*P)
            int64 of visible / predicted tokens (every temporal patch of a kept / hidden
            spatial patch) and bool masks of which entries are real (the rest is padding).
            Per sample ``round((1 - mask_ratio) * n_valid)`` (at least 1, at most
            ``n_valid - 1``) valid patches are visible, the other valid ones predicted.
        """
        b, dev = patch_valid.shape[0], patch_valid.device
        n_valid = patch_valid.sum(1)
        if int(n_valid.min()) < 2:
            raise SettingError("a flat map needs at least 2 patches with valid pixels")
        n_keep = (n_valid.float() * (1 - self.cfg.mask_ratio)).round().long().clamp(1)
        n_keep = torch.minimum(n_keep, n_valid - 1)
        n_pred = n_valid - n_keep
        noise = torch.rand(b, self.n_spatial, generator=generator).to(dev) + (~patch_valid) * 2.0
        order = noise.argsort(1)                                  # valid patches first, random order
        rank = torch.arange(self.n_spatial, device=dev)[None]
        k_max, p_max = int(n_keep.max()), int(n_pred.max())
        keep_s, keep_pad = order[:, :k_max], rank[:, :k_max] < n_keep[:, None]
        pred_s = torch.gather(order, 1, (n_keep[:, None] + rank[:, :p_max]).clamp(max=self.n_spatial - 1))
        pred_pad = rank[:, :p_max] < n_pred[:, None]
        gt = self.grid[0]
        return self._tube_ids(keep_s), keep_pad.repeat(1, gt), self._tube_ids(pred_s), pred_pad.repeat(1, gt)

    # ------------------------------------------------------------------ pre-training
    def forward(self, batch: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        x, valid = self._check(batch)
        patch_valid = self.patch_valid(valid)
        keep_ids, keep_pad, pred_ids, pred_pad = self.tube_mask(patch_valid, generator)
        enc = self._encode(gather_tokens(self._embed(x), keep_ids), keep_pad)
        dec_pos = (self.dec_pos_t[:, None] + self.dec_pos_s[None]).flatten(0, 1)
        h = torch.cat([self.dec_in(enc) + dec_pos[keep_ids], self.mask_token + dec_pos[pred_ids]], 1)
        pad = torch.cat([keep_pad, pred_pad], 1)
        for blk in self.decoder:
            h = blk(h, pad)
        pred = self.dec_out(self.dec_norm(h[:, keep_ids.shape[1]:]))
        target = gather_tokens(self.patchify(x[:, 0]), pred_ids)
        pix = gather_tokens(self.patchify(valid[:, None].expand(-1, self.cfg.frames, -1, -1).float()), pred_ids)
        pix = pix * pred_pad[..., None]
        loss = (((pred.float() - target.float()) ** 2) * pix).sum() / pix.sum().clamp_min(1)
        gt = self.grid[0]
        return loss, {"visible_patches": float(keep_pad.sum()) / gt / x.shape[0],
                      "valid_patches": float(patch_valid.sum()) / x.shape[0]}
