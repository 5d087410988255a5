"""GGUF export: what llama.cpp's Jamba loader reads, read back with gguf-py; and, when llama-cpp-python is
installed, the file run in llama.cpp against the float model."""

import json
import os
import shutil

import gguf
import numpy as np
import pytest
import torch

from quintet.chat import CHAT_TEMPLATE
from quintet.cli import main
from quintet.data.tokenizer_training import train_tokenizer
from quintet.deploy.convert import quantize_folder
from quintet.deploy.gguf_export import export_gguf
from quintet.deploy.quantized_folder import load_dequantized
from quintet.models.jamba import JambaForCausalLM
from quintet.models.jamba.create import create_model
from quintet.tokenizer import load_tokenizer

TEXTS = ["The quick brown fox, 1234 times over.", "Über naïve café: 42!", "  spaced\n\nlines\tand tabs  "]
PROMPT = "The quick brown fox, 12 café"

# Metadata llama.cpp reads for a Jamba model (llama-model.cpp load_hparams, models/jamba.cpp
# load_arch_hparams, llama-vocab.cpp load for the "gpt2" tokenizer), and the chat template.
REQUIRED_KEYS = [
    "general.architecture",
    "jamba.context_length",
    "jamba.embedding_length",
    "jamba.block_count",
    "jamba.feed_forward_length",
    "jamba.attention.head_count",
    "jamba.attention.head_count_kv",
    "jamba.attention.layer_norm_rms_epsilon",
    "jamba.ssm.conv_kernel",
    "jamba.ssm.inner_size",
    "jamba.ssm.state_size",
    "jamba.ssm.time_step_rank",
    "jamba.expert_count",
    "jamba.expert_used_count",
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.chat_template",
]
# `tokenizer.ggml.pre` values llama.cpp accepts (llama-vocab.cpp) that split as quintet's tokenizers do.
LLAMA_CPP_PRE = {"smollm", "gpt-2"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """jamba-tiny (every layer kind; weights large enough that every part moves the logits) with a trained
    byte-level BPE of 300 tokens for its 1024 ids."""
    root = tmp_path_factory.mktemp("gguf")
    create_model("jamba-tiny", root / "float", seed=0, initializer_range=0.2)
    train_tokenizer(TEXTS * 20, root / "float", vocab_size=300, min_frequency=1)
    return root / "float"


@pytest.fixture(scope="module")
def exports(folder):
    return {t: export_gguf(folder, folder.parent / f"model-{t}.gguf", t) for t in ("f32", "q8_0", "q4_0")}


@pytest.fixture(scope="module")
def fp4_folder(folder):
    quantize_folder(folder, folder.parent / "fp4", group_size=64)
    return folder.parent / "fp4"


def _fields(reader):
    """Metadata values by key (decoded by hand: `ReaderField.contents()` is newer than gguf 0.10)."""
    out = {}
    for name, field in reader.fields.items():
        string = field.types[-1] == gguf.GGUFValueType.STRING
        values = [
            bytes(field.parts[i]).decode() if string else field.parts[i].tolist()[0] for i in field.data
        ]
        out[name] = values if field.types[0] == gguf.GGUFValueType.ARRAY else values[0]
    return out


def _expected_shapes(config):
    """Tensor name -> ggml shape (ne, innermost first), as llama.cpp's Jamba load_arch_tensors makes them."""
    E, V, F = config.hidden_size, config.vocab_size, config.intermediate_size
    d_in, d_conv, d_state, r = (
        config.mamba_d_inner,
        config.mamba_d_conv,
        config.mamba_d_state,
        config.mamba_dt_rank,
    )
    kv = config.num_key_value_heads * config.head_dim
    shapes = {"token_embd.weight": [E, V], "output_norm.weight": [E], "output.weight": [E, V]}
    for i, (kind, experts) in enumerate(
        zip(config.layers_block_type, config.layers_num_experts, strict=True)
    ):
        layer = {"attn_norm.weight": [E], "ffn_norm.weight": [E]}
        if kind == "mamba":
            layer.update(
                {
                    "ssm_in.weight": [E, 2 * d_in],
                    "ssm_conv1d.weight": [d_conv, d_in],
                    "ssm_conv1d.bias": [d_in],
                    "ssm_x.weight": [d_in, r + 2 * d_state],
                    "ssm_dt_norm.weight": [r],
                    "ssm_dt.weight": [r, d_in],
                    "ssm_dt.bias": [d_in],
                    "ssm_b_norm.weight": [d_state],
                    "ssm_c_norm.weight": [d_state],
                    "ssm_a": [d_state, d_in],
                    "ssm_d": [d_in],
                    "ssm_out.weight": [d_in, E],
                }
            )
        else:
            layer.update(
                {"attn_q.weight": [E, E], "attn_k.weight": [E, kv], "attn_v.weight": [E, kv]}
                | {"attn_output.weight": [E, E]}
            )
        if experts > 1:
            layer.update(
                {
                    "ffn_gate_inp.weight": [E, experts],
                    "ffn_gate_exps.weight": [E, F, experts],
                    "ffn_down_exps.weight": [F, E, experts],
                    "ffn_up_exps.weight": [E, F, experts],
                }
            )
        else:
            layer.update({"ffn_gate.weight": [E, F], "ffn_down.weight": [F, E], "ffn_up.weight": [E, F]})
        shapes.update({f"blk.{i}.{k}": v for k, v in layer.items()})
    return shapes


def _quantized_names(shapes):
    """What llama.cpp's converter quantizes: matrices with rows a multiple of 32, except the router and
    the conv, norms and non-`.weight` tensors."""
    keep_f32 = ("_norm.weight", "ffn_gate_inp.weight", "ssm_conv1d.weight")
    return {
        n
        for n, s in shapes.items()
        if len(s) >= 2 and n.endswith(".weight") and not n.endswith(keep_f32) and s[0] % 32 == 0
    }


def _original_tensors(model):
    """Tensors of the model under llama.cpp's names and in its layout: one of each kind and transform."""
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    sd = {k: v.numpy() for k, v in state.items()}
    out = {
        "token_embd.weight": sd["model.embed_tokens.weight"],
        "output_norm.weight": sd["model.final_layernorm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    for i in range(model.config.num_hidden_layers):
        p = f"model.layers.{i}."
        if p + "mamba.A_log" in sd:
            out[f"blk.{i}.ssm_a"] = (-torch.exp(state[p + "mamba.A_log"])).numpy()
            out[f"blk.{i}.ssm_conv1d.weight"] = sd[p + "mamba.conv1d.weight"][:, 0]
            out[f"blk.{i}.ssm_in.weight"] = sd[p + "mamba.in_proj.weight"]
            out[f"blk.{i}.ssm_x.weight"] = sd[p + "mamba.x_proj.weight"]
        else:
            out[f"blk.{i}.attn_k.weight"] = sd[p + "self_attn.k_proj.weight"]
        if p + "feed_forward.router.weight" in sd:
            n = model.config.num_experts
            out[f"blk.{i}.ffn_down_exps.weight"] = np.stack(
                [sd[f"{p}feed_forward.experts.{e}.down_proj.weight"] for e in range(n)]
            )
        else:
            out[f"blk.{i}.ffn_up.weight"] = sd[p + "feed_forward.up_proj.weight"]
    return out


# ------------------------------------------------------------------------------------------ metadata
def test_metadata_is_what_llama_cpps_jamba_loader_reads(folder, exports):
    config = JambaForCausalLM.from_pretrained(folder).config
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    for t, summary in exports.items():
        fields = _fields(gguf.GGUFReader(summary["path"]))
        assert [k for k in REQUIRED_KEYS if k not in fields] == [], t
        assert fields["general.architecture"] == "jamba"
        assert fields["general.file_type"] == {"f32": 0, "q8_0": 7, "q4_0": 2}[t]
        assert fields["jamba.block_count"] == config.num_hidden_layers == 4
        assert fields["jamba.context_length"] == config.max_position_embeddings
        assert fields["jamba.embedding_length"] == config.hidden_size
        assert fields["jamba.feed_forward_length"] == config.intermediate_size
        assert fields["jamba.attention.head_count"] == config.num_attention_heads
        # 0 marks a Mamba layer (llama.cpp: is_recurrent = n_head_kv == 0); jamba-tiny's layer 2 attends
        assert fields["jamba.attention.head_count_kv"] == [0, 0, config.num_key_value_heads, 0]
        assert fields["jamba.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)
        assert fields["jamba.ssm.conv_kernel"] == config.mamba_d_conv
        assert fields["jamba.ssm.inner_size"] == 2 * config.hidden_size
        assert fields["jamba.ssm.state_size"] == config.mamba_d_state
        assert fields["jamba.ssm.time_step_rank"] == config.mamba_dt_rank
        assert fields["jamba.expert_count"] == config.num_experts
        assert fields["jamba.expert_used_count"] == config.num_experts_per_tok

        assert fields["tokenizer.ggml.model"] == "gpt2"
        assert fields["tokenizer.ggml.pre"] == "smollm" and fields["tokenizer.ggml.pre"] in LLAMA_CPP_PRE
        tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
        assert len(tokens) == len(types) == config.vocab_size == 1024  # padded past the tokenizer's 300
        vocab = tokenizer["model"]["vocab"]
        assert all(tokens[i] == token for token, i in vocab.items())
        assert tokens[:3] == ["<|pad|>", "<|bos|>", "<|eos|>"] and types[:6] == [3] * 6  # CONTROL
        assert types[vocab["Ġ"]] == 1 and tokens[300:] == [f"[PAD{i}]" for i in range(300, 1024)]
        assert set(types[300:]) == {5}  # UNUSED
        assert fields["tokenizer.ggml.merges"] == [" ".join(m) for m in tokenizer["model"]["merges"]]
        assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
        assert fields["tokenizer.ggml.padding_token_id"] == 0
        assert fields["tokenizer.ggml.add_bos_token"] is False  # quintet adds no bos when encoding
        assert fields["tokenizer.chat_template"] == CHAT_TEMPLATE  # from tokenizer_config.json


def test_summary(exports):
    f32, q8 = exports["f32"], exports["q8_0"]
    assert f32["tensors"] == q8["tensors"] and f32["quantized_tensors"] == 0 < q8["quantized_tensors"]
    assert f32["type"] == "f32" and f32["source"] == "float" and f32["vocab"] == 1024
    assert exports["q4_0"]["bytes"] < q8["bytes"] < f32["bytes"]
    assert all(s["bytes"] == os.path.getsize(s["path"]) for s in exports.values())


# ------------------------------------------------------------------------------------------ tensors
@pytest.mark.parametrize("type", ["f32", "q8_0", "q4_0"])
def test_tensor_names_shapes_and_types(folder, exports, type):
    config = JambaForCausalLM.from_pretrained(folder).config
    shapes = _expected_shapes(config)
    reader = gguf.GGUFReader(exports[type]["path"])
    got = {t.name: ([int(n) for n in t.shape], t.tensor_type) for t in reader.tensors}
    assert set(got) == set(shapes)
    assert {n: s for n, (s, _) in got.items()} == shapes
    quantized = _quantized_names(shapes) if type != "f32" else set()
    assert "token_embd.weight" in quantized or type == "f32"
    assert "blk.0.ssm_dt.weight" not in quantized  # rows of dt_rank = 8
    qtype = getattr(gguf.GGMLQuantizationType, type.upper())
    for name, (_, ggml_type) in got.items():
        assert ggml_type == (qtype if name in quantized else gguf.GGMLQuantizationType.F32), name


def test_tensor_names_are_gguf_pys_own_jamba_names(folder, exports):
    """Cross-check with gguf-py's tensor map for Jamba (what llama.cpp's converter maps HF names to)."""
    if not hasattr(gguf.MODEL_ARCH, "JAMBA"):
        pytest.skip("this gguf has no Jamba tensor map (gguf-py added it after 0.10)")
    model = JambaForCausalLM.from_pretrained(folder)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.JAMBA, model.config.num_hidden_layers)
    written = {t.name for t in gguf.GGUFReader(exports["f32"]["path"]).tensors}
    checked = 0
    for hf_name in model.state_dict():
        if ".experts." in hf_name:
            continue
        mapped = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert mapped in written, (hf_name, mapped)
        checked += 1
    assert checked > 40


def test_f32_tensors_are_the_models_and_q8_0_is_close(folder, exports):
    model = JambaForCausalLM.from_pretrained(folder)
    originals = _original_tensors(model)
    # q8_0: within half a step (max |w| of the block / 127) plus the float16 rounding of the scale;
    # q4_0: within one step (max |w| / 8): the block's largest weight of the other sign is clipped to 7
    for type, tolerance in (("f32", 0.0), ("q8_0", 0.6 / 127), ("q4_0", 1.05 / 8)):
        tensors = {t.name: t for t in gguf.GGUFReader(exports[type]["path"]).tensors}
        for name, want in originals.items():
            t = tensors[name]
            got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
            if type == "f32" or t.tensor_type == gguf.GGMLQuantizationType.F32:
                np.testing.assert_array_equal(got, want, err_msg=name)
            else:
                blocks = want.reshape(-1, 32)
                bound = np.abs(blocks).max(1, keepdims=True) * tolerance
                assert (np.abs(got.reshape(-1, 32) - blocks) <= bound).all(), (type, name)


def test_tied_embeddings_leave_output_out(tmp_path):
    create_model("jamba-tiny", tmp_path / "tied", seed=0, tie_word_embeddings=True)
    summary = export_gguf(tmp_path / "tied", tmp_path / "tied.gguf")
    names = {t.name for t in gguf.GGUFReader(summary["path"]).tensors}
    assert "token_embd.weight" in names and "output.weight" not in names  # llama.cpp reuses token_embd


def test_a_model_without_conv_bias_gets_zeros(tmp_path):
    create_model("jamba-tiny", tmp_path / "m", seed=0, mamba_conv_bias=False)
    reader = gguf.GGUFReader(export_gguf(tmp_path / "m", tmp_path / "m.gguf")["path"])
    bias = {t.name: t for t in reader.tensors}["blk.0.ssm_conv1d.bias"]
    assert bias.data.shape == (256,) and not bias.data.any()


# ------------------------------------------------------------------------------------------ FP4 folders
@pytest.mark.parametrize("type", ["f32", "q8_0"])
def test_an_fp4_folder_exports_its_dequantized_weights(folder, fp4_folder, type):
    summary = export_gguf(fp4_folder, fp4_folder.parent / f"fp4-{type}.gguf", type)
    assert summary["source"] == "m0e4"
    reader = gguf.GGUFReader(summary["path"])
    config = JambaForCausalLM.from_pretrained(folder).config
    assert {t.name: [int(n) for n in t.shape] for t in reader.tensors} == _expected_shapes(config)
    fields = _fields(reader)
    assert [k for k in REQUIRED_KEYS if k not in fields] == []
    # the FP4 folder carries tokenizer_config.json (quintet.io.MODEL_FILES): the float folder's template
    assert fields["tokenizer.chat_template"] == CHAT_TEMPLATE and fields["tokenizer.ggml.pre"] == "smollm"
    if type == "f32":
        originals = _original_tensors(load_dequantized(fp4_folder))
        tensors = {t.name: t for t in reader.tensors}
        for name, want in originals.items():
            np.testing.assert_array_equal(np.asarray(tensors[name].data).reshape(want.shape), want, name)


# ------------------------------------------------------------------------------------------ tokenizer
def test_a_folder_without_tokenizer_json_gets_the_byte_tokenizer(tmp_path):
    create_model("jamba-tiny", tmp_path / "m", seed=0)
    summary = export_gguf(tmp_path / "m", tmp_path / "m.gguf")
    fields = _fields(gguf.GGUFReader(summary["path"]))
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert tokens[:3] == ["<|pad|>", "<|bos|>", "<|eos|>"] and types[:3] == [3, 3, 3]
    assert tokens[3 + ord("a")] == "a" and tokens[3 + ord(" ")] == "Ġ" and tokens[3 + 0xFF] == "ÿ"
    assert len(set(tokens[3:259])) == 256 and set(types[3:259]) == {1}
    assert fields["tokenizer.ggml.merges"] == ["<|pad|> <|bos|>"]  # GGUF needs one; it never applies
    assert fields["tokenizer.ggml.pre"] == "gpt-2" and "tokenizer.chat_template" not in fields


def test_chat_template_jinja_comes_first(folder, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(folder, copy)
    (copy / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    fields = _fields(gguf.GGUFReader(export_gguf(copy, tmp_path / "m.gguf")["path"]))
    assert fields["tokenizer.chat_template"] == "{{ messages[0]['content'] }}"


# ------------------------------------------------------------------------------------------ errors
def _one_line_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_input_is_one_line_and_exit_code_2(folder, tmp_path, capsys):
    out = str(tmp_path / "x.gguf")
    cmd = ["deploy", "export-gguf"]
    err = _one_line_error(capsys, [*cmd, str(folder), "--out", out, "--type", "q5_k"])
    assert err == "quintet: error: --type = 'q5_k': valid types are f32, q8_0, q4_0"

    err = _one_line_error(capsys, [*cmd, str(tmp_path / "nowhere"), "--out", out])
    assert "nowhere: no such model folder" in err
    (tmp_path / "empty").mkdir()
    err = _one_line_error(capsys, [*cmd, str(tmp_path / "empty"), "--out", out])
    assert "empty/config.json: no config.json" in err

    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text(json.dumps({"model_type": "vitar"}))
    err = _one_line_error(capsys, [*cmd, str(tmp_path / "vit"), "--out", out])
    assert "vit/config.json: model_type = 'vitar': GGUF export supports 'jamba' only" in err

    create_model("jamba-tiny", tmp_path / "wide", seed=0, mamba_expand=3)
    err = _one_line_error(capsys, [*cmd, str(tmp_path / "wide"), "--out", out])
    assert "wide/config.json: mamba_expand = 3: llama.cpp's Jamba runs only 2" in err

    err = _one_line_error(capsys, [*cmd, str(folder), "--out", str(tmp_path)])
    assert "is a folder; give a file name" in err
    assert not list(tmp_path.glob("*.gguf*"))  # nothing half-written is left behind


def test_cli_writes_the_file(folder, tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    assert main(["deploy", "export-gguf", str(folder), "--out", str(out), "--type", "q4_0"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}: 65 tensors (" in printed and " in q4_0), " in printed
    assert _fields(gguf.GGUFReader(out))["general.file_type"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["cli.gguf"]


# ------------------------------------------------------------------------------------------ llama.cpp
def test_llama_cpp_runs_the_f32_export_with_the_models_logits(folder, exports):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[bench]')"
    )
    tokenizer = load_tokenizer(folder)
    ids = tokenizer.encode(PROMPT)
    model = JambaForCausalLM.from_pretrained(folder)
    next_id = 17
    with torch.no_grad():
        want = model(torch.tensor([[*ids, next_id]])).logits[0].numpy()
    llm = llama_cpp.Llama(
        model_path=exports["f32"]["path"],
        logits_all=True,
        n_threads=1,
        n_ctx=64,
        verbose=False,
        # an f32 KV cache: the default f16 one rounds keys and values to 11 bits
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
    )
    try:
        for text in [PROMPT, *TEXTS, "<|user|>\nhi<|eos|>\n"]:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text), text
        llm.eval(ids)  # the prompt in one batch
        llm.eval([next_id])  # then one step through the cached conv / SSM states and the KV cache
        got = np.array(llm.scores[: len(ids) + 1])
    finally:
        llm.close()
    assert np.abs(want).max() > 1.0  # logits that every layer moved
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)


def test_llama_cpp_runs_the_quantized_exports(folder, exports):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[bench]')"
    )
    ids = load_tokenizer(folder).encode(PROMPT)
    with torch.no_grad():
        want = JambaForCausalLM.from_pretrained(folder)(torch.tensor([ids])).logits[0].numpy()
    for type, min_correlation in (("q8_0", 0.99), ("q4_0", 0.5)):  # q4_0 of weights drawn with std 0.2
        llm = llama_cpp.Llama(
            model_path=exports[type]["path"], logits_all=True, n_threads=1, n_ctx=64, verbose=False
        )
        try:
            llm.eval(ids)
            got = np.array(llm.scores[: len(ids)])
        finally:
            llm.close()
        assert np.isfinite(got).all()
        assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > min_correlation, type
