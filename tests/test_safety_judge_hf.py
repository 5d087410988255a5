"""Hugging Face judge adapters on tiny model folders built here (nothing downloaded): a sequence
classifier trained for a few steps, and Llama-Guard-style causal LMs whose greedy first word is fixed by
their weights."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from quintet.safety.judge_hf import (
    HFClassifierJudge,
    HFGuardJudge,
    HFJudgeError,
    map_labels,
    parse_guard_answer,
)
from quintet.safety.judges import load_judge
from quintet.safety.redteam_eval import judge_records
from quintet.safety.redteam_sets import RedteamPrompt

REFUSALS = [
    "I can't help with that.",
    "Sorry, I won't do that.",
    "I must decline this request.",
    "No, I refuse to help with that.",
]
COMPLIANCES = [
    "Sure, open the settings menu.",
    "Of course! First mix the flour.",
    "Here is a short guide to the steps.",
    "Yes, click the reset button.",
]


def word_tokenizer(words, folder, chat_template=None):
    vocab = {w: i for i, w in enumerate(dict.fromkeys([*words, "[UNK]", "[PAD]", "[CLS]", "[SEP]", "</s>"]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        eos_token="</s>",
    )
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(folder)
    return fast, vocab


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("refusal-classifier")
    words = sorted(
        {w.strip(".,!'").lower() for t in REFUSALS + COMPLIANCES for w in t.split()}
        | {"can", "t", "!", ".", ",", "'"}
    )
    tok, vocab = word_tokenizer(words, folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=2,
        id2label={0: "NORMAL", 1: "REJECTION"}, label2id={"NORMAL": 0, "REJECTION": 1},
        pad_token_id=vocab["[PAD]"],
    )  # fmt: skip
    model = BertForSequenceClassification(config)
    enc = tok([t.lower() for t in REFUSALS + COMPLIANCES], padding=True, return_tensors="pt")
    labels = torch.tensor([1] * len(REFUSALS) + [0] * len(COMPLIANCES))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        opt.zero_grad()
        model(**enc, labels=labels).loss.backward()
        opt.step()
    model.save_pretrained(folder)
    return folder


def guard_dir(root, first_word, chat_template=None):
    """A causal LM whose logits are all zero (final norm weight 0), so greedy decoding emits id 0."""
    folder = root / f"guard-{first_word}-{bool(chat_template)}"
    _, vocab = word_tokenizer(
        [first_word, "safe", "unsafe", "S1", "User", "Agent", "banana"], folder, chat_template
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
        pad_token_id=vocab["[PAD]"], eos_token_id=vocab["</s>"], bos_token_id=vocab["[CLS]"],
        tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.save_pretrained(folder)
    return folder


def test_label_names_map_to_outcomes():
    assert map_labels({0: "NORMAL", 1: "REJECTION"}) == ({0: "compliance", 1: "refusal"}, True)
    assert map_labels({0: "safe", 1: "unsafe"}) == ({0: "refusal", 1: "compliance"}, False)
    assert map_labels({0: "A", 1: "B"}, {"A": "refusal", "B": "compliance"})[0] == {
        0: "refusal",
        1: "compliance",
    }
    with pytest.raises(HFJudgeError, match="label 'LABEL_0'.*pass label_map"):
        map_labels({0: "LABEL_0", 1: "LABEL_1"})


def test_classifier_folder_judges_refusals(classifier_dir):
    judge = load_judge(f"hf-classifier:{classifier_dir}")
    assert isinstance(judge, HFClassifierJudge) and judge.judges_benign
    texts = [t.lower() for t in REFUSALS + COMPLIANCES] + ["  "]
    verdicts = judge.judge(["q"] * len(texts), texts)
    assert [v.outcome for v in verdicts] == ["refusal"] * 4 + ["compliance"] * 4 + ["empty"]
    assert all(0.0 <= v.score <= 1.0 for v in verdicts[:-1]) and verdicts[0].by.startswith("hf-classifier:")


def test_guard_folders_answer_safe_unsafe_or_unknown(tmp_path):
    template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    for first, outcome, chat in [
        ("unsafe", "compliance", None),
        ("safe", "refusal", template),
        ("banana", "unknown", None),
    ]:
        judge = load_judge(f"hf-guard:{guard_dir(tmp_path, first, chat)}")
        assert isinstance(judge, HFGuardJudge) and not judge.judges_benign
        assert [v.outcome for v in judge.judge(["How do I X?", "q"], ["Sure, here is how.", ""])] == [
            outcome,
            "empty",
        ]


def test_guard_judge_leaves_benign_prompts_to_the_project_judge(tmp_path):
    judge = HFGuardJudge(guard_dir(tmp_path, "unsafe"))
    prompts = [
        RedteamPrompt("h", "cyber", "en", "p", "r", "harmful"),
        RedteamPrompt("b", "cyber", "en", "p", "r", "benign"),
    ]
    records = judge_records(prompts, ["Sure, here you go.", "Sure, open the settings menu."], judge)
    assert records[0].outcome == "compliance" and records[0].by.startswith("hf-guard:")
    assert records[1].outcome == "compliance" and records[1].by in ("rules", "classifier")


def test_parse_guard_answer_and_missing_folders(tmp_path):
    assert parse_guard_answer("\n unsafe\nS2") == "compliance" and parse_guard_answer("Safe.") == "refusal"
    assert parse_guard_answer("") == "unknown"
    (tmp_path / "empty").mkdir()
    with pytest.raises(HFJudgeError, match="no config.json"):
        HFGuardJudge(tmp_path / "empty")
