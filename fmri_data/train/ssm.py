"""Mamba-style selective state-space block (S6; Gu & Dao 2023, arXiv 2312.00752).

Per channel ``d`` and state ``n`` the scan is::

    h_t = exp(delta_t[d] * A[d, n]) * h_{t-1} + delta_t[d] * B_t[n] * u_t[d]
    y_t[d] = sum_n C_t[n] * h_t[n] + D[d] * u_t[d]

with ``delta``, ``B``, ``C`` computed from the input (the "selective" part). On a CUDA
tensor the fused kernel of ``mamba-ssm`` (``selective_scan_fn``) is used when that package
is importable; everywhere else :func:`selective_scan` below, a plain sequential scan in
torch (exact, O(L) steps; fine for the window lengths NeuroSTORM mixes, 16-256 tokens).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

try:  # pragma: no cover - only on GPU machines with mamba-ssm installed
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _cuda_scan
except Exception:  # ImportError, or a broken CUDA extension
    _cuda_scan = None


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor) -> torch.Tensor:
    """Reference selective scan.

    Args:
        u, delta: (batch, L, d) input and positive step sizes.
        A: (d, n) state matrix (negative real entries).
        B, C: (batch, L, n) input and output projections.
        D: (d,) skip connection.

    Returns:
        y: (batch, L, d), same dtype as ``u`` (the recurrence runs in float32).
    """
    dtype = u.dtype
    u, delta, B, C = u.float(), delta.float(), B.float(), C.float()
    dA = torch.exp(delta.unsqueeze(-1) * A.float())             # (b, L, d, n)
    dBu = (delta * u).unsqueeze(-1) * B.unsqueeze(2)             # (b, L, d, n)
    h = torch.zeros_like(dA[:, 0])
    ys = []
    for t in range(u.shape[1]):
        h = dA[:, t] * h + dBu[:, t]
        ys.append((h * C[:, t].unsqueeze(1)).sum(-1))
    y = torch.stack(ys, 1) + u * D.float()
    return y.to(dtype)


def scan(u, delta, A, B, C, D) -> torch.Tensor:
    """:func:`selective_scan`, or mamba-ssm's fused CUDA kernel for CUDA tensors when installed."""
    if _cuda_scan is not None and u.is_cuda:  # pragma: no cover - GPU only
        y = _cuda_scan(u.transpose(1, 2).contiguous(), delta.transpose(1, 2).contiguous(), A.float(),
                       B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), D.float())
        return y.transpose(1, 2).to(u.dtype)
    return selective_scan(u, delta, A, B, C, D)


class MambaMixer(nn.Module):
    """A Mamba block over ``(batch, L, dim)`` sequences: gated, causal depth-wise conv + S6 scan.

    Args:
        dim: token width; expand: inner width factor; d_state: state size ``n``;
        d_conv: depth-wise causal convolution width.
    """

    def __init__(self, dim: int, d_state: int = 16, expand: int = 2, d_conv: int = 4):
        super().__init__()
        inner = expand * dim
        self.dt_rank = max(1, math.ceil(dim / 16))
        self.d_state = d_state
        self.in_proj = nn.Linear(dim, 2 * inner)
        self.conv = nn.Conv1d(inner, inner, d_conv, groups=inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, inner)
        # S4D-real initialisation of A, dt bias so that softplus(dt) starts in [1e-3, 1e-1]
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(inner, 1))
        self.D = nn.Parameter(torch.ones(inner))
        dt = torch.exp(torch.rand(inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.out_proj = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        xs = F.silu(self.conv(xs.transpose(1, 2))[..., :length].transpose(1, 2))
        dt, B, C = self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))
        y = scan(xs, delta, -torch.exp(self.A_log), B, C, self.D)
        return self.out_proj(y * F.silu(z))
