"""Bad input and bad configs: clear errors naming file and line, or counted skips; resumed runs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quintet.data.curation import ConfigError, CurationInputError, curate, load_config

GOOD = [
    "The library opens early on Saturdays, and the reading room stays quiet all afternoon.",
    "Volunteers repaired the old clock tower so that it shows the right time again.",
    "Mail anna.virtanen@example.com or call +1 555 123 4567 to book a place at the workshop.",
]


def _config(
    tmp_path: Path, steps: str = "", inputs: str = "", extra: str = "", suffix: str = ".toml"
) -> Path:
    inputs = inputs or '[[inputs]]\nname = "web"\ntype = "jsonl"\npath = "web"\n'
    steps = steps or '[[steps]]\ntype = "numbers"\n\n[[steps]]\ntype = "pii"\n'
    path = tmp_path / f"curation{suffix}"
    path.write_text(f'languages = ["en", "fi"]\n{extra}\n{inputs}\n{steps}', encoding="utf-8")
    return path


def _write_jsonl(path: Path, lines: list[str | bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines)
    path.write_bytes(data)


def _rows(texts):
    return [json.dumps({"id": f"d{i}", "text": t, "lang": "en"}) for i, t in enumerate(texts)]


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    _write_jsonl(
        tmp_path / "web" / "a.jsonl",
        [*_rows(GOOD[:2]), '{"id": "x", "text": "unterminated', *_rows(GOOD[2:])],
    )
    with pytest.raises(
        CurationInputError, match=r"web/a\.jsonl:3: malformed JSON, column 21: Unterminated string"
    ):
        curate(_config(tmp_path), tmp_path / "out")


def test_non_utf8_line_names_file_and_line(tmp_path):
    _write_jsonl(tmp_path / "web" / "a.jsonl", [*_rows(GOOD[:1]), b'{"id": "x", "text": "caf\xe9"}'])
    with pytest.raises(CurationInputError, match=r"a\.jsonl:2: not UTF-8 \(byte 0xe9 at column 25\)"):
        curate(_config(tmp_path), tmp_path / "out")


def test_non_utf8_text_file_names_file_and_line(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "ok.txt").write_text(GOOD[0], encoding="utf-8")
    (folder / "bad.txt").write_bytes(b"first line\nsecond " + b"\xff\xfe line\n")
    inputs = '[[inputs]]\nname = "notes"\ntype = "text"\npath = "notes"\nlang = "en"\n'
    with pytest.raises(CurationInputError, match=r"notes/bad\.txt:2: not UTF-8 \(byte 0xff at column 8\)"):
        curate(_config(tmp_path, inputs=inputs), tmp_path / "out")


def test_skip_counts_and_reports_bad_lines(tmp_path):
    lines = [
        *_rows(GOOD[:2]),
        "not json at all",
        b'{"text": "\xff"}',
        "[1, 2]",
        '{"id": "e", "text": ""}',
        *_rows(GOOD[2:]),
    ]
    _write_jsonl(tmp_path / "web" / "a.jsonl", lines)
    inputs = '[[inputs]]\nname = "web"\ntype = "jsonl"\npath = "web"\non_error = "skip"\n'
    result = curate(_config(tmp_path, inputs=inputs), tmp_path / "out")
    assert result.stats["inputs"]["web"]["skipped"] == {
        "malformed_json": 1,
        "not_utf8": 1,
        "not_an_object": 1,
        "empty_text": 1,
    }
    assert result.stats["inputs"]["web"]["documents"] == 3
    assert "malformed_json 1" in result.stats_paths["markdown"].read_text()
    records = [
        json.loads(x)
        for x in (tmp_path / "out" / "dropped" / "skipped" / "web-00000.jsonl").read_text().splitlines()
    ]
    assert [(r["line"], r["reason"]) for r in records] == [
        (3, "malformed_json"),
        (4, "not_utf8"),
        (5, "not_an_object"),
        (6, "empty_text"),
    ]
    assert all(r["file"].endswith("web/a.jsonl") for r in records)
    kept = (tmp_path / "out" / "curated" / "en" / "00000.jsonl").read_text().splitlines()
    assert len(kept) == 3 and "<EMAIL>" in kept[2] and "<PHONE>" in kept[2]


def test_empty_input_folder(tmp_path):
    (tmp_path / "web").mkdir()
    with pytest.raises(
        CurationInputError, match=r"curation\.toml: input 'web': no files matching \*\*/\*\.jsonl in .*web"
    ):
        curate(_config(tmp_path), tmp_path / "out")
    with pytest.raises(CurationInputError, match="does not exist"):
        curate(_config(tmp_path, inputs='[[inputs]]\ntype = "text"\npath = "nowhere"\n'), tmp_path / "out")


def test_unknown_language_code_names_line(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('# a comment\nlanguages = ["en", "xx"]\n[[inputs]]\ntype = "jsonl"\npath = "web"\n')
    with pytest.raises(
        ConfigError, match=r"c\.toml:2: languages: unknown language code 'xx'; valid ISO 639-1"
    ):
        load_config(path)


def test_unknown_step_names_line_and_choices(tmp_path):
    steps = '[[steps]]\ntype = "numbers"\n\n[[steps]]\ntype = "qualty"\n'
    with pytest.raises(
        ConfigError,
        match=r"curation\.toml:\d+: steps\[1\]\.type = 'qualty': unknown step; valid steps: numbers",
    ) as err:
        load_config(_config(tmp_path, steps=steps))
    line = int(str(err.value).split(":")[1])
    assert _config(tmp_path, steps=steps).read_text().splitlines()[line - 1] == 'type = "qualty"'


def test_unknown_setting_and_bad_value(tmp_path):
    steps = (
        '[[steps]]\ntype = "numbers"\nmax_digit_fraction = 0.2\n\n'
        '[[steps]]\ntype = "language"\ntreshold = 0.5\n'
    )
    with pytest.raises(
        ConfigError,
        match=r"curation\.toml:\d+: steps\[1\] \(language\): unknown setting 'treshold'; valid: threshold",
    ):
        load_config(_config(tmp_path, steps=steps))
    steps = '[[steps]]\ntype = "numbers"\nmax_digit_fraction = 2.0\n'
    with pytest.raises(ConfigError, match=r"max_digit_fraction = 2\.0: must be in \(0, 1\]"):
        load_config(_config(tmp_path, steps=steps))
    steps = '[[steps]]\ntype = "dedup"\n\n[[steps]]\ntype = "pii"\n'
    with pytest.raises(ConfigError, match="dedup must be the last step"):
        load_config(_config(tmp_path, steps=steps))
    with pytest.raises(ConfigError, match=r"top level: unknown setting 'langauges'"):
        load_config(_config(tmp_path, extra='langauges = ["en"]'))


def test_yaml_config_and_its_errors(tmp_path):
    _write_jsonl(tmp_path / "web" / "a.jsonl", _rows(GOOD))
    path = tmp_path / "c.yaml"
    path.write_text(
        "languages: [en, fi]\ninputs:\n  - name: web\n    type: jsonl\n    path: web\n"
        "steps:\n  - type: numbers\n  - type: pii\n    kinds: [email]\n"
    )
    result = curate(path, tmp_path / "out")
    assert result.stats["steps"][1]["extra"] == {"redacted_email": 1, "documents_redacted": 1}
    path.write_text(
        "languages: [en]\ninputs:\n  - type: jsonl\n    path: web\n"
        "steps:\n  - type: numbers\n  - type: toxic\n"
    )
    with pytest.raises(ConfigError, match=r"c\.yaml:7: steps\[1\]\.type = 'toxic'"):
        load_config(path)


def test_rerun_with_another_config_is_refused(tmp_path):
    _write_jsonl(tmp_path / "web" / "a.jsonl", _rows(GOOD))
    curate(_config(tmp_path), tmp_path / "out")
    again = curate(_config(tmp_path), tmp_path / "out")  # same config: resumes (nothing left to do)
    assert again.stats["output"]["documents"] == 3
    with pytest.raises(ConfigError, match="holds a curation made with another configuration"):
        curate(_config(tmp_path, steps='[[steps]]\ntype = "pii"\n'), tmp_path / "out")


_CURATE = """
import sys
from quintet.data.curation import curate
if __name__ == "__main__":
    curate(sys.argv[1], sys.argv[2])
"""


def _curated_rows(out: Path) -> list[tuple[str, str]]:
    rows = []
    for path in sorted((out / "curated").rglob("*.jsonl")):
        rows += [(r["id"], r["text"]) for r in map(json.loads, path.read_text().splitlines())]
    return sorted(rows)


def test_killed_curation_resumes_without_duplicates(tmp_path):
    """A run killed during its filter stage, run again, writes every document exactly once."""
    words = [
        "library",
        "reading",
        "room",
        "volunteers",
        "clock",
        "tower",
        "market",
        "bridge",
        "river",
        "garden",
    ]
    expected = []
    for f in range(4):
        rows = []
        for i in range(2000):
            text = " ".join(words[(i * 7 + j * 3 + f) % len(words)] for j in range(12)) + f" {f}-{i}."
            rows.append(json.dumps({"id": f"f{f}-{i}", "text": text, "lang": "en"}))
            expected.append((f"f{f}-{i}", text))
        _write_jsonl(tmp_path / "web" / f"part{f}.jsonl", rows + rows[:200])  # 200 exact duplicates per file
    steps = '[[steps]]\ntype = "numbers"\n\n[[steps]]\ntype = "dedup"\nminhash = false\n'
    config = _config(tmp_path, steps=steps, extra="[executor]\ntasks = 4\nworkers = 1\n")
    script = tmp_path / "run.py"
    script.write_text(_CURATE)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(config), str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill below reaches its workers too
    )
    marker = out / "logs" / "filter" / "completions" / "00000"
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30  # its workers die with it; a loaded machine may take a moment to reap them
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.01)
    done = sorted(p.name for p in (out / "logs" / "filter" / "completions").iterdir())
    assert proc.returncode == -signal.SIGKILL and 1 <= len(done) < 4, done  # killed halfway through

    resumed = curate(config, out)
    rows = _curated_rows(out)
    assert rows == sorted(expected)  # each document once: no duplicates from the killed run, none lost
    assert resumed.stats["steps"][0]["total"] == 4 * 2200  # every task counted once
    assert resumed.stats["output"]["documents"] == 4 * 2000


def test_slurm_stages_are_chained(tmp_path):
    """The same config on Slurm: one job array per stage, each depending on the one before (not submitted)."""
    from quintet.data.curation import build_stages
    from quintet.data.curation.pipeline import make_executors

    _write_jsonl(tmp_path / "web" / "a.jsonl", _rows(GOOD))
    steps = '[[steps]]\ntype = "pii"\n\n[[steps]]\ntype = "dedup"\n'
    slurm = '[executor]\nkind = "slurm"\ntasks = 8\npartition = "cpu"\ntime = "02:00:00"\ncpus_per_task = 2\n'
    config = load_config(_config(tmp_path, steps=steps, extra=slurm))
    executors = make_executors(build_stages(config, tmp_path / "out"), config, tmp_path / "out" / "logs")
    assert [(type(e).__name__, e.tasks) for e in executors] == [
        ("SlurmPipelineExecutor", 8),
        ("SlurmPipelineExecutor", 8),
        ("SlurmPipelineExecutor", 1),
        ("SlurmPipelineExecutor", 8),
        ("SlurmPipelineExecutor", 14),
        ("SlurmPipelineExecutor", 1),
        ("SlurmPipelineExecutor", 8),
    ]
    assert all(e.depends is before for before, e in zip(executors, executors[1:], strict=False))
    assert executors[0].cpus_per_task == 2 and executors[0].partition == "cpu"
    config.executor.options.pop("partition")
    with pytest.raises(ConfigError, match="slurm' needs partition"):
        make_executors(build_stages(config, tmp_path / "out"), config, tmp_path / "out" / "logs")


def test_parquet_output_and_folder_inputs(tmp_path):
    """Parquet in and out, a text folder with a declared language, code by extension; shards read Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from quintet.data.shards import load_index, tokenize_curated
    from quintet.data.tokenizer_training import train_tokenizer

    (tmp_path / "web").mkdir()
    pq.write_table(
        pa.Table.from_pylist([{"id": f"p{i}", "text": t, "lang": "en"} for i, t in enumerate(GOOD)]),
        tmp_path / "web" / "a.parquet",
    )
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "n1.txt").write_text("Kirjasto aukeaa aikaisin lauantaisin.", encoding="utf-8")
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "pkg" / "mod.py").write_text("def f(x):\n    return x + 1\n")
    (tmp_path / "src" / "notes.md").write_text("not code")
    inputs = (
        '[[inputs]]\nname = "web"\ntype = "parquet"\npath = "web"\n\n'
        '[[inputs]]\nname = "notes"\ntype = "text"\npath = "notes"\nlang = "fi"\n\n'
        '[[inputs]]\nname = "src"\ntype = "code"\npath = "src"\nextensions = [".py"]\n'
    )
    config = _config(tmp_path, inputs=inputs, extra='[output]\nformat = "parquet"\n')
    result = curate(config, tmp_path / "out")
    rows = {
        p.parent.name: pq.read_table(p).to_pylist() for p in (tmp_path / "out" / "curated").rglob("*.parquet")
    }
    assert sorted(rows) == ["code", "en", "fi"]
    assert (
        rows["code"][0]["id"] == "pkg/mod.py"
        and json.loads(rows["code"][0]["metadata"])["code_language"] == "python"
    )
    assert rows["fi"][0]["source"] == "notes" and len(rows["en"]) == 3
    assert result.stats["inputs"]["src"]["files"] == 1
    tokenizer = train_tokenizer(
        tmp_path / "out" / "curated", tmp_path / "tok", vocab_size=300, min_frequency=1
    )
    index = load_index(tokenize_curated(tmp_path / "out" / "curated", tokenizer, tmp_path / "shards"))
    assert sum(s["train"]["documents"] + s["heldout"]["documents"] for s in index["sources"].values()) == 5


def test_code_false_drops_code(tmp_path):
    _write_jsonl(
        tmp_path / "web" / "a.jsonl",
        [*_rows(GOOD[:2]), json.dumps({"id": "c", "text": "x = 1", "lang": "code"})],
    )
    result = curate(_config(tmp_path, extra="code = false"), tmp_path / "out")
    assert result.stats["steps"][0]["step"] == "code" and result.stats["steps"][0]["reasons"] == {"code": 1}
    assert result.stats["output"]["documents"] == 2
