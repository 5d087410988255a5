"""Evaluation: perplexity and bits-per-byte per language, multiple-choice log-likelihood tasks, and an
lm-evaluation-harness model adapter (`quintet`).

- `perplexity`: `perplexity_by_language`, `text_nll`, `rolling_windows`, `evaluate_perplexity`, readers for
  held-out token shards and JSONL text.
- `multiple_choice`: `read_mc_task`, `loglikelihoods`, `evaluate_mc`, `evaluate_mc_task`,
  `write_lm_eval_task`.
- `lm_eval_adapter` (needs `lm_eval`): `QuintetLM`, registered as `quintet`; `python -m
  quintet.eval.lm_eval_adapter` is lm-eval's command line with it registered.
- `commands`: `add_eval_parser` (`quintet eval redteam | perplexity | mc | lm-eval`).
"""
