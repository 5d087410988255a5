"""DPO training, the reference cache, sDPO steps and preference-file errors, on a tiny Jamba."""

import dataclasses
import json
import math

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
from quintet.align.sequences import router_aux_loss_coef, score_completions
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


def _copy(model):
    reference = JambaForCausalLM(model.config)
    reference.load_state_dict(model.state_dict())
    return reference.eval()


@pytest.mark.parametrize("precompute", [True, False])
def test_step_zero_reference_equals_the_policy(tiny, pairs, precompute):
    """The reference runs the policy's ops, so at step 0 every implicit reward is exactly 0 (TRL: 0)."""
    cfg = DPOConfig(batch_size=4, precompute_reference=precompute, router_aux_loss_coef=0.0)
    history = train_dpo(tiny, ByteTokenizer(), pairs, cfg, ref_model=_copy(tiny), progress=False)
    first = history[0]
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    assert first["rewards/accuracies"] == 0.0 and first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert {"learning_rate", "lr", "grad_norm", "logits/chosen", "logits/rejected"} <= set(first)
    assert first["grad_norm"] > 0 and "aux_loss" not in first


def test_router_aux_loss_is_added_and_logged_for_a_moe_model(tiny, pairs):
    assert tiny.config.num_experts > 1  # jamba-tiny has MoE layers
    coef = 0.5
    cfg = DPOConfig(batch_size=4, router_aux_loss_coef=coef)
    first = train_dpo(tiny, ByteTokenizer(), pairs, cfg, ref_model=_copy(tiny), progress=False)[0]
    assert first["aux_loss"] > 0
    assert first["loss"] == pytest.approx(math.log(2) + coef * first["aux_loss"], rel=1e-6)
    default = DPOConfig(batch_size=4)  # unset: the model config's coefficient (TRL's rule)
    assert router_aux_loss_coef(tiny, default.router_aux_loss_coef) == tiny.config.router_aux_loss_coef
    dense = JambaForCausalLM(
        JambaConfig.from_preset("jamba-tiny", num_hidden_layers=2, num_experts=1, num_experts_per_tok=1)
    )
    with pytest.raises(ValueError, match="router_aux_loss_coef = 0.5: the model has no mixture-of-experts"):
        train_dpo(dense, ByteTokenizer(), pairs, cfg, ref_model=_copy(dense), progress=False)


def test_aux_loss_is_the_models_load_balancing_loss_over_real_tokens(tiny):
    ids = torch.randint(3, 250, (3, 12))
    mask = torch.ones_like(ids, dtype=torch.bool)
    ours = score_completions(tiny, ids, mask, real=mask, aux_loss=True).aux_loss
    torch.testing.assert_close(ours, tiny(ids, output_router_logits=True).aux_loss)
    padded = torch.cat([ids, torch.zeros(3, 5, dtype=torch.long)], dim=1)  # right padding is left out
    real = torch.cat([mask, torch.zeros(3, 5, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(score_completions(tiny, padded, real, real=real, aux_loss=True).aux_loss, ours)


def test_conversational_and_asdict_rows_are_read(tmp_path, tiny):
    path = tmp_path / "p.jsonl"
    pair = PreferencePair("p", "x", "y", lang="fi")
    conversation = {
        "prompt": [{"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    implicit = {"chosen": [*conversation["prompt"], *conversation["chosen"]]}
    implicit["rejected"] = [*conversation["prompt"], *conversation["rejected"]]
    rows = [dataclasses.asdict(pair), conversation, implicit]  # asdict writes "step": null
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    read = read_preferences(path)
    assert read[0] == pair and read[1] == PreferencePair(**conversation) and read[2] == read[1]
    history = train_dpo(tiny, ByteTokenizer(), read, DPOConfig(), ref_model=_copy(tiny), progress=False)
    assert len(history) == 1
    path.write_text(json.dumps({**conversation, "prompt": "2+2?"}) + "\n")
    with pytest.raises(PreferenceDataError, match=r"p.jsonl:1: field 'prompt': messages: expected a list"):
        read_preferences(path)


def test_sdpo_progress_bars_name_the_step(tiny, pairs, capsys):
    steps = split_steps(pairs, 2, "random")
    train_sdpo(tiny, ByteTokenizer(), steps, DPOConfig(batch_size=8), progress=True)
    err = capsys.readouterr().err
    assert "sdpo step 1/2" in err and "sdpo step 2/2" in err and "sdpo step 2/2: reference" in err
