"""Tokenizer training, token shards and the mixture sampler, on small project-written texts."""

import json
import random

import numpy as np
import pytest

from quintet.chat import CHAT_TEMPLATE, SPECIAL_TOKENS, apply_chat_template
from quintet.data.mixture import MixtureSampler, heldout_windows
from quintet.data.shards import ShardError, iter_documents, load_index, tokenize_curated
from quintet.data.tokenizer_training import train_tokenizer
from quintet.tokenizer import load_tokenizer

WORDS = {
    "en": [
        "the",
        "library",
        "opens",
        "early",
        "and",
        "the",
        "reading",
        "room",
        "stays",
        "quiet",
        "all",
        "afternoon",
    ],
    "fi": ["kirjasto", "aukeaa", "aikaisin", "ja", "lukusali", "on", "hiljainen", "koko", "iltapäivän"],
    "ja": ["図書館", "は", "朝早く", "開き", "閲覧室", "は", "午後", "ずっと", "静か", "だ", "。"],
}
TRICKY = [
    "  two leading spaces, trailing tab\t",
    "windows\r\nline ends and 12345 digits 3.14159",
    "emoji 😀👍🏽 and combining é (e + U+0301) and ﬁ ligature",
    "a literal <|eos|> and <|user|> inside text",
    "हिंदी में लिखा गया वाक्य है। 日本語と English mixed",
    "",
]


def _texts(lang, n, rng):
    words = WORDS[lang]
    sep = "" if lang == "ja" else " "
    return [sep.join(rng.choice(words) for _ in range(rng.randint(5, 60))) + f" {i}" for i in range(n)]


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    """A curated folder (<lang>/00000.jsonl) and a tokenizer trained on it."""
    root = tmp_path_factory.mktemp("tokens")
    rng = random.Random(0)
    docs = {}
    for lang, n in (("en", 120), ("fi", 60), ("ja", 40)):
        texts = _texts(lang, n, rng) + (TRICKY if lang == "en" else [])
        rows = [{"id": f"{lang}-{i}", "text": t, "lang": lang} for i, t in enumerate(texts) if t]
        (root / "curated" / lang).mkdir(parents=True)
        with open(root / "curated" / lang / "00000.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        docs[lang] = rows
    tokenizer = train_tokenizer(root / "curated", root / "tokenizer", vocab_size=400)
    return root, docs, tokenizer


def test_special_tokens_and_round_trip(curated):
    root, _, path = curated
    tok = load_tokenizer(path.parent)
    raw = tok._tok
    assert [raw.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (
        raw.token_to_id("<|pad|>") == 0
        and raw.token_to_id("<|bos|>") == 1
        and raw.token_to_id("<|eos|>") == 2
    )
    assert tok.vocab_size == 400
    for text in TRICKY + ["unseen words: Zyxw qvq ŋ ʒ"]:
        assert tok.decode(tok.encode(text)) == text.replace("<|eos|>", "").replace("<|user|>", "")
    digits = tok.encode("2024")
    assert [tok.decode([i]) for i in digits] == ["2", "0", "2", "4"]


def test_chat_template_matches_jinja(curated):
    import jinja2

    _, _, path = curated
    config = json.loads((path.parent / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE and config["eos_token"] == "<|eos|>"
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Mikä on Suomen pääkaupunki?"},
        {"role": "assistant", "content": "Helsinki."},
    ]
    template = jinja2.Environment().from_string(CHAT_TEMPLATE)
    for prompt in (False, True):
        expected = template.render(messages=messages, add_generation_prompt=prompt, eos_token="<|eos|>")
        assert apply_chat_template(messages, add_generation_prompt=prompt) == expected
    assert apply_chat_template(messages[:1]) == "<|system|>\nAnswer briefly.<|eos|>\n"
    with pytest.raises(ValueError, match="messages\\[0\\].role = 'robot'"):
        apply_chat_template([{"role": "robot", "content": "hi"}])


def test_vocab_size_is_checked(tmp_path):
    with pytest.raises(ValueError, match="vocab_size = 100"):
        train_tokenizer(["text"], tmp_path, vocab_size=100)


def test_shards_decode_to_the_curated_text(curated, tmp_path):
    root, docs, path = curated
    index_path = tokenize_curated(
        root / "curated", path, tmp_path / "shards", heldout_fraction=0.1, shard_tokens=500
    )
    index = load_index(index_path)
    assert index["dtype"] == "uint16" and index["tokenizer"]["eos_token_id"] == 2
    tok = load_tokenizer(tmp_path / "shards")
    for lang, rows in docs.items():
        info = index["sources"][lang]
        assert len(info["train"]["files"]) > 1  # shard_tokens split them
        assert info["train"]["documents"] + info["heldout"]["documents"] == len(rows)
        assert info["heldout"]["documents"] >= 1
        decoded = [
            tok._tok.decode(d.tolist(), skip_special_tokens=False)
            for s in ("train", "heldout")
            for d in iter_documents(index, lang, s)
        ]
        assert sorted(decoded) == sorted(r["text"] for r in rows)  # exact, literal "<|eos|>" included


def test_heldout_split_is_stable(curated, tmp_path):
    root, _, path = curated
    a = load_index(tokenize_curated(root / "curated", path, tmp_path / "a", heldout_fraction=0.1))
    b = load_index(
        tokenize_curated(root / "curated", path, tmp_path / "b", heldout_fraction=0.1, shard_tokens=300)
    )
    for lang in a["sources"]:
        first = [d.tolist() for d in iter_documents(a, lang, "heldout")]
        second = [d.tolist() for d in iter_documents(b, lang, "heldout")]
        assert first == second


def test_index_checks_files(curated, tmp_path):
    root, _, path = curated
    index_path = tokenize_curated(root / "curated", path, tmp_path / "s")
    index = json.loads(index_path.read_text())
    victim = tmp_path / "s" / index["sources"]["en"]["train"]["files"][0]["path"]
    victim.write_bytes(victim.read_bytes()[:-2])
    with pytest.raises(ShardError, match="en/train-00000.bin"):
        load_index(tmp_path / "s")


@pytest.fixture(scope="module")
def shards(curated, tmp_path_factory):
    root, _, path = curated
    out = tmp_path_factory.mktemp("mix") / "shards"
    tokenize_curated(root / "curated", path, out, heldout_fraction=0.1, shard_tokens=700)
    return out


def test_mixture_token_counts_follow_weights(shards):
    weights = {"en": 0.55, "fi": 0.3, "ja": 0.15}
    sampler = MixtureSampler(shards, weights, seq_len=16, seed=0)
    tokens = dict.fromkeys(weights, 0)
    for _ in range(3000):
        window, source = next(sampler)
        assert window.shape == (16,) and window.dtype == np.int64
        tokens[source] += len(window)
    total = sum(tokens.values())
    for source, w in weights.items():
        assert abs(tokens[source] / total - w) <= 0.02 * w, (source, tokens[source] / total, w)


def test_mixture_is_deterministic_and_resumable(shards):
    weights = {"en": 2, "fi": 1, "ja": 1}
    a = MixtureSampler(shards, weights, seq_len=32, seed=7)
    b = MixtureSampler(shards, weights, seq_len=32, seed=7)
    first = [next(a) for _ in range(150)]
    assert all(
        (x.tokens == y.tokens).all() and x.source == y.source
        for x, y in zip(first, (next(b) for _ in range(150)), strict=True)
    )
    state = a.state_dict()
    rest = [next(a) for _ in range(400)]  # past the end of the smaller sources: second epochs
    resumed = MixtureSampler(shards, weights, seq_len=32, seed=7)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    again = [next(resumed) for _ in range(400)]
    assert all(
        (x.tokens == y.tokens).all() and x.source == y.source for x, y in zip(rest, again, strict=True)
    )
    other = MixtureSampler(shards, weights, seq_len=32, seed=8)
    assert any((x.tokens != next(other).tokens).any() for x in first)
    with pytest.raises(ValueError, match="weights"):
        MixtureSampler(shards, {"en": 1}, seq_len=32, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len"):
        MixtureSampler(shards, weights, seq_len=16, seed=7).load_state_dict(state)


def test_mixture_epoch_visits_every_window_once(shards):
    sampler = MixtureSampler(shards, {"ja": 1.0}, seq_len=8, seed=3)
    n = len(sampler.streams["ja"]) // 8
    starts = [sampler.window_start("ja", k) for k in range(n)]
    assert sorted(starts) == list(range(0, n * 8, 8))


def test_mixture_errors(shards):
    with pytest.raises(ShardError, match="not in the shards"):
        MixtureSampler(shards, {"de": 1.0}, seq_len=8)
    with pytest.raises(ValueError, match="non-negative"):
        MixtureSampler(shards, {"en": -1.0}, seq_len=8)


def test_heldout_windows(shards):
    windows = heldout_windows(shards, seq_len=8, max_tokens=40)
    assert set(windows) == {"en", "fi", "ja"}
    for source, ws in windows.items():
        assert 1 <= len(ws) <= 5 and all(w.shape == (8,) and str(w.dtype) == "torch.int64" for w in ws), (
            source
        )
