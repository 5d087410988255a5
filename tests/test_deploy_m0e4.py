"""M0E4: the bit trick, quantization, packing, and the conversion to PyTorch's CPU int4 layout."""

import pytest
import torch

from quintet.deploy.m0e4 import (
    QuantizationError,
    code_to_fp16,
    code_to_fp16_reference,
    codes_from_int4,
    dequantize,
    dequantize_reference,
    int4_dequantize,
    int4_matmul,
    int4_scale_zero,
    pack_codes,
    quantize_rtn,
    to_cpu_int4,
    unpack_codes,
)


def _all_finite_fp16() -> torch.Tensor:
    values = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    return values[torch.isfinite(values)]


def test_bit_trick_gives_one_plus_q_over_16_for_every_code():
    codes = torch.arange(16, dtype=torch.uint8)
    h = code_to_fp16(codes)
    assert h.dtype == torch.float16
    for q in range(16):
        assert h[q].item() == 1 + q / 16  # exact: a float64 comparison with the rational value
    assert torch.equal(h.view(torch.int16), code_to_fp16_reference(codes).view(torch.int16))
    assert torch.equal(h.view(torch.int16), (torch.arange(16, dtype=torch.int16) << 6) | 0x3C00)


@pytest.mark.parametrize("scale", [1.0, 0.0123, 3.5e-5, 700.0])
def test_dequantize_equals_the_arithmetic_definition_for_every_code_and_offset(scale):
    """All 16 codes against every finite float16 offset c: the bit-trick dequantization equals
    (1 + q/16 - c) * S evaluated in float32, bit for bit, and is the correctly rounded exact value whenever
    |c| >= 2^-13 (below that, h - c itself needs more than float32's 24 bits)."""
    c = _all_finite_fp16().view(-1, 1)
    n = c.shape[0]
    codes = torch.arange(16, dtype=torch.uint8).repeat(2).expand(n, 32).contiguous()
    scales = torch.full((n, 1), scale, dtype=torch.float16)
    w = dequantize(codes, scales, c, 32)
    arithmetic = (1.0 + codes.float() / 16.0 - c.float()) * scales.float()
    assert torch.equal(w, arithmetic)
    exact = (1.0 + codes.double() / 16.0 - c.double()) * scales.double()
    normal = (c.abs() >= 2.0**-13).expand(n, 32)
    assert torch.equal(w[normal], exact.float()[normal])
    torch.testing.assert_close(w[~normal].double(), exact[~normal], rtol=2.0**-22, atol=0)


def test_dequantize_matches_the_element_by_element_reference():
    q = quantize_rtn(torch.randn(6, 128), 32)
    ref = dequantize_reference(q.codes, q.scales, q.offsets, 32)
    torch.testing.assert_close(q.dequantize().double(), ref, rtol=2.0**-23, atol=1e-30)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_rtn_error_is_at_most_half_a_step(group_size):
    w = torch.randn(16, 256) * 0.05
    w[3] += 1.0  # a group that does not straddle zero
    q = quantize_rtn(w, group_size)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 15
    assert q.scales.dtype == torch.float16 and q.offsets.dtype == torch.float16
    step = q.scales.float().repeat_interleave(group_size, 1) / 16  # s = S / 16
    err = (q.dequantize() - w).abs()
    assert bool((err <= step / 2 + 1e-3 * step).all())
    straddling = torch.tensor([i != 3 for i in range(16)])
    assert bool((q.codes.view(16, -1, group_size)[straddling].amin(-1) == 0).all())  # min -> code 0


def test_constant_and_zero_groups_are_exact():
    w = torch.zeros(4, 64)
    w[1] = 0.25
    w[2, :32] = -3.0
    q = quantize_rtn(w, 32)
    torch.testing.assert_close(q.dequantize(), w, atol=1e-3, rtol=0)
    assert torch.equal(q.dequantize()[0], torch.zeros(64))


def test_quantize_rejects_bad_input():
    with pytest.raises(QuantizationError, match="group_size = 48"):
        quantize_rtn(torch.randn(4, 96), 48)
    with pytest.raises(QuantizationError, match="in_features = 96 is not a multiple of group_size = 64"):
        quantize_rtn(torch.randn(4, 96), 64, name="w")
    bad = torch.randn(4, 64)
    bad[1, 2] = float("nan")
    with pytest.raises(QuantizationError, match="layer.w: holds NaN"):
        quantize_rtn(bad, 32, name="layer.w")
    with pytest.raises(QuantizationError, match="overflows"):
        quantize_rtn(torch.tensor([[-60000.0, 60000.0] * 16]), 32)


def test_pack_unpack_round_trip():
    every_byte = torch.arange(256, dtype=torch.uint8).view(4, 64)
    assert torch.equal(pack_codes(unpack_codes(every_byte)), every_byte)
    codes = torch.randint(0, 16, (7, 3, 64), dtype=torch.uint8)
    packed = pack_codes(codes)
    assert packed.shape == (7, 3, 32)
    assert torch.equal(unpack_codes(packed), codes)
    # the documented layout: low nibble = even index, high nibble = odd index
    assert pack_codes(torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)).tolist() == [[0x21, 0x0F]]
    with pytest.raises(QuantizationError, match="odd"):
        pack_codes(torch.zeros(2, 3, dtype=torch.uint8))


@pytest.mark.parametrize(("n", "k", "group_size"), [(64, 256, 32), (96, 128, 64), (192, 384, 128)])
def test_int4_layout_conversion_keeps_every_code(n, k, group_size):
    q = quantize_rtn(torch.randn(n, k), group_size)
    packed, _ = to_cpu_int4(q.codes, q.scales, q.offsets, group_size)
    assert torch.equal(codes_from_int4(packed, k, group_size), q.codes)


def test_int4_parameters_are_the_m0e4_parameters_rounded_once_to_bfloat16():
    n, k, g = 64, 256, 64
    q = quantize_rtn(torch.randn(n, k) * 0.1, g)
    packed, scale_and_zeros = to_cpu_int4(q.codes, q.scales, q.offsets, g)
    scale, zero = int4_scale_zero(q.scales, q.offsets)
    # exact in float64: (q - 8) * S/16 + S (1.5 - c) == (1 + q/16 - c) S
    lhs = (q.codes.double() - 8) * scale.repeat_interleave(g, 1) + zero.repeat_interleave(g, 1)
    assert torch.equal(lhs, dequantize_reference(q.codes, q.scales, q.offsets, g))
    assert torch.equal(scale_and_zeros[..., 0].t(), scale.float().to(torch.bfloat16))
    assert torch.equal(scale_and_zeros[..., 1].t(), zero.float().to(torch.bfloat16))
    # the kernel computes (q - 8) * scale + zero in float32 with those bfloat16 parameters
    sb = scale_and_zeros[..., 0].t().float().repeat_interleave(g, 1)
    zb = scale_and_zeros[..., 1].t().float().repeat_interleave(g, 1)
    expected = ((q.codes.float() - 8) * sb + zb).to(torch.bfloat16).float()
    assert torch.equal(int4_dequantize(packed, scale_and_zeros, k, g), expected)
    # so the kernel's weight differs from M0E4's by the bfloat16 rounding of scale and zero only
    bound = (8 * sb + zb.abs()) * 2.0**-8 + expected.abs() * 2.0**-8
    assert bool(((expected - q.dequantize()).abs() <= bound).all())


def test_int4_matmul_matches_float_reference():
    n, k, g = 128, 512, 64
    q = quantize_rtn(torch.randn(n, k) * 0.05, g)
    packed, sz = to_cpu_int4(q.codes, q.scales, q.offsets, g)
    x = torch.randn(3, k).to(torch.bfloat16)
    y = int4_matmul(x, packed, sz, g)
    ref = x.float() @ q.dequantize().t()
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().mean()))
