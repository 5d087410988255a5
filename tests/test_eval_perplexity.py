"""Perplexity and bits-per-byte: rolling windows score every token once, batching changes nothing, short
texts equal one full forward, and held-out token shards or JSONL files give the same texts."""

import json
import math

import pytest
import torch

from quintet.eval.perplexity import (
    EvalDataError,
    perplexity_by_language,
    read_texts_jsonl,
    read_texts_shards,
    rolling_windows,
    text_nll,
)
from quintet.models.jamba import JambaConfig, JambaForCausalLM
from quintet.tokenizer import ByteTokenizer, HFTokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return JambaForCausalLM(JambaConfig.from_preset("jamba-tiny", num_hidden_layers=2, vocab_size=512)).eval()


@pytest.mark.parametrize("n, max_length", [(0, 4), (1, 4), (3, 4), (10, 4), (17, 5), (9, 2)])
def test_rolling_windows_score_each_token_once_within_the_window(n, max_length):
    ids = list(range(10, 10 + n))
    windows = rolling_windows(ids, prefix_id=1, max_length=max_length)
    scored = []
    for seq, k in windows:
        assert 2 <= len(seq) <= max_length + 1 and 1 <= k <= len(seq) - 1  # fed: all but the last
        scored += seq[len(seq) - k :]
    assert scored == ids
    seq = [1, *ids]
    for window, _ in windows:  # each window is a contiguous piece of prefix + ids
        start = seq.index(window[0]) if window[0] != 1 else 0
        assert window == seq[start : start + len(window)]


@torch.no_grad()
def full_forward_nll(model, ids, prefix):
    seq = torch.tensor([[prefix, *ids]])
    logp = torch.log_softmax(model(seq).logits[0, :-1].float(), -1)
    return -float(logp.gather(-1, seq[0, 1:, None]).sum())


def test_short_texts_equal_one_full_forward_and_batching_changes_nothing(model):
    tok = ByteTokenizer()
    texts = ["Hello, world.", "Hyvää päivää!", "नमस्ते", "こんにちは", ""]
    one = text_nll(model, tok, texts, max_length=256, batch_size=1)
    many = text_nll(model, tok, texts, max_length=256, batch_size=3)
    for (a, n), (b, m), text in zip(one, many, texts, strict=True):
        assert n == m == len(tok.encode(text))
        assert a == pytest.approx(b, rel=1e-5, abs=1e-4)
        if text:
            assert a == pytest.approx(
                full_forward_nll(model, tok.encode(text), model.config.bos_token_id), rel=1e-5
            )
    assert one[-1] == (0.0, 0)


def test_long_texts_are_scored_in_windows(model):
    tok = ByteTokenizer()
    text = "The quick brown fox jumps over the lazy dog. " * 3
    nll_full, n = text_nll(model, tok, [text], max_length=1024)[0]
    nll_windowed, m = text_nll(model, tok, [text], max_length=16)[0]
    assert n == m == len(text.encode())
    assert nll_full == pytest.approx(full_forward_nll(model, tok.encode(text), 1), rel=1e-5)
    assert math.isfinite(nll_windowed) and nll_windowed != pytest.approx(nll_full)  # less context per token


def test_bits_per_byte_and_perplexity_per_language(model):
    tok = ByteTokenizer()
    texts = {"en": ["Good morning.", "See you tomorrow."], "ja": ["おはようございます。", ""]}
    result = perplexity_by_language(model, tok, texts, max_length=64)
    ja = result["ja"]
    nll = sum(n for n, _ in text_nll(model, tok, ["おはようございます。"], 64))
    assert (
        ja["documents"] == 1
        and ja["skipped_empty"] == 1
        and ja["bytes"] == len("おはようございます。".encode())
    )
    assert ja["bits_per_byte"] == pytest.approx(nll / math.log(2) / ja["bytes"])
    assert ja["perplexity"] == pytest.approx(math.exp(nll / ja["tokens"]))
    assert result["all"]["tokens"] == result["en"]["tokens"] + ja["tokens"]


def test_jsonl_texts_and_their_errors(tmp_path):
    path = tmp_path / "held.jsonl"
    path.write_text(
        '{"text": "a", "lang": "en"}\n\n{"text": "b", "lang": "fi"}\n{"text": "c", "lang": "en"}\n'
    )
    assert read_texts_jsonl([path]) == {"en": ["a", "c"], "fi": ["b"]}
    assert read_texts_jsonl([path], lang="vi") == {"vi": ["a", "b", "c"]}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "lang": "en"}\n{"body": "x"}\n')
    with pytest.raises(EvalDataError, match=r"bad.jsonl:2: needs a string field 'text'"):
        read_texts_jsonl([bad])
    nolang = tmp_path / "nolang.jsonl"
    nolang.write_text('{"text": "a"}\n')
    with pytest.raises(EvalDataError, match=r"nolang.jsonl:1: field 'lang' = None"):
        read_texts_jsonl([nolang])


def test_held_out_token_shards_decode_to_their_documents(tmp_path, model):
    from quintet.data.shards import tokenize_curated
    from quintet.data.tokenizer_training import train_tokenizer

    docs = {
        "en": [f"Document {i}: the weather in Helsinki is cold in winter." for i in range(30)],
        "fi": [f"Asiakirja {i}: Helsingissä on talvella kylmä." for i in range(30)],
    }
    for lang, texts in docs.items():
        (tmp_path / "curated" / lang).mkdir(parents=True)
        rows = [json.dumps({"id": f"{lang}-{i}", "text": t, "lang": lang}) for i, t in enumerate(texts)]
        (tmp_path / "curated" / lang / "docs.jsonl").write_text("\n".join(rows) + "\n")
    tok_path = train_tokenizer([t for ts in docs.values() for t in ts], tmp_path / "tok", vocab_size=400)
    index = tokenize_curated(tmp_path / "curated", tok_path, tmp_path / "shards", heldout_fraction=0.2)
    held = read_texts_shards(index.parent)
    assert set(held) == {"en", "fi"} and all(held.values())
    for lang, texts in held.items():
        assert set(texts) <= set(docs[lang])
    result = perplexity_by_language(model, HFTokenizer(tok_path), held, max_length=64)
    assert result["en"]["documents"] == len(held["en"]) and result["fi"]["bits_per_byte"] > 0
    with pytest.raises(EvalDataError, match="no source 'de'"):
        read_texts_shards(index.parent, sources=["de"])
