"""DPO training, the reference cache, sDPO steps and preference-file errors, on a tiny Jamba."""

import json

import pytest
import torch

from quintet.align.demo_preferences import answer_is_correct, make_demo_preferences
from quintet.align.dpo import DPOConfig, model_hash, preference_accuracy, reference_logps, train_dpo
from quintet.align.preference_data import (
    PreferenceDataError,
    PreferencePair,
    read_preferences,
    write_preferences,
)
from quintet.align.sdpo import split_steps, train_sdpo
from quintet.models.jamba import JambaConfig, JambaForCausalLM
from quintet.tokenizer import ByteTokenizer


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return JambaForCausalLM(JambaConfig.from_preset("jamba-tiny", num_hidden_layers=2)).eval()


@pytest.fixture(scope="module")
def pairs():
    return [p for p in make_demo_preferences(per_cell=2, seed=1) if p.lang in ("en", "fi")]


def test_demo_preferences_have_checkable_ground_truth():
    data = make_demo_preferences(per_cell=5, seed=0)
    assert {p.lang for p in data} == {"en", "fi", "hi", "ja", "vi"}
    assert {p.difficulty for p in data} == {"easy", "hard"}
    for p in data:
        assert answer_is_correct(p.chosen, p.answer) and not answer_is_correct(p.rejected, p.answer)
    train = {p.id for p in data if p.split == "train"}
    assert train and not train & {p.id for p in data if p.split == "eval"}


def test_dpo_raises_preference_accuracy_and_logs_trl_metrics(tiny, pairs):
    tok = ByteTokenizer()
    before = preference_accuracy(tiny, tok, pairs)
    reference = JambaForCausalLM(tiny.config)
    reference.load_state_dict(tiny.state_dict())
    cfg = DPOConfig(beta=0.5, lr=3e-3, epochs=3, batch_size=8, warmup=0.0, schedule="constant")
    history = train_dpo(tiny, tok, pairs, cfg, ref_model=reference, progress=False)
    assert {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    } <= set(history[0])
    assert preference_accuracy(tiny, tok, pairs) > max(before, 0.8)
    assert history[-1]["loss"] < history[0]["loss"]


def test_reference_cache_is_reused_and_invalidated(tiny, pairs, tmp_path):
    tok = ByteTokenizer()
    cfg = DPOConfig(cache_dir=str(tmp_path))
    first = reference_logps(tiny, tok, pairs, cfg)
    assert len(list(tmp_path.glob("ref-*.safetensors"))) == 1
    torch.testing.assert_close(reference_logps(tiny, tok, pairs, cfg), first)
    assert len(list(tmp_path.glob("ref-*.safetensors"))) == 1
    with torch.no_grad():
        tiny.lm_head.weight.add_(0.01)
    changed_model = reference_logps(tiny, tok, pairs, cfg)
    assert len(list(tmp_path.glob("ref-*.safetensors"))) == 2 and not torch.equal(changed_model, first)
    reference_logps(tiny, tok, pairs[:-1], cfg)
    assert len(list(tmp_path.glob("ref-*.safetensors"))) == 3


def test_sdpo_step_t_references_step_t_minus_1(tiny, pairs):
    tok = ByteTokenizer()
    sft_hash = model_hash(tiny)
    steps = split_steps(pairs, 3, "easy_to_hard", sft_model=tiny, tokenizer=tok)
    assert sum(len(s) for s in steps) == len(pairs)
    cfg = DPOConfig(beta=0.5, lr=1e-3, batch_size=8, warmup=0.0)
    model, results = train_sdpo(tiny, tok, steps, cfg, progress=False)
    assert results[0].reference_hash == sft_hash
    for prev, cur in zip(results, results[1:], strict=False):
        assert cur.reference_hash == prev.output_hash != prev.reference_hash
    assert results[-1].output_hash == model_hash(model)


def test_easy_to_hard_orders_by_reference_margin(tiny, pairs):
    from quintet.align.sdpo import reference_margins

    tok = ByteTokenizer()
    steps = split_steps(pairs, 2, "easy_to_hard", sft_model=tiny, tokenizer=tok)
    m0 = reference_margins(tiny, tok, steps[0], 256)
    m1 = reference_margins(tiny, tok, steps[1], 256)
    assert m0.min() >= m1.max()
    a = split_steps(pairs, 2, "random", seed=3)
    assert a == split_steps(pairs, 2, "random", seed=3) and a != split_steps(pairs, 2, "random", seed=4)
    by_source = split_steps(
        pairs,
        0,
        "source",
        sources=["add-easy", "add-hard", "mul-easy", "mul-hard", "km_to_m-easy", "km_to_m-hard"],
    )
    assert [s[0].source for s in by_source] == [
        "add-easy",
        "add-hard",
        "mul-easy",
        "mul-hard",
        "km_to_m-easy",
        "km_to_m-hard",
    ]


@pytest.mark.parametrize(
    "row, fragment",
    [
        ({"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "field 'chosen' is empty"),
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, "chosen == rejected"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "stepp": 1}, "unknown field(s) ['stepp']"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "step": -1}, "field 'step' = -1"),
    ],
)
def test_malformed_rows_name_the_line(tmp_path, row, fragment):
    path = tmp_path / "prefs.jsonl"
    good = {"prompt": "p", "chosen": "x", "rejected": "y"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(PreferenceDataError) as err:
        read_preferences(path)
    assert f"{path}:2" in str(err.value) and fragment in str(err.value)


def test_bad_json_and_round_trip(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "p", "chosen": "x", "rejected": "y"}\n{"prompt": \n')
    with pytest.raises(PreferenceDataError, match=r"p.jsonl:2: not valid JSON"):
        read_preferences(path)
    pairs = [PreferencePair("p", "x", "y", step=1, lang="fi")]
    write_preferences(path, pairs)
    assert read_preferences(path) == pairs
