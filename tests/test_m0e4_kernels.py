"""quintet's M0E4 CPU kernels against dequantize-then-matmul, on every instruction set this CPU runs."""

from __future__ import annotations

import pytest
import torch

from quintet.kernels import m0e4_cpu
from quintet.kernels.m0e4 import dequantize, pack_codes, quantize_rtn
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
        # micro-tiles for a few rows (every block of rows and of W, ragged ends), large tiles past them;
        # and each of the two forced at every row count
        limit = m0e4_cpu.MICRO_TILE_MAX_ROWS
        code = ISAS.index(isa)
        for rows in (1, 5, 23, limit, limit + 1):
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
            ys = [
                m0e4_matmul(x, qweight, scales, offsets, group_size, path="tiles"),
                *(
                    m0e4_cpu._kernel.get().matmul_tiles(
                        x, qweight, scales, offsets, group_size, code, dtype == "bfloat16", small, 1 << 14
                    )
                    for small in (0, rows)
                ),
            ]
            for y in ys:
                assert y.shape == (rows, n) and y.dtype == torch.float32
                if dtype == "float32":
                    check_close(y, x, w, 2e-6)
                else:  # x and the tile rounded to bfloat16 (8 bits of mantissa) once each, and the output
                    check_close(y, x, w, 3 * 2**-8)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prefill_rows_do_not_depend_on_the_other_rows(monkeypatch, dtype):
    """Where the prefill path is our own kernel (bfloat16 products on AVX-512 BF16: every row count;
    float32: up to MICRO_TILE_MAX_ROWS), a row's result is the same bits alone or among others."""
    monkeypatch.setenv(m0e4_cpu.DTYPE_ENV, dtype)
    q = quantize_rtn(torch.randn(200, 256), 64)
    args_ = (pack_codes(q.codes), q.scales, q.offsets, 64)
    x = torch.randn(300, 256)
    own = dtype == "bfloat16" and m0e4_cpu.isa() == "avx512" and m0e4_cpu._kernel.bf16
    rows = 300 if own else m0e4_cpu.MICRO_TILE_MAX_ROWS
    together = m0e4_matmul(x[:rows], *args_, path="tiles")
    for i in (0, 7, rows - 1):
        assert torch.equal(m0e4_matmul(x[i : i + 1], *args_, path="tiles")[0], together[i])
        assert torch.equal(m0e4_matmul(x[i : i + 9], *args_, path="tiles")[0], together[i])


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


def int8_activation_reference(x, codes, scales, offsets, group_size):
    """x rounded to int8 per block of 32 (dx = max|x| / 127), times the codes, scaled per group, plus the
    offsets' term from the exact x: the int8-activation GEMV's definition, in float64."""
    m, k = x.shape
    blocks = x.view(m, k // 32, 32)
    dx = blocks.abs().amax(-1, keepdim=True) / 127
    xq = torch.where(dx > 0, torch.round(blocks / dx), torch.zeros_like(blocks))
    xhat = (xq * dx).view(m, k).double()
    s = scales.double().repeat_interleave(group_size, 1)
    xsum = x.double().view(m, k // group_size, group_size).sum(-1)
    return xhat @ (codes.double() * s / 16).t() + xsum @ (scales.double() * (1 - offsets.double())).t()


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_int8_activation_gemv_equals_its_definition(isa):
    if isa not in runnable_isas():
        pytest.skip(f"this CPU has no {isa}")
    ops = torch.ops.quintet_m0e4
    if isa == "avx512" and not ops.has_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI")
    for group_size in (32, 64, 128):
        codes, scales, offsets = every_code_weight(37, 384, group_size, seed=group_size)
        w = dequantize(codes, scales, offsets, group_size)
        for rows in (1, 3, 5):
            x = torch.randn(rows, 384, generator=torch.Generator().manual_seed(rows))
            y = ops.gemv_q8(x, pack_codes(codes), scales, offsets, group_size, ISAS.index(isa))
            want = int8_activation_reference(x, codes, scales, offsets, group_size)
            bound = x.double().abs() @ w.double().abs().t()
            assert ((y.double() - want).abs() <= 2e-6 * bound + 1e-12).all()
            # and it is near the float matmul: the error of 8-bit activations, no more
            assert ((y.double() - x.double() @ w.double().t()).abs() <= 0.02 * bound).all()


def test_int8_activations_only_when_asked():
    q = quantize_rtn(torch.randn(64, 256), 64)
    args = (torch.randn(1, 256), pack_codes(q.codes), q.scales, q.offsets, 64)
    exact = m0e4_matmul(*args, path="gemv")
    with m0e4_cpu.decode_activations("int8"):
        approx = m0e4_matmul(*args, path="gemv")
    if m0e4_cpu.int8_activations_available():
        assert not torch.equal(exact, approx)
    torch.testing.assert_close(approx, exact, rtol=0.05, atol=0.05 * float(exact.abs().max()))
    with pytest.raises(ValueError, match="must be one of float32, int8"), m0e4_cpu.decode_activations("int4"):
        pass


def test_fused_swiglu_gemv_equals_the_three_ops(monkeypatch):
    monkeypatch.setenv(m0e4_cpu.DTYPE_ENV, "float32")  # the unfused tiles, exact too
    from quintet.deploy.fusions import FusedSwiGLU
    from quintet.deploy.qlinear import M0E4Linear

    def lin(n, k):
        return M0E4Linear.from_quantized(quantize_rtn(torch.randn(n, k), 64))

    ff = FusedSwiGLU(lin(256, 128), lin(256, 128), lin(128, 256))
    x = torch.randn(3, 128)
    w_gu, w_down = ff.gate_up_proj.dequantized_weight(), ff.down_proj.dequantized_weight()
    gate, up = (x @ w_gu.t()).split(256, dim=-1)
    want = (torch.nn.functional.silu(gate) * up) @ w_down.t()
    with torch.inference_mode(), m0e4_cpu.matmul_path("gemv"):
        got = ff(x)
    tol = 1e-5 * float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=tol)
    with torch.inference_mode(), m0e4_cpu.matmul_path("tiles"):  # the unfused ops
        torch.testing.assert_close(ff(x), want, rtol=1e-5, atol=tol)


def test_fused_add_rms_norm_equals_pytorch():
    x, h, w = torch.randn(3, 1, 96), torch.randn(3, 1, 96), torch.randn(96)
    with torch.inference_mode(), m0e4_cpu.matmul_path("gemv"):
        total, normed = m0e4_cpu.fused_add_rms_norm(x, h, w, 1e-6)
        same, alone = m0e4_cpu.fused_add_rms_norm(x, None, w, 1e-6)
    torch.testing.assert_close(total, x + h)
    torch.testing.assert_close(normed, torch.nn.functional.rms_norm(x + h, (96,), w, 1e-6))
    assert same is x
    torch.testing.assert_close(alone, torch.nn.functional.rms_norm(x, (96,), w, 1e-6))
    with m0e4_cpu.matmul_path("tiles"):  # outside a decode step PyTorch's kernel runs
        assert m0e4_cpu.fused_add_rms_norm(x, h, w, 1e-6) is None


def test_fused_float_swiglu_equals_the_three_ops():
    from quintet.deploy.fusions import EngineLinear, FusedSwiGLU

    torch.manual_seed(0)
    gate, up = torch.nn.Linear(96, 160, bias=False), torch.nn.Linear(96, 160, bias=False)
    down = torch.nn.Linear(160, 96, bias=False)
    ff = FusedSwiGLU(gate, up, down)
    ff.gate_up_proj, ff.down_proj = EngineLinear(ff.gate_up_proj), EngineLinear(down)
    x = torch.randn(2, 96)
    want = down(torch.nn.functional.silu(gate(x)) * up(x))
    with torch.inference_mode(), m0e4_cpu.matmul_path("gemv"):
        torch.testing.assert_close(ff(x), want, rtol=1e-5, atol=1e-5)


def test_moving_a_quantized_module_keeps_its_storage_types():
    from quintet.deploy.qlinear import M0E4Linear

    lin = M0E4Linear.from_quantized(quantize_rtn(torch.randn(32, 64), 32), bias=torch.zeros(32))
    lin.to(torch.float32)
    lin.to(dtype=torch.bfloat16)
    assert lin.qweight.dtype == torch.uint8 and lin.scales.dtype == lin.offsets.dtype == torch.float16
    assert lin.bias.dtype == torch.bfloat16  # the float parameter does follow


# ------------------------------------------------------------------------------------------ decode layout
def test_decode_layout_is_a_reordering_of_the_same_bytes():
    codes, scales, offsets = every_code_weight(48, 256, 64)
    q = pack_codes(codes)
    tiled = m0e4_cpu.to_decode_layout(q, scales, offsets)
    assert [t.shape for t in tiled] == [(3, 32, 64), (3, 4, 16), (3, 4, 16)]
    # byte 4r + b of word w of tile t is byte 4w + b of row 16t + r
    assert tiled[0][2, 5, 4 * 7 + 3] == q[16 * 2 + 7, 4 * 5 + 3]
    assert tiled[1][1, 3, 9] == scales[16 + 9, 3]
    assert sorted(tiled[0].flatten().tolist()) == sorted(q.flatten().tolist())
    back = m0e4_cpu.to_row_layout(*tiled)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, scales, offsets), strict=True))
    assert m0e4_cpu.weight_rows(tiled[0]) == 48 and m0e4_cpu.weight_rows(q) == 48


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_every_op_reads_the_decode_layout(isa):
    """The int8 GEMV (VNNI: its own kernel; elsewhere through per-tile copies), the float GEMV, the
    dequantized rows and the prefill tiles give the row layout's results from the decode layout."""
    if isa not in runnable_isas():
        pytest.skip(f"this CPU has no {isa}")
    ops, code = torch.ops.quintet_m0e4, ISAS.index(isa)
    for group_size in (32, 64, 128):
        codes, scales, offsets = every_code_weight(48, 384, group_size, seed=group_size)
        rows_layout = (pack_codes(codes), scales, offsets)
        tiled = m0e4_cpu.to_decode_layout(*rows_layout)
        w = dequantize(codes, scales, offsets, group_size)
        for m in (1, 3, 5, 8):
            x = torch.randn(m, 384, generator=torch.Generator().manual_seed(m))
            y8 = ops.gemv_q8(x, *tiled, group_size, code)
            want = int8_activation_reference(x, codes, scales, offsets, group_size)
            bound = x.double().abs() @ w.double().abs().t()
            assert ((y8.double() - want).abs() <= 2e-6 * bound + 1e-12).all()
            y = ops.gemv(x, *tiled, group_size, code)
            assert torch.equal(y, ops.gemv(x, *rows_layout, group_size, code))
        out_rows, out_tiled = torch.empty(21, 384), torch.empty(21, 384)
        ops.dequantize_rows(*rows_layout, group_size, 11, out_rows, code)  # a range across tiles
        ops.dequantize_rows(*tiled, group_size, 11, out_tiled, code)
        assert torch.equal(out_rows, out_tiled)
        for m in (4, 200):  # micro-tiles and large tiles
            x = torch.randn(m, 384)
            a = ops.matmul_tiles(x, *rows_layout, group_size, code, False, 96, 1 << 19)
            assert torch.equal(a, ops.matmul_tiles(x, *tiled, group_size, code, False, 96, 1 << 19))


def test_decode_layout_shapes_are_checked():
    codes, scales, offsets = every_code_weight(32, 256, 64)
    q, s, o = m0e4_cpu.to_decode_layout(pack_codes(codes), scales, offsets)
    with pytest.raises(RuntimeError, match="decode layout"):
        torch.ops.quintet_m0e4.gemv(torch.randn(1, 256), q, s.transpose(1, 2).contiguous(), o, 64, 0)


def test_a_module_in_the_decode_layout_keeps_its_weight(monkeypatch):
    monkeypatch.setenv(m0e4_cpu.DTYPE_ENV, "float32")
    from quintet.deploy.qlinear import M0E4Linear

    lin = M0E4Linear.from_quantized(quantize_rtn(torch.randn(48, 256), 64))
    w, x = lin.dequantized_weight(), torch.randn(3, 256)
    with torch.inference_mode(), m0e4_cpu.matmul_path("gemv"):
        before = lin(x)
    assert lin.use_decode_layout() and lin.qweight.shape == (3, 32, 64)
    assert torch.equal(lin.dequantized_weight(), w)
    assert torch.equal(lin.row_layout()[0], pack_codes(lin.codes()))
    for path in ("gemv", "tiles"):
        with torch.inference_mode(), m0e4_cpu.matmul_path(path):
            torch.testing.assert_close(lin(x), before if path == "gemv" else x @ w.t(), rtol=1e-5, atol=1e-5)
    # shapes the layout cannot hold stay in rows
    assert not M0E4Linear.from_quantized(quantize_rtn(torch.randn(40, 256), 64)).use_decode_layout()
    assert not M0E4Linear.from_quantized(quantize_rtn(torch.randn(48, 192), 64)).use_decode_layout()
