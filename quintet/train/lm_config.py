"""Configuration of a language-model training run, read from one TOML file.

[model]
preset = "jamba-tiny"            # a fresh model from a preset, or
init_from = "runs/base"          # a model folder to continue from (continual pretraining)
vocab_size = 8192                # optional: extend the vocabulary (a new tokenizer with more ids)

[data]
shards = "runs/data/shards"      # token shards written by `quintet data tokenize`
seq_len = 256

[optim]
micro_batch_size = 8             # sequences per process per micro-step
grad_accum = 1
weight_decay = 0.1
grad_clip = 1.0

[run]
out_dir = "runs/train"
seed = 0
checkpoint_every = 50            # steps; a checkpoint is also written at every stage's end
precision = "auto"               # "fp32", "bf16" (autocast), or "auto": bf16 where the hardware has it
activation_checkpointing = false
parallel = "ddp"                 # under torchrun: "ddp" or "fsdp" (FSDP2 fully_shard)

[[stages]]                       # or: curriculum = "aurora-m" with total_tokens, cap_mixture, cat_mixture
name = "CAP"
tokens = 200000
mixture = { en = 1.0, fi = 1.0, code = 0.5 }
lr = 1e-3
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from quintet.config import ConfigFile, read_config
from quintet.errors import ConfigError
from quintet.train.curriculum import Curriculum, Stage, aurora_m_stages

PRECISIONS = ("auto", "fp32", "bf16")
PARALLEL = ("ddp", "fsdp")


@dataclass
class ModelSection:
    preset: str | None = None
    init_from: str | None = None
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        if (self.preset is None) == (self.init_from is None):
            raise ConfigError("[model]: give exactly one of preset (a fresh model) or init_from (a folder)")
        if self.vocab_size is not None and (not isinstance(self.vocab_size, int) or self.vocab_size < 1):
            raise ConfigError(f"[model].vocab_size = {self.vocab_size!r}: must be a positive integer")


@dataclass
class DataSection:
    shards: str | list[str] = ""  # one shard folder, or several made with the same tokenizer
    seq_len: int = 256

    def __post_init__(self) -> None:
        if isinstance(self.shards, list) and not all(isinstance(x, str) and x for x in self.shards):
            raise ConfigError(f"[data].shards = {self.shards!r}: a folder or a list of folders")
        if not self.shards:
            raise ConfigError("[data].shards: missing; the folder of token shards to train on")
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ConfigError(f"[data].seq_len = {self.seq_len!r}: must be an integer >= 2")


@dataclass
class OptimSection:
    micro_batch_size: int = 8
    grad_accum: int = 1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "grad_accum"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"[optim].{name} = {value!r}: must be a positive integer")
        if self.grad_clip < 0:
            raise ConfigError(f"[optim].grad_clip = {self.grad_clip!r}: must be >= 0 (0 turns it off)")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"[optim].{name} = {getattr(self, name)!r}: must be in [0, 1)")


@dataclass
class RunSection:
    out_dir: str = "runs/train"
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 1
    precision: str = "auto"
    activation_checkpointing: bool = False
    parallel: str = "ddp"
    heldout_tokens: int = 4096  # per language, for the held-out loss at each stage's end
    max_steps: int | None = None  # stop early (for tests and smoke runs); resume continues

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"[run].precision = {self.precision!r}: valid: {', '.join(PRECISIONS)}")
        if self.parallel not in PARALLEL:
            raise ConfigError(f"[run].parallel = {self.parallel!r}: valid: {', '.join(PARALLEL)}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 1:
            raise ConfigError(
                f"[run].checkpoint_every = {self.checkpoint_every!r}: must be a positive integer"
            )


@dataclass
class TrainConfig:
    model: ModelSection
    data: DataSection
    curriculum: Curriculum
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], source: str = "config", config: ConfigFile | None = None
    ) -> TrainConfig:
        config = config or ConfigFile(data, source)
        config.check_sections(("model", "data", "optim", "run", "stages", "curriculum"))
        sections = {
            name: config.section(name, section_cls)
            for name, section_cls in (
                ("model", ModelSection),
                ("data", DataSection),
                ("optim", OptimSection),
                ("run", RunSection),
            )
        }
        try:
            curriculum = _curriculum(data, config)
        except (ConfigError, TypeError) as err:
            if config.path and str(err).startswith(f"{config.name}:"):  # already names the file and line
                raise
            section = "stages" if "stages" in data else "curriculum"
            raise config.error(str(err), section=section) from None
        return cls(curriculum=curriculum, **sections)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TrainConfig:
        config = read_config(path, "training config")
        return cls.from_dict(config.data, source=str(path), config=config)

    @property
    def global_batch_size(self) -> int:
        """Sequences per optimizer step over all processes is this times the world size."""
        return self.optim.micro_batch_size * self.optim.grad_accum


def _curriculum(data: dict[str, Any], config: ConfigFile) -> Curriculum:
    """The stages, each value type-checked at its line (`ConfigFile.check_types`)."""
    if "stages" in data and "curriculum" in data:
        raise ConfigError("give [[stages]] or [curriculum], not both")
    if "stages" in data:
        if not isinstance(data["stages"], list):
            raise ConfigError(
                "[[stages]]: expected a list of tables (each [[stages]] with name, tokens, mixture)"
            )
        stages = []
        for i, spec in enumerate(data["stages"]):
            where = f"[[stages]] #{i + 1}"
            if not isinstance(spec, dict):
                raise ConfigError(f"{where}: expected a table with name, tokens and mixture")
            config.check_types(spec, Stage, where, section="stages", index=i)
            stages.append(Stage.from_dict(spec, where=where))
        return Curriculum(stages)
    spec = dict(data.get("curriculum", {}))
    config.check_types(spec, aurora_m_stages, "[curriculum]", section="curriculum")
    preset = spec.pop("preset", None)
    if preset != "aurora-m":
        raise ConfigError(
            f"[curriculum].preset = {preset!r}: valid: 'aurora-m' (or list the stages as [[stages]])"
        )
    try:
        return aurora_m_stages(**spec)
    except TypeError as err:
        raise ConfigError(
            f"[curriculum]: {err}; fields: total_tokens, cap_mixture, cat_mixture, lr, min_lr, cat_lr"
        ) from None
