"""Quantization as a module swap, quantized folders and their errors, ViTAR."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from quintet.deploy.convert import load_float_model
from quintet.deploy.qlinear import M0E4Linear
from quintet.deploy.quantize import QuantConfig, dequantize_model, quantize
from quintet.deploy.quantized_folder import (
    QuantizedCheckpointError,
    load_dequantized,
    load_quantized,
    load_quantized_model,
    save_quantized,
)
from quintet.errors import CheckpointError
from quintet.models.jamba.create import create_model


def test_quantize_swaps_linears_of_any_module_and_skips_what_it_must():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 48, bias=True), nn.Linear(48, 16))
    model.add_module("router", nn.Linear(64, 4))
    x = torch.randn(5, 64)
    qc = quantize(model, QuantConfig(group_size=32, skip=("router",)))
    assert qc["modules"] == {"0": "linear", "2": "linear"}  # "3" has 48 inputs: not a multiple of 32
    assert isinstance(model[0], M0E4Linear) and isinstance(model[2], M0E4Linear)
    assert isinstance(model[3], nn.Linear) and isinstance(model.router, nn.Linear)
    y = model[:4](x)
    reference = dequantize_model(model)
    assert isinstance(reference[0], nn.Linear) and reference[0].weight.dtype == torch.float32
    torch.testing.assert_close(y, reference[:4](x), rtol=0.05, atol=0.02)


def test_quant_config_validates():
    with pytest.raises(ValueError, match="group_size = 16: must be one of 32, 64, 128"):
        QuantConfig(group_size=16)
    with pytest.raises(ValueError, match="calibration = 'awq'"):
        QuantConfig(calibration="awq")


@pytest.fixture(scope="module")
def fp4_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("qfolder")
    create_model("jamba-tiny", root / "float", seed=0)
    model, base = load_float_model(root / "float")
    save_quantized(model, root / "fp4", base, quantize(model, QuantConfig(group_size=64)), root / "float")
    return root / "fp4"


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_a_truncated_file_is_reported_as_corrupt(fp4_folder, tmp_path):
    bad = _copy(fp4_folder, tmp_path / "bad")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors file.*corrupt"):
        load_quantized(bad)


def test_mismatched_tensors_are_named_with_found_and_expected(fp4_folder, tmp_path):
    bad = _copy(fp4_folder, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    tensors["lm_head.scales"] = tensors["lm_head.scales"][:, :1].contiguous()
    tensors["model.layers.0.mamba.in_proj.offsets"] = tensors["model.layers.0.mamba.in_proj.offsets"].float()
    del tensors["model.layers.2.self_attn.q_proj.qweight"]
    tensors["extra.weight"] = torch.zeros(2)
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(QuantizedCheckpointError) as err:
        load_quantized(bad)
    msg = str(err.value)
    assert "model.safetensors: the weights do not match config.json (group_size 64)" in msg
    assert "wrong shape: lm_head.scales: found [1024, 1], expected [1024, 2]" in msg
    assert (
        "wrong dtype: model.layers.0.mamba.in_proj.offsets: found torch.float32, expected torch.float16"
        in msg
    )
    assert "missing tensor: model.layers.2.self_attn.q_proj.qweight (expected shape [128, 64])" in msg
    assert "unexpected tensor: extra.weight" in msg


def test_non_finite_scales_are_named(fp4_folder, tmp_path):
    bad = _copy(fp4_folder, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    tensors["lm_head.scales"][7, 1] = float("inf")
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(
        QuantizedCheckpointError, match=r"lm_head.scales\[7, 1\] = inf: scales and offsets must be"
    ):
        load_quantized(bad)


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (
            lambda qc: qc.update(group_size=32),
            "wrong shape: lm_head.scales: found [1024, 2], expected [1024, 4]",
        ),
        (
            lambda qc: qc.update(group_size=48),
            "quantization_config.group_size = 48: valid values are 32, 64, 128",
        ),
        (
            lambda qc: qc.update(quant_method="gptq"),
            "quantization_config.quant_method = 'gptq': quintet reads 'm0e4'",
        ),
        (lambda qc: qc.update(bits=8), "quantization_config.bits = 8"),
        (
            lambda qc: qc["modules"].update({"model.layers.9.mlp": "linear"}),
            "names 'model.layers.9.mlp', which",
        ),
        (
            lambda qc: qc["modules"].update({"model.final_layernorm": "linear"}),
            "modules['model.final_layernorm'] = 'linear', but the model's model.final_layernorm is a RMSNorm",
        ),
    ],
)
def test_a_config_that_does_not_match_the_weights_is_explained(fp4_folder, tmp_path, edit, fragment):
    bad = _copy(fp4_folder, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    edit(config["quantization_config"])
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantizedCheckpointError) as err:
        load_quantized(bad)
    assert "config.json" in str(err.value) or "model.safetensors" in str(err.value)
    assert fragment in str(err.value)


def test_a_float_folder_is_not_taken_for_a_quantized_one(fp4_folder, tmp_path):
    create_model("jamba-tiny", tmp_path / "float", seed=0)
    with pytest.raises(
        QuantizedCheckpointError, match="no quantization_config; not a quantized model folder"
    ):
        load_quantized(tmp_path / "float")
    with pytest.raises(ValueError, match="already quantized"):
        load_float_model(fp4_folder)
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        load_quantized(tmp_path / "nowhere")


def test_quantized_folder_round_trips_the_codes(fp4_folder):
    model = load_quantized_model(fp4_folder)
    again = load_quantized_model(fp4_folder)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


vitar = pytest.importorskip("quintet.models.vitar")


@pytest.mark.parametrize("preset", ["vitar-tiny", "vit-tiny"])
def test_vitar_quantized_at_any_resolution(tmp_path, preset):
    torch.manual_seed(0)
    model = vitar.build_model(vitar.preset_config(preset)).eval()
    model.save_pretrained(tmp_path / "float")
    float_model, base = load_float_model(tmp_path / "float")
    qc = quantize(float_model, QuantConfig(group_size=32))
    assert qc["modules"] and all(kind == "linear" for kind in qc["modules"].values())
    save_quantized(float_model, tmp_path / "fp4", base, qc, tmp_path / "float")
    fp4 = load_quantized(tmp_path / "fp4")
    reference = load_dequantized(tmp_path / "fp4")
    original = vitar.load_model(tmp_path / "float")
    sizes = [(32, 32), (48, 40)] if preset == "vitar-tiny" else [(32, 32)]
    for h, w in sizes:
        images = torch.rand(2, 3, h, w)
        with torch.no_grad():
            out, ref, orig = fp4(images), reference(images), original(images)
        assert out.shape == (2, 10) and out.dtype == torch.float32
        torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05 * float(ref.abs().max()))
        assert float((ref - orig).abs().max()) < 0.5 * float(orig.abs().max()) + 0.1
