"""What a named model is: its architecture family, config, preprocessing and labels.

Plain data, no torch: the same dicts travel into checkpoints and ONNX metadata, where the
runtime reads them without importing this package.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from crossvit.contract import IMAGENET_MEAN, IMAGENET_STD, validate_preprocessing
from crossvit.errors import ConfigError


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
        # one validation for every stage: the contract's (the runtime uses the same function)
        checked = validate_preprocessing(dataclasses.asdict(self))
        for key, value in checked.items():
            object.__setattr__(self, key, tuple(value) if isinstance(value, list) else value)

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
