"""Small pure-torch transformer blocks shared by the ViT/Hiera-style models.

Written here instead of taken from ``timm``: timm needs torchvision, and PyPI's torchvision
wheels pin a torch build of their own (a CUDA one), which breaks next to the CPU torch the
project installs. Attention is :func:`torch.nn.functional.scaled_dot_product_attention`
(flash / memory-efficient kernels on a GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SettingError


class Attention(nn.Module):
    """Multi-head self-attention over ``(B, N, C)`` tokens.

    ``pad`` (``(B, N)`` bool, True = real token) keeps padded tokens out of every key set.
    """

    def __init__(self, dim: int, heads: int, dim_out: int | None = None):
        super().__init__()
        if dim % heads:
            raise SettingError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim_out or dim)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if pad is None else pad[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Sequential):
    def __init__(self, dim: int, ratio: float = 4.0, dim_out: int | None = None):
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim_out or dim))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), pad)
        return x + self.mlp(self.norm2(x))


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``x`` (B, N, C), ``ids`` (B, M) int64 -> (B, M, C): the tokens ``x[b, ids[b]]``."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def trunc_normal_(module: nn.Module, std: float = 0.02) -> None:
    """Initialise Linear/Conv weights N(0, std) truncated at 2 std, biases 0, LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv3d, nn.Conv1d)):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
