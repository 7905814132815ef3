"""The chunked selective scan against the sequential reference (fmri_data/train/ssm.py).

Inputs are synthetic random tensors of the scan's shapes: the reference answer is the
sequential scan (one torch step per token, differentiated by autograd) on the same inputs,
so no real data is needed.

Tolerances. Both scans run the recurrence in float32 and differ only in summation order
(the chunked one multiplies the carried state by exp(cumulative log-decay) instead of one
decay per step), so float32 results agree to a few float32 eps (1.2e-7) times the sequence
length relative to the largest value: 1e-5 leaves a margin of ~100x over the 1e-7 seen.
With bfloat16 inputs both compute in float32 and round once to bfloat16 (8 significant
bits), so results may differ by one bfloat16 ulp: relative 2**-7 per element (eps of
bfloat16), plus the float32 tolerance relative to the largest value for elements that
lose digits to cancellation.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fmri_data.errors import SettingError
from fmri_data.train import build_model, get_config, ssm
from fmri_data.train.ssm import MambaMixer, chunked_scan, scan, selective_scan, set_scan

F32_RTOL = 1e-5
BF16_EPS = 2.0 ** -7


def _inputs(b: int, length: int, d: int, n: int, dtype: torch.dtype, strong_decay: bool = False, seed: int = 0):
    """(u, delta, A, B, C, D) as MambaMixer feeds the scan: delta = softplus(.) > 0, A < 0."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, length, d, generator=g)
    delta = F.softplus(torch.randn(b, length, d, generator=g) + (2.0 if strong_decay else -1.0))
    A = -torch.exp(torch.randn(d, n, generator=g) + (2.0 if strong_decay else 0.0))
    B, C = torch.randn(b, length, n, generator=g), torch.randn(b, length, n, generator=g)
    D = torch.randn(d, generator=g)
    return [t.to(dtype).requires_grad_() for t in (u, delta, A, B, C, D)]


def _forward_backward(fn, inputs, seed: int = 1):
    y = fn(*inputs)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype)
    grads = torch.autograd.grad(y, inputs, gy)
    return y, grads


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    scale = float(expected.detach().float().abs().max()) or 1.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=F32_RTOL * scale,
                               msg=lambda m: f"{what}: {m}")
    assert actual.dtype == expected.dtype, what


NAMES = ("y", "grad u", "grad delta", "grad A", "grad B", "grad C", "grad D")
# (batch, L, d, n, chunk): L not a multiple of the chunk, L = 1, one chunk, the default chunk
SHAPES = [(2, 1, 3, 4, None), (2, 37, 5, 4, 8), (3, 64, 8, 16, None), (1, 50, 4, 3, 7), (2, 16, 6, 4, 16),
          (2, 19, 4, 4, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-L{}-d{}-n{}-chunk{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_chunked_scan_equals_the_sequential_scan_forward_and_backward(shape, dtype):
    b, length, d, n, chunk = shape
    inputs = _inputs(b, length, d, n, dtype)
    ref = _forward_backward(selective_scan, inputs)
    got = _forward_backward(lambda *a: chunked_scan(*a, chunk=chunk), inputs)
    rtol = F32_RTOL if dtype == torch.float32 else BF16_EPS
    for name, a, e in zip(NAMES, (got[0], *got[1]), (ref[0], *ref[1])):
        _close(a, e, rtol, f"{name} {shape} {dtype}")


@pytest.mark.parametrize("length, chunk", [(1, None), (10, 3), (12, 4), (12, 12), (7, 20)])
def test_linear_recurrence_equals_the_step_by_step_recurrence(length, chunk):
    g = torch.Generator().manual_seed(length)
    log_a, x = -torch.rand(2, length, 3, generator=g) * 2, torch.randn(2, length, 3, generator=g)
    x_before = x.clone()
    h, expected = ssm.linear_recurrence(log_a, x, chunk), []
    state = torch.zeros(2, 3)
    for t in range(length):
        state = log_a[:, t].exp() * state + x[:, t]
        expected.append(state)
    torch.testing.assert_close(h, torch.stack(expected, 1), rtol=F32_RTOL, atol=F32_RTOL)
    assert torch.equal(x, x_before)   # the caller's input is left alone unless overwrite=True


def test_strong_decays_stay_finite_and_equal():
    """Strong decays: the log-decays of a 16-token chunk sum to below -88, where exp(-cumsum)
    (the unstable way to factor a chunk) overflows float32; every exponent here is <= 0."""
    inputs = _inputs(2, 40, 6, 8, torch.float32, strong_decay=True, seed=3)
    log_a = inputs[1].detach().unsqueeze(-1) * inputs[2].detach()          # (b, L, d, n) log-decays
    assert float(log_a[:, :16].sum(1).min()) < -88                          # exp(88) > float32 max
    ref = _forward_backward(selective_scan, inputs)
    got = _forward_backward(lambda *a: chunked_scan(*a, chunk=16), inputs)
    for name, a, e in zip(NAMES, (got[0], *got[1]), (ref[0], *ref[1])):
        assert torch.isfinite(a).all(), name
        _close(a, e, F32_RTOL, name)


def test_mixer_under_bf16_autocast_matches_the_sequential_scan():
    """The trainer's mixed precision (bf16 autocast; on the CPU here): linear layers hand the scan
    bfloat16 inputs, both scans run in float32 and return bfloat16."""
    torch.manual_seed(0)
    mixer = MambaMixer(8, d_state=4)
    x = torch.randn(3, 21, 8)
    out = {}
    for method in ("sequential", "chunked"):
        set_scan(mixer, method)
        mixer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = mixer(x)
        y.float().square().mean().backward()
        out[method] = (y, *(p.grad.clone() for p in mixer.parameters()))
    assert out["chunked"][0].dtype == torch.bfloat16
    for i, (a, e) in enumerate(zip(out["chunked"], out["sequential"])):
        _close(a, e, BF16_EPS, f"output/parameter gradient {i}")


def _tiny_neurostorm_whose_scan_matters():
    """The tiny NeuroSTORM (windows of 16 tokens + 3 prompts = 19 tokens: chunks of 5, not a
    multiple) with its Mamba mixers and head re-initialised at torch's default scale and
    step sizes delta ~ 1: at the model's own small initialisation (std 0.02, delta ~ 0.01) the
    state term is ~1e-7 of the mixer output, and any scan would give the same loss."""
    cfg = get_config("neurostorm", "tiny", ["model.n_prompts=3"])
    model = build_model(cfg)
    torch.manual_seed(3)
    for mixer in model.modules():
        if isinstance(mixer, MambaMixer):
            for layer in (mixer.in_proj, mixer.conv, mixer.x_proj, mixer.dt_proj, mixer.out_proj):
                layer.reset_parameters()
            nn.init.constant_(mixer.dt_proj.bias, 0.5)
    model.head.reset_parameters()
    return cfg, model


def _steps(model, method: str, batch: dict, steps: int) -> tuple[list[float], list[torch.Tensor]]:
    """Losses of ``steps`` AdamW steps on the same batch and masks; gradients of the first."""
    model = copy.deepcopy(model)
    set_scan(model, method)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, grads = [], None
    for _ in range(steps):
        loss, _ = model(batch, torch.Generator().manual_seed(7))
        loss.backward()
        grads = grads or [p.grad.clone() for p in model.parameters()]
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses, grads


def _max_rel(grads, ref) -> float:
    return max(float((g - r).abs().max() / r.abs().max().clamp_min(1e-30)) for g, r in zip(grads, ref))


def test_neurostorm_tiny_steps_same_loss_and_gradients_with_both_scans():
    """Same batch and masks: the first loss to 1e-5, every parameter's gradient to 1e-4 of its
    largest entry (float32 differences of the scan, ~1e-7, carried through four blocks), the
    loss after two AdamW steps to 1e-3. The gradients would catch a wrong scan: with the state
    cut off (h_t = delta_t B_t u_t) they differ from the sequential scan's by > 10 %."""
    cfg, model = _tiny_neurostorm_whose_scan_matters()
    assert set_scan(model, "auto") == sum(cfg.model.depths)
    batch = {"data": torch.randn(2, 1, *model.input_shape, generator=torch.Generator().manual_seed(0))}
    seq_losses, seq_grads = _steps(model, "sequential", batch, 3)
    losses, grads = _steps(model, "chunked", batch, 3)
    assert abs(losses[0] - seq_losses[0]) <= F32_RTOL * abs(seq_losses[0])
    assert _max_rel(grads, seq_grads) <= 1e-4
    assert abs(losses[-1] - seq_losses[-1]) <= 1e-3 * abs(seq_losses[-1])
    assert abs(seq_losses[-1] - seq_losses[0]) > 0.05 * seq_losses[0]   # the steps changed the model
    cut = copy.deepcopy(model)
    for mixer in cut.modules():
        if isinstance(mixer, MambaMixer):
            nn.init.constant_(mixer.A_log, 30.0)   # A = -1e13: exp(delta A) = 0, no state carried
    assert _max_rel(_steps(cut, "sequential", batch, 1)[1], seq_grads) > 0.1


def test_default_scan_is_not_the_sequential_loop_on_cpu(monkeypatch):
    def refuse(*args):
        raise AssertionError("the sequential scan ran")

    monkeypatch.setattr(ssm, "selective_scan", refuse)
    mixer = MambaMixer(8, d_state=4)
    assert mixer.scan_method == "auto"
    mixer(torch.randn(2, 10, 8)).sum().backward()
    with pytest.raises(AssertionError, match="sequential scan ran"):
        scan(*_inputs(1, 3, 2, 2, torch.float32), method="sequential")


@pytest.mark.parametrize("call, message", [
    (lambda: scan(*_inputs(1, 3, 2, 2, torch.float32), method="parallel"),
     "selective scan method 'parallel' unknown; one of auto, chunked, sequential"),
    (lambda: MambaMixer(8, scan="fast"), "selective scan method 'fast' unknown; one of auto, chunked, sequential"),
    (lambda: set_scan(MambaMixer(8), "x"), "selective scan method 'x' unknown; one of auto, chunked, sequential"),
    (lambda: chunked_scan(*_inputs(1, 3, 2, 2, torch.float32), chunk=0), "selective scan chunk must be >= 1, not 0"),
])
def test_bad_scan_settings_are_one_clear_error(call, message):
    with pytest.raises(SettingError) as info:
        call()
    assert str(info.value) == message


def test_the_scan_is_a_model_setting():
    from fmri_data.errors import SettingError
    from fmri_data.train import build_model, get_config

    model = build_model(get_config("neurostorm", "tiny", ["model.scan=sequential"]))
    assert {m.scan_method for m in model.modules() if hasattr(m, "scan_method")} == {"sequential"}
    with pytest.raises(SettingError, match="selective scan method 'fast' unknown"):
        build_model(get_config("neurostorm", "tiny", ["model.scan=fast"]))
