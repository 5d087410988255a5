"""ViTAR and plain-ViT configurations: the public contract of the vision models.

A model folder holds `config.json` (these fields plus `model_type`) and `model.safetensors`. `model_type`
says which class reads it: "vitar" (`ViTARConfig`) or "vit" (`ViTConfig`, the plain baseline).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quintet.config import read_config, suggest
from quintet.errors import ConfigError
from quintet.io import atomic_write_text

MERGERS = ("atm", "avgpool")
POS_EMBEDS = ("fpe", "interpolated")


@dataclass
class VisionConfig:
    """Fields shared by ViTAR and the plain ViT.

    `image_size` is the base resolution: the plain ViT's positional table has
    (image_size / patch_size)^2 entries; ViTAR uses it only as the default resolution of demos.
    """

    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    num_classes: int = 1000
    hidden_size: int = 384
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    drop_path_rate: float = 0.0
    initializer_range: float = 0.02
    image_mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    image_std: tuple[float, ...] = (0.229, 0.224, 0.225)
    labels: list[str] | None = None

    def __post_init__(self) -> None:
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)
        if self.labels is not None:
            self.labels = [str(v) for v in self.labels]
        self.validate()

    @property
    def _name(self) -> str:
        return type(self).__name__

    def validate(self) -> None:
        for name in (
            "image_size",
            "patch_size",
            "num_channels",
            "num_classes",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
        ):
            _check_positive_int(self._name, name, getattr(self, name))
        _check_number(self._name, "mlp_ratio", self.mlp_ratio, low=0.0, low_open=True)
        _check_number(self._name, "layer_norm_eps", self.layer_norm_eps, low=0.0, low_open=True)
        _check_number(self._name, "drop_path_rate", self.drop_path_rate, low=0.0, high=1.0, high_open=True)
        _check_number(self._name, "initializer_range", self.initializer_range, low=0.0, low_open=True)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"{self._name}.num_attention_heads = {self.num_attention_heads}: must divide hidden_size = "
                f"{self.hidden_size} (valid: {_divisors(self.hidden_size)})"
            )
        if self.image_size < self.patch_size:
            raise ConfigError(
                f"{self._name}.image_size = {self.image_size}: must be at least "
                f"patch_size = {self.patch_size}"
            )
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if len(value) != self.num_channels:
                raise ConfigError(
                    f"{self._name}.{name} = {list(value)}: needs one value per channel "
                    f"(num_channels = {self.num_channels})"
                )
        if any(v <= 0 for v in self.image_std):
            raise ConfigError(f"{self._name}.image_std = {list(self.image_std)}: every value must be > 0")
        if self.labels is not None and len(self.labels) != self.num_classes:
            raise ConfigError(
                f"{self._name}.labels has {len(self.labels)} names: needs exactly num_classes = "
                f"{self.num_classes}, or null"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def base_grid(self) -> int:
        """Tokens per side at the base resolution."""
        return self.image_size // self.patch_size

    def label(self, index: int) -> str:
        return self.labels[index] if self.labels is not None else str(index)

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["image_mean"] = list(self.image_mean)
        out["image_std"] = list(self.image_std)
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> VisionConfig:
        """Build a config from a `config.json`-style dict; unknown keys are an error naming `source`."""
        expected = cls.__dataclass_fields__["model_type"].default
        model_type = data.get("model_type", expected)
        if model_type != expected:
            raise ConfigError(f"{source}: model_type = {model_type!r}: expected {expected!r}")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = [k for k in data if k not in names and k != "model_type"]
        if unknown:
            hints = [f"{key!r}{suggest(key, names)}" for key in unknown]
            raise ConfigError(
                f"{source}: unknown {cls.__name__} field(s): {', '.join(hints)}. "
                f"Valid fields: {', '.join(sorted(names))}"
            )
        try:
            return cls(**{k: v for k, v in data.items() if k != "model_type"})
        except (ConfigError, TypeError) as err:
            raise ConfigError(f"{source}: {err}") from None

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(directory) / "config.json", json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> VisionConfig:
        presets = {k: v for k, v in PRESETS.items() if v[0] is cls}
        if name not in presets:
            raise ConfigError(f"unknown {cls.__name__} preset {name!r}; valid presets: {', '.join(presets)}")
        return cls(**{**presets[name][1], **overrides})


@dataclass
class ViTARConfig(VisionConfig):
    """ViTAR: patch embedding, Fuzzy Positional Encoding, Adaptive Token Merger, transformer, head.

    `grid_size` is G: ATM merges the token grid until it is G x G (a grid already at most G per side is
    passed through one ATM pass with 1 x 1 cells and stays as it is). The FPE map is G x G.
    `merger` = "avgpool" replaces ATM by one adaptive average pooling to G x G (the paper's ablation);
    `pos_embed` = "interpolated" turns the fuzzy offsets off (the same map, only interpolated).
    `fpe_offset` is the largest offset, in token units (0.5 in the paper).
    The `decoder_*`, `mask_ratio` and `norm_pix_loss` fields are used only by masked-autoencoder
    pre-training (`ViTARForMaskedImageModeling`); the names follow Hugging Face's ViTMAEConfig.
    """

    grid_size: int = 14
    merger: str = "atm"
    pos_embed: str = "fpe"
    fpe_offset: float = 0.5
    decoder_hidden_size: int = 192
    decoder_num_hidden_layers: int = 2
    decoder_num_attention_heads: int = 3
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    model_type: str = field(default="vitar", init=False)

    def validate(self) -> None:
        super().validate()
        for name in (
            "grid_size",
            "decoder_hidden_size",
            "decoder_num_hidden_layers",
            "decoder_num_attention_heads",
        ):
            _check_positive_int(self._name, name, getattr(self, name))
        if self.merger not in MERGERS:
            raise ConfigError(f"ViTARConfig.merger = {self.merger!r}: valid values: {', '.join(MERGERS)}")
        if self.pos_embed not in POS_EMBEDS:
            raise ConfigError(
                f"ViTARConfig.pos_embed = {self.pos_embed!r}: valid values: {', '.join(POS_EMBEDS)}"
            )
        _check_number(self._name, "fpe_offset", self.fpe_offset, low=0.0, high=1.0)
        _check_number(
            self._name, "mask_ratio", self.mask_ratio, low=0.0, high=1.0, low_open=True, high_open=True
        )
        if self.decoder_hidden_size % self.decoder_num_attention_heads:
            raise ConfigError(
                f"ViTARConfig.decoder_num_attention_heads = {self.decoder_num_attention_heads}: must divide "
                f"decoder_hidden_size = {self.decoder_hidden_size} "
                f"(valid: {_divisors(self.decoder_hidden_size)})"
            )


@dataclass
class ViTConfig(VisionConfig):
    """The plain ViT baseline: a learnable positional table at the base grid, resampled (bicubic, as
    timm's `resample_abs_pos_embed`) to any other grid; every patch token goes through the encoder."""

    model_type: str = field(default="vit", init=False)


def config_from_dict(data: dict[str, Any], source: str = "config") -> ViTARConfig | ViTConfig:
    """Read either kind of config, by its `model_type`."""
    model_type = data.get("model_type")
    classes = {"vitar": ViTARConfig, "vit": ViTConfig}
    if model_type not in classes:
        raise ConfigError(f"{source}: model_type = {model_type!r}: valid values: vitar, vit")
    return classes[model_type].from_dict(data, source=source)


def load_config(directory: str | os.PathLike) -> ViTARConfig | ViTConfig:
    """The config of a model folder (`config.json`)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json in the model folder {directory}")
    return config_from_dict(read_config(path, "model config").data, source=str(path))


def preset_config(name: str, **overrides: Any) -> ViTARConfig | ViTConfig:
    """A config by preset name (`vitar-tiny`, `vitar-s`, `vitar-b`, `vit-tiny`, `vit-s`, `vit-b`)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    cls, fields = PRESETS[name]
    try:
        return cls(**{**fields, **overrides})
    except TypeError as err:
        raise ConfigError(f"preset {name!r}: {err}") from None


def _check_positive_int(cls: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{cls}.{name} = {value!r}: must be a positive integer")


def _check_number(
    cls: str,
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
        hi = "" if high is None else f"{high}" + (")" if high_open else "]")
        interval = f"{lo}, {hi}" if low is not None and high is not None else (f"> {low}" if low_open else lo)
        raise ConfigError(f"{cls}.{name} = {value!r}: must be a number in {interval}")


def _divisors(n: int) -> str:
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return ", ".join(map(str, divs)) if len(divs) <= 12 else ", ".join(map(str, divs[:12])) + ", ..."


_TINY = dict(
    image_size=32,
    patch_size=4,
    num_classes=10,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    image_mean=(0.5, 0.5, 0.5),
    image_std=(0.25, 0.25, 0.25),
)
_DEIT_S = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, drop_path_rate=0.1)
_DEIT_B = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, drop_path_rate=0.1)

PRESETS: dict[str, tuple[type[VisionConfig], dict[str, Any]]] = {
    # Tests, demo and the CPU experiment: base 32 px, patch 4 -> 8 x 8 tokens, G = 8 (the analogue of
    # 224 / 16 / 14). ~0.2M parameters.
    "vitar-tiny": (
        ViTARConfig,
        dict(
            _TINY,
            grid_size=8,
            decoder_hidden_size=32,
            decoder_num_hidden_layers=1,
            decoder_num_attention_heads=2,
        ),
    ),
    # The paper's widths: DeiT-S / DeiT-B plus the shared ATM block; 16 px patches, G = 14.
    "vitar-s": (ViTARConfig, dict(_DEIT_S, grid_size=14)),
    "vitar-b": (
        ViTARConfig,
        dict(
            _DEIT_B,
            grid_size=14,
            decoder_hidden_size=512,
            decoder_num_hidden_layers=8,
            decoder_num_attention_heads=16,
        ),
    ),
    # The plain ViT baselines with the same widths.
    "vit-tiny": (ViTConfig, dict(_TINY)),
    "vit-s": (ViTConfig, dict(_DEIT_S)),
    "vit-b": (ViTConfig, dict(_DEIT_B)),
}
