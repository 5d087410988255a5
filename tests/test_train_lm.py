"""The LM trainer on real token shards: curriculum, exact resume, divergence, DDP and FSDP2 under torchrun."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quintet.data.shards import ShardError, tokenize_curated
from quintet.data.tokenizer_training import train_tokenizer
from quintet.models.jamba import JambaForCausalLM
from quintet.train.lm import ResumeError, TrainingDiverged, train_lm
from quintet.train.lm_config import TrainConfig

WORDS = {
    "en": "the cat sat on a mat and the dog ran to the park while birds sang in trees".split(),
    "fi": "kissa istui matolla ja koira juoksi puistoon kun linnut lauloivat puissa".split(),
    "code": "def f ( x ) : return x + 1 for i in range ( 10 ) : print ( i ) if x else None".split(),
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm-data")
    rng = random.Random(0)
    for source, vocab in WORDS.items():
        folder = root / "curated" / source
        folder.mkdir(parents=True)
        rows = [
            {"id": f"{source}-{i}", "text": " ".join(rng.choice(vocab) for _ in range(80))} for i in range(60)
        ]
        (folder / "part-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_tokenizer(root / "curated", root / "tokenizer", vocab_size=400, min_frequency=1)
    return tokenize_curated(root / "curated", tok, root / "shards", heldout_fraction=0.1)


def _config(shards: Path, out: Path, **run) -> dict:
    return {
        "model": {"preset": "jamba-tiny"},
        "data": {"shards": str(shards), "seq_len": 32},
        "optim": {"micro_batch_size": 2, "grad_accum": 2},
        "run": {"out_dir": str(out), "checkpoint_every": 5, "heldout_tokens": 256, **run},
        "stages": [
            {"name": "CAP", "tokens": 2048, "mixture": {"en": 2.0, "fi": 1.0, "code": 1.0}, "lr": 3e-3},
            {"name": "CAT", "tokens": 1024, "mixture": {"en": 1.0, "code": 1.0}, "lr": 1e-3},
        ],
    }


def _losses(metrics: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_curriculum_runs_both_stages_with_the_configured_token_counts(shards, tmp_path):
    result = train_lm(TrainConfig.from_dict(_config(shards, tmp_path / "run")), progress=False)
    rows = [json.loads(line) for line in result.metrics.read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["stage"] for r in steps] == ["CAP"] * 16 + ["CAT"] * 8  # 2048 and 1024 tokens at 128 per step
    ends = [r for r in rows if r.get("event") == "stage_end"]
    assert [e["stage"] for e in ends] == ["CAP", "CAT"]
    cap = ends[0]["tokens_by_source"]
    assert sum(cap.values()) == 2048
    for source, weight in {"en": 0.5, "fi": 0.25, "code": 0.25}.items():
        assert abs(cap[source] / 2048 - weight) <= 0.02
    assert set(ends[1]["tokens_by_source"]) == {"en", "code"}
    assert set(ends[0]["heldout_loss"]) == {"en", "fi", "code"}
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert (result.out_dir / "loss.png").is_file()
    model = JambaForCausalLM.from_pretrained(result.final_model)
    assert (result.final_model / "tokenizer.json").is_file() and model.config.vocab_size == 1024


def test_interrupted_and_resumed_run_matches_uninterrupted(shards, tmp_path):
    full = train_lm(TrainConfig.from_dict(_config(shards, tmp_path / "full")), progress=False)
    cut = TrainConfig.from_dict(_config(shards, tmp_path / "cut", max_steps=7))
    first = train_lm(cut, progress=False)
    assert first.state.step == 7
    rest = train_lm(TrainConfig.from_dict(_config(shards, tmp_path / "cut")), resume=True, progress=False)
    assert rest.state.step == 24
    assert _losses(rest.metrics) == _losses(full.metrics)  # bit for bit: same data, RNG, optimizer state
    final_a = JambaForCausalLM.from_pretrained(full.final_model).state_dict()
    final_b = JambaForCausalLM.from_pretrained(rest.final_model).state_dict()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_divergence_stops_with_the_last_good_checkpoint_intact(shards, tmp_path):
    cfg = _config(shards, tmp_path / "nan", checkpoint_every=1)
    cfg["stages"][0]["lr"] = 1e6
    cfg["stages"][0]["warmup"] = 0.0
    cfg["optim"]["grad_clip"] = 0.0
    with pytest.raises(TrainingDiverged) as err:
        train_lm(TrainConfig.from_dict(cfg), progress=False)
    message = str(err.value)
    assert "stopped before the update" in message and "Last good checkpoint" in message
    latest = (tmp_path / "nan" / "checkpoints" / "latest").read_text().strip()
    assert latest in message
    model = JambaForCausalLM.from_pretrained(tmp_path / "nan" / "checkpoints" / latest)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_resume_with_another_model_shape_and_unknown_source_are_clear_errors(shards, tmp_path):
    train_lm(TrainConfig.from_dict(_config(shards, tmp_path / "r", max_steps=5)), progress=False)
    other = _config(shards, tmp_path / "r")
    other["model"] = {"preset": "jamba-small"}
    with pytest.raises(ResumeError, match="different shape than the configured one"):
        train_lm(TrainConfig.from_dict(other), resume=True, progress=False)
    bad = _config(shards, tmp_path / "s")
    bad["stages"][0]["mixture"] = {"en": 1.0, "sv": 1.0}
    with pytest.raises(ShardError, match=r"weights name sources \['sv'\] that are not in the shards"):
        train_lm(TrainConfig.from_dict(bad), progress=False)


def _torchrun(config_path: Path, nproc: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(29500 + random.Random(str(config_path)).randint(0, 400)),
        "-m",
        "quintet.train",
        "lm",
        str(config_path),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _write(cfg: dict, path: Path) -> Path:
    def toml_value(v):
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
        return repr(v)

    lines = []
    for section in ("model", "data", "optim", "run"):
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in cfg[section].items()]
    for stage in cfg["stages"]:
        lines.append("[[stages]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in stage.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_follow_the_one_process_loss_curve(shards, tmp_path, parallel):
    one = _config(shards, tmp_path / "one")
    one["optim"]["micro_batch_size"] = 4
    one["stages"] = one["stages"][:1]
    one["stages"][0]["tokens"] = 1024
    two = json.loads(json.dumps(one))
    two["optim"]["micro_batch_size"] = 2
    two["run"]["out_dir"] = str(tmp_path / "two")
    two["run"]["parallel"] = parallel
    single = train_lm(TrainConfig.from_dict(one), progress=False)
    result = _torchrun(_write(two, tmp_path / "two.toml"), 2)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = _losses(single.metrics), _losses(tmp_path / "two" / "metrics.jsonl")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 5))
    for (_, la), (_, lb) in zip(a, b, strict=True):
        assert abs(la - lb) < 2e-4 * max(1.0, abs(la))  # the MoE aux loss is per process: not bitwise
    shutil.rmtree(tmp_path / "two" / "checkpoints")


def test_no_resume_refused_and_resume_after_a_kill_writes_each_step_once(shards, tmp_path):
    from quintet.errors import OutputInUseError

    full = train_lm(TrainConfig.from_dict(_config(shards, tmp_path / "full")), progress=False)
    train_lm(TrainConfig.from_dict(_config(shards, tmp_path / "cut", max_steps=7)), progress=False)
    # as if killed after writing step 7's metrics row, the last checkpoint at step 5 (checkpoint_every)
    checkpoints = tmp_path / "cut" / "checkpoints"
    shutil.rmtree(checkpoints / "step-000007")
    (checkpoints / "latest").write_text("step-000005\n")
    with (tmp_path / "cut" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 8, "loss": 1.')  # and half a row
    again = TrainConfig.from_dict(_config(shards, tmp_path / "cut"))
    with pytest.raises(OutputInUseError, match="--resume to continue it, or --overwrite"):
        train_lm(again, progress=False)
    rest = train_lm(again, resume=True, progress=False)
    steps = [s for s, _ in _losses(rest.metrics)]
    assert steps == sorted(set(steps)) == list(range(1, 25))  # each step once
    assert _losses(rest.metrics) == _losses(full.metrics)
    over = train_lm(
        TrainConfig.from_dict(_config(shards, tmp_path / "cut", max_steps=3)), overwrite=True, progress=False
    )
    assert [s for s, _ in _losses(over.metrics)] == [1, 2, 3]
