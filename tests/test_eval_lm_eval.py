"""The lm-evaluation-harness adapter, run through the real lm_eval package on a local YAML task: its
log-likelihoods equal quintet's own scoring and a direct forward; rolling log-likelihoods equal
`text_nll`; generation stops at lm-eval's stop strings; the documented command line works (slow)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from quintet.eval.lm_eval_adapter import QuintetLM
from quintet.eval.multiple_choice import encode_pair, evaluate_mc, read_mc_task, write_lm_eval_task
from quintet.eval.perplexity import text_nll
from quintet.generation import generate
from quintet.models.jamba import JambaConfig, JambaForCausalLM
from quintet.tokenizer import ByteTokenizer

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ITEMS = [
    {
        "question": "The capital of Finland is",
        "choices": ["Helsinki", "Turku", "Oulu"],
        "answer": 0,
        "lang": "en",
    },
    {"question": "Suomen pääkaupunki on", "choices": ["Helsinki", "Tampere"], "answer": 0, "lang": "fi"},
    {"question": "日本の首都は", "choices": ["東京", "大阪"], "answer": 1, "lang": "ja"},
    {"question": "Thủ đô của Việt Nam là", "choices": ["Hà Nội", "Huế"], "answer": 0, "lang": "vi"},
    {"question": "2 + 2 =", "choices": ["4", "5", "22"], "answer": 0, "lang": "en"},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    torch.manual_seed(0)
    JambaForCausalLM(JambaConfig.from_preset("jamba-tiny", num_hidden_layers=2)).save_pretrained(
        root / "model"
    )
    task = root / "capitals.jsonl"
    task.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ITEMS), encoding="utf-8")
    yaml_path = write_lm_eval_task(task, root / "tasks", name="quintet_capitals")
    return root, task, yaml_path.parent


@torch.no_grad()
def direct(model, ctx, cont):
    ids = torch.tensor([ctx + cont])
    logp = torch.log_softmax(model(ids).logits[0].float(), -1)[len(ctx) - 1 : len(ctx) + len(cont) - 1]
    return float(logp.gather(-1, torch.tensor(cont)[:, None]).sum())


def run_capitals(pretrained, task_dir):
    """The capitals task through lm-eval's own `simple_evaluate` on the quintet model of `pretrained`."""
    return simple_evaluate(
        model="quintet",
        model_args={"pretrained": str(pretrained)},
        tasks=["quintet_capitals"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True,
        batch_size=3,
    )


def test_lm_eval_loglikelihoods_equal_our_scoring(setup):
    root, task, task_dir = setup
    results = run_capitals(root / "model", task_dir)
    model = JambaForCausalLM.from_pretrained(root / "model").eval()
    ours = evaluate_mc(model, ByteTokenizer(), read_mc_task(task))
    samples = sorted(results["samples"]["quintet_capitals"], key=lambda s: s["doc_id"])
    assert len(samples) == len(ITEMS)
    for sample, item, mine in zip(samples, ITEMS, ours["items"], strict=True):
        harness = [float(r[0][0]) for r in sample["resps"]]
        assert harness == pytest.approx(mine["loglikelihoods"], rel=1e-5, abs=1e-4)
        for choice, ll in zip(item["choices"], harness, strict=True):
            ctx, cont = encode_pair(
                ByteTokenizer(), item["question"], " " + choice, model.config.bos_token_id
            )
            assert ll == pytest.approx(direct(model, ctx, cont), rel=1e-5, abs=1e-4)
        assert sample["acc"] == mine["acc"] and sample["acc_norm"] == mine["acc_norm"]
    metrics = results["results"]["quintet_capitals"]
    assert metrics["acc,none"] == pytest.approx(ours["acc"]) and metrics["acc_norm,none"] == pytest.approx(
        ours["acc_norm"]
    )


def test_rolling_loglikelihood_and_generation_through_lm_eval_requests(setup):
    root, _, _ = setup
    lm = QuintetLM(pretrained=str(root / "model"), batch_size=2, max_length=64)
    texts = ["Hello, world.", "Hyvää huomenta! " * 8]
    rolling = lm.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)], disable_tqdm=True
    )
    assert rolling == pytest.approx(
        [-n for n, _ in text_nll(lm.model, lm.tok, texts, max_length=64)], rel=1e-6
    )

    request = Instance("generate_until", {}, ("Once upon a time", {"until": ["e"], "max_gen_toks": 12}), 0)
    (text,) = lm.generate_until([request], disable_tqdm=True)
    ids = generate(lm.model, [lm.tok.encode("Once upon a time")], max_new_tokens=12, vocab_limit=259)[0]
    full = lm.tok.decode(ids)
    assert "e" not in text and full.startswith(text) and (text == full or full[len(text)] == "e")


@pytest.mark.slow
def test_documented_command_line_runs_the_quintet_model(setup, tmp_path):
    root, _, task_dir = setup
    cmd = [sys.executable, "-m", "quintet.eval.lm_eval_adapter", "--model", "quintet", "--model_args",
           f"pretrained={root / 'model'}", "--tasks", "quintet_capitals", "--include_path", str(task_dir),
           "--output_path", str(tmp_path / "out")]  # fmt: skip
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "quintet_capitals" in done.stdout and "acc" in done.stdout


def test_lm_eval_runs_an_fp4_folder_through_the_one_loader(setup, tmp_path):
    from quintet.deploy.convert import quantize_folder
    from quintet.loading import load_model

    root, task, task_dir = setup
    quantize_folder(root / "model", tmp_path / "fp4", group_size=32)
    results = run_capitals(tmp_path / "fp4", task_dir)
    ours = evaluate_mc(load_model(tmp_path / "fp4"), ByteTokenizer(), read_mc_task(task))
    samples = sorted(results["samples"]["quintet_capitals"], key=lambda s: s["doc_id"])
    for sample, mine in zip(samples, ours["items"], strict=True):
        assert [float(r[0][0]) for r in sample["resps"]] == pytest.approx(
            mine["loglikelihoods"], rel=1e-5, abs=1e-4
        )
