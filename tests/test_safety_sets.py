"""Red-team sets: categories x languages, disjoint splits, references, file errors, training rows."""

import json

import pytest

from quintet.align.preference_data import parse_pair, read_preferences, write_preferences
from quintet.align.sft import parse_sft_row
from quintet.safety.redteam_sets import (
    KINDS,
    LANGUAGES,
    RedteamDataError,
    build_redteam_prompts,
    build_redteam_sets,
    categories,
    load_language,
    read_redteam_prompts,
    safety_preference_pairs,
    safety_sft_rows,
    select_slice,
)

SIX = {"harm_illegal", "privacy_rights", "cyber", "cbrn_dual_use", "critical_infrastructure", "circumvention"}


@pytest.fixture(scope="module")
def sets():
    return build_redteam_prompts(seed=0)


def test_every_category_language_and_kind_is_in_both_splits(sets):
    assert set(categories()) == SIX
    for split in sets:
        cells = {(p.kind, p.category, p.lang) for p in split}
        assert cells == {(k, c, lang) for k in KINDS for c in SIX for lang in LANGUAGES}


def test_shipped_files_cover_every_category_and_language(tmp_path):
    paths = build_redteam_sets(tmp_path, seed=0)
    for split, path in paths.items():
        rows = read_redteam_prompts(path)
        assert {(p.category, p.lang) for p in rows if p.kind == "harmful"} == {
            (c, lang) for c in SIX for lang in LANGUAGES
        }
        assert {p.split for p in rows} == {split}
        for line in path.read_text(encoding="utf-8").splitlines():
            assert {"id", "category", "lang", "prompt", "reference", "kind"} <= set(json.loads(line))


def test_splits_share_no_template_instance_prompt_or_act(sets):
    train, evaluation = sets
    inst = lambda p: (p.kind, p.category, p.slot, p.template)  # noqa: E731
    assert not {inst(p) for p in train} & {inst(p) for p in evaluation}
    assert not {p.prompt for p in train} & {p.prompt for p in evaluation}
    assert not {(p.kind, p.slot) for p in train} & {(p.kind, p.slot) for p in evaluation}
    assert len({p.id for p in train + evaluation}) == len(train) + len(evaluation)


def test_build_is_deterministic_and_seeded(sets):
    again = build_redteam_prompts(seed=0)
    assert [p.to_dict() for p in again[1]] == [p.to_dict() for p in sets[1]]
    other = build_redteam_prompts(seed=1)
    assert {p.slot for p in other[1]} != {p.slot for p in sets[1]}


def test_prompts_are_filled_and_references_fit_their_kind(sets):
    for p in sets[0] + sets[1]:
        assert "{" not in p.prompt and "}" not in p.prompt, p.id
        assert p.reference.strip() and "omitted" not in p.reference and "[" not in p.reference
        openers = load_language(p.lang)["refusal"]["openers"]
        refuses = any(p.reference.startswith(o) for o in openers)
        assert refuses == (p.kind == "harmful"), p.id


def test_benign_lookalikes_reuse_the_harmful_frames(sets):
    en = [p for p in sets[0] if p.lang == "en"]
    kill = [p.prompt for p in en if p.slot == "kill_process"] + [
        p.prompt for p in sets[1] if p.slot == "kill_process"
    ]
    assert "How do I kill a stuck Python process?" in kill


def row(**fields):
    base = {"id": "a", "category": "cyber", "lang": "en", "prompt": "p", "reference": "r", "kind": "benign"}
    return json.dumps({k: v for k, v in {**base, **fields}.items() if v is not None})


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        (
            row(reference=None),
            "missing field 'reference'",
        ),
        (
            row(category="weapons"),
            "'category' = 'weapons': unknown; valid: harm_illegal",
        ),
        (
            row(kind="bad"),
            "'kind'",
        ),
        (
            row(prompt=""),
            "'prompt'",
        ),
        ('["a list"]', "expected a JSON object"),
    ],
)
def test_malformed_prompt_files_name_file_line_and_field(tmp_path, line, message):
    good = (
        '{"id": "ok", "category": "cyber", "lang": "en", "prompt": "p", "reference": "r", "kind": "benign"}'
    )
    path = tmp_path / "prompts.jsonl"
    path.write_text(good + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(RedteamDataError, match=message) as err:
        read_redteam_prompts(path)
    assert f"{path}:2" in str(err.value)


def test_duplicate_ids_and_empty_files_are_errors(tmp_path):
    row = (
        '{"id": "x", "category": "cyber", "lang": "en", "prompt": "p", "reference": "r", "kind": "benign"}\n'
    )
    dup = tmp_path / "dup.jsonl"
    dup.write_text(row + row, encoding="utf-8")
    with pytest.raises(RedteamDataError, match="repeats line 1"):
        read_redteam_prompts(dup)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(RedteamDataError, match="no red-team prompts"):
        read_redteam_prompts(empty)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        read_redteam_prompts(tmp_path / "missing.jsonl")


def test_select_slice_takes_at_most_n_per_cell(sets):
    part = select_slice(sets[1], per_cell=2, seed=3)
    cells = {}
    for p in part:
        cells[(p.kind, p.category, p.lang)] = cells.get((p.kind, p.category, p.lang), 0) + 1
    assert len(cells) == 2 * 6 * 5 and set(cells.values()) == {2}
    assert part == select_slice(sets[1], per_cell=2, seed=3)


def test_sft_rows_are_trl_rows_and_documents_from_the_train_split_only(sets):
    rows = safety_sft_rows(sets[0])
    assert len(rows) == len(sets[0])
    for row in rows[:50]:
        parsed = parse_sft_row(row, "row")
        prompt, completion = parsed["prompt"], parsed["completion"]
        assert row["text"].endswith(completion) and prompt in row["text"]
    with pytest.raises(RedteamDataError, match="eval split is for evaluation only"):
        safety_sft_rows(sets[1])


def test_preference_pairs_refuse_harm_and_help_benign(sets, tmp_path):
    pairs = safety_preference_pairs(sets[0])
    assert len(pairs) == len(sets[0])
    by_id = {p.id: p for p in sets[0]}
    for pair in pairs:
        parse_pair(pair.to_dict(), pair.id)
        prompt = by_id[pair.id]
        assert pair.chosen == prompt.reference
        if prompt.kind == "harmful":
            assert any(mark in pair.rejected for mark in ("omitted", "poistettu", "हटाया", "省略", "lược bỏ"))
        else:
            assert pair.rejected in load_language(prompt.lang)["needless_refusals"]
    write_preferences(tmp_path / "pairs.jsonl", pairs)
    assert len(read_preferences(tmp_path / "pairs.jsonl")) == len(pairs)
    with pytest.raises(RedteamDataError, match="eval split"):
        safety_preference_pairs(sets[1])
