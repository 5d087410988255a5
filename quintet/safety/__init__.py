"""Red-teaming by harm category (Aurora-M): prompt sets, judges, evaluation and reports.

- `redteam_sets`: the project's template-built sets (six categories x five languages, benign look-alikes,
  act-disjoint train/eval splits), `build_redteam_sets`, `read_redteam_prompts`, `safety_sft_rows`,
  `safety_preference_pairs`, `build_safety_data`.
- `judges`: the `Judge` interface, `Verdict`, `RuleJudge`, `ClassifierJudge`, `ProjectJudge`, `load_judge`,
  `judge_quality`; `judge_classifier`: the shipped n-gram classifier; `judge_hf`: local Hugging Face judges.
- `redteam_eval`: `evaluate_redteam`; `report`: JSON, Markdown, PNG and terminal tables.
- `commands`: `add_safety_parser` (`quintet safety build`).
"""
