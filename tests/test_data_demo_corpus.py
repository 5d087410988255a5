"""The demo corpus: deterministic, every document labelled, the injected noise really there."""

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from quintet.data.curation.pii import luhn_valid
from quintet.data.demo_corpus import (
    LANGUAGES,
    NOISE_TYPES,
    DemoCorpusConfig,
    generate_demo_corpus,
    load_labels,
)

SMALL = DemoCorpusConfig(
    clean=12,
    wrong_language=2,
    low_quality=4,
    toxic=2,
    pii=3,
    number_heavy=2,
    exact_duplicates=2,
    near_duplicates=3,
    text_files=2,
    code_files=4,
    code_duplicates=1,
)


def _documents(root: Path) -> dict[str, str]:
    docs = {}
    for path in (root / "web").glob("*.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            docs[row["id"]] = row["text"]
    for path in (root / "web").glob("*.parquet"):
        for row in pq.read_table(path).to_pylist():
            docs[row["id"]] = row["text"]
    for folder in ("text", "code"):
        for path in (root / folder).iterdir():
            docs[path.name] = path.read_text(encoding="utf-8")
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    summary = generate_demo_corpus(root, SMALL)
    return root, summary


def test_every_document_is_labelled_once(corpus):
    root, summary = corpus
    docs, labels = _documents(root), load_labels(root)
    assert set(docs) == set(labels)
    assert summary["documents"] == len(labels)
    counts = Counter(label.noise for label in labels.values())
    assert set(counts) <= set(NOISE_TYPES)
    assert counts["wrong_language"] == SMALL.wrong_language * len(LANGUAGES)
    assert counts["exact_duplicate"] == SMALL.exact_duplicates * len(LANGUAGES) + SMALL.code_duplicates
    assert counts["near_duplicate"] == SMALL.near_duplicates * len(LANGUAGES)
    assert all(label.lang not in LANGUAGES for label in labels.values() if label.noise == "wrong_language")


def test_injected_noise_is_in_the_text(corpus):
    root, _ = corpus
    docs, labels = _documents(root), load_labels(root)
    for doc_id, label in labels.items():
        text = docs[doc_id]
        if label.noise == "exact_duplicate":
            assert text == docs[label.duplicate_of]
        elif label.noise == "near_duplicate":
            assert text != docs[label.duplicate_of]
        elif label.noise == "toxic":
            assert label.toxic_terms and all(term in text for term in label.toxic_terms)
        elif label.noise == "pii":
            assert label.pii
            for item in label.pii:
                assert item["value"] in text
                if item["type"] == "card":
                    assert luhn_valid(item["value"].replace(" ", "").replace("-", ""))


def test_generation_is_deterministic(corpus, tmp_path):
    root, _ = corpus
    generate_demo_corpus(tmp_path, SMALL)
    for path in root.rglob("*"):
        if path.is_file() and path.name != "summary.json":
            assert (tmp_path / path.relative_to(root)).read_bytes() == path.read_bytes(), path


def test_config_is_validated():
    with pytest.raises(ValueError, match="clean = 3"):
        DemoCorpusConfig(clean=3)
    with pytest.raises(ValueError, match="toxic = -1"):
        DemoCorpusConfig(toxic=-1)
