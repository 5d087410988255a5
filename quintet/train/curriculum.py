"""Training curricula: named stages, each with a token budget, a data mixture and its own LR schedule.

A stage starts where the previous one ended (same weights, same optimizer moments); its learning rate
warms up from zero over `warmup` (a fraction of the stage's tokens), then follows `schedule` down to
`min_lr` at the stage's last token: `cosine`, `linear`, or `constant` (stays at `lr`).

Aurora-M (arXiv 2404.00399) continually pretrains in two stages: CAP, Continual Auxiliary Pretraining on
a broad multilingual web + code mixture (377B tokens), then CAT, Continual Alignment Tuning on a re-mixed,
higher-quality set with instruction and safety data and no number/symbol-heavy text (58B tokens).
`aurora_m_stages` splits any budget in the paper's proportions (377 : 58).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from quintet.errors import ConfigError
from quintet.lr_schedule import SCHEDULES, lr_at

AURORA_M_CAP_TOKENS, AURORA_M_CAT_TOKENS = 377e9, 58e9


@dataclass
class Stage:
    name: str
    tokens: int
    mixture: dict[str, float]
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup: float = 0.01
    schedule: str = "cosine"

    def __post_init__(self) -> None:
        where = f"stage {self.name!r}"
        if not isinstance(self.tokens, int) or isinstance(self.tokens, bool) or self.tokens <= 0:
            raise ConfigError(
                f"{where}: tokens = {self.tokens!r}: the token budget must be a positive integer"
            )
        if not isinstance(self.mixture, dict) or not self.mixture:
            raise ConfigError(f"{where}: mixture = {self.mixture!r}: give weights over named sources")
        for source, weight in self.mixture.items():
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight > 0:
                raise ConfigError(
                    f"{where}: mixture[{source!r}] = {weight!r}: weights must be positive numbers"
                )
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"{where}: schedule = {self.schedule!r}: valid: {', '.join(SCHEDULES)}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"{where}: warmup = {self.warmup!r}: a fraction of the stage in [0, 1)")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ConfigError(
                f"{where}: lr = {self.lr!r}, min_lr = {self.min_lr!r}: need 0 <= min_lr <= lr, lr > 0"
            )

    @property
    def weights(self) -> dict[str, float]:
        """The mixture normalised to sum to one."""
        total = sum(self.mixture.values())
        return {k: v / total for k, v in self.mixture.items()}

    def lr_at(self, tokens_done: int) -> float:
        """Learning rate after `tokens_done` tokens of this stage."""
        return lr_at(tokens_done / self.tokens, self.lr, self.min_lr, self.warmup, self.schedule)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "stage") -> Stage:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown}; valid: {sorted(known)}")
        if "name" not in data or "tokens" not in data or "mixture" not in data:
            raise ConfigError(f"{where}: needs name, tokens and mixture")
        return cls(**data)


@dataclass
class Curriculum:
    stages: list[Stage] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("curriculum: no stages; give at least one")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"curriculum: stage names must be unique, got {names}")

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.stages)

    def sources(self) -> set[str]:
        return {src for s in self.stages for src in s.mixture}


def aurora_m_stages(
    total_tokens: int,
    cap_mixture: dict[str, float],
    cat_mixture: dict[str, float],
    lr: float = 3e-4,
    min_lr: float = 3e-5,
    cat_lr: float | None = None,
) -> Curriculum:
    """CAP then CAT with Aurora-M's proportions of the budget (377B : 58B tokens)."""
    cap = round(total_tokens * AURORA_M_CAP_TOKENS / (AURORA_M_CAP_TOKENS + AURORA_M_CAT_TOKENS))
    return Curriculum(
        [
            Stage("CAP", cap, dict(cap_mixture), lr=lr, min_lr=min_lr, warmup=0.02, schedule="cosine"),
            Stage(
                "CAT",
                total_tokens - cap,
                dict(cat_mixture),
                lr=cat_lr or lr / 2,
                min_lr=min_lr,
                warmup=0.02,
                schedule="cosine",
            ),
        ]
    )
