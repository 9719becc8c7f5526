"""What a named model is: its architecture family, config, preprocessing and labels.

Plain data, no torch: the same dicts travel into checkpoints and ONNX metadata, where the
runtime reads them without importing this package.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from crossvit.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


def dataclass_from_dict(cls, values: dict, what: str):
    """`cls(**values)` for a config from JSON, naming unknown keys and missing ones."""
    if not isinstance(values, dict):
        raise ConfigError(f"{what} must be a JSON object, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown {what} keys: {', '.join(unknown)}")
    try:
        return cls(**values)
    except TypeError as e:  # a missing required field
        raise ConfigError(f"incomplete {what}: {e}") from None


@dataclass(frozen=True)
class Preprocessing:
    """The eval transform: resize the shorter side to size/crop_pct, centre-crop, normalize.

    Same meaning as timm's `input_size`, `crop_pct`, `interpolation`, `mean`, `std`.
    """

    input_size: tuple[int, int, int]  # C, H, W of the tensor the model takes
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        c = self.input_size[0] if len(self.input_size) == 3 else 0
        if len(self.input_size) != 3 or min(self.input_size) < 1:
            raise ConfigError(f"preprocessing input_size must be (C, H, W) > 0, got {self.input_size}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ConfigError(f"preprocessing crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"preprocessing interpolation must be one of {INTERPOLATIONS}, "
                              f"got {self.interpolation!r}")
        if len(self.mean) != c or len(self.std) != c or min(self.std) <= 0:
            raise ConfigError(f"preprocessing mean/std need {c} values (std > 0), "
                              f"got mean={self.mean} std={self.std}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "Preprocessing":
        return dataclass_from_dict(cls, values, "preprocessing")


@dataclass(frozen=True)
class ModelSpec:
    """One named entry of the registry."""

    name: str
    architecture: str  # "seed" (vit-pytorch) or "official" (IBM / timm)
    config: dict  # constructor keyword arguments, in that family's own names
    preprocessing: Preprocessing
    labels: str | tuple[str, ...]  # a shipped label set ("imagenet-1k", "digits") or the names
    weights: str | None = None  # file in crossvit/assets with trained weights, if shipped
    description: str = ""
    extra: dict = field(default_factory=dict)
