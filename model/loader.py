"""The one way from a model name and/or a checkpoint to a loaded model."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from crossvit import __version__
from crossvit.errors import ConfigError, UsageError

from .checkpoint import LoadedModel, ModelInfo, load_checkpoint
from .registry import build_model, get_spec, resolve_labels, weights_path

RANDOM_WEIGHTS_NOTE = "no checkpoint: random weights, for speed measurements only"


def load_model(checkpoint: str | Path | None = None, *, name: str | None = None,
               config: dict | str | Path | None = None, overrides: dict | None = None,
               pretrained: bool = True) -> LoadedModel:
    """A checkpoint (ours, or foreign + name/config), or a registered name.

    A name alone gives its shipped weights when it has some (and `pretrained`), else a random
    initialization, marked as such in its provenance (`info.random_weights`): useful for
    measuring an architecture's export parity and speed, meaningless for its answers.
    """
    if checkpoint is not None:
        return load_checkpoint(checkpoint, name=name, config=config, overrides=overrides)
    if config is not None:  # it would be silently ignored below
        raise UsageError("--config describes a foreign checkpoint's constructor arguments: give that checkpoint "
                         "too (a registered --model NAME needs none)")
    if name is None:
        raise ConfigError("give a checkpoint or a model name")
    spec = get_spec(name)
    if pretrained and spec.weights is not None:
        return load_checkpoint(weights_path(spec), name=name, overrides=overrides)
    model = build_model(spec.architecture, {**spec.config, **(overrides or {})}).eval()
    n = model.config.num_classes
    overridden = "num_classes" in (overrides or {}) and n != spec.config.get("num_classes")
    info = ModelInfo(architecture=spec.architecture, config=model.config.to_dict(),
                     labels=[f"class_{i}" for i in range(n)] if overridden else resolve_labels(spec.labels, n),
                     preprocessing=spec.preprocessing.to_dict(), name=name,
                     provenance={"source": "random initialization", "random_weights": True,
                                 "crossvit_version": __version__})
    return LoadedModel(model=model, info=info)


def create_model(name: str, checkpoint: str | Path | None = None, *, pretrained: bool = False,
                 **overrides) -> nn.Module:
    """Build a named model; load weights from `checkpoint` (any supported format) if given.

    `pretrained=True` loads the weights shipped with the package (only models that ship some).
    `overrides` replace config fields, e.g. `num_classes=10`.
    """
    if pretrained and checkpoint is None and get_spec(name).weights is None:
        raise ConfigError(f"model {name!r} ships no weights; pass checkpoint=PATH")
    return load_model(checkpoint, name=name, overrides=overrides, pretrained=pretrained).model
