"""`make demo`, data part: demo corpus -> curation (statistics, scores) -> tokenizer -> token shards."""

from __future__ import annotations

import json
from pathlib import Path

from quintet.data.commands import DEMO_CONFIG


def run_data_demo(out_dir: Path, config: Path | None = None, verbose: bool = True) -> dict[str, Path]:
    """Demo corpus -> curation (statistics table, filter scores) -> tokenizer -> token shards, in `out_dir`.

    Returns the paths written: corpus, curated, stats_json, stats_markdown, stats_png, scores, tokenizer,
    shard_index.
    """
    from quintet.data.curation import curate
    from quintet.data.curation_scoring import score_curation
    from quintet.data.demo_corpus import generate_demo_corpus
    from quintet.data.mixture import MixtureSampler
    from quintet.data.shards import load_index, tokenize_curated
    from quintet.data.tokenizer_training import train_tokenizer
    from quintet.io import atomic_write_text

    def say(text: str) -> None:
        if verbose:
            print(text, flush=True)

    out = Path(out_dir)
    config = config or DEMO_CONFIG
    if not config.is_file():
        raise FileNotFoundError(f"{config}: the demo curation config is missing (it ships in the repository)")
    say(f"\n=== data: demo corpus -> {out / 'corpus'}")
    summary = generate_demo_corpus(out / "corpus")
    say(f"{summary['documents']} documents in 5 languages + code, labelled noise: {summary['labels']}")

    say(f"\n=== data: curation with {config} (datatrove, local executor)")
    result = curate(config, out / "curation", data_root=out / "corpus")
    say(result.stats_paths["markdown"].read_text())
    scores = score_curation(out / "corpus", out / "curation")
    scores_path = out / "curation" / "scores.json"
    atomic_write_text(scores_path, json.dumps(scores, indent=2) + "\n")
    for step, s in scores["filters"].items():
        found = f"{s['tp']}/{s['positives']} {s['target']}"
        say(f"{step:>9}: precision {s['precision']:.3f} recall {s['recall']:.3f} ({found})")
    pii, dedup = scores["pii"], scores["dedup"]
    say(f"      pii: precision {pii['precision']:.3f} recall {pii['recall']:.3f} ({pii['tp']} items)")
    exact, near = dedup["exact_duplicate"]["recall"], dedup["near_duplicate"]["recall"]
    say(f"    dedup: exact {exact:.3f}, near {near:.3f}, false removals {dedup['false_removal_rate']:.3%}")

    say(f"\n=== data: tokenizer -> {out / 'tokenizer'}")
    tokenizer = train_tokenizer(result.curated_dir, out / "tokenizer", vocab_size=4096)
    say(f"byte-level BPE, 4096 tokens, digits split: {tokenizer}")

    say(f"\n=== data: token shards -> {out / 'shards'}")
    index_path = tokenize_curated(result.curated_dir, tokenizer, out / "shards")
    index = load_index(index_path)
    for source, splits in index["sources"].items():
        train, heldout = splits["train"]["tokens"], splits["heldout"]["tokens"]
        say(f"{source:>5}: train {train:>7} tokens, heldout {heldout:>6}")
    weights = {s: 1.0 for s in index["sources"]}
    sampler = MixtureSampler(index_path, weights, seq_len=128, seed=0)
    sampler.batch(60)
    say(f"mixture sampler, equal weights, 60 windows of 128 tokens: {sampler.tokens_drawn()}")
    return {
        "corpus": out / "corpus",
        "curated": result.curated_dir,
        "stats_json": result.stats_paths["json"],
        "stats_markdown": result.stats_paths["markdown"],
        "stats_png": result.stats_paths["png"],
        "scores": scores_path,
        "tokenizer": tokenizer,
        "shard_index": index_path,
    }
