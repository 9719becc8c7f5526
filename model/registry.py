"""The name -> spec table behind `create_model` (one table, no copied entry functions)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

from torch import nn

from crossvit.assets import asset
from crossvit.contract import MAX_LABEL_CHARS
from crossvit.errors import ConfigError

from . import official, seed
from .spec import ModelSpec, Preprocessing

def _identity_filter(state_dict: dict) -> dict:
    return dict(state_dict)


@dataclass(frozen=True)
class Architecture:
    """A model family: its config class, model class and foreign-checkpoint filter."""

    name: str
    config_cls: type
    model_cls: type
    filter_state_dict: Callable[[dict], dict]  # pure: foreign key names -> ours
    config_keys: tuple[str, ...]  # keys that identify a user's config JSON as this family

    def build(self, config: dict) -> nn.Module:
        return self.model_cls.from_config(self.config_cls.from_dict(dict(config)))


ARCHITECTURES: dict[str, Architecture] = {
    "seed": Architecture("seed", seed.SeedConfig, seed.CrossViT, _identity_filter,
                         ("sm_dim", "lg_dim")),
    "official": Architecture("official", official.OfficialConfig, official.OfficialCrossViT,
                             official.checkpoint_filter_fn, ("img_size", "embed_dim")),
}

MODELS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.architecture not in ARCHITECTURES:
        raise ConfigError(f"model {spec.name!r}: unknown architecture {spec.architecture!r}")
    MODELS[spec.name] = spec
    return spec


# The embedded default model: trained by scripts/train_default.py on scikit-learn's digits.
DEFAULT_MODEL = "crossvit_digits"
register(ModelSpec(
    name=DEFAULT_MODEL,
    architecture="seed",
    config=dict(
        image_size=32, num_classes=10, channels=3,
        sm_dim=64, sm_patch_size=4, sm_enc_depth=1, sm_enc_heads=4, sm_enc_dim_head=16, sm_enc_mlp_dim=128,
        lg_dim=64, lg_patch_size=8, lg_enc_depth=1, lg_enc_heads=4, lg_enc_dim_head=16, lg_enc_mlp_dim=128,
        cross_attn_depth=1, cross_attn_heads=4, cross_attn_dim_head=16, depth=2,
        dropout=0.1, emb_dropout=0.1,
    ),
    preprocessing=Preprocessing(input_size=(3, 32, 32), crop_pct=1.0, interpolation="bicubic",
                                mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    labels="digits",
    weights="crossvit_digits.safetensors",
    description="seed CrossViT trained on scikit-learn's 8x8 digits, upscaled to 32x32 (embedded)",
))
for _spec in official.SPECS:
    register(_spec)


def list_models() -> list[str]:
    return sorted(MODELS)


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, MODELS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(list_models())}"
        raise ConfigError(f"unknown model name {name!r}{hint}") from None


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ConfigError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}") from None


def guess_architecture(config: dict) -> str:
    """Tell the family of a user's config dict by its key names (vit-pytorch's vs timm's)."""
    for arch in ARCHITECTURES.values():
        if all(k in config for k in arch.config_keys):
            return arch.name
    raise ConfigError("cannot tell the architecture of this config: expected vit-pytorch keys "
                      "(sm_dim, lg_dim, ...) or timm keys (img_size, embed_dim, ...), "
                      "or an explicit \"architecture\" entry")


def resolve_labels(labels: str | tuple[str, ...] | list[str], num_classes: int) -> list[str]:
    """Turn a shipped label-set name into class names; check the count against the model."""
    if isinstance(labels, str):
        try:
            path = asset(f"{labels}_labels.txt")
        except ConfigError:
            raise ConfigError(f"unknown label set {labels!r} (no {labels}_labels.txt in crossvit/assets)") from None
        names = path.read_text(encoding="utf-8").splitlines()
    else:
        names = [str(n) for n in labels]
    if len(names) != num_classes:
        raise ConfigError(f"{len(names)} labels given for a model with {num_classes} classes")
    long = next((i for i, n in enumerate(names) if len(n) > MAX_LABEL_CHARS), None)
    if long is not None:  # metadata with it would be refused when read (contract._metadata_type_problem)
        raise ConfigError(f"label {long} is {len(names[long])} characters long; a class name may have at most "
                          f"{MAX_LABEL_CHARS}")
    return names


def build_model(architecture: str, config: dict) -> nn.Module:
    """A randomly initialized model of one family from a config dict in that family's names."""
    return get_architecture(architecture).build(config)


def weights_path(spec: ModelSpec):
    """The shipped weights of a registered model, or None when it ships none."""
    return asset(spec.weights) if spec.weights else None
