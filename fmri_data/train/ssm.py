"""Mamba-style selective state-space block (S6; Gu & Dao 2023, arXiv 2312.00752).

Per channel ``d`` and state ``n`` the scan is::

    h_t = exp(delta_t[d] * A[d, n]) * h_{t-1} + delta_t[d] * B_t[n] * u_t[d]
    y_t[d] = sum_n C_t[n] * h_t[n] + D[d] * u_t[d]

with ``delta``, ``B``, ``C`` computed from the input (the "selective" part). Three ways to run
it, chosen by ``method`` (:func:`scan`, :class:`MambaMixer`, :func:`set_scan`):

- ``"sequential"``: :func:`selective_scan`, the reference: one torch step per token (exact,
  differentiated by autograd step by step; slow: ``L`` Python iterations forward and backward).
- ``"chunked"``: :func:`chunked_scan`, a chunked scan in plain torch (any device): the ``L``
  tokens in chunks of ``chunk`` (default ``ceil(sqrt(L))``); the states inside every chunk
  from a zero start are computed for all chunks at once, a short loop over chunks carries
  the state between them, and each state gets the carried state times ``exp`` of the
  cumulative log-decay since its chunk's start (``cumsum``; every exponent <= 0):
  ``chunk + L / chunk`` sequential steps instead of ``L`` (:func:`linear_recurrence`; the
  chunk-then-pass-states split of Mamba-2's SSD block decomposition, Dao & Gu 2024, arXiv
  2405.21060, Sec. 6). Its backward pass is the same chunked scan run backwards in time on
  the adjoint, in a hand-written :class:`torch.autograd.Function` that keeps the inputs and
  the states ``h`` instead of a graph of ``L`` steps (as the fused kernel of ``mamba-ssm``
  keeps its inputs and recomputes).
- ``"auto"`` (default): the fused CUDA kernel of ``mamba-ssm`` (``selective_scan_fn``) for
  CUDA tensors when that package is importable, else ``"chunked"``.

All three run the recurrence in float32 and return the dtype of ``u``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SettingError

try:  # pragma: no cover - only on GPU machines with mamba-ssm installed
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _cuda_scan
except (ImportError, OSError, RuntimeError):  # not installed, or a broken CUDA extension
    _cuda_scan = None

METHODS = ("auto", "chunked", "sequential")
FUSED_CUDA: bool = _cuda_scan is not None
"""Whether ``mamba-ssm``'s fused CUDA kernel is importable (``method="auto"`` uses it on CUDA)."""


def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor) -> torch.Tensor:
    """Reference selective scan: a sequential loop over the ``L`` tokens.

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


def linear_recurrence(log_a: torch.Tensor, x: torch.Tensor, chunk: int | None = None, *,
                      overwrite: bool = False) -> torch.Tensor:
    """All states of ``h_t = exp(log_a_t) * h_{t-1} + x_t`` (``h_{-1} = 0``) along axis 1, chunked.

    The ``L`` steps are cut into ``ceil(L / chunk)`` chunks. (1) Every chunk's states from a
    zero start, all chunks at once: ``chunk - 1`` steps over ``(batch, n_chunks, ...)``
    slices. (2) The state entering each chunk: a loop over chunks, ``H_c = P_c H_{c-1} +
    h_c[last]`` with ``P_c = exp(sum of the chunk's log_a)``. (3) ``h_t += exp(S_t) H_{c-1}``
    with ``S_t`` the cumulative log-decay since the chunk's start (``cumsum``). Every factor
    is ``exp`` of a sum of ``log_a`` (<= 0 for a decaying recurrence), so nothing overflows.
    ``chunk + L / chunk`` sequential steps instead of ``L``, ``O(L)`` work, three tensors of
    the input's size (``h``, ``a``, ``S``; a segment-sum form, Mamba-2's ``segsum``, would
    take ``chunk`` times the work and memory: Mamba-1's decays differ per channel and state,
    so its intra-chunk part is no matmul; measured 2-5x slower on the CPU). Not differentiated here (:class:`_ChunkedScan` does the
    backward pass by calling this on the adjoint).

    Args:
        log_a: (batch, L, ...) float32 log-decays, <= 0 (positive values may overflow).
        x: (batch, L, ...) float32 inputs, the shape of ``log_a``.
        chunk: tokens per chunk (>= 1; ``L`` need not be a multiple of it); ``None``:
            ``ceil(sqrt(L))``, which minimises the number of sequential steps.
        overwrite: ``x`` may be overwritten (saves one copy of it).

    Returns:
        h: (batch, L, ...) float32.
    """
    b, length, *rest = x.shape
    if length == 0:
        return x.clone()
    chunk = max(1, math.isqrt(length - 1) + 1) if chunk is None else min(chunk, length)
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    if pad:  # trailing zeros change no earlier state
        log_a = torch.cat([log_a, log_a.new_zeros(b, pad, *rest)], 1)
        x = torch.cat([x, x.new_zeros(b, pad, *rest)], 1)
    within = log_a.reshape(b, n_chunks, chunk, *rest).cumsum(2)              # S_t since the chunk's start
    a = log_a.reshape(b, n_chunks, chunk, *rest).exp()
    h = x.reshape(b, n_chunks, chunk, *rest)
    if not (overwrite or pad) and h.data_ptr() == x.data_ptr():  # a view of the caller's x
        h = h.clone()
    for t in range(1, chunk):                                                 # (1) every chunk from zero
        h[:, :, t].addcmul_(a[:, :, t], h[:, :, t - 1])
    decay = within[:, :, -1].exp()                                            # P_c, (b, n_chunks, ...)
    state = torch.zeros_like(h[:, 0, 0])
    starts = [state]
    for c in range(n_chunks - 1):                                             # (2) carry across chunks
        state = torch.addcmul(h[:, c, -1], decay[:, c], state)
        starts.append(state)
    h.addcmul_(within.exp_(), torch.stack(starts, 1).unsqueeze(2))            # (3)
    return h.reshape(b, n_chunks * chunk, *rest)[:, :length]


class _ChunkedScan(torch.autograd.Function):
    """:func:`selective_scan`'s map, forward and backward by :func:`linear_recurrence`.

    Backward (derived from the recurrence; checked against autograd through
    :func:`selective_scan` in ``tests/train/test_ssm.py``), with ``a_t = exp(delta_t A)``,
    ``x_t = delta_t u_t B_t``: the adjoint ``lam_t = C_t gy_t + a_{t+1} lam_{t+1}`` is the
    same recurrence run backwards in time; then ``dL/dx_t = lam_t`` and
    ``dL/d(delta_t A) = lam_t * a_t * h_{t-1}``, from which the gradients of ``u``, ``delta``,
    ``A``, ``B`` follow by the chain rule; ``dL/dC_t = sum_d gy_t h_t``.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, chunk):
        with torch.autocast(u.device.type, enabled=False):  # float32 throughout, as selective_scan
            return _ChunkedScan._forward(ctx, u, delta, A, B, C, D, chunk)

    @staticmethod
    def _forward(ctx, u, delta, A, B, C, D, chunk):
        uf, df, Af, Bf, Cf = u.float(), delta.float(), A.float(), B.float(), C.float()
        log_a = df.unsqueeze(-1) * Af                                         # (b, L, d, n)
        x = (df * uf).unsqueeze(-1) * Bf.unsqueeze(2)                         # (b, L, d, n)
        h = linear_recurrence(log_a, x, chunk, overwrite=True)
        del x
        y = torch.einsum("bldn,bln->bld", h, Cf) + uf * D.float()
        ctx.save_for_backward(u, delta, A, B, C, D, h)
        ctx.chunk = chunk
        return y.to(u.dtype)

    @staticmethod
    def backward(ctx, gy):
        with torch.autocast(gy.device.type, enabled=False):
            return _ChunkedScan._backward(ctx, gy)

    @staticmethod
    def _backward(ctx, gy):
        u, delta, A, B, C, D, h = ctx.saved_tensors
        uf, df, Af, Bf, Cf, gy = u.float(), delta.float(), A.float(), B.float(), C.float(), gy.float()
        # lam_t = C_t gy_t + a_{t+1} lam_{t+1}: the forward recurrence on time-reversed inputs,
        # built from the reversed (b, L, d) and (b, L, n) factors (no flip of a (b, L, d, n) tensor)
        d_rev = df.flip(1)
        d_next_rev = torch.cat([d_rev.new_zeros(d_rev[:, :1].shape), d_rev[:, :-1]], 1)     # delta_{t+1}, reversed
        gh_rev = gy.flip(1).unsqueeze(-1) * Cf.flip(1).unsqueeze(2)
        lam = linear_recurrence(d_next_rev.unsqueeze(-1) * Af, gh_rev, ctx.chunk, overwrite=True).flip(1)
        del gh_rev
        g_log_a = (df.unsqueeze(-1) * Af).exp_().mul_(lam)                     # dL/d(delta_t A) = lam_t a_t h_{t-1}
        g_log_a[:, 1:].mul_(h[:, :-1])
        g_log_a[:, 0] = 0.0
        du_delta = torch.einsum("bldn,bln->bld", lam, Bf)                     # dL/d(delta_t u_t)
        grads = (du_delta * df + gy * D.float(),                                                    # u
                 torch.einsum("bldn,dn->bld", g_log_a, Af) + du_delta * uf,                        # delta
                 torch.einsum("bldn,bld->dn", g_log_a, df),                                         # A
                 torch.einsum("bldn,bld->bln", lam, df * uf),                                       # B
                 torch.einsum("bld,bldn->bln", gy, h),                                              # C
                 (gy * uf).sum((0, 1)))                                                              # D
        return (*(g.to(t.dtype) for g, t in zip(grads, (u, delta, A, B, C, D))), None)


def chunked_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 D: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """The selective scan of :func:`selective_scan`, parallel over chunks of ``chunk`` tokens.

    Same arguments, shapes and result as :func:`selective_scan` (equal to float32 summation
    order); differentiable (a :class:`torch.autograd.Function` whose backward is the chunked
    scan of the adjoint, see :class:`_ChunkedScan`). Memory kept for backward: the float32
    states ``h`` (batch, L, d, n) and the inputs; transient: a few tensors of that size.
    ``chunk``: tokens per chunk (``None``: ``ceil(sqrt(L))``).

    Raises:
        SettingError: ``chunk`` < 1.
    """
    if chunk is not None and chunk < 1:
        raise SettingError(f"selective scan chunk must be >= 1, not {chunk}")
    return _ChunkedScan.apply(u, delta, A, B, C, D, chunk)


def scan(u, delta, A, B, C, D, method: str = "auto", chunk: int | None = None) -> torch.Tensor:
    """The selective scan by ``method``: ``auto`` | ``chunked`` | ``sequential`` (module docstring).

    Arguments and result as :func:`selective_scan`.

    Raises:
        SettingError: an unknown ``method``.
    """
    if method not in METHODS:
        raise SettingError(f"selective scan method '{method}' unknown; one of {', '.join(METHODS)}")
    if method == "auto" and _cuda_scan is not None and u.is_cuda:  # pragma: no cover - GPU only
        y = _cuda_scan(u.transpose(1, 2).contiguous(), delta.transpose(1, 2).contiguous(), A.float(),
                       B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), D.float())
        return y.transpose(1, 2).to(u.dtype)
    if method == "sequential":
        return selective_scan(u, delta, A, B, C, D)
    return chunked_scan(u, delta, A, B, C, D, chunk)


class MambaMixer(nn.Module):
    """A Mamba block over ``(batch, L, dim)`` sequences: gated, causal depth-wise conv + S6 scan.

    Args:
        dim: token width; expand: inner width factor; d_state: state size ``n``;
        d_conv: depth-wise causal convolution width; scan: the scan ``method`` of :func:`scan`
            (attribute ``scan_method``, changeable after construction, e.g. by :func:`set_scan`).
    """

    def __init__(self, dim: int, d_state: int = 16, expand: int = 2, d_conv: int = 4, scan: str = "auto"):
        super().__init__()
        if scan not in METHODS:
            raise SettingError(f"selective scan method '{scan}' unknown; one of {', '.join(METHODS)}")
        self.scan_method = scan
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
        y = scan(xs, delta, -torch.exp(self.A_log), B, C, self.D, self.scan_method)
        return self.out_proj(y * F.silu(z))


def set_scan(model: nn.Module, method: str) -> int:
    """Set the scan ``method`` of every :class:`MambaMixer` in ``model``; returns how many.

    Raises:
        SettingError: an unknown ``method``.
    """
    if method not in METHODS:
        raise SettingError(f"selective scan method '{method}' unknown; one of {', '.join(METHODS)}")
    mixers = [m for m in model.modules() if isinstance(m, MambaMixer)]
    for m in mixers:
        m.scan_method = method
    return len(mixers)
