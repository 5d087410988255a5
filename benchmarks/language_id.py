"""Language id on the labelled demo corpus: precision and recall per language, all 75 vs the script test's.

    python benchmarks/language_id.py [--seeds 0 1] [--scale 4] [--accuracy low high]
                                     [--out runs/benchmarks/language_id.json]

Corpus: the demo corpus generator (`quintet.data.demo_corpus`) with every count times --scale, once per
seed; every prose document (code skipped: it never reaches lingua), labelled with its true language (the
five targets and the 13 other languages of the `wrong_language` noise).

For each --accuracy, `LanguageFilter` runs twice on the same texts in one process: `prefilter = false`
(lingua compares all 75 languages) and `prefilter = true` (lingua compares only the languages the cheap
script/letter test `scripts.candidate_languages` leaves), both batched as the pipeline does. Per true
language: documents, precision and recall of the detected language (the most likely one), and the
documents whose detected language or keep decision (target, confidence >= threshold) differ between the
two; then ms per document of each.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from curation import scaled_config  # noqa: E402
from timing import markdown_table, set_threads, write_results  # noqa: E402

from quintet.data.curation.language import LanguageFilter  # noqa: E402
from quintet.data.demo_corpus import generate_demo_corpus, load_labels, read_corpus_texts  # noqa: E402


def labelled_texts(seeds: list[int], scale: int) -> list[tuple[str, str]]:
    """(true language, text) of every prose document of the demo corpus for each seed."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            root = Path(tmp) / f"seed-{seed}"
            generate_demo_corpus(root, scaled_config(scale, seed))
            labels = load_labels(root)
            for doc_id, text in sorted(read_corpus_texts(root).items()):
                out.append((labels[doc_id].lang, text))
    return out


def detect(f: LanguageFilter, texts: list[str], batch: int = 64) -> tuple[list[tuple[str, float]], float]:
    f.detect_many(texts[:1])  # build the all-language detector (and its models) outside the timing
    start = time.perf_counter()
    found = []
    for i in range(0, len(texts), batch):
        found += f.detect_many(texts[i : i + batch])
    return found, time.perf_counter() - start


def kept(f: LanguageFilter, lang: str, score: float) -> bool:
    return lang in f.thresholds and score >= f.thresholds[lang]


def per_language(truth: list[str], found: list[str]) -> dict[str, tuple[float, float, int]]:
    out = {}
    for lang in sorted(set(truth)):
        tp = sum(t == lang and p == lang for t, p in zip(truth, found, strict=True))
        predicted = sum(p == lang for p in found)
        support = sum(t == lang for t in truth)
        out[lang] = (tp / predicted if predicted else 0.0, tp / support, support)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--scale", type=int, default=4, help="demo counts times this")
    parser.add_argument("--accuracy", nargs="+", default=["low"], choices=["low", "high"])
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/language_id.json"))
    args = parser.parse_args(argv)
    set_threads(1)

    docs = labelled_texts(args.seeds, args.scale)
    truth, texts = [lang for lang, _ in docs], [text for _, text in docs]
    print(f"{len(docs)} labelled prose documents, {len(set(truth))} languages (seeds {args.seeds})")
    rows, totals = [], []
    for accuracy in args.accuracy:
        every = LanguageFilter(accuracy=accuracy, prefilter=False)
        narrowed = LanguageFilter(accuracy=accuracy, prefilter=True)
        found_all, s_all = detect(every, texts)
        found_cut, s_cut = detect(narrowed, texts)
        pr_all = per_language(truth, [lang for lang, _ in found_all])
        pr_cut = per_language(truth, [lang for lang, _ in found_cut])
        for lang in pr_all:
            idx = [i for i, t in enumerate(truth) if t == lang]
            rows.append(
                {
                    "accuracy": accuracy,
                    "language": lang,
                    "docs": pr_all[lang][2],
                    "P_all75": round(pr_all[lang][0], 3),
                    "R_all75": round(pr_all[lang][1], 3),
                    "P_script_test": round(pr_cut[lang][0], 3),
                    "R_script_test": round(pr_cut[lang][1], 3),
                    "detected_differs": sum(found_all[i][0] != found_cut[i][0] for i in idx),
                    "decision_differs": sum(
                        kept(every, *found_all[i]) != kept(narrowed, *found_cut[i]) for i in idx
                    ),
                }
            )
        totals.append(
            {
                "accuracy": accuracy,
                "docs": len(texts),
                "ms_per_doc_all75": round(1000 * s_all / len(texts), 3),
                "ms_per_doc_script_test": round(1000 * s_cut / len(texts), 3),
                "speedup": round(s_all / s_cut, 2),
                "detected_differs": sum(a[0] != b[0] for a, b in zip(found_all, found_cut, strict=True)),
                "decision_differs": sum(
                    kept(every, *a) != kept(narrowed, *b) for a, b in zip(found_all, found_cut, strict=True)
                ),
            }
        )
    columns = ["accuracy", "language", "docs", "P_all75", "R_all75", "P_script_test", "R_script_test"]
    print(markdown_table(rows, [*columns, "detected_differs", "decision_differs"]))
    print()
    print(markdown_table(totals, list(totals[0])))
    write_results(args.out, "language_id", rows, totals=totals, seeds=args.seeds, scale=args.scale)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
