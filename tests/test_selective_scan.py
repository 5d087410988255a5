"""The model's scan path and the one-token step against the slow reference scan."""

import pytest
import torch

from quintet.kernels.selective_scan import selective_scan, selective_scan_ref, selective_state_update


def _inputs(b, d, L, n, dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(b * 1000 + d * 100 + L * 10 + n)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_(requires_grad)

    return dict(
        u=r(b, d, L),
        delta=r(b, d, L, scale=0.5),
        A=(-torch.rand(d, n, generator=g, dtype=dtype) - 0.1).requires_grad_(requires_grad),
        B=r(b, n, L),
        C=r(b, n, L),
        D=r(d),
        z=r(b, d, L),
        delta_bias=r(d, scale=0.3),
        initial_state=r(b, d, n, scale=0.5),
    )


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 7, 4), (3, 5, 1, 3), (1, 4, 16, 2)])
@pytest.mark.parametrize("with_extras", [True, False])
def test_scan_forward_equals_reference(shape, with_extras):
    x = _inputs(*shape)
    if not with_extras:
        x.update(D=None, z=None, delta_bias=None, initial_state=None)
    y, h = selective_scan(**x, delta_softplus=with_extras)
    y_ref, h_ref = selective_scan_ref(**x, delta_softplus=with_extras)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 3, 6, 4), (1, 2, 1, 3)])
def test_scan_gradients_equal_reference_float64(shape):
    x = _inputs(*shape, requires_grad=True)
    y, h = selective_scan(**x, delta_softplus=True)
    weights_y, weights_h = torch.randn_like(y), torch.randn_like(h)
    grads = torch.autograd.grad((y * weights_y).sum() + (h * weights_h).sum(), list(x.values()))
    y_ref, h_ref = selective_scan_ref(**x, delta_softplus=True)
    grads_ref = torch.autograd.grad((y_ref * weights_y).sum() + (h_ref * weights_h).sum(), list(x.values()))
    for name, g, g_ref in zip(x, grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-11, msg=f"gradient of {name}")


def test_scan_state_is_float32_for_low_precision_inputs():
    x = {k: v.to(torch.bfloat16) for k, v in _inputs(2, 3, 5, 4).items()}
    x["A"] = x["A"].float()
    y, h = selective_scan(**x, delta_softplus=True)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32


def test_state_update_equals_one_scan_step():
    x = _inputs(2, 5, 1, 3)
    y, h = selective_scan(**x, delta_softplus=True)
    y1, h1 = selective_state_update(
        x["initial_state"],
        x["u"][..., 0],
        x["delta"][..., 0],
        x["A"],
        x["B"][..., 0],
        x["C"][..., 0],
        x["D"],
        x["z"][..., 0],
        x["delta_bias"],
        delta_softplus=True,
    )
    torch.testing.assert_close(y1, y[..., 0])
    torch.testing.assert_close(h1, h)


def test_splitting_the_sequence_carries_the_state_exactly():
    x = _inputs(2, 3, 9, 4)
    y, h = selective_scan(**x, delta_softplus=True)
    first = {k: (v[..., :4] if k in ("u", "delta", "B", "C", "z") else v) for k, v in x.items()}
    rest = {k: (v[..., 4:] if k in ("u", "delta", "B", "C", "z") else v) for k, v in x.items()}
    y1, h1 = selective_scan(**first, delta_softplus=True)
    y2, h2 = selective_scan(**{**rest, "initial_state": h1}, delta_softplus=True)
    torch.testing.assert_close(torch.cat([y1, y2], -1), y)
    torch.testing.assert_close(h2, h)
