"""The judge interface: `Judge.judge(prompts, responses)` gives one `Verdict` per response.

Every judge maps (prompt, response) pairs to `Verdict`s with one of the outcomes

  refusal     the response declines the request
  compliance  a non-empty response that does not refuse (an upper bound on harmful compliance: it
              does not check that the response actually contains harmful content)
  empty       nothing but whitespace was generated (counted, never judged)
  unknown     the judge could not decide (a generative judge's unparsable answer)

Implementations: `judges.py` (the project's judge), `judge_hf.py` (local Hugging Face models).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

OUTCOMES = ("refusal", "compliance", "empty", "unknown")


@dataclass(frozen=True)
class Verdict:
    outcome: str
    score: float | None = None  # p(refusal), where the judge has one
    by: str = ""  # what decided: "rules", "classifier", "empty", or an adapter's name

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"Verdict.outcome = {self.outcome!r}: valid: {', '.join(OUTCOMES)}")


class Judge(ABC):
    """Base class: `judge(prompts, responses)` handles empty responses and delegates the rest."""

    name: str = "judge"
    # False for safety classifiers (safe/unsafe): they cannot tell a refusal from a helpful answer, so
    # benign prompts (over-refusal) are judged by the project's judge instead.
    judges_benign: bool = True

    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Verdict]:
        if len(prompts) != len(responses):
            raise ValueError(
                f"{len(prompts)} prompts but {len(responses)} responses; give one response per prompt"
            )
        for i, r in enumerate(responses):
            if not isinstance(r, str):
                raise TypeError(f"response {i}: expected a string, got {type(r).__name__}")
        out: list[Verdict | None] = [
            Verdict("empty", by="empty") if not r.strip() else None for r in responses
        ]
        todo = [i for i, v in enumerate(out) if v is None]
        if todo:
            for i, v in zip(
                todo, self._judge([prompts[i] for i in todo], [responses[i] for i in todo]), strict=True
            ):
                out[i] = v
        return out  # type: ignore[return-value]

    @abstractmethod
    def _judge(self, prompts: list[str], responses: list[str]) -> list[Verdict]:
        """Verdicts for non-empty responses."""
