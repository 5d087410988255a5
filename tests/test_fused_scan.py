"""The fused CPU scan (forward, backward, decode step) against the PyTorch scan and the slow reference."""

import warnings

import pytest
import torch

from quintet.kernels import selective_scan_cpu as fused
from quintet.kernels.selective_scan import selective_scan, selective_scan_ref, selective_state_update
from quintet.kernels.selective_scan_cpu import (
    fused_scan_available,
    selective_scan_fused,
    selective_state_update_fused,
)

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def _inputs(b: int, d: int, L: int, n: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed + 7919 * b + 104729 * d + 31 * L + n)

    def r(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype) * scale

    return dict(
        u=r(b, d, L),
        delta=r(b, d, L, scale=0.5),
        A=-torch.rand(d, n, generator=g, dtype=dtype) * 2 - 0.05,
        B=r(b, n, L),
        C=r(b, n, L),
        D=r(d),
        z=r(b, d, L),
        delta_bias=r(d, scale=0.3),
        initial_state=r(b, d, n, scale=0.5),
    )


def _drop(x: dict, keep: dict) -> dict:
    """keep: which optional inputs to pass (D, z, delta_bias, initial_state)."""
    return {k: (None if k in keep and not keep[k] else v) for k, v in x.items()}


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Equal within rtol relative to the largest entry of `expected` (per-entry for well-scaled values)."""
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30))


# Which optional inputs are passed: all, none, and two mixed sets.
OPTIONS = [
    dict(D=True, z=True, delta_bias=True, initial_state=True),
    dict(D=False, z=False, delta_bias=False, initial_state=False),
    dict(D=True, z=False, delta_bias=True, initial_state=False),
    dict(D=False, z=True, delta_bias=False, initial_state=True),
]


def test_kernel_builds_and_loads():
    assert fused_scan_available(), f"fused scan unavailable: {fused._loader.reason}"


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 1, 5), (3, 5, 7, 3), (1, 4, 33, 2), (2, 1, 0, 4)])
@pytest.mark.parametrize("keep", OPTIONS)
@pytest.mark.parametrize("softplus", [True, False])
def test_forward_equals_slow_reference(shape, keep, softplus):
    x = _drop(_inputs(*shape), keep)
    y, h = selective_scan_fused(**x, delta_softplus=softplus)
    y_ref, h_ref = selective_scan_ref(**x, delta_softplus=softplus)
    assert y.dtype == torch.float32 and h.dtype == torch.float32 and h.shape == h_ref.shape
    _close(y, y_ref)
    _close(h, h_ref)


# d = 37: two full 16-channel blocks and a padded one; L = 70: three 32-step chunks, the last short.
@pytest.mark.parametrize("shape", [(2, 37, 70, 16), (1, 16, 64, 16), (3, 19, 45, 7)])
@pytest.mark.parametrize("keep", OPTIONS)
def test_forward_equals_torch_scan(shape, keep):
    x = _drop(_inputs(*shape), keep)
    y, h = selective_scan_fused(**x, delta_softplus=True)
    y_ref, h_ref = selective_scan(**x, delta_softplus=True)
    _close(y, y_ref)
    _close(h, h_ref)


def _grads(fn, x: dict, softplus: bool, weights: tuple[torch.Tensor, torch.Tensor] | None = None):
    leaves = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in x.items()}
    y, h = fn(**leaves, delta_softplus=softplus)
    if weights is None:
        g = torch.Generator().manual_seed(1)
        weights = (
            torch.randn(y.shape, generator=g, dtype=y.dtype),
            torch.randn(h.shape, generator=g, dtype=h.dtype),
        )
    ((y * weights[0]).sum() + (h * weights[1]).sum()).backward()
    return y.detach(), h.detach(), {k: v.grad for k, v in leaves.items() if v is not None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 37, 70, 16), (1, 3, 1, 5), (3, 5, 33, 3)])
@pytest.mark.parametrize("keep", OPTIONS)
@pytest.mark.parametrize("softplus", [True, False])
def test_gradients_equal_torch_scan(dtype, shape, keep, softplus):
    x = _drop(_inputs(*shape, dtype=dtype), keep)
    y, h, grads = _grads(selective_scan_fused, x, softplus)
    y_ref, h_ref, grads_ref = _grads(selective_scan, x, softplus)
    rtol = 1e-5 if dtype == torch.float32 else 1e-10
    _close(y, y_ref, rtol)
    _close(h, h_ref, rtol)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert grads[name].dtype == x[name].dtype and grads[name].shape == x[name].shape, name
        _close(grads[name], grads_ref[name], rtol)


def test_gradients_equal_slow_reference_float64():
    x = _inputs(2, 3, 5, 4, dtype=torch.float64)
    _, _, grads = _grads(selective_scan_fused, x, True)
    _, _, grads_ref = _grads(selective_scan_ref, x, True)
    for name in NAMES:
        _close(grads[name], grads_ref[name], 1e-10)


def test_gradcheck_float64():
    x = _inputs(2, 3, 4, 2, dtype=torch.float64)
    leaves = [x[k].clone().requires_grad_() for k in NAMES]

    def f(*args):
        return selective_scan_fused(*args[:8], True, args[8])

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7)


def test_only_the_final_state_used():
    x = _inputs(1, 18, 40, 16)
    _, _, grads = _grads(
        selective_scan_fused, x, True, weights=(torch.zeros(1, 18, 40), torch.ones(1, 18, 16))
    )
    _, _, grads_ref = _grads(selective_scan, x, True, weights=(torch.zeros(1, 18, 40), torch.ones(1, 18, 16)))
    for name in NAMES:
        _close(grads[name], grads_ref[name])


def test_strided_views_and_low_precision():
    """The mixer's layout: z, B, C are transposed views of (b, L, .) tensors; bf16 activations."""
    b, d, L, n = 2, 20, 40, 16
    x = _inputs(b, d, L, n)
    views = dict(x)
    views["z"] = x["z"].transpose(1, 2).contiguous().transpose(1, 2)
    views["B"] = x["B"].transpose(1, 2).contiguous().transpose(1, 2)
    views["C"] = x["C"].transpose(1, 2).contiguous().transpose(1, 2)
    views["u"] = torch.randn(b, d, 2 * L)[..., ::2]
    x["u"] = views["u"].contiguous()
    _close(selective_scan_fused(**views, delta_softplus=True)[0], selective_scan(**x, delta_softplus=True)[0])
    low = {k: (v.to(torch.bfloat16) if k in ("u", "delta", "z") else v) for k, v in x.items()}
    y, h = selective_scan_fused(**low, delta_softplus=True)
    y_ref, h_ref = selective_scan(**low, delta_softplus=True)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    _close(y.float(), y_ref.float(), 1e-2)
    _close(h, h_ref)


def test_threads_agree():
    x = _inputs(2, 50, 65, 16)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(_grads(selective_scan_fused, x, True))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)  # forward: same order of sums
    for name in NAMES:
        _close(results[1][2][name], results[0][2][name])


def test_no_autograd_when_no_input_requires_grad():
    x = _inputs(1, 17, 9, 16)
    x["u"].requires_grad_()
    with torch.no_grad():
        y, h = selective_scan_fused(**x, delta_softplus=True)
    assert y.grad_fn is None and h.grad_fn is None
    y, _ = selective_scan_fused(**x, delta_softplus=True)
    assert y.grad_fn is not None


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 37, 16), (2, 20, 5)])
@pytest.mark.parametrize("keep", OPTIONS)
def test_decode_step_equals_torch(shape, keep):
    b, d, n = shape
    x = _inputs(b, d, 3, n)
    state = x["initial_state"]
    step = dict(u=x["u"][..., 1], delta=x["delta"][..., 1], A=x["A"], B=x["B"][..., 1], C=x["C"][..., 1])
    extras = dict(D=x["D"], z=x["z"][..., 1], delta_bias=x["delta_bias"])
    extras = {k: (v if keep[k] else None) for k, v in extras.items()}
    y, new_state = selective_state_update_fused(state, **step, **extras, delta_softplus=True)
    y_ref, new_ref = selective_state_update(state, **step, **extras, delta_softplus=True)
    assert y.shape == (b, d) and new_state.shape == state.shape
    _close(y, y_ref)
    _close(new_state, new_ref)
    torch.testing.assert_close(state, x["initial_state"], rtol=0, atol=0)  # not modified in place


def test_decode_steps_continue_the_scan():
    x = _inputs(2, 24, 12, 16)
    y_scan, h_scan = selective_scan_fused(**x, delta_softplus=True)
    head = {
        k: (v[..., :8] if v is not None and v.dim() == 3 and k != "initial_state" else v)
        for k, v in x.items()
    }
    _, state = selective_scan_fused(**head, delta_softplus=True)
    for t in range(8, 12):
        y_t, state = selective_state_update_fused(
            state, x["u"][..., t], x["delta"][..., t], x["A"], x["B"][..., t], x["C"][..., t], x["D"],
            x["z"][..., t], x["delta_bias"], True,
        )  # fmt: skip
        _close(y_t, y_scan[..., t])
    _close(state, h_scan)


def test_fallback_when_disabled(monkeypatch):
    """QUINTET_DISABLE_FUSED_SCAN=1 takes the real fallback path: one warning, PyTorch results."""
    monkeypatch.setenv(fused.DISABLE_ENV, "1")
    monkeypatch.setattr(fused._loader, "warned", False)  # as in a fresh process: nothing warned yet
    assert not fused_scan_available()
    x = _inputs(2, 5, 6, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y, h = selective_scan_fused(**x, delta_softplus=True)
        y2, _ = selective_scan_fused(**x, delta_softplus=True)
        step = selective_state_update_fused(h, x["u"][..., 0], x["delta"][..., 0], x["A"], x["B"][..., 0],
                                            x["C"][..., 0])  # fmt: skip
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and fused.DISABLE_ENV in messages[0] and "unavailable" in messages[0]
    y_ref, h_ref = selective_scan(**x, delta_softplus=True)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)
    torch.testing.assert_close(y2, y_ref, rtol=0, atol=0)
    step_ref = selective_state_update(
        h, x["u"][..., 0], x["delta"][..., 0], x["A"], x["B"][..., 0], x["C"][..., 0]
    )
    torch.testing.assert_close(step[0], step_ref[0], rtol=0, atol=0)
    # Unset again, the kernel is back.
    monkeypatch.delenv(fused.DISABLE_ENV)
    assert fused_scan_available()


@pytest.mark.parametrize(
    "hidden,expand,d_state,d_conv,dt_rank,conv_bias,batch,dtype",
    [
        (512, 2, 16, 4, 32, True, 1, torch.float32),  # jamba-small's mixer
        (40, 3, 5, 3, 7, False, 3, torch.float32),  # odd sizes, no conv bias
        (24, 2, 16, 2, 3, True, 2, torch.float64),
        (16, 1, 3, 1, 2, True, 1, torch.float64),  # d_conv 1: no conv state
    ],
)
def test_fused_mixer_step_equals_the_pytorch_mixer(
    hidden, expand, d_state, d_conv, dt_rank, conv_bias, batch, dtype
):
    """One cached token through the fused mixer step equals the PyTorch mixer: output and both states."""
    from quintet.models.jamba import JambaConfig
    from quintet.models.jamba.cache import HybridCache
    from quintet.models.jamba.mamba import JambaMambaMixer

    config = JambaConfig(
        hidden_size=hidden,
        num_attention_heads=1,
        num_key_value_heads=1,
        num_hidden_layers=1,
        attn_layer_period=1000,
        attn_layer_offset=999,
        mamba_expand=expand,
        mamba_d_state=d_state,
        mamba_d_conv=d_conv,
        mamba_dt_rank=dt_rank,
        mamba_conv_bias=conv_bias,
    )
    torch.manual_seed(d_state + d_conv)
    mixer = JambaMambaMixer(config, 0).to(dtype)
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    prompt = torch.randn(batch, 6, hidden, dtype=dtype)
    token = torch.randn(batch, 1, hidden, dtype=dtype)
    caches = [HybridCache(config), HybridCache(config)]
    with torch.no_grad():
        for cache in caches:
            mixer(prompt, cache=cache)
        old = caches[0].mamba_state(0)
        before = [t.clone() for t in old]
        weights = [mixer.conv1d.weight, mixer.x_proj.weight, mixer.A_log]
        assert fused.inference_kernels_available(token, *caches[0].mamba_state(0), *weights)
        fast = mixer(token, cache=caches[0])
        for now, then in zip(old, before, strict=True):
            torch.testing.assert_close(now, then, rtol=0, atol=0)  # the cached state is not modified
    with torch.enable_grad():  # autograd on: the fused step steps aside, the PyTorch mixer runs
        slow = mixer(token, cache=caches[1])
    assert slow.requires_grad and not fast.requires_grad
    _close(fast, slow.detach())
    for a, b in zip(caches[0].mamba_state(0), caches[1].mamba_state(0), strict=True):
        _close(a, b.detach())


@pytest.mark.parametrize(
    "b,L,d,K,with_state,with_bias,dtype",
    [
        (1, 2048, 1024, 4, False, True, torch.float32),  # a jamba-small prompt
        (3, 70, 37, 4, True, True, torch.float32),  # odd sizes, a partial time tile, a carried state
        (2, 2, 19, 4, True, False, torch.float64),  # L < d_conv - 1: the new state keeps old columns
        (1, 1, 8, 3, True, True, torch.float64),
        (2, 5, 6, 1, False, True, torch.float64),  # d_conv 1: no state at all
    ],
)
def test_fused_causal_conv_equals_conv1d(b, L, d, K, with_state, with_bias, dtype):
    """silu(causal depthwise conv) in the (b, L, d) layout equals Conv1d over [state, x], state included."""
    g = torch.Generator().manual_seed(b * 1000 + L + d + K)
    xz = torch.randn(b, L, 2 * d, generator=g, dtype=dtype)
    x = xz[..., :d]  # a strided view, as in_proj's output chunk is
    weight = torch.randn(d, 1, K, generator=g, dtype=dtype)
    bias = torch.randn(d, generator=g, dtype=dtype) if with_bias else None
    state = torch.randn(b, d, K - 1, generator=g, dtype=dtype) if with_state else None
    assert fused.inference_kernels_available(x, weight)
    out, new_state = fused.causal_conv1d_silu_fused(x, state, weight, bias)
    window = torch.cat([state if with_state else x.new_zeros(b, d, K - 1), x.transpose(1, 2)], dim=-1)
    expected = torch.nn.functional.silu(torch.nn.functional.conv1d(window, weight, bias, groups=d))
    _close(out, expected.transpose(1, 2))
    torch.testing.assert_close(new_state, window[..., window.shape[-1] - (K - 1) :], rtol=0, atol=0)
