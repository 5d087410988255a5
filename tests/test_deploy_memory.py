"""A loaded FP4 model holds its weights in 4 bits: resident memory against the weights file."""

import os

import pytest
import torch

from quintet.deploy.convert import quantize_folder
from quintet.deploy.memory_plan import weight_bytes, weight_bytes_per_token
from quintet.deploy.memory_probe import resident_memory
from quintet.deploy.qlinear import M0E4Linear
from quintet.deploy.quantized_folder import file_bytes, load_quantized
from quintet.kernels import m0e4_cpu
from quintet.models.jamba import JambaConfig, JambaForCausalLM

# big enough that the weights, not the allocator's slack, dominate what a process holds (~30 MiB FP4)
SHAPE = dict(vocab_size=32768, hidden_size=512, intermediate_size=1024, num_attention_heads=8)


@pytest.fixture(scope="module")
def fp4_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    torch.manual_seed(0)
    JambaForCausalLM(JambaConfig.from_preset("jamba-tiny", **SHAPE)).save_pretrained(root / "float")
    quantize_folder(root / "float", root / "fp4", group_size=64)
    return root / "fp4"


def test_no_float_copy_of_any_quantized_weight(fp4_folder):
    engine = load_quantized(fp4_folder)
    quantized = [m for m in engine.modules() if isinstance(m, M0E4Linear)]
    assert quantized
    tensors = [*engine.buffers(), *engine.parameters()]
    float_shapes = {tuple(t.shape) for t in tensors if t.is_floating_point() and t.dim() == 2}
    for m in quantized:  # (this model's float-kept modules have no shape in common with quantized ones)
        assert (m.out_features, m.in_features) not in float_shapes
    assert weight_bytes(engine) <= 1.25 * file_bytes(fp4_folder)
    assert weight_bytes_per_token(engine) < weight_bytes(engine)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads resident memory from /proc")
@pytest.mark.skipif(not m0e4_cpu.m0e4_kernels_available(), reason="the PyTorch fallback is not the claim")
def test_resident_memory_of_a_loaded_fp4_model_is_near_its_file(fp4_folder):
    got = resident_memory(fp4_folder, cache_tokens=512)
    weights = file_bytes(fp4_folder)
    assert got["rss_loaded"] <= 1.25 * weights + got["cache_bytes"], (got, weights)
