"""Red-team prompt sets written by the project: six harm categories x five languages, from templates.

The sets follow Aurora-M's template-built part of the "Biden-Harris Redteam" set: a prompt is a request
frame (`templates`, e.g. "Tell me how to {act}.") filled with a slot value (`harmful`: an abstract harmful
act such as "break into a neighbour's e-mail account"); every harmful prompt's reference answer is a
refusal with an explanation (why, per category) and a safe alternative. Benign look-alikes ("kill a stuck
Python process") use the same frames and carry a helpful reference answer: they measure over-refusal.

Resources (`resources/redteam/<lang>.json`, one file per language so a translator edits one file) share
their category, act and template ids across languages. A template instance is (category, act, template):
the split assigns whole acts to train or eval, so no instance (in any language) is in both splits, and
eval acts are never seen in training. Rows follow DESIGN.md: `id`, `category`, `lang`, `prompt`,
`reference`, `kind`, plus the optional `split`, `template`, `slot`.

Prompts name a harm without instructions; references never contain any. Compliance examples (the
`rejected` side of preference pairs) are placeholders with the details omitted.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from quintet.align.preference_data import PreferencePair
from quintet.chat import PLAIN_TEMPLATE, render_template
from quintet.io import atomic_path, check_row, read_records

LANGUAGES = ("en", "fi", "hi", "ja", "vi")
KINDS = ("harmful", "benign")
REQUIRED_FIELDS = ("id", "category", "lang", "prompt", "reference", "kind")
OPTIONAL_FIELDS = ("split", "template", "slot")
SPLITS = ("train", "eval")
TRAIN_FILE, EVAL_FILE = "redteam-train.jsonl", "redteam-eval.jsonl"


class RedteamDataError(ValueError):
    """A red-team prompt file or resource has a row that cannot be used."""


def _resource_dir() -> Path:
    return Path(str(resources.files("quintet.safety") / "resources"))


@functools.lru_cache(maxsize=1)
def load_categories() -> dict[str, dict[str, str]]:
    """The six categories (id -> name, description), in report order."""
    return json.loads((_resource_dir() / "categories.json").read_text(encoding="utf-8"))


def categories() -> tuple[str, ...]:
    return tuple(load_categories())


@functools.cache
def load_language(lang: str) -> dict[str, Any]:
    """One language's templates, slot lists, reference pieces; checked against English's ids."""
    path = _resource_dir() / "redteam" / f"{lang}.json"
    if not path.is_file():
        raise RedteamDataError(f"{path}: no red-team resources for language {lang!r}; have {LANGUAGES}")
    data = json.loads(path.read_text(encoding="utf-8"))
    _check_language(path, data)
    return data


def _check_language(path: Path, data: dict[str, Any]) -> None:
    cats = set(categories())
    for section in ("harmful", "benign"):
        if set(data[section]) != cats:
            raise RedteamDataError(
                f"{path}: section {section!r} has categories {sorted(data[section])}; expected {sorted(cats)}"
            )
    for part in ("reasons", "alternatives"):
        if set(data["refusal"][part]) != cats:
            raise RedteamDataError(f"{path}: refusal.{part} must have one entry per category {sorted(cats)}")
    if data["lang"] != "en":
        en = load_language("en")
        if set(data["templates"]) != set(en["templates"]):
            raise RedteamDataError(f"{path}: template ids {sorted(data['templates'])} differ from en.json's")
        for section in ("harmful", "benign"):
            for cat in cats:
                if set(data[section][cat]) != set(en[section][cat]):
                    raise RedteamDataError(
                        f"{path}: {section}.{cat} has ids {sorted(data[section][cat])}; en.json has "
                        f"{sorted(en[section][cat])}"
                    )
    for cat, acts in data["harmful"].items():
        for act_id, act in acts.items():
            _forms(data, act, f"{path}: harmful.{cat}.{act_id}")
    for cat, items in data["benign"].items():
        for item_id, item in items.items():
            _forms(data, item["act"], f"{path}: benign.{cat}.{item_id}")


def _forms(data: dict[str, Any], act: str, where: str) -> dict[str, str]:
    """The slot's grammatical forms: `act` plus derived ones (Hindi's oblique infinitive -ना -> -ने)."""
    forms = {"act": act}
    for name, rule in data.get("forms", {}).items():
        old, new = rule["replace_suffix"]
        if not act.endswith(old):
            raise RedteamDataError(f"{where}: {act!r} must end with {old!r} to form {name}")
        forms[name] = act[: -len(old)] + new
    return forms


def _fill(text: str, forms: dict[str, str]) -> str:
    return text.format(**forms)


def _pick(options: Sequence[str], *key: str) -> str:
    """A stable choice by a hash of `key` (the same in every language and Python process)."""
    digest = hashlib.sha256("\x1f".join(key).encode("utf-8")).digest()
    return options[int.from_bytes(digest[:8], "big") % len(options)]


@dataclass(frozen=True)
class RedteamPrompt:
    id: str
    category: str
    lang: str
    prompt: str
    reference: str
    kind: str
    split: str | None = None
    template: str | None = None
    slot: str | None = None

    def to_dict(self) -> dict[str, str]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def refusal_reference(lang: str, category: str, *key: str) -> str:
    """A refusal with an explanation and a safe alternative, in `lang`, for `category`."""
    ref = load_language(lang)["refusal"]
    return " ".join(
        (_pick(ref["openers"], "opener", *key), ref["reasons"][category], ref["alternatives"][category])
    )


def split_acts(seed: int = 0, eval_fraction: float = 0.25) -> dict[tuple[str, str, str], str]:
    """(kind, category, act id) -> "train" or "eval": per category, a seeded share of acts goes to eval."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction = {eval_fraction!r}: must be in (0, 1)")
    en = load_language("en")
    out = {}
    for kind in KINDS:
        for cat in categories():
            ids = sorted(en[kind][cat])
            random.Random(f"{seed}:{kind}:{cat}").shuffle(ids)
            n_eval = max(1, round(len(ids) * eval_fraction))
            for i, act_id in enumerate(ids):
                out[(kind, cat, act_id)] = "eval" if i < n_eval else "train"
    return out


def build_redteam_prompts(
    seed: int = 0, eval_fraction: float = 0.25, languages: Sequence[str] = LANGUAGES
) -> tuple[list[RedteamPrompt], list[RedteamPrompt]]:
    """(train, eval) prompts: every template x act x language, split by act (deterministic in `seed`)."""
    split = split_acts(seed, eval_fraction)
    out: dict[str, list[RedteamPrompt]] = {"train": [], "eval": []}
    for kind in KINDS:
        for cat in categories():
            for lang in languages:
                data = load_language(lang)
                for act_id, entry in data[kind][cat].items():
                    act = entry if kind == "harmful" else entry["act"]
                    forms = _forms(data, act, f"{lang}:{act_id}")
                    s = split[(kind, cat, act_id)]
                    for tid, template in data["templates"].items():
                        reference = (
                            refusal_reference(lang, cat, act_id, tid)
                            if kind == "harmful"
                            else entry["answer"]
                        )
                        out[s].append(
                            RedteamPrompt(
                                id=f"{kind}-{cat}-{act_id}-{tid}-{lang}",
                                category=cat,
                                lang=lang,
                                prompt=_fill(template, forms),
                                reference=reference,
                                kind=kind,
                                split=s,
                                template=tid,
                                slot=act_id,
                            )
                        )
    return out["train"], out["eval"]


def write_redteam_prompts(path: str | os.PathLike, prompts: Iterable[RedteamPrompt]) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps(p.to_dict(), ensure_ascii=False) + "\n")
    return path


def build_redteam_sets(
    out_dir: str | os.PathLike, seed: int = 0, eval_fraction: float = 0.25
) -> dict[str, Path]:
    """Write `redteam-train.jsonl` and `redteam-eval.jsonl` under `out_dir`; returns {split: path}."""
    train, evaluation = build_redteam_prompts(seed, eval_fraction)
    out = Path(out_dir)
    return {
        "train": write_redteam_prompts(out / TRAIN_FILE, train),
        "eval": write_redteam_prompts(out / EVAL_FILE, evaluation),
    }


SFT_FILE, PAIRS_FILE = "safety-sft.jsonl", "safety-pairs.jsonl"


def build_safety_data(
    out_dir: str | os.PathLike, seed: int = 0, eval_fraction: float = 0.25
) -> dict[str, Path]:
    """The red-team sets plus the train split's training data: SFT/CAT rows and sDPO preference pairs.

    Writes redteam-train.jsonl, redteam-eval.jsonl, safety-sft.jsonl, safety-pairs.jsonl; returns their paths.
    """
    from quintet.align.preference_data import write_preferences

    paths = build_redteam_sets(out_dir, seed, eval_fraction)
    train = read_redteam_prompts(paths["train"])
    out = Path(out_dir)
    with atomic_path(out / SFT_FILE) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in safety_sft_rows(train):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    write_preferences(out / PAIRS_FILE, safety_preference_pairs(train))
    return {**paths, "sft": out / SFT_FILE, "pairs": out / PAIRS_FILE}


def parse_redteam_row(row: Any, where: str) -> RedteamPrompt:
    """Validate one row; errors name `where` (file:line), the field, the value and what is valid."""
    row = check_row(
        row, where, RedteamDataError, required=REQUIRED_FIELDS, fields=REQUIRED_FIELDS + OPTIONAL_FIELDS
    )
    for name in REQUIRED_FIELDS:
        if not isinstance(row[name], str) or not row[name].strip():
            raise RedteamDataError(f"{where}: field {name!r} = {row[name]!r}: must be a non-empty string")
    if row["category"] not in categories():
        raise RedteamDataError(
            f"{where}: field 'category' = {row['category']!r}: unknown; valid: {', '.join(categories())}"
        )
    if row["kind"] not in KINDS:
        raise RedteamDataError(f"{where}: field 'kind' = {row['kind']!r}: valid: {', '.join(KINDS)}")
    if "split" in row and row["split"] not in SPLITS:
        raise RedteamDataError(f"{where}: field 'split' = {row['split']!r}: valid: {', '.join(SPLITS)}")
    return RedteamPrompt(**row)


def read_redteam_prompts(path: str | os.PathLike) -> list[RedteamPrompt]:
    """All rows of a red-team JSONL file; the first bad line raises an error naming the file and line."""
    return read_records(
        path, parse_redteam_row, RedteamDataError, "red-team prompt", "red-team prompts", unique="id"
    )


def select_slice(prompts: Sequence[RedteamPrompt], per_cell: int, seed: int = 0) -> list[RedteamPrompt]:
    """At most `per_cell` prompts per (kind, category, lang) cell, a seeded choice, in input order."""
    if not isinstance(per_cell, int) or per_cell < 1:
        raise ValueError(f"per_cell = {per_cell!r}: must be a positive integer")
    cells: dict[tuple[str, str, str], list[int]] = {}
    for i, p in enumerate(prompts):
        cells.setdefault((p.kind, p.category, p.lang), []).append(i)
    keep: set[int] = set()
    for key, idx in cells.items():
        rng = random.Random(f"{seed}:{':'.join(key)}")
        keep.update(rng.sample(idx, min(per_cell, len(idx))))
    return [p for i, p in enumerate(prompts) if i in keep]


def _training_split_only(prompts: Sequence[RedteamPrompt], what: str) -> None:
    bad = [p.id for p in prompts if p.split == "eval"]
    if bad:
        raise RedteamDataError(
            f"{what}: {len(bad)} prompt(s) come from the eval split (first: {bad[0]!r}); "
            f"the eval split is for evaluation only: give the train split ({TRAIN_FILE})"
        )


def compliance_placeholder(lang: str, act: str, *key: str) -> str:
    """A non-operational stand-in for compliance: it agrees to the request and omits every detail."""
    data = load_language(lang)
    return _fill(_pick(data["compliance_placeholders"], "comply", *key), _forms(data, act, lang))


def needless_refusal(lang: str, *key: str) -> str:
    return _pick(load_language(lang)["needless_refusals"], "needless", *key)


def _act_of(p: RedteamPrompt) -> str:
    if p.slot is None or p.lang not in LANGUAGES:
        raise RedteamDataError(
            f"prompt {p.id!r}: safety pairs need the project's own rows (with 'slot' and a language in "
            f"{LANGUAGES}); build them with build_redteam_sets"
        )
    entry = load_language(p.lang)[p.kind][p.category].get(p.slot)
    if entry is None:
        raise RedteamDataError(
            f"prompt {p.id!r}: field 'slot' = {p.slot!r} is not a {p.kind} act of {p.category}"
        )
    return entry if p.kind == "harmful" else entry["act"]


def safety_sft_rows(prompts: Sequence[RedteamPrompt]) -> list[dict[str, str]]:
    """Safety instructions for the CAT stage's mix and for SFT: the prompt and its reference answer.

    Each row is both a TRL prompt/completion row and a document (`text` = the plain chat template
    rendering, `id`, `lang`, `source`), so it feeds the SFT trainer and the pretraining mixture alike.
    """
    _training_split_only(prompts, "safety_sft_rows")
    return [
        {
            "id": f"safety-{p.id}",
            "prompt": p.prompt,
            "completion": p.reference,
            "text": render_template(
                PLAIN_TEMPLATE,
                [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": p.reference}],
                add_generation_prompt=False,
            ),
            "lang": p.lang,
            "source": f"quintet-redteam-{p.kind}",
            "category": p.category,
            "kind": p.kind,
        }
        for p in prompts
    ]


def safety_preference_pairs(prompts: Sequence[RedteamPrompt]) -> list[PreferencePair]:
    """sDPO/DPO pairs: harmful -> (refusal with explanation, compliance placeholder); benign -> (helpful
    answer, needless refusal), so preference training does not teach over-refusal.

    `source` is "redteam-harmful" or "redteam-benign" (sDPO can split steps by it), `task` the category.
    """
    _training_split_only(prompts, "safety_preference_pairs")
    pairs = []
    for p in prompts:
        key = (p.slot or "", p.template or "")
        if p.kind == "harmful":
            rejected = compliance_placeholder(p.lang, _act_of(p), *key)
        else:
            _act_of(p)
            rejected = needless_refusal(p.lang, *key)
        pairs.append(
            PreferencePair(
                prompt=p.prompt,
                chosen=p.reference,
                rejected=rejected,
                split="train",
                source=f"redteam-{p.kind}",
                lang=p.lang,
                task=p.category,
                id=p.id,
            )
        )
    return pairs
