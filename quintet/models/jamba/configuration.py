"""Jamba configuration: the public contract of the model.

Field names and defaults are those of Hugging Face `transformers`' `JambaConfig` (the Jamba-v0.1 shape,
arXiv 2403.19887), so a `config.json` written by either library is read by the other.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quintet.config import read_config, suggest
from quintet.errors import ConfigError
from quintet.io import atomic_write_text

# Keys that `transformers` writes into every config.json (or wrote in earlier versions) and that carry no
# architecture: accepted on read and dropped.
_HF_METADATA_KEYS = frozenset(
    {
        "architectures",
        "auto_map",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "_name_or_path",
        "return_dict",
        "output_hidden_states",
        "output_attentions",
        "torchscript",
        "use_bfloat16",
        "tf_legacy_loss",
        "pruned_heads",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "is_decoder",
        "cross_attention_hidden_size",
        "add_cross_attention",
        "tie_encoder_decoder",
        "finetuning_task",
        "id2label",
        "label2id",
        "tokenizer_class",
        "prefix",
        "sep_token_id",
        "decoder_start_token_id",
        "task_specific_params",
        "problem_type",
        "max_length",
        "min_length",
        "do_sample",
        "early_stopping",
        "num_beams",
        "num_beam_groups",
        "diversity_penalty",
        "temperature",
        "top_k",
        "top_p",
        "typical_p",
        "repetition_penalty",
        "length_penalty",
        "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size",
        "bad_words_ids",
        "num_return_sequences",
        "output_scores",
        "return_dict_in_generate",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "remove_invalid_values",
        "exponential_decay_length_penalty",
        "suppress_tokens",
        "begin_suppress_tokens",
        # Jamba-v0.1's own legacy keys (its hub config.json carries them).
        "n_ctx",
        "num_logits_to_keep",
        "sliding_window",
        "calc_logits_for_entire_prompt",
    }
)
_ALIASES = {"num_local_experts": "num_experts"}


@dataclass
class JambaConfig:
    """Shape and behaviour of a Jamba hybrid Transformer-Mamba-MoE language model.

    Layer ``i`` is attention iff ``i % attn_layer_period == attn_layer_offset`` (else Mamba) and has a
    mixture-of-experts feed-forward iff ``i % expert_layer_period == expert_layer_offset`` (else a dense
    SwiGLU MLP). ``use_mamba_kernels``, ``use_mambapy``, ``use_associative_scan``, ``use_cache``,
    ``max_position_embeddings`` and ``initializer_range`` are kept for compatibility with `transformers`;
    the model has no positional encoding, so ``max_position_embeddings`` bounds nothing.
    """

    vocab_size: int = 65536
    tie_word_embeddings: bool = False
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    max_position_embeddings: int = 262144
    attention_dropout: float = 0.0
    num_experts_per_tok: int = 2
    num_experts: int = 16
    expert_layer_period: int = 2
    expert_layer_offset: int = 1
    attn_layer_period: int = 8
    attn_layer_offset: int = 4
    use_mamba_kernels: bool = True
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int | str = "auto"
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    use_mambapy: bool = False
    use_associative_scan: bool = True
    model_type: str = field(default="jamba", init=False)

    def __post_init__(self) -> None:
        if self.mamba_dt_rank == "auto":
            self.mamba_dt_rank = math.ceil(self.hidden_size / 16)
        self.validate()

    # ---------------------------------------------------------------- validation
    def validate(self) -> None:
        positive = [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "num_experts_per_tok",
            "num_experts",
            "expert_layer_period",
            "attn_layer_period",
            "mamba_d_state",
            "mamba_d_conv",
            "mamba_expand",
            "mamba_dt_rank",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"JambaConfig.{name} = {value!r}: must be a positive integer")
        for name in ("attn_layer_offset", "expert_layer_offset"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"JambaConfig.{name} = {value!r}: must be an integer >= 0")
        if self.attn_layer_offset >= self.attn_layer_period:
            raise ConfigError(
                f"JambaConfig.attn_layer_offset = {self.attn_layer_offset}: must be smaller than "
                f"attn_layer_period = {self.attn_layer_period} (valid: 0..{self.attn_layer_period - 1})"
            )
        if self.expert_layer_offset >= self.expert_layer_period:
            raise ConfigError(
                f"JambaConfig.expert_layer_offset = {self.expert_layer_offset}: must be smaller than "
                f"expert_layer_period = {self.expert_layer_period} (valid: 0..{self.expert_layer_period - 1})"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"JambaConfig.num_attention_heads = {self.num_attention_heads}: must divide hidden_size = "
                f"{self.hidden_size} (valid: {_divisors(self.hidden_size)})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"JambaConfig.num_key_value_heads = {self.num_key_value_heads}: must divide "
                f"num_attention_heads = {self.num_attention_heads} "
                f"(valid: {_divisors(self.num_attention_heads)})"
            )
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(
                f"JambaConfig.num_experts_per_tok = {self.num_experts_per_tok}: must be at most "
                f"num_experts = {self.num_experts}"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"JambaConfig.hidden_act = {self.hidden_act!r}: only 'silu' is supported")
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            raise ConfigError(f"JambaConfig.rms_norm_eps = {self.rms_norm_eps!r}: must be a number > 0")
        for name in ("pad_token_id", "bos_token_id"):
            _check_token_id(name, getattr(self, name), self.vocab_size)
        for token in self.eos_token_ids:
            _check_token_id("eos_token_id", token, self.vocab_size)

    # ---------------------------------------------------------------- derived shape
    @property
    def layers_block_type(self) -> list[str]:
        """`"attention"` or `"mamba"` per layer."""
        return [
            "attention" if i % self.attn_layer_period == self.attn_layer_offset else "mamba"
            for i in range(self.num_hidden_layers)
        ]

    @property
    def layers_num_experts(self) -> list[int]:
        """Experts per layer: `num_experts` for MoE layers, 1 for dense MLP layers."""
        return [
            self.num_experts if i % self.expert_layer_period == self.expert_layer_offset else 1
            for i in range(self.num_hidden_layers)
        ]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    @property
    def layout(self) -> str:
        """The layer layout as a string: `A` attention, `m` Mamba (Jamba-v0.1: `mmmmAmmm` x 4)."""
        return "".join("A" if t == "attention" else "m" for t in self.layers_block_type)

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["architectures"] = ["JambaForCausalLM"]
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> JambaConfig:
        """Build a config from a `config.json`-style dict; unknown keys are an error naming `source`."""
        model_type = data.get("model_type", "jamba")
        if model_type != "jamba":
            raise ConfigError(f"{source}: model_type = {model_type!r}: expected 'jamba'")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs: dict[str, Any] = {}
        unknown = []
        for key, value in data.items():
            key = _ALIASES.get(key, key)
            if key in names:
                kwargs[key] = value
            elif key not in _HF_METADATA_KEYS and key != "model_type":
                unknown.append(key)
        if unknown:
            hints = [f"{key!r}{suggest(key, names)}" for key in unknown]
            raise ConfigError(
                f"{source}: unknown JambaConfig field(s): {', '.join(hints)}. "
                f"Valid fields: {', '.join(sorted(names))}"
            )
        try:
            return cls(**kwargs)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> JambaConfig:
        return cls.from_dict(read_config(path, "model config").data, source=str(path))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> JambaConfig:
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json in the model folder {directory}")
        return cls.from_json_file(path)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(directory) / "config.json", json.dumps(self.to_dict(), indent=2) + "\n")

    # ---------------------------------------------------------------- presets
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> JambaConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown Jamba preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def _divisors(n: int) -> str:
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return ", ".join(map(str, divs)) if len(divs) <= 12 else ", ".join(map(str, divs[:12])) + ", ..."


def _check_token_id(name: str, value: Any, vocab_size: int) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab_size:
        raise ConfigError(f"JambaConfig.{name} = {value!r}: must be a token id in [0, {vocab_size})")


PRESETS: dict[str, dict[str, Any]] = {
    # For tests: every layer kind (attention, Mamba, MoE, dense MLP) appears; 1.6M parameters.
    "jamba-tiny": dict(
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        attn_layer_period=4,
        attn_layer_offset=2,
        expert_layer_period=2,
        expert_layer_offset=1,
        mamba_d_state=16,
        mamba_d_conv=4,
        mamba_expand=2,
    ),
    # For demos and benchmarks (103M total, 65M active): the v0.1 layout (1:7 attention:Mamba,
    # MoE every 2nd layer, 8 experts top-2) scaled down.
    "jamba-small": dict(
        vocab_size=32768,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        attn_layer_period=8,
        attn_layer_offset=4,
        expert_layer_period=2,
        expert_layer_offset=1,
        mamba_d_state=16,
        mamba_d_conv=4,
        mamba_expand=2,
    ),
    # The paper's shape (Jamba-v0.1: 52B total / 12B active); for counting, far too large to run here.
    "jamba-v0.1": {},
}
