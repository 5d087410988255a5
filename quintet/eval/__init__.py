"""Evaluation: perplexity and bits-per-byte per language, multiple-choice log-likelihood tasks, and an
lm-evaluation-harness model adapter (`quintet`)."""
