"""quintet's M0E4 CPU kernels against dequantize-then-matmul, on every instruction set this CPU runs."""

from __future__ import annotations

import pytest
import torch

from quintet.deploy.m0e4 import dequantize, pack_codes, quantize_rtn
from quintet.kernels import m0e4_cpu
from quintet.kernels.m0e4_cpu import ISAS, m0e4_matmul

pytestmark = pytest.mark.skipif(
    not m0e4_cpu.m0e4_kernels_available(), reason=f"M0E4 kernels unavailable: {m0e4_cpu._kernel.reason}"
)


def runnable_isas() -> list[str]:
    m0e4_cpu.m0e4_kernels_available()
    return list(ISAS[: m0e4_cpu._kernel.best + 1])


def every_code_weight(n: int, k: int, group_size: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Codes where every group holds all 16 values (shuffled), random positive scales, random offsets."""
    g = torch.Generator().manual_seed(seed)
    groups = k // group_size
    base = torch.arange(16, dtype=torch.uint8).repeat(group_size // 16)
    codes = torch.stack([base[torch.randperm(group_size, generator=g)] for _ in range(n * groups)])
    codes = codes.view(n, k)
    scales = (torch.rand(n, groups, generator=g) * 0.2 + 0.01).half()
    offsets = (torch.rand(n, groups, generator=g) * 1.5 + 0.5).half()
    return codes, scales, offsets


def check_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rel: float) -> None:
    """|y - x W^T| within `rel` of sum |x| |w| (the bound of rounding in a dot product)."""
    ref = x.double() @ w.double().t()
    bound = x.double().abs() @ w.double().abs().t()
    err = (y.double() - ref).abs()
    assert (err <= rel * bound + 1e-30).all(), f"max error {(err / bound).max().item():.3g} of |x||w|"


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_gemv_equals_dequantized_matmul(monkeypatch, isa, group_size):
    if isa not in runnable_isas():
        pytest.skip(f"this CPU has no {isa}")
    monkeypatch.setenv(m0e4_cpu.ISA_ENV, isa)
    n, k = 37, group_size * 3  # odd N, several groups
    codes, scales, offsets = every_code_weight(n, k, group_size)
    qweight = pack_codes(codes)
    w = dequantize(codes, scales, offsets, group_size)
    for rows in range(1, 17):
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
        y = m0e4_matmul(x, qweight, scales, offsets, group_size, path="gemv")
        assert y.shape == (rows, n) and y.dtype == torch.float32
        check_close(y, x, w, 2e-6)


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiles_equal_dequantized_matmul(monkeypatch, isa, dtype):
    if isa not in runnable_isas():
        pytest.skip(f"this CPU has no {isa}")
    monkeypatch.setenv(m0e4_cpu.ISA_ENV, isa)
    monkeypatch.setenv(m0e4_cpu.DTYPE_ENV, dtype)
    monkeypatch.setattr(m0e4_cpu, "TILE_BYTES", 64 * 96 * 4)  # several tiles and a ragged last one
    for group_size in (32, 64, 128):
        n, k = 301, group_size * 3
        codes, scales, offsets = every_code_weight(n, k, group_size, seed=group_size)
        qweight = pack_codes(codes)
        w = dequantize(codes, scales, offsets, group_size)
        x = torch.randn(23, k)
        y = m0e4_matmul(x, qweight, scales, offsets, group_size, path="tiles")
        if dtype == "float32":
            check_close(y, x, w, 2e-6)
        else:  # x and the tile rounded to bfloat16 (8 bits of mantissa) once each
            check_close(y, x, w, 2 * 2**-8)


def test_matmul_keeps_batch_shape_dtype_and_bias():
    lin = torch.nn.Linear(64, 48)
    q = quantize_rtn(lin.weight.detach(), 32)
    w = q.dequantize()
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    y = m0e4_matmul(x, pack_codes(q.codes), q.scales, q.offsets, 32, lin.bias.detach())
    assert y.shape == (2, 3, 48) and y.dtype == torch.bfloat16
    ref = torch.nn.functional.linear(x.float(), w, lin.bias.detach())
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)


def test_empty_input_reads_nothing():
    q = quantize_rtn(torch.randn(16, 64), 64)
    y = m0e4_matmul(torch.empty(0, 64), pack_codes(q.codes), q.scales, q.offsets, 64)
    assert y.shape == (0, 16)


def test_forcing_an_isa_the_cpu_lacks_is_refused(monkeypatch):
    monkeypatch.setenv(m0e4_cpu.ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="must be one of scalar, avx2, avx512"):
        m0e4_cpu.isa()


def test_disabled_kernel_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setenv(m0e4_cpu.DISABLE_ENV, "1")
    monkeypatch.setattr(m0e4_cpu._kernel, "warned", False)
    codes, scales, offsets = every_code_weight(20, 64, 32)
    w = dequantize(codes, scales, offsets, 32)
    x = torch.randn(5, 64)
    with pytest.warns(RuntimeWarning, match="M0E4 CPU kernel library is unavailable"):
        y = m0e4_matmul(x, pack_codes(codes), scales, offsets, 32)
    check_close(y, x, w, 2e-6)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m0e4_matmul(x, pack_codes(codes), scales, offsets, 32)  # no second warning


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_float_gemv_equals_linear(monkeypatch, isa):
    if isa not in runnable_isas():
        pytest.skip(f"this CPU has no {isa}")
    monkeypatch.setenv(m0e4_cpu.ISA_ENV, isa)
    g = torch.Generator().manual_seed(1)
    for n, k in ((37, 100), (64, 512), (5, 17)):  # ragged rows (not a multiple of 4) and K tails
        w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
        for rows in (1, 2, 4):
            x = torch.randn(rows, k, generator=g)
            check_close(torch.ops.quintet_m0e4.gemv_f32(x, w, ISAS.index(isa)), x, w, 2e-6)
            with torch.inference_mode(), m0e4_cpu.matmul_path("gemv"):
                y = m0e4_cpu.float_linear(x, w, b)
            torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
