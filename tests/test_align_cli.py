"""`quintet align sft|sdpo CONFIG` end to end, as a user runs them."""

import json
import subprocess
import sys

from quintet.align.demo_preferences import make_demo_preferences
from quintet.align.preference_data import write_preferences


def quintet(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "quintet", *args], capture_output=True, text=True, timeout=600
    )


def test_sft_then_sdpo_from_configs(tmp_path):
    model = tmp_path / "base"
    assert quintet("model", "init", "--preset", "jamba-tiny", "--out", str(model)).returncode == 0
    pairs = make_demo_preferences(per_cell=1, seed=0)
    write_preferences(tmp_path / "prefs.jsonl", [p for p in pairs if p.split == "train"])
    write_preferences(tmp_path / "prefs-eval.jsonl", [p for p in pairs if p.split == "eval"])
    sft_rows = [{"prompt": p.prompt, "completion": p.chosen} for p in pairs if p.split == "train"]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sft_rows))

    (tmp_path / "sft.toml").write_text(
        f'[model]\npath = "{model}"\n[data]\ntrain = "{tmp_path / "sft.jsonl"}"\n'
        f'[sft]\nlr = 1e-3\nbatch_size = 8\nchat_template = true\n[run]\nout_dir = "{tmp_path / "sft"}"\n'
    )
    result = quintet("align", "sft", str(tmp_path / "sft.toml"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["steps"] >= 3

    (tmp_path / "sdpo.toml").write_text(
        f'[model]\npath = "{tmp_path / "sft" / "model"}"\n'
        f'[data]\ntrain = "{tmp_path / "prefs.jsonl"}"\neval = "{tmp_path / "prefs-eval.jsonl"}"\n'
        f'[dpo]\nbeta = 0.1\nlr = 1e-4\nbatch_size = 8\n[sdpo]\nsteps = 2\nsplit = "easy_to_hard"\n'
        f'[run]\nout_dir = "{tmp_path / "sdpo"}"\n'
    )
    result = quintet("align", "sdpo", str(tmp_path / "sdpo.toml"))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert [s["step"] for s in summary["steps"]] == [1, 2]
    assert 0 <= summary["eval_accuracy_after"] <= 1
    assert (tmp_path / "sdpo" / "model" / "model.safetensors").is_file()
    assert len(list((tmp_path / "sdpo" / "reference-cache").glob("ref-*.safetensors"))) == 2
    first = json.loads((tmp_path / "sdpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["sdpo_step"] == 1 and first["rewards/accuracies"] == 0.0  # step 0: reference == policy
    assert {"learning_rate", "grad_norm", "logits/chosen", "logits/rejected", "aux_loss"} <= set(first)


def test_config_errors_are_clear(tmp_path):
    (tmp_path / "bad.toml").write_text(
        '[model]\npath = "x"\n[data]\ntrain = "y"\n[run]\nout_dir = "z"\n[dpoo]\n'
    )
    result = quintet("align", "dpo", str(tmp_path / "bad.toml"))
    assert result.returncode == 2 and "unknown section(s) ['dpoo']" in result.stderr
    (tmp_path / "bad.toml").write_text('[model]\npath = "x"\n[run]\nout_dir = "z"\n')
    result = quintet("align", "sft", str(tmp_path / "bad.toml"))
    assert result.returncode == 2 and "[data].train is missing" in result.stderr
