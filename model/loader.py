"""The one way from a model name and/or a checkpoint to a loaded model."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from crossvit import __version__
from crossvit.errors import ConfigError, UsageError

from .checkpoint import LoadedModel, ModelInfo, load_checkpoint
from .registry import build_model, get_spec, resolve_labels, weights_path

RANDOM_WEIGHTS_NOTE = "no checkpoint: random weights, for speed measurements only"
DEFAULT_INIT_SEED = 0  # a weightless model draws the same weights every run, so its deploys repeat


def load_model(checkpoint: str | Path | None = None, *, name: str | None = None,
               config: dict | str | Path | None = None, overrides: dict | None = None,
               pretrained: bool = True, init_seed: int | None = DEFAULT_INIT_SEED) -> LoadedModel:
    """A checkpoint (ours, or foreign + name/config), or a registered name.

    A name alone gives its shipped weights when it has some (and `pretrained`), else a random
    initialization, marked as such in its provenance (`info.random_weights`): useful for
    measuring an architecture's export parity and speed, meaningless for its answers. That
    initialization draws from torch's generator seeded with `init_seed` (recorded in the
    provenance), without touching the caller's generator: the same weights every run, so a
    deploy's files and the gates they pass repeat. `init_seed=None` draws from the caller's
    generator as it stands.
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
    if init_seed is not None and not 0 <= init_seed < 2 ** 64:  # torch.manual_seed's range
        raise ConfigError(f"init seed {init_seed} is outside 0..2**64-1")
    model = _initialize(spec.architecture, {**spec.config, **(overrides or {})}, init_seed)
    n = model.config.num_classes
    overridden = "num_classes" in (overrides or {}) and n != spec.config.get("num_classes")
    info = ModelInfo(architecture=spec.architecture, config=model.config.to_dict(),
                     labels=[f"class_{i}" for i in range(n)] if overridden else resolve_labels(spec.labels, n),
                     preprocessing=spec.preprocessing.to_dict(), name=name,
                     provenance={"source": "random initialization", "random_weights": True,
                                 **({} if init_seed is None else {"init_seed": init_seed}),
                                 "weights_sha256": weights_sha256(model),
                                 "crossvit_version": __version__})
    return LoadedModel(model=model, info=info)


def weights_sha256(model: nn.Module) -> str:
    """A digest of a model's weights (names, dtypes, shapes, bytes): the identity of a random
    initialization, which has no file to hash, so that rebuilding it from its seed is checked."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _initialize(architecture: str, config: dict, init_seed: int | None) -> nn.Module:
    if init_seed is None:
        return build_model(architecture, config).eval()
    with torch.random.fork_rng(devices=[]):  # CPU generator only; the caller's state is restored
        torch.manual_seed(init_seed)
        return build_model(architecture, config).eval()


def rebuild_random_init(model: dict, what: str) -> LoadedModel:
    """The random initialization an artifact was exported from, rebuilt from its metadata's model
    (registered name, config, `init_seed`) and checked against the recorded weights digest, so
    that `check` needs no checkpoint for it. ConfigError where that cannot be done exactly."""
    from .registry import list_models

    model = model if isinstance(model, dict) else {}
    provenance = model.get("provenance") if isinstance(model.get("provenance"), dict) else {}
    name, seed, digest = model.get("name"), provenance.get("init_seed"), provenance.get("weights_sha256")
    if (not isinstance(name, str) or name not in list_models() or type(seed) is not int or not 0 <= seed < 2 ** 64
            or not isinstance(digest, str)):
        raise ConfigError(f"{what} holds random weights, and its metadata does not say how to draw them again (a "
                          "registered model and an init seed): give its checkpoint with --reference CHECKPOINT")
    loaded = load_model(name=name, pretrained=False, init_seed=seed)
    if loaded.info.config != model.get("config") or loaded.info.provenance["weights_sha256"] != digest:
        raise ConfigError(f"{what}: {name} with init seed {seed} does not rebuild the weights it was exported with "
                          f"(another config, or this PyTorch {torch.__version__} draws other values): give its "
                          "checkpoint with --reference CHECKPOINT")
    return loaded


def create_model(name: str, checkpoint: str | Path | None = None, *, pretrained: bool = False,
                 **overrides) -> nn.Module:
    """Build a named model; load weights from `checkpoint` (any supported format) if given.

    `pretrained=True` loads the weights shipped with the package (only models that ship some).
    `overrides` replace config fields, e.g. `num_classes=10`.
    """
    if pretrained and checkpoint is None and get_spec(name).weights is None:
        raise ConfigError(f"model {name!r} ships no weights; pass checkpoint=PATH")
    return load_model(checkpoint, name=name, overrides=overrides, pretrained=pretrained).model
