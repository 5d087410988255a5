"""The FP4 engine: quantized folders, greedy equality with the dequantized model, the sub-tensor KV cache."""

import json

import pytest
import torch

from quintet.deploy.convert import load_float_model
from quintet.deploy.engine import JambaEngine, to_engine
from quintet.deploy.kv_cache import SubTensorKVCache
from quintet.deploy.qlinear import M0E4Embedding, M0E4Linear
from quintet.deploy.quantize import QuantConfig, quantize
from quintet.deploy.quantized_folder import (
    file_bytes,
    load_dequantized,
    load_quantized,
    load_quantized_model,
    save_quantized,
)
from quintet.generation import generate
from quintet.loading import load_model
from quintet.models.jamba import JambaConfig, JambaForCausalLM

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [100, 200, 250], [17], [40, 41, 42, 43, 44, 45, 46, 47, 48, 3]]


def _trained_tiny_model() -> JambaForCausalLM:
    """A small Jamba trained for a few seconds on arithmetic sequences (next = prev + 37 mod 253): its
    greedy choices are decisive, as a trained model's are (a random model's top two logits are often
    closer than bfloat16's rounding, so greedy equality would test luck, not the engine)."""
    torch.manual_seed(0)
    config = JambaConfig.from_preset(
        "jamba-tiny", vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4
    )
    model = JambaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(25):
        ids = (torch.randint(3, 256, (8, 1)) + 37 * torch.arange(32)) % 253 + 3
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    _trained_tiny_model().save_pretrained(root / "float")
    model, base = load_float_model(root / "float")
    qc = quantize(model, QuantConfig(group_size=32))
    save_quantized(model, root / "fp4", base, qc, root / "float")
    return root / "float", root / "fp4"


def test_quantized_folder_format(folders):
    float_dir, fp4_dir = folders
    config = json.loads((fp4_dir / "config.json").read_text())
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["calibration"]) == ("m0e4", 4, 32, "rtn")
    assert qc["modules"]["model.embed_tokens"] == "embedding"
    assert qc["modules"]["lm_head"] == "linear"
    assert not any(name.endswith(("dt_proj", "x_proj", "router")) for name in qc["modules"])
    assert (fp4_dir / "generation_config.json").is_file()
    assert file_bytes(fp4_dir) < 0.2 * file_bytes(float_dir)
    model = load_quantized_model(fp4_dir)
    head = model.lm_head
    assert isinstance(head, M0E4Linear) and head.qweight.dtype == torch.uint8
    assert tuple(head.qweight.shape) == (256, 32) and tuple(head.scales.shape) == (256, 2)
    assert isinstance(model.model.embed_tokens, M0E4Embedding)


def test_quantized_greedy_output_equals_the_dequantized_fp32_model(folders):
    _, fp4_dir = folders
    engine = load_quantized(fp4_dir)
    reference = load_dequantized(fp4_dir)
    assert isinstance(engine, JambaEngine) and isinstance(reference, JambaForCausalLM)
    assert reference.dtype == torch.float32
    ours = generate(engine, PROMPTS, max_new_tokens=16, stop_token_ids=())
    theirs = generate(reference, PROMPTS, max_new_tokens=16, stop_token_ids=())
    assert ours == theirs
    for prompt in PROMPTS:  # each row alone gives what it gives in the (left-padded) batch
        assert generate(engine, [prompt], max_new_tokens=16, stop_token_ids=()) == [
            ours[PROMPTS.index(prompt)]
        ]
    ids = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        ours_logits, ref_logits = engine(ids).logits.float(), reference(ids).logits
    assert float((ours_logits - ref_logits).abs().max()) < 0.1 * float(ref_logits.std())


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("pad", [64, 1])
def test_engine_in_float32_equals_the_model_step_by_step(folders, fuse, pad):
    """Padding, masking, GQA folding and fusions change no number beyond float32 rounding."""
    float_dir, _ = folders
    model = JambaForCausalLM.from_pretrained(float_dir)
    engine = to_engine(
        JambaForCausalLM.from_pretrained(float_dir), dtype=torch.float32, fuse=fuse, pad_multiple=pad
    )
    ids = torch.tensor([[4, 9, 33, 7, 12], [0, 0, 5, 8, 99]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with torch.inference_mode():
        ref_cache, cache = model.new_cache(), engine.new_cache()
        want = model(ids, attention_mask=mask, cache=ref_cache).logits
        got = engine(ids, attention_mask=mask, cache=cache).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        for step in range(3):
            nxt = torch.tensor([[3 + step], [40 + step]])
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
            want = model(nxt, attention_mask=mask, cache=ref_cache).logits
            got = engine(nxt, attention_mask=mask, cache=cache).logits
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        # a second chunk of several tokens on a non-empty cache (chunked prefill), no padding mask
        model_c, engine_c = model.new_cache(), engine.new_cache()
        model(ids[:1, :2], cache=model_c)
        engine(ids[:1, :2], cache=engine_c)
        torch.testing.assert_close(
            engine(ids[:1, 2:], cache=engine_c).logits,
            model(ids[:1, 2:], cache=model_c).logits,
            rtol=1e-4,
            atol=1e-5,
        )


def test_bfloat16_engine_of_a_float_model(folders):
    float_dir, _ = folders
    model = JambaForCausalLM.from_pretrained(float_dir)
    engine = to_engine(JambaForCausalLM.from_pretrained(float_dir), dtype=torch.bfloat16)
    assert engine.dtype == torch.bfloat16 and engine.lm.lm_head.weight.dtype == torch.bfloat16
    assert generate(engine, PROMPTS, max_new_tokens=8, stop_token_ids=()) == generate(
        model, PROMPTS, max_new_tokens=8, stop_token_ids=()
    )
    ids = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        got, want = engine(ids).logits.float(), model(ids).logits
    assert float((got - want).abs().max()) < 0.1 * float(want.std())


def test_sub_tensor_cache_plugs_into_the_model_unchanged(folders):
    """With pad_multiple = 1 the views have the exact length, so the model's own attention can use them."""
    float_dir, _ = folders
    model = JambaForCausalLM.from_pretrained(float_dir)
    ids = torch.tensor([[4, 9, 33, 7, 12, 5]])
    with torch.inference_mode():
        ref, ours = model.new_cache(), SubTensorKVCache(model.config, 16, pad_multiple=1, dtype=torch.float32)
        torch.testing.assert_close(model(ids, cache=ours).logits, model(ids, cache=ref).logits)
        for t in (3, 8, 1):
            step = torch.tensor([[t]])
            torch.testing.assert_close(model(step, cache=ours).logits, model(step, cache=ref).logits)


def test_kv_buffer_never_moves_and_no_step_copies_the_past(folders):
    _, fp4_dir = folders
    engine = load_quantized(fp4_dir, max_cache_length=512)
    layer = engine.config.layers_block_type.index("attention")
    cache = engine.new_cache()
    prompt = torch.tensor([[3 + i % 250 for i in range(150)]])
    lengths, ptrs = set(), set()
    with torch.inference_mode():
        logits = engine(prompt, cache=cache, logits_to_keep=1).logits
        buffer = cache.keys[layer]
        for step in range(100):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            if step == 50:  # profile one decode step's allocations
                with torch.profiler.profile(profile_memory=True) as prof:
                    logits = engine(nxt, cache=cache, logits_to_keep=1).logits
                past_bytes = buffer[:, :, : cache.get_seq_length() - 1].nbytes
            else:
                logits = engine(nxt, cache=cache, logits_to_keep=1).logits
            k, v = cache.keys[layer], cache.values[layer]
            ptrs.add((k.data_ptr(), v.data_ptr()))
            lengths.add(cache.attended_length(cache.get_seq_length()))
    assert ptrs == {(buffer.data_ptr(), cache.values[layer].data_ptr())} and cache.reallocations == 0
    assert buffer.shape[2] == 512
    assert lengths == {192, 256}  # 151..250 tokens: the attended length changes every 64 steps only
    # No op of the step allocates as much as the past K (what a concatenation would): the K/V that
    # attention reads are views of the buffer.
    big = [(e.name, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage >= past_bytes]
    assert big == [], (past_bytes, big)
    with torch.inference_mode():  # what update_kv hands to attention is a view of the buffer
        empty = torch.zeros(1, 2, 0, 16, dtype=torch.bfloat16)
        k_view, _ = cache.update_kv(layer, empty, empty)
    assert k_view.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    assert k_view.shape[2] == 256


def test_cache_grows_when_a_sequence_outgrows_it(folders):
    float_dir, _ = folders
    engine = to_engine(JambaForCausalLM.from_pretrained(float_dir), dtype=torch.float32, max_cache_length=8)
    model = JambaForCausalLM.from_pretrained(float_dir)
    out = generate(engine, [[5, 6, 7]], max_new_tokens=80, stop_token_ids=())
    assert out == generate(model, [[5, 6, 7]], max_new_tokens=80, stop_token_ids=())


def test_one_loader_detects_the_format(folders):
    float_dir, fp4_dir = folders
    assert isinstance(load_model(fp4_dir), JambaEngine)
    assert isinstance(load_model(float_dir), JambaForCausalLM)
