"""End to end on the demo corpus: curation scored against the labels, statistics, tokenizer, shards, CLI.

One curation of the full demo corpus (593 documents; ~30 s on 2 cores) is shared by the module.
"""

import argparse
import json
from pathlib import Path

import pytest

from quintet.data.commands import DEMO_CONFIG, add_data_parser
from quintet.data.curation import curate
from quintet.data.curation_scoring import score_curation
from quintet.data.demo_corpus import generate_demo_corpus, load_labels
from quintet.data.mixture import MixtureSampler
from quintet.data.shards import iter_documents, load_index, tokenize_curated
from quintet.data.tokenizer_training import curated_texts, train_tokenizer
from quintet.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("data-e2e")
    generate_demo_corpus(root / "corpus")
    result = curate(DEMO_CONFIG, root / "curation", data_root=root / "corpus")
    scores = score_curation(root / "corpus", root / "curation")
    print("\nfilter scores:", json.dumps(scores["filters"], indent=1))
    print("pii:", json.dumps(scores["pii"]), "\ndedup:", json.dumps(scores["dedup"]))
    return root, result, scores


@pytest.mark.parametrize("step", ["numbers", "language", "quality", "toxicity"])
def test_filter_precision_and_recall(run, step):
    _, _, scores = run
    s = scores["filters"][step]
    assert s["positives"] >= 30
    assert s["precision"] >= 0.95 and s["recall"] >= 0.95, s


def test_pii_precision_and_recall(run):
    _, _, scores = run
    pii = scores["pii"]
    assert pii["tp"] >= 60
    assert pii["precision"] >= 0.95 and pii["recall"] >= 0.95, pii
    for kind, row in pii["by_kind"].items():
        assert row["tp"] > 0 and row["precision"] >= 0.95 and row["recall"] >= 0.95, (kind, row)


def test_dedup(run):
    _, _, scores = run
    dedup = scores["dedup"]
    exact, near = dedup["exact_duplicate"], dedup["near_duplicate"]
    assert exact["removed"] == exact["copies"] > 0 and exact["groups_with_one_survivor"] == exact["groups"]
    assert near["recall"] >= 0.9 and near["groups"] >= 30
    assert dedup["false_removal_rate"] < 0.01


def test_kept_documents_have_their_true_language(run):
    root, result, _ = run
    labels = load_labels(root / "corpus")
    rows = [
        json.loads(line) for p in result.curated_dir.rglob("*.jsonl") for line in p.read_text().splitlines()
    ]
    assert rows and all(row["lang"] == labels[row["id"]].lang for row in rows)
    assert all(
        path.parent.name == json.loads(path.read_text().splitlines()[0])["lang"]
        for path in result.curated_dir.rglob("*.jsonl")
    )
    assert {row["source"] for row in rows} == {"web", "web-parquet", "text", "code"}


def test_statistics_add_up(run):
    root, result, _ = run
    stats = json.loads(result.stats_paths["json"].read_text())
    assert sum(i["documents"] for i in stats["inputs"].values()) == len(load_labels(root / "corpus"))
    steps = stats["steps"]
    assert [s["step"] for s in steps] == [
        "numbers",
        "language",
        "quality",
        "toxicity",
        "pii",
        "exact_dedup",
        "minhash_dedup",
    ]
    for before, after in zip(steps, steps[1:], strict=False):
        assert after["total"] == before["kept"], (before["step"], after["step"])
    for s in steps:
        assert s["total"] == s["kept"] + s["dropped"]
        assert sum(s["reasons"].values()) in (0, s["dropped"])
        assert sum(row["dropped"] for row in s["by_language"].values()) == s["dropped"], s["step"]
    assert stats["output"]["documents"] == steps[-1]["kept"]
    for lang, row in stats["languages"].items():
        assert row["in"] == sum(v for k, v in row.items() if k != "in"), lang
    assert sum(r["in"] for r in stats["languages"].values()) == steps[0]["total"]
    assert result.stats_paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = result.stats_paths["markdown"].read_text()
    assert "| language | in | numbers | language | quality |" in table and "| other | 40 |" in table
    dropped = [
        json.loads(x)
        for x in (root / "curation" / "dropped" / "quality")
        .glob("*.jsonl")
        .__next__()
        .read_text()
        .splitlines()
    ]
    assert all(row["reason"].startswith("quality:") for row in dropped)


def test_tokenizer_and_shards_reproduce_the_curated_text(run, tmp_path):
    _, result, _ = run
    tokenizer = train_tokenizer(result.curated_dir, tmp_path / "tok", vocab_size=4096)
    index = load_index(tokenize_curated(result.curated_dir, tokenizer, tmp_path / "shards"))
    assert index["dtype"] == "uint16" and set(index["sources"]) == {"en", "fi", "hi", "ja", "vi", "code"}
    tok = load_tokenizer(tmp_path / "shards")
    decoded = sorted(
        tok.decode(doc.tolist())
        for source in index["sources"]
        for split in ("train", "heldout")
        for doc in iter_documents(index, source, split)
    )
    assert decoded == sorted(curated_texts(result.curated_dir))
    for source, splits in index["sources"].items():
        assert splits["heldout"]["documents"] >= 1, source

    weights = {"en": 0.25, "hi": 0.15, "ja": 0.1, "code": 0.5}
    sampler = MixtureSampler(tmp_path / "shards", weights, seq_len=64, seed=0)
    counts = dict.fromkeys(weights, 0)
    for _ in range(2000):
        tokens, source = next(sampler)
        counts[source] += len(tokens)
    total = sum(counts.values())
    for source, w in weights.items():
        assert abs(counts[source] / total - w) <= 0.02 * w, (source, counts[source] / total)


def _cli(argv):
    parser = argparse.ArgumentParser(prog="quintet")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_commands(run, tmp_path, capsys):
    root, result, _ = run
    assert _cli(["data", "curate", str(DEMO_CONFIG), "--out", str(root / "curation"), "--report-only"]) == 0
    assert "| quality | 523 |" in capsys.readouterr().out
    assert (
        _cli(
            [
                "data",
                "tokenizer",
                "--data",
                str(result.curated_dir),
                "--out",
                str(tmp_path / "tok"),
                "--vocab-size",
                "1024",
            ]
        )
        == 0
    )
    assert (tmp_path / "tok" / "tokenizer_config.json").is_file()
    assert (
        _cli(
            [
                "data",
                "tokenize",
                "--data",
                str(result.curated_dir),
                "--tokenizer",
                str(tmp_path / "tok"),
                "--out",
                str(tmp_path / "shards"),
                "--sources",
                "en",
                "code",
            ]
        )
        == 0
    )
    assert set(load_index(tmp_path / "shards")["sources"]) == {"en", "code"}
    assert "wrote" in capsys.readouterr().out
    assert _cli(["data", "demo-corpus", "--out", str(tmp_path / "corpus"), "--seed", "1"]) == 0
    assert Path(tmp_path / "corpus" / "labels.jsonl").is_file()


@pytest.mark.slow
def test_run_data_demo(tmp_path):
    from quintet.demo.data import run_data_demo

    paths = run_data_demo(tmp_path, verbose=False)
    assert set(paths) == {
        "corpus",
        "curated",
        "stats_json",
        "stats_markdown",
        "stats_png",
        "scores",
        "tokenizer",
        "shard_index",
    }
    assert all(Path(p).exists() for p in paths.values())
    scores = json.loads(paths["scores"].read_text())
    assert all(s["precision"] >= 0.95 and s["recall"] >= 0.95 for s in scores["filters"].values())
