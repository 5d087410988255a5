"""The engine's decode plan: the same kernel calls as the modules, so the same logits to the bit."""

import pytest
import torch

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

    def counted(ids, cache):
        nonlocal ran
        out = plan(ids, cache)
        ran += out is not None
        return out

    engine.decode_plan = counted if use_plan else (lambda ids, cache: None)
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
def test_plan_gives_the_modules_logits_bit_for_bit(quantized, activations):
    engine = _engine(quantized, activations)
    with torch.inference_mode():
        ref, _ = _decode(engine, use_plan=False)
        got, ran = _decode(engine, use_plan=True)
    assert ran == 12  # every one-token step ran through the plan, none through the modules
    assert torch.equal(got, ref)


@pytest.mark.parametrize("activations", ["float32", "int8"])
def test_plan_runs_a_batch_of_rows_as_the_modules_do(activations):
    engine = _engine(True, activations)
    with torch.inference_mode():
        ref, _ = _decode(engine, use_plan=False, rows=3)  # the MoE's sorted dispatch, each expert once
        got, ran = _decode(engine, use_plan=True, rows=3)
    assert ran == 12 and got.shape[0] == 3
    assert torch.equal(got, ref)


def test_plan_rebinds_when_the_instruction_set_changes(monkeypatch):
    engine = _engine(True)
    with torch.inference_mode():
        _decode(engine, use_plan=True, steps=2)
        first = engine.decode_plan.key
        monkeypatch.setenv(m0e4_cpu.ISA_ENV, "scalar")
        ref, _ = _decode(engine, use_plan=False)
        got, ran = _decode(engine, use_plan=True)
    assert engine.decode_plan.key != first and ran == 12
    assert torch.equal(got, ref)  # the scalar kernels, through both paths


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
