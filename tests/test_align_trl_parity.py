"""The same TRL-format JSONL through TRL's own dataset preparation and through ours gives the same token ids
and the same loss masks: DPO (`DPOTrainer._prepare_dataset` + `DataCollatorForPreference`) and SFT
(`SFTTrainer._prepare_dataset`), string and conversational rows, both truncation modes, with and without a
post-processor that adds a bos token. TRL's functions run for real (unbound, on a stand-in `self` holding
only the tokenizer attributes they read); the tokenizer is one quintet trains, loaded by transformers."""

import json
from types import SimpleNamespace

import pytest

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from tokenizers.processors import TemplateProcessing  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from trl import DPOConfig as TRLDPOConfig  # noqa: E402
from trl import SFTConfig as TRLSFTConfig  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer  # noqa: E402
from trl.trainer.sft_trainer import SFTTrainer  # noqa: E402

from quintet.align.dpo import encode_pairs  # noqa: E402
from quintet.align.preference_data import read_preferences  # noqa: E402
from quintet.align.sequences import Tokenization, pad_batch  # noqa: E402
from quintet.align.sft import encode_sft_rows, read_sft_examples  # noqa: E402
from quintet.data.tokenizer_training import train_tokenizer  # noqa: E402
from quintet.tokenizer import HFTokenizer  # noqa: E402

EOS_ID = 2
TEXTS = [
    "The capital of Finland is Helsinki.",
    "What is two plus two? It is four. It is five.",
    "Hyvää huomenta, maailma! Mikä on Suomen pääkaupunki?",
    "Tell me a story about a cat that sat on the mat.",
] * 10

STRING_PAIRS = [
    {"prompt": "What is two plus two?", "chosen": " It is four.", "rejected": " It is five."},
    {"prompt": "The capital of Finland is ", "chosen": "Helsinki.", "rejected": "Turku."},
    {"prompt": "Tell me a story " * 6, "chosen": "A cat sat.", "rejected": "No."},  # fills max_length 24
    {"prompt": "Mikä on Suomen pääkaupunki?", "chosen": " Helsinki.<|eos|>", "rejected": " Oulu " * 9},
]


def conversation(*turns):
    return [{"role": role, "content": content} for role, content in turns]


CONVERSATIONAL_PAIRS = [
    {
        "prompt": conversation(("user", "What is two plus two?")),
        "chosen": conversation(("assistant", "It is four.")),
        "rejected": conversation(("assistant", "It is five.")),
    },
    {
        "prompt": conversation(
            ("system", "Answer in Finnish."),
            ("user", "Capital of Finland?"),
            ("assistant", "Helsinki."),
            ("user", "And its population?"),
        ),
        "chosen": conversation(("assistant", "Noin 680 000.")),
        "rejected": conversation(("assistant", "Tell me a story about a cat " * 3)),
    },  # fmt: skip
]
IMPLICIT_PAIRS = [  # no prompt: chosen and rejected hold the whole exchange (TRL's extract_prompt)
    {
        "chosen": conversation(("user", "Capital of Finland?"), ("assistant", "Helsinki.")),
        "rejected": conversation(("user", "Capital of Finland?"), ("assistant", "Turku.")),
    }
]
SFT_ROWS = {
    "strings": [
        {"prompt": "What is two plus two?", "completion": " It is four."},
        {"prompt": "The capital of Finland is ", "completion": "Helsinki."},
        {"prompt": "Tell me a story " * 6, "completion": "A cat sat."},
    ],
    "conversational": [
        {"prompt": conversation(("user", "2+2?")), "completion": conversation(("assistant", "4"))},
        {
            "prompt": conversation(("system", "Be brief."), ("user", "Capital of Finland?")),
            "completion": conversation(("assistant", "Helsinki.")),
        },
        {
            "prompt": conversation(("user", "Tell me a story " * 4)),
            "completion": conversation(("assistant", "No.")),
        },
    ],
    "messages": [
        {"messages": conversation(("user", "Capital of Finland?"), ("assistant", "Helsinki."))},
        {
            "messages": conversation(
                ("user", "Hi"), ("assistant", "Hello"), ("user", "2+2?"), ("assistant", "4")
            )
        },
    ],
    "text": [{"text": "The capital of Finland is Helsinki."}, {"text": "Tell me a story " * 8}],
}
SETTINGS = [(None, "keep_start"), (24, "keep_start"), (24, "keep_end"), (1024, "keep_start")]


@pytest.fixture(scope="module", params=["plain", "bos post-processor"])
def tokenizers(request, tmp_path_factory):
    """(transformers' tokenizer, quintet's HFTokenizer) of one quintet-trained tokenizer folder."""
    folder = tmp_path_factory.mktemp("tok")
    path = train_tokenizer(TEXTS, folder, vocab_size=420, min_frequency=1)
    if request.param == "bos post-processor":
        tok = Tokenizer.from_file(str(path))
        tok.post_processor = TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 1)])
        tok.save(str(path))
    hf = AutoTokenizer.from_pretrained(folder)
    assert (hf("a").input_ids[0] == 1) == (request.param == "bos post-processor")
    return hf, HFTokenizer(path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def trl_dpo(hf, rows, max_length, mode, tmp_path):
    """TRL's tokenized pairs: [(chosen ids, chosen mask, rejected ids, rejected mask)], after its drops."""
    args = TRLDPOConfig(
        output_dir=str(tmp_path / "trl"), max_length=max_length, truncation_mode=mode, report_to=[],
        use_cpu=True, bf16=False,
    )  # fmt: skip
    data = DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=hf), Dataset.from_list(rows), hf, args, "t")
    collate = DataCollatorForPreference(pad_token_id=0, max_length=max_length, truncation_mode=mode)
    out = []
    for example in data:
        batch = collate([{k: example[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}])
        rows_ = []
        for i in range(2):
            n = int(batch["attention_mask"][i].sum())
            rows_ += [batch["input_ids"][i, :n].tolist(), batch["completion_mask"][i, :n].bool().tolist()]
        out.append(tuple(rows_))
    return out


def ours_dpo(tok, path, max_length, mode, chat_template=False):
    pairs = read_preferences(path)
    _, examples = encode_pairs(tok, pairs, EOS_ID, Tokenization(max_length, mode, chat_template))
    out = []
    for chosen, rejected in examples:
        row = []
        for e in (chosen, rejected):
            ids, mask = pad_batch([e], 0)
            row += [ids[0].tolist(), mask[0].tolist()]
        out.append(tuple(row))
    return out


@pytest.mark.parametrize("max_length, mode", SETTINGS)
@pytest.mark.parametrize("kind", ["strings", "conversational", "implicit prompt"])
def test_dpo_tokens_and_masks_equal_trl(tokenizers, tmp_path, kind, max_length, mode):
    hf, tok = tokenizers
    rows = {
        "strings": STRING_PAIRS,
        "conversational": CONVERSATIONAL_PAIRS,
        "implicit prompt": IMPLICIT_PAIRS,
    }
    path = write_jsonl(tmp_path / "prefs.jsonl", rows[kind])
    theirs = trl_dpo(hf, rows[kind], max_length, mode, tmp_path)
    ours = ours_dpo(tok, path, max_length, mode)
    assert ours == theirs
    if kind == "strings" and (max_length, mode) == (24, "keep_start"):
        assert len(theirs) == len(rows[kind]) - 1  # the long prompt's pair is dropped by both


def test_chat_template_setting_equals_trl_on_the_conversational_rows(tokenizers, tmp_path):
    """`chat_template = true` on string rows is TRL on the same rows as one user and one assistant turn."""
    hf, tok = tokenizers
    strings = STRING_PAIRS[:2]
    as_chat = [
        {
            "prompt": conversation(("user", r["prompt"])),
            "chosen": conversation(("assistant", r["chosen"])),
            "rejected": conversation(("assistant", r["rejected"])),
        }
        for r in strings
    ]
    path = write_jsonl(tmp_path / "prefs.jsonl", strings)
    assert ours_dpo(tok, path, 1024, "keep_start", chat_template=True) == trl_dpo(
        hf, as_chat, 1024, "keep_start", tmp_path
    )
    assert ours_dpo(tok, path, 1024, "keep_start") != ours_dpo(tok, path, 1024, "keep_start", True)


def trl_sft(hf, rows, max_length, mode, tmp_path):
    args = TRLSFTConfig(
        output_dir=str(tmp_path / "trl"), max_length=max_length, truncation_mode=mode, report_to=[],
        use_cpu=True, bf16=False,
    )  # fmt: skip
    is_prompt_completion = "prompt" in rows[0]
    stand_in = SimpleNamespace(_tokenizer=hf, chat_template=None, completion_only_loss=is_prompt_completion)
    data = SFTTrainer._prepare_dataset(stand_in, Dataset.from_list(rows), hf, args, False, None, "t")
    return [(e["input_ids"], [label != -100 for label in e["labels"]]) for e in data]


@pytest.mark.parametrize("max_length, mode", SETTINGS)
@pytest.mark.parametrize("kind", list(SFT_ROWS))
def test_sft_tokens_and_masks_equal_trl(tokenizers, tmp_path, kind, max_length, mode):
    hf, tok = tokenizers
    path = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS[kind])
    examples = encode_sft_rows(tok, read_sft_examples(path), EOS_ID, Tokenization(max_length, mode))
    ours = []
    for e in examples:
        ids, mask = pad_batch([e], 0)
        ours.append((ids[0].tolist(), mask[0].tolist()))
    assert ours == trl_sft(hf, SFT_ROWS[kind], max_length, mode, tmp_path)
