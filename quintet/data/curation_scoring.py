"""How well a curation run did on a labelled corpus: precision and recall of each step against the labels
that `quintet.data.demo_corpus` wrote beside the documents."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quintet.data.demo_corpus import Label, load_labels, read_jsonl_rows

# Which labelled noise each filter step is meant to catch.
FILTER_TARGETS = {
    "numbers": "number_heavy",
    "language": "wrong_language",
    "quality": "low_quality",
    "toxicity": "toxic",
}
DEDUP_STEPS = ("exact_dedup", "minhash_dedup")


def _ratio(num: int, den: int) -> float:
    return num / den if den else 1.0


def score_curation(corpus_dir: str | Path, curation_dir: str | Path) -> dict[str, Any]:
    """Precision and recall of each step of a curation of the demo corpus, against its labels.

    Needs a JSONL curation with `write_dropped = true`. For a filter, the documents that reached it (those
    no earlier step dropped) are scored: precision = dropped and labelled / dropped, recall = dropped and
    labelled / labelled. PII is scored per item: a placeholder of the right kind in a document that had
    such an item is a true positive, one more than the document had a false positive, an item whose value
    is still in the text a false negative. Dedup is scored per group (an original and its copies): every
    group should keep exactly one document; a removal of a document from no group, or of a group's last
    one, is a false removal.
    """
    labels = load_labels(corpus_dir)
    curation = Path(curation_dir)
    order = [s["step"] for s in json.loads((curation / "stats.json").read_text())["steps"]]
    dropped_by: dict[str, str] = {}
    for step in order:
        folder = curation / "dropped" / step
        if folder.is_dir():
            for row in read_jsonl_rows(folder):
                dropped_by[row["id"]] = step
    kept = {row["id"]: row for row in read_jsonl_rows(curation / "curated")}
    dropped_rows = {row["id"]: row for s in DEDUP_STEPS for row in read_jsonl_rows(curation / "dropped" / s)}
    unknown = (set(kept) | set(dropped_by)) - set(labels)
    if unknown:
        raise ValueError(f"{curation}: documents not in the labels of {corpus_dir}: {sorted(unknown)[:5]}")

    report: dict[str, Any] = {"filters": {}, "documents": len(labels), "kept": len(kept)}
    alive = set(labels)
    for step in order:
        leaving = {i for i in alive if dropped_by.get(i) == step}
        if step in FILTER_TARGETS:
            positive = {i for i in alive if labels[i].noise == FILTER_TARGETS[step]}
            tp = len(leaving & positive)
            report["filters"][step] = {
                "target": FILTER_TARGETS[step],
                "reached": len(alive),
                "positives": len(positive),
                "dropped": len(leaving),
                "tp": tp,
                "fp": len(leaving - positive),
                "fn": len(positive - leaving),
                "precision": _ratio(tp, len(leaving)),
                "recall": _ratio(tp, len(positive)),
            }
        if step == "pii":
            texts = {i: kept[i]["text"] if i in kept else dropped_rows[i]["text"] for i in alive}
            report["pii"] = _score_pii(labels, texts)
        if step == DEDUP_STEPS[0] or (step == DEDUP_STEPS[1] and "dedup" not in report):
            report["dedup"] = _score_dedup(labels, alive, set(kept))
        alive -= leaving
    missing = alive - set(kept)
    if missing:
        raise ValueError(
            f"{curation}: {len(missing)} documents neither kept nor dropped, e.g. {sorted(missing)[:3]}"
        )
    return report


def _score_pii(labels: dict[str, Label], texts: dict[str, str]) -> dict[str, Any]:
    from quintet.data.curation.pii import PLACEHOLDERS

    by_kind = {k: {"tp": 0, "fp": 0, "fn": 0} for k in PLACEHOLDERS}
    for doc_id, text in texts.items():
        expected: dict[str, int] = {}
        for item in labels[doc_id].pii:
            expected[item["type"]] = expected.get(item["type"], 0) + 1
            if item["value"] in text:
                by_kind[item["type"]]["fn"] += 1
        for kind, placeholder in PLACEHOLDERS.items():
            found, want = text.count(placeholder), expected.get(kind, 0)
            by_kind[kind]["tp"] += min(found, want)
            by_kind[kind]["fp"] += max(0, found - want)
    for row in by_kind.values():
        row["precision"] = _ratio(row["tp"], row["tp"] + row["fp"])
        row["recall"] = _ratio(row["tp"], row["tp"] + row["fn"])
    tp, fp, fn = (sum(r[k] for r in by_kind.values()) for k in ("tp", "fp", "fn"))
    return {
        "by_kind": by_kind,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
    }


def _score_dedup(labels: dict[str, Label], reached: set[str], kept: set[str]) -> dict[str, Any]:
    groups: dict[str, set[str]] = {}
    kinds: dict[str, str] = {}
    for doc_id, label in labels.items():
        if label.noise in ("exact_duplicate", "near_duplicate"):
            groups.setdefault(label.duplicate_of, {label.duplicate_of}).add(doc_id)
            kinds[label.duplicate_of] = label.noise
    in_group = set().union(*groups.values()) if groups else set()
    result: dict[str, Any] = {}
    false_removed = sum(1 for i in reached - in_group if i not in kept)
    should_survive = len(reached - in_group)
    for kind in ("exact_duplicate", "near_duplicate"):
        expected = removed = groups_ok = n_groups = 0
        for orig, members in groups.items():
            if kinds[orig] != kind:
                continue
            present = members & reached
            if len(present) < 2:
                continue
            survivors = len(present & kept)
            n_groups += 1
            expected += len(present) - 1
            removed += min(len(present) - survivors, len(present) - 1)
            groups_ok += survivors == 1
            false_removed += survivors == 0
            should_survive += 1
        result[kind] = {
            "groups": n_groups,
            "copies": expected,
            "removed": removed,
            "recall": _ratio(removed, expected),
            "groups_with_one_survivor": groups_ok,
        }
    result["should_survive"] = should_survive
    result["false_removals"] = false_removed
    result["false_removal_rate"] = false_removed / should_survive if should_survive else 0.0
    return result
