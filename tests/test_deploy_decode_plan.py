"""The engine's decode plan: one native call per step (`DecodeProgram`), the same kernels as the modules.

Attention is the program's own loop (the modules call SDPA), so its logits equal the modules' within float32
rounding, not to the bit; what must hold to the bit is that a row's result does not depend on the rows
beside it (the server batches its slots)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from quintet.deploy.engine import to_engine
from quintet.deploy.quantize import QuantConfig, quantize
from quintet.kernels import m0e4_cpu
from quintet.kernels.m0e4_cpu import m0e4_kernels_available
from quintet.kernels.selective_scan_cpu import fused_scan_available
from quintet.models.jamba import JambaConfig, JambaForCausalLM

pytestmark = pytest.mark.skipif(
    not (m0e4_kernels_available() and fused_scan_available()), reason="the C++ kernels are not built here"
)


def _engine(quantized: bool, activations: str = "float32"):
    torch.manual_seed(0)
    model = JambaForCausalLM(JambaConfig.from_preset("jamba-tiny")).eval()  # attention, MoE, Mamba layers
    if quantized:
        quantize(model, QuantConfig(group_size=32))
    engine = to_engine(model)
    engine.activations = activations
    return engine


def _decode(engine, use_plan: bool, steps: int = 12, rows: int = 1) -> tuple[torch.Tensor, int]:
    """Logits of a prompt's continuation, teacher-forced on fixed tokens; and how many steps the plan ran."""
    plan = engine.decode_plan
    ran = 0

    def counted(ids, cache, activations=None):
        nonlocal ran
        out = plan(ids, cache, activations)
        ran += out is not None
        return out

    engine.decode_plan = counted if use_plan else None
    try:
        cache = engine.new_cache()
        prompt = torch.arange(3, 20).repeat(rows, 1) + 50 * torch.arange(rows)[:, None]
        out = [engine(prompt, cache=cache, logits_to_keep=1).logits]
        for t in range(steps):
            ids = 40 + 7 * t + 3 * torch.arange(rows)[:, None]
            out.append(engine(ids, cache=cache, logits_to_keep=1).logits)
        return torch.cat(out, dim=1), ran
    finally:
        engine.decode_plan = plan


@pytest.mark.parametrize(
    "quantized,activations",
    [(True, "float32"), (True, "int8"), (False, "float32")],
    ids=["fp4", "int8", "float"],
)
def test_plan_gives_the_modules_logits(quantized, activations):
    engine = _engine(quantized, activations)
    with torch.inference_mode():
        ref, _ = _decode(engine, use_plan=False)
        got, ran = _decode(engine, use_plan=True)
    assert ran == 12  # every one-token step ran through the plan, none through the modules
    # float32: rounding only. int8: a last-bit difference can move an activation to the next int8 level.
    tol = 1e-5 if activations == "float32" else 3e-2
    assert (got - ref).abs().max() < tol
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("activations", ["float32", "int8"])
def test_plan_runs_a_batch_of_rows_as_the_modules_do(activations):
    engine = _engine(True, activations)
    with torch.inference_mode():
        ref, _ = _decode(engine, use_plan=False, rows=3)  # the MoE's sorted dispatch, each expert once
        got, ran = _decode(engine, use_plan=True, rows=3)
    assert ran == 12 and got.shape[0] == 3
    tol = 1e-5 if activations == "float32" else 3e-2
    assert (got - ref).abs().max() < tol


@pytest.mark.parametrize("activations", ["float32", "int8"])
def test_a_rows_logits_do_not_depend_on_the_rows_beside_it(activations):
    """Each row alone, then the three in one batch (rows of different lengths, as a server's slots): the
    same bits."""
    engine = _engine(True, activations)
    prompts = [torch.arange(3, 20), torch.arange(30, 39), torch.arange(60, 84)]
    steps = [[40 + 7 * t + 3 * r for t in range(6)] for r in range(3)]

    def run(rows: list[int]) -> torch.Tensor:
        from quintet.serve.slots import SlotCache

        slots = SlotCache(max_batch=len(rows), max_length=128)
        for i, r in enumerate(rows):
            cache = engine.new_cache()
            engine(prompts[r].unsqueeze(0), cache=cache, logits_to_keep=1)
            slots.load(i, cache)
        out = []
        for t in range(6):
            ids = torch.tensor([[steps[r][t]] for r in rows])
            logits = engine.decode_plan(ids, slots.rows(0, len(rows)), activations)
            assert logits is not None
            out.append(logits)
        return torch.cat(out, dim=1)

    with torch.inference_mode():
        alone = torch.cat([run([r]) for r in range(3)])
        together = run([0, 1, 2])
    assert torch.equal(alone, together)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("isa", m0e4_cpu.ISAS)
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim", [(8, 2, 64), (8, 8, 64), (16, 4, 128), (6, 3, 32), (8, 2, 48)]
)
def test_attention_step_equals_sdpa(isa, heads, kv_heads, head_dim, kv_dtype):
    """The program's attention op writes each row's new K/V at its position and attends to keys 0..position,
    as SDPA does over those keys; every instruction set, the AVX-512 fast shapes and the generic loops;
    K/V buffers in float32 or float16 (widened as they are read: SDPA over the float16 values in float32)."""
    code = m0e4_cpu.ISAS.index(isa)
    if code > m0e4_cpu.ISAS.index(m0e4_cpu.isa()):
        pytest.skip(f"this CPU does not run {isa}")
    torch.manual_seed(0)
    ops = m0e4_cpu._kernel.get()
    rows, cap, d = 3, 200, head_dim
    keys = torch.randn(rows, kv_heads, cap, d).to(kv_dtype)
    values = torch.randn(rows, kv_heads, cap, d).to(kv_dtype)
    qkv = 2 * torch.randn(rows, (heads + 2 * kv_heads) * d)
    positions = torch.tensor([5, 130, 0])
    k_out, v_out = keys.clone(), values.clone()
    out = ops.attend_decode(qkv, k_out, v_out, positions, heads, kv_heads, d, d**-0.5, code)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    for r, p in enumerate(positions.tolist()):
        keys[r, :, p], values[r, :, p] = k[r].view(kv_heads, d), v[r].view(kv_heads, d)
        k_r, v_r = keys[r : r + 1, :, : p + 1].float(), values[r : r + 1, :, : p + 1].float()
        ref = F.scaled_dot_product_attention(q[r].view(1, heads, 1, d), k_r, v_r, enable_gqa=True)
        torch.testing.assert_close(out[r], ref.reshape(-1), rtol=1e-5, atol=1e-5)
    assert torch.equal(k_out, keys) and torch.equal(v_out, values)


def test_attention_step_refuses_mixed_kv_buffers():
    ops = m0e4_cpu._kernel.get()
    keys, values = torch.zeros(1, 2, 8, 32), torch.zeros(1, 2, 8, 32, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="both float32 or both float16"):
        ops.attend_decode(torch.zeros(1, 8 * 32), keys, values, torch.tensor([0]), 4, 2, 32, 1.0, 0)


def test_int8_fp4_engines_keep_a_float16_kv_cache():
    """llama.cpp's pairing: an FP4 engine with int8 decode activations keeps K/V in float16 (its decode
    plan runs on them); float32 activations and float models keep float32 K/V."""
    assert _engine(False).new_cache().dtype == torch.float32
    torch.manual_seed(0)
    model = JambaForCausalLM(JambaConfig.from_preset("jamba-tiny")).eval()
    quantize(model, QuantConfig(group_size=32))
    exact = to_engine(copy.deepcopy(model), activations="float32")
    assert exact.new_cache().dtype == torch.float32
    fast = to_engine(model, activations="int8")
    assert fast.new_cache().dtype == torch.float16
    _, ran = _decode(fast, use_plan=True)
    assert ran == 12
    cache = fast.new_cache()
    with torch.inference_mode():
        fast(torch.arange(3, 20).unsqueeze(0), cache=cache)
    assert all(k.dtype == torch.float16 for k in cache.keys if k is not None)


def test_plan_rebinds_when_the_instruction_set_changes(monkeypatch):
    engine = _engine(True)
    with torch.inference_mode():
        _decode(engine, use_plan=True, steps=2)
        first = engine.decode_plan.key
        monkeypatch.setenv(m0e4_cpu.ISA_ENV, "scalar")
        ref, _ = _decode(engine, use_plan=False)
        got, ran = _decode(engine, use_plan=True)
    assert engine.decode_plan.key != first and ran == 12
    assert (got - ref).abs().max() < 1e-5  # the scalar kernels, through both paths


def test_plan_steps_aside_without_kernels_batches_or_unfused_models(monkeypatch):
    engine = _engine(True)
    with torch.inference_mode():
        cache = engine.new_cache()
        engine(torch.arange(3, 9).unsqueeze(0), cache=cache)
        assert engine.decode_plan(torch.tensor([[5]]), cache) is not None
        assert engine.decode_plan(torch.tensor([[5, 6]]), cache) is None  # two new tokens: the modules
        assert engine.decode_plan(torch.tensor([[5]]), engine.new_cache()) is None  # no prompt yet
        monkeypatch.setenv(m0e4_cpu.DISABLE_ENV, "1")
        assert engine.decode_plan(torch.tensor([[5]]), cache) is None
    torch.manual_seed(0)
    unfused = to_engine(JambaForCausalLM(JambaConfig.from_preset("jamba-tiny")).eval(), fuse=False)
    with torch.inference_mode():
        cache = unfused.new_cache()
        unfused(torch.arange(3, 9).unsqueeze(0), cache=cache)
        assert unfused.decode_plan(torch.tensor([[5]]), cache) is None


def test_decode_layout_engine_equals_the_row_layout_engine(monkeypatch):
    """Where the int8 GEMV runs vector code, an int8 engine holds its M0E4 weights in the decode layout (the
    same bytes reordered, nothing added). Read through float32 activations it gives the row layout's logits
    to the bit (every op but the int8 GEMV copies the tiles back to rows); with int8 activations its steps
    err from the exact engine as much as the row layout's do (each int8 GEMV agrees with the row kernel to
    float32 rounding, test_m0e4_kernels, but a last-bit change upstream can move a block's int8 rounding,
    so the two int8 engines are compared through their error, not with each other)."""
    import quintet.deploy.engine as engine_module
    from quintet.deploy.memory_plan import weight_bytes
    from quintet.deploy.qlinear import M0E4Linear

    torch.manual_seed(0)
    model = JambaForCausalLM(JambaConfig.from_preset("jamba-tiny")).eval()
    quantize(model, QuantConfig(group_size=32))
    exact = to_engine(copy.deepcopy(model), activations="float32")
    tiled = to_engine(copy.deepcopy(model), activations="int8")
    monkeypatch.setattr(engine_module, "decode_layout_runs", lambda activations: False)
    rows = to_engine(copy.deepcopy(model), activations="int8")
    layouts = {m.qweight.dim() for m in tiled.modules() if isinstance(m, M0E4Linear)}
    if not m0e4_cpu.decode_layout_runs("int8"):
        assert layouts == {2}
        pytest.skip("no AVX2 or AVX-512 here: engines keep the row layout")
    assert 3 in layouts
    assert {m.qweight.dim() for m in rows.modules() if isinstance(m, M0E4Linear)} == {2}
    assert weight_bytes(tiled) == weight_bytes(rows)

    want, _ = _decode(exact, use_plan=True)
    exact_tiled = to_engine(copy.deepcopy(model), activations="float32")
    for m in exact_tiled.modules():
        if isinstance(m, M0E4Linear):
            m.use_decode_layout()
    got, ran = _decode(exact_tiled, use_plan=True)
    assert ran == 12 and torch.equal(got, want)

    a, ran = _decode(tiled, use_plan=True)
    b, _ = _decode(rows, use_plan=True)
    assert ran == 12 and torch.equal(a[:, 0], b[:, 0])  # the prompt: float32 tiles, to the bit
    err_tiled, err_rows = (a - want).abs().mean(), (b - want).abs().mean()
    assert err_tiled <= 1.5 * err_rows and err_rows <= 1.5 * err_tiled, (err_tiled, err_rows)


def test_steps_on_a_bound_cache_equal_the_full_path():
    """After a step, the next steps on the same cache run with its buffers bound in the program (no Python
    around the kernel call); they give the full path's logits, and any change (a reset and a new prompt in
    the same cache, another cache) goes back through the full path first."""
    engine = _engine(True, "int8")
    plan = engine.decode_plan

    def generate(cache, prompt, steps, bound):
        out = [engine(prompt, cache=cache, logits_to_keep=1).logits]
        for t in range(steps):
            if not bound:
                plan._fast = None  # forget the binding: every step takes the full path
            out.append(engine(torch.tensor([[40 + 7 * t]]), cache=cache).logits)
        return torch.cat(out, dim=1)

    with torch.inference_mode():
        prompt = torch.arange(3, 20).unsqueeze(0)
        want = generate(engine.new_cache(), prompt, 8, bound=False)
        cache = engine.new_cache()
        got = generate(cache, prompt, 8, bound=True)
        assert plan._fast is not None and plan._fast[0] is cache
        assert torch.equal(got, want)
        cache.reset()  # the same cache, a new sequence: its states are replaced, the binding dropped
        assert torch.equal(generate(cache, prompt, 8, bound=True), want)
        other = engine.new_cache()
        assert torch.equal(generate(other, prompt, 3, bound=True), want[:, :4])


def test_bound_steps_from_two_threads_on_two_caches():
    """The program binds one cache's buffers at a time: generations on two caches from two threads give
    what each gives alone."""
    import threading

    engine = _engine(True, "int8")
    prompts = [torch.arange(3, 20).unsqueeze(0), torch.arange(30, 41).unsqueeze(0)]

    def generate(prompt, out):
        with torch.inference_mode():
            cache = engine.new_cache()
            logits = [engine(prompt, cache=cache, logits_to_keep=1).logits]
            for t in range(12):
                logits.append(engine(torch.tensor([[40 + 7 * t]]), cache=cache).logits)
            out.append(torch.cat(logits, dim=1))

    alone = []
    for p in prompts:
        generate(p, alone)
    together = [[], []]
    threads = [threading.Thread(target=generate, args=(p, o)) for p, o in zip(prompts, together, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    for want, got in zip(alone, together, strict=True):
        assert torch.equal(got[0], want)
