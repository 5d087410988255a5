"""SFT: the loss covers response tokens only; packing keeps every response token scored once."""

import json

import pytest
import torch

from quintet.align.sequences import Tokenization, encode_example, pad_batch
from quintet.align.sft import SFTConfig, SFTDataError, _pack, read_sft_examples, sft_loss, train_sft
from quintet.chat import render_prompt
from quintet.models.jamba import JambaConfig, JambaForCausalLM
from quintet.tokenizer import ByteTokenizer


def test_loss_ignores_prompt_tokens():
    torch.manual_seed(0)
    model = JambaForCausalLM(JambaConfig.from_preset("jamba-tiny", num_hidden_layers=2))
    tok = ByteTokenizer()
    a = encode_example(tok, "What is 2 plus 2?", "4.", 2, 128)
    b = encode_example(tok, "What is 9 plus 9? Tell me.", "4.", 2, 128)
    la = sft_loss(model, *pad_batch([a], 0))
    ids, resp = pad_batch([a], 0)
    assert resp.sum() == len(tok.encode("4.")) + 1  # response bytes + eos
    assert resp[0, : len(tok.encode("What is 2 plus 2?"))].sum() == 0  # a string prompt is used as given
    chat = encode_example(tok, "What is 2 plus 2?", "4.", 2, Tokenization(128, chat_template=True))
    assert chat.prompt_len == len(render_prompt(tok, "What is 2 plus 2?"))
    assert torch.isfinite(la) and torch.isfinite(sft_loss(model, *pad_batch([b], 0)))


def test_packing_scores_each_response_token_once():
    tok = ByteTokenizer()
    examples = [encode_example(tok, f"q{i}", "answer " * (i + 1), 2, 64) for i in range(6)]
    packed = _pack(examples, 160)
    assert len(packed) < len(examples)
    assert all(len(p.ids) <= 160 for p in packed)
    assert sum(sum(p.response_mask) for p in packed) == sum(len(e.ids) - e.prompt_len for e in examples)
    ids, resp = pad_batch(packed, 0)
    assert int(resp.sum()) == sum(len(e.ids) - e.prompt_len for e in examples)


def test_sft_learns_the_responses():
    torch.manual_seed(0)
    model = JambaForCausalLM(JambaConfig.from_preset("jamba-tiny", num_hidden_layers=2))
    data = [(f"What is {i} plus 1?", f"{i + 1}.") for i in range(8)]
    history = train_sft(
        model, ByteTokenizer(), data, SFTConfig(lr=3e-3, epochs=6, batch_size=4), progress=False
    )
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]


def test_read_formats_and_errors(tmp_path):
    path = tmp_path / "sft.jsonl"
    rows = [
        {"prompt": "p", "completion": "c"},
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_sft_examples(path) == rows
    path.write_text(json.dumps({"prompt": "p", "response": "c"}) + "\n")
    with pytest.raises(SFTDataError, match=r"sft.jsonl:1: needs 'prompt' and 'completion'"):
        read_sft_examples(path)
    path.write_text(json.dumps({"messages": [{"role": "user", "content": 3}]}) + "\n")
    with pytest.raises(SFTDataError, match=r"sft.jsonl:1: field 'messages': messages\[0\].content"):
        read_sft_examples(path)
