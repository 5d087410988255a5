"""M0E4: the bit trick, quantization and packing."""

import pytest
import torch

from quintet.kernels.m0e4 import (
    QuantizationError,
    code_to_fp16,
    code_to_fp16_reference,
    dequantize,
    dequantize_reference,
    pack_codes,
    quantize_rtn,
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
