"""A loaded FP4 model holds its weights in 4 bits: resident memory against the weights file."""

import json
import os
import subprocess
import sys

import pytest
import torch

from quintet.deploy.engine import load_quantized
from quintet.deploy.memory_plan import weight_bytes, weight_bytes_per_token
from quintet.deploy.qlinear import M0E4Linear
from quintet.deploy.quantize import file_bytes, quantize_folder
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


_PROBE = """
import json, sys, torch
from quintet.deploy.engine import load_quantized
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
torch.set_num_threads(1)
def run(folder, prompt):
    engine = load_quantized(folder, max_cache_length=512)
    cache = engine.new_cache()
    with torch.inference_mode():
        engine(torch.randint(3, 1000, (1, prompt)), cache=cache, logits_to_keep=1)
        for _ in range(8):
            engine(torch.tensor([[5]]), cache=cache)
    return engine, cache
# what a process pays once, whatever it loads: libraries loaded and code generated on first use (PyTorch's,
# oneDNN's for each matmul shape, quintet's kernels). Paid here by a first copy of the model, which stays
# loaded (so the second cannot reuse its memory): the second copy's cost is the model's own.
warm = run(sys.argv[1], 16)
base = rss()
engine, cache = run(sys.argv[1], 16)
print(json.dumps({"rss": rss() - base, "cache": sum(cache.nbytes().values())}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads resident memory from /proc")
@pytest.mark.skipif(not m0e4_cpu.m0e4_kernels_available(), reason="the PyTorch fallback is not the claim")
def test_resident_memory_of_a_loaded_fp4_model_is_near_its_file(fp4_folder):
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(fp4_folder)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    weights = file_bytes(fp4_folder)
    assert got["rss"] <= 1.25 * weights + got["cache"], (got, weights)
