"""SFT: the loss covers response tokens only; packing keeps every response token scored once."""

import json

import pytest
import torch

from quintet.align.sequences import Tokenization, encode_example, pad_batch
from quintet.align.sft import (
    SFTConfig,
    SFTDataError,
    _pack,
    encode_sft_rows,
    read_sft_examples,
    sft_loss,
    train_sft,
)
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


def test_sft_adds_and_logs_the_router_loss_and_trl_metric_names():
    torch.manual_seed(0)
    model = JambaForCausalLM(JambaConfig.from_preset("jamba-tiny", num_hidden_layers=2))
    rows = [{"prompt": f"What is {i} plus 1?", "completion": f" {i + 1}."} for i in range(4)]
    rows += [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    cfg = SFTConfig(lr=0.0, batch_size=8, router_aux_loss_coef=0.25, warmup=0.0)
    (first,) = train_sft(model, ByteTokenizer(), rows, cfg, progress=False)
    assert {"learning_rate", "lr", "grad_norm", "aux_loss"} <= set(first) and first["aux_loss"] > 0
    encoded = encode_sft_rows(ByteTokenizer(), rows, 2, cfg.tokenization)
    ids, response = pad_batch(encoded, 0)
    model.train()
    ce = sft_loss(model, ids, response).item()
    assert first["loss"] == pytest.approx(ce + 0.25 * first["aux_loss"], rel=1e-5)
    off = train_sft(model, ByteTokenizer(), rows, SFTConfig(router_aux_loss_coef=0.0), progress=False)
    assert "aux_loss" not in off[0]


def test_messages_rows_score_every_token_and_long_rows_truncate_by_mode():
    tok = ByteTokenizer()
    messages = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    (e,) = encode_sft_rows(tok, [messages], 2, Tokenization())
    assert e.prompt_len == 0 and e.ids[-1] == 2  # TRL: the loss on the whole conversation
    row = {"prompt": "q" * 10, "completion": "a" * 10}
    (end,) = encode_sft_rows(tok, [row, messages], 2, Tokenization(8, "keep_end"))[:1]
    assert end.ids == tok.encode("a" * 7) + [2] and end.prompt_len == 0
    (start,) = encode_sft_rows(tok, [row, messages], 2, Tokenization(8))  # the row without a scored token
    assert start.prompt_len == 0  # is dropped (TRL's rule); the conversation is kept
