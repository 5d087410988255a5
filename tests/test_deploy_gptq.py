"""GPTQ onto the M0E4 grid: its reference properties, the layer-by-layer Jamba pass, calibration files."""

import json

import pytest
import torch

from quintet.deploy.convert import quantize_folder
from quintet.deploy.gptq import gptq_quantize_jamba, gptq_quantize_weight, read_calibration
from quintet.deploy.quantize import QuantConfig, quantizable_modules, quantize
from quintet.deploy.quantized_folder import load_quantized
from quintet.eval.perplexity import perplexity_by_language
from quintet.kernels.m0e4 import quantize_rtn
from quintet.models.jamba import JambaConfig, JambaForCausalLM
from quintet.tokenizer import ByteTokenizer


def test_with_an_identity_hessian_gptq_is_round_to_nearest():
    w = torch.randn(64, 256) * 0.05
    q, ref = gptq_quantize_weight(w, torch.eye(256), 64), quantize_rtn(w, 64)
    assert torch.equal(q.codes, ref.codes)
    assert torch.equal(q.scales, ref.scales) and torch.equal(q.offsets, ref.offsets)


def test_gptq_lowers_the_output_error_on_correlated_inputs():
    k = 256
    x = torch.randn(2048, k) @ (torch.randn(k, k) / k**0.5) + 0.1 * torch.randn(2048, k)
    w = torch.randn(96, k) * 0.05
    gptq = gptq_quantize_weight(w, x.t().double() @ x.double(), 64)
    rtn = quantize_rtn(w, 64)

    def err(q):
        return float(((x @ w.t() - x @ q.dequantize().t()) ** 2).mean())

    assert err(gptq) < 0.7 * err(rtn)
    assert int(gptq.codes.max()) <= 15


def test_dead_inputs_are_zeroed():
    h = torch.eye(64, dtype=torch.float64)
    h[5, 5] = 0.0
    q = gptq_quantize_weight(torch.randn(16, 64), h, 32)
    assert torch.allclose(q.dequantize()[:, 5], torch.zeros(16), atol=float(q.scales.float().max()) / 16)


def test_gptq_on_jamba_covers_every_quantized_linear_and_beats_rtn_on_its_data():
    torch.manual_seed(0)
    config = JambaConfig.from_preset("jamba-tiny", vocab_size=300)
    model = JambaForCausalLM(config).eval()
    samples = [torch.randint(3, 300, (1, 64)) for _ in range(4)]
    qconfig = QuantConfig(group_size=32, calibration="gptq")
    names = {n for n, m in quantizable_modules(model, qconfig).items() if isinstance(m, torch.nn.Linear)}
    float_logits = [model(s).logits for s in samples]
    gptq = gptq_quantize_jamba(model, samples, qconfig)
    assert set(gptq) == names
    quantize(model, qconfig, gptq)
    torch.manual_seed(0)
    fresh = JambaForCausalLM(config).eval()  # the same float weights, rounded to nearest
    quantize(fresh, QuantConfig(group_size=32))

    def dist(m):
        return sum(
            float(((m(s).logits.float() - f) ** 2).mean()) for s, f in zip(samples, float_logits, strict=True)
        )

    with torch.inference_mode():
        assert dist(model) < dist(fresh)


def test_quantize_folder_with_gptq_and_perplexity(tmp_path):
    torch.manual_seed(0)
    JambaForCausalLM(JambaConfig.from_preset("jamba-tiny", vocab_size=300)).save_pretrained(tmp_path / "m")
    calib = tmp_path / "calib.jsonl"
    calib.write_text(
        "\n".join(json.dumps({"text": f"line {i}: the quick brown fox " * 4}) for i in range(40))
    )
    summary = quantize_folder(
        tmp_path / "m", tmp_path / "q", group_size=32, gptq=calib, gptq_samples=4, gptq_seq_len=64
    )
    assert summary["calibration"] == "gptq" and summary["calibration_tokens"] == 256
    assert summary["bytes_after"] < 0.2 * summary["bytes_before"]
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["calibration"] == "gptq" and qc["calibration_tokens"] == 256
    texts = {"en": ["the quick brown fox " * 8]}
    ppl_q = perplexity_by_language(load_quantized(tmp_path / "q"), ByteTokenizer(), texts, 64)["en"][
        "perplexity"
    ]
    model = JambaForCausalLM.from_pretrained(tmp_path / "m")
    ppl_f = perplexity_by_language(model, ByteTokenizer(), texts, 64)["en"]["perplexity"]
    assert ppl_q > 1.0 and abs(ppl_q - ppl_f) / ppl_f < 0.5


def test_calibration_file_errors_name_the_line(tmp_path):
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match=r"c.jsonl:2: expected an object with a string 'text' field"):
        read_calibration(bad, ByteTokenizer().encode, seq_len=4)
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"c.jsonl:2: not valid JSON"):
        read_calibration(bad, ByteTokenizer().encode, seq_len=4)
    bad.write_text('{"text": "ok"}\n')
    with pytest.raises(ValueError, match="only 2 tokens; calibration needs at least seq_len = 64"):
        read_calibration(bad, ByteTokenizer().encode, seq_len=64)
    with pytest.raises(FileNotFoundError, match="no such calibration file"):
        read_calibration(tmp_path / "none.jsonl", ByteTokenizer().encode)
