"""Multiple-choice scoring: lm-eval's context/continuation rule, log-likelihoods equal a direct forward,
acc / acc_norm, and task-file errors that name file, line and field."""

import json

import pytest
import torch

from quintet.eval.multiple_choice import (
    EvalDataError,
    encode_pair,
    evaluate_mc,
    loglikelihoods,
    read_mc_task,
    write_lm_eval_task,
)
from quintet.models.jamba import JambaConfig, JambaForCausalLM
from quintet.tokenizer import ByteTokenizer

CAPITALS = [
    ("en", "The capital of Finland is", ["Helsinki", "Turku", "Oulu"]),
    ("fi", "Suomen pääkaupunki on", ["Helsinki", "Tampere"]),
    ("hi", "भारत की राजधानी है", ["नई दिल्ली", "मुंबई"]),
    ("ja", "日本の首都は", ["東京", "大阪"]),
    ("vi", "Thủ đô của Việt Nam là", ["Hà Nội", "Huế"]),
    ("en", "2 + 2 =", ["4", "5", "22"]),
]
ITEMS = [
    {"id": f"q{i}", "question": q, "choices": c, "answer": 0, "lang": g}
    for i, (g, q, c) in enumerate(CAPITALS)
]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return JambaForCausalLM(JambaConfig.from_preset("jamba-tiny", num_hidden_layers=2)).eval()


@pytest.fixture
def task(tmp_path):
    path = tmp_path / "capitals.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ITEMS), encoding="utf-8")
    return path


@torch.no_grad()
def direct_loglikelihood(model, ctx, cont):
    ids = torch.tensor([ctx + cont])
    logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    rows = logp[len(ctx) - 1 : len(ctx) + len(cont) - 1]
    targets = torch.tensor(cont)
    return float(rows.gather(-1, targets[:, None]).sum()), bool((rows.argmax(-1) == targets).all())


def test_encode_pair_follows_lm_eval():
    tok = ByteTokenizer()
    assert encode_pair(tok, "Question: ", "yes", 1) == (tok.encode("Question:"), tok.encode(" yes"))
    assert encode_pair(tok, "", "yes", 1) == ([1], tok.encode("yes"))
    assert encode_pair(tok, "a", " b", 1) == (tok.encode("a"), tok.encode(" b"))


def test_loglikelihoods_equal_a_direct_forward(model):
    tok = ByteTokenizer()
    requests = [(r["question"], " " + c) for r in ITEMS for c in r["choices"]] + [("", "Helsinki")]
    got = loglikelihoods(model, tok, requests, batch_size=4)
    for (ctx, cont), (ll, greedy) in zip(requests, got, strict=True):
        c, k = encode_pair(tok, ctx, cont, model.config.bos_token_id)
        want, want_greedy = direct_loglikelihood(model, c, k)
        assert ll == pytest.approx(want, rel=1e-5, abs=1e-4) and greedy == want_greedy
    single = loglikelihoods(model, tok, requests, batch_size=1)
    assert [ll for ll, _ in single] == pytest.approx([ll for ll, _ in got], rel=1e-5, abs=1e-4)


def test_long_inputs_keep_the_continuation(model):
    """lm-eval's rule: the last max_length + 1 tokens, all but the last fed (32 input tokens)."""
    tok = ByteTokenizer()
    ((ll, _),) = loglikelihoods(model, tok, [("x" * 300, " answer")], max_length=32)
    ids = (tok.encode("x" * 300) + tok.encode(" answer"))[-33:]
    assert ll == pytest.approx(
        direct_loglikelihood(model, ids[: -len(" answer")], ids[-len(" answer") :])[0], rel=1e-5
    )


def test_accuracy_follows_the_loglikelihoods(model, task):
    items = read_mc_task(task)
    result = evaluate_mc(model, ByteTokenizer(), items)
    for item, rec in zip(items, result["items"], strict=True):
        lls = rec["loglikelihoods"]
        assert rec["acc"] == float(lls.index(max(lls)) == item.answer)
        norm = [ll / len(c) for ll, c in zip(lls, item.choices, strict=True)]
        assert rec["acc_norm"] == float(norm.index(max(norm)) == item.answer)
    assert result["acc"] == pytest.approx(sum(r["acc"] for r in result["items"]) / len(items))
    assert (
        set(result["by_language"]) == {"en", "fi", "hi", "ja", "vi"} and result["by_language"]["en"]["n"] == 2
    )


@pytest.mark.parametrize(
    "row, message",
    [
        ({"question": "q", "choices": ["a"], "answer": 0}, "'choices' = \\['a'\\]: must be a list of >= 2"),
        (
            {"question": "q", "choices": ["a", "b"], "answer": 2},
            "'answer' = 2: must be an index in \\[0, 2\\)",
        ),
        ({"question": "q", "choices": ["a", "b"], "answer": True}, "'answer' = True"),
        ({"choices": ["a", "b"], "answer": 0}, "needs a string 'question'"),
    ],
)
def test_task_file_errors_name_file_line_and_field(tmp_path, row, message):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(ITEMS[0]) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(EvalDataError, match=rf"t.jsonl:2: .*{message}"):
        read_mc_task(path)


def test_lm_eval_task_yaml_points_at_the_same_file(task, tmp_path):
    yaml_path = write_lm_eval_task(task, tmp_path / "tasks", name="capitals")
    text = yaml_path.read_text()
    assert "task: capitals" in text and str(task.resolve()) in text and "output_type: multiple_choice" in text
    ctx = tmp_path / "ctx.jsonl"
    ctx.write_text(json.dumps({"context": "q", "choices": ["a", "b"], "answer": 0}) + "\n")
    with pytest.raises(EvalDataError, match="no 'question'"):
        write_lm_eval_task(ctx, tmp_path / "tasks")


def test_cli_mc_and_perplexity_print_and_write_json(model, task, tmp_path, capsys):
    import argparse

    from quintet.eval.commands import add_eval_parser

    model.save_pretrained(tmp_path / "model")
    texts = tmp_path / "held.jsonl"
    texts.write_text('{"text": "Hello there.", "lang": "en"}\n{"text": "Hei vaan.", "lang": "fi"}\n')
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    for argv in (
        [
            "eval",
            "mc",
            "--model",
            str(tmp_path / "model"),
            "--task",
            str(task),
            "--out",
            str(tmp_path / "mc.json"),
        ],
        [
            "eval",
            "perplexity",
            "--model",
            str(tmp_path / "model"),
            "--data",
            str(texts),
            "--out",
            str(tmp_path / "p.json"),
        ],
    ):
        args = parser.parse_args(argv)
        assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert '"acc"' in printed and "bits/byte" in printed
    assert json.loads((tmp_path / "mc.json").read_text())["n"] == len(ITEMS)
    assert set(json.loads((tmp_path / "p.json").read_text())["languages"]) == {"en", "fi", "all"}
