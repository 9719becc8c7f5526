"""Checkpoint I/O: our `.safetensors` with JSON metadata, and foreign state dicts.

Our format: a safetensors file whose metadata entry "crossvit" is the JSON of `ModelInfo`
(architecture, config, labels, preprocessing, provenance), enough to rebuild the model
without any other input. Foreign checkpoints (vit-pytorch/timm/IBM state dicts in `.pt`,
`.pth`, `.bin`, `.safetensors`, possibly nested under `state_dict`/`model`/`model_ema`, with
`module.` prefixes) need the model named or a config given. Pickled files are read with
`torch.load(weights_only=True)`: anything that needs arbitrary unpickling is refused.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from crossvit import __version__
from crossvit.errors import CheckpointError, ConfigError

from .registry import get_architecture, get_spec, guess_architecture, resolve_labels
from .spec import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

FORMAT = "crossvit-checkpoint"
FORMAT_VERSION = 1
METADATA_KEY = "crossvit"
# Containers that training scripts wrap state dicts in, most specific first.
NESTED_KEYS = ("model_ema", "state_dict_ema", "state_dict", "model", "module", "net")
# Prefixes added by DataParallel/DistributedDataParallel and torch.compile.
STRIP_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class ModelInfo:
    """Everything needed to rebuild and use a model; travels in checkpoints and ONNX metadata."""

    architecture: str
    config: dict
    labels: list[str]
    preprocessing: dict
    name: str | None = None
    provenance: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "architecture": self.architecture, "name": self.name, "config": self.config,
            "labels": self.labels, "preprocessing": self.preprocessing,
            "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ModelInfo":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise CheckpointError("metadata is not crossvit checkpoint metadata")
        try:
            info = cls(architecture=d["architecture"], config=dict(d["config"]),
                       labels=[str(x) for x in d["labels"]], preprocessing=dict(d["preprocessing"]),
                       name=d.get("name"), provenance=dict(d.get("provenance") or {}))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"crossvit metadata is incomplete: {e!r}") from None
        Preprocessing.from_dict(info.preprocessing)  # validates
        return info


@dataclass
class LoadedModel:
    """A model in eval mode with the facts about it, and where it came from."""

    model: nn.Module
    info: ModelInfo
    source: Path | None = None
    sha256: str | None = None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: str | Path, write) -> Path:
    """Call `write(tmp_path)`, then rename over `path`; no half-written file on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def default_preprocessing(input_shape: tuple[int, int, int]) -> Preprocessing:
    """timm's defaults for a model that came with no preprocessing of its own."""
    c = input_shape[0]
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if c == 3 else ((0.5,) * c, (0.5,) * c)
    return Preprocessing(input_size=input_shape, crop_pct=0.875, mean=mean, std=std)


def save_checkpoint(model: nn.Module, path: str | Path, *, labels: list[str] | str | None = None,
                    preprocessing: Preprocessing | dict | None = None, name: str | None = None,
                    provenance: dict | None = None) -> Path:
    """Write `model` as `.safetensors` with the metadata that rebuilds it (atomically)."""
    from safetensors.torch import save_file

    architecture = getattr(model, "architecture", None)
    if architecture is None or not hasattr(model, "config"):
        raise CheckpointError(f"cannot save a {type(model).__name__}: not a crossvit model")
    config = model.config.to_dict()
    spec = get_spec(name) if name else None
    if labels is None:
        if spec is None:
            raise ConfigError("save_checkpoint needs labels= (or name= of a registered model)")
        labels = spec.labels
    labels = resolve_labels(labels, config["num_classes"])
    if preprocessing is None:
        preprocessing = spec.preprocessing if spec else default_preprocessing(model.input_shape)
    if isinstance(preprocessing, dict):
        preprocessing = Preprocessing.from_dict(preprocessing)
    info = ModelInfo(
        architecture=architecture, config=config, labels=labels,
        preprocessing=preprocessing.to_dict(), name=name,
        provenance={"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "crossvit_version": __version__, "torch_version": torch.__version__,
                    **(provenance or {})},
    )
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {METADATA_KEY: json.dumps(info.to_dict(), separators=(",", ":"))}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _read_safetensors(path: Path) -> tuple[dict, dict | None]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError, OSError on truncation, ...
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    meta = None
    if METADATA_KEY in metadata:
        try:
            meta = json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: crossvit metadata is not valid JSON ({e})") from None
    return tensors, meta


def _read_pickle(path: Path) -> tuple[dict, dict | None]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "weights_only" in str(e) or "Weights only" in str(e):
            raise CheckpointError(
                f"{path}: refused: loading it needs arbitrary unpickling (it stores Python objects, "
                "not just tensors); only tensors, dicts, lists and numbers are read. Re-save its "
                "state_dict with torch.save(model.state_dict(), ...) or as .safetensors"
            ) from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    except Exception as e:  # garbage makes the unpickler raise almost anything (IndexError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                              f"{first}") from None
    return _unwrap(obj, path), None


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _unwrap(obj, path: Path) -> dict:
    """Find the state dict inside training containers ({'model': ..., 'optimizer': ...})."""
    seen = []
    while not _is_state_dict(obj):
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: not a state dict (found a {type(obj).__name__})")
        key = next((k for k in NESTED_KEYS if k in obj and isinstance(obj[k], dict)), None)
        if key is None:
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if tensors and len(tensors) >= len(obj) // 2:
                return tensors  # a state dict with a few non-tensor extras (e.g. a version int)
            keys = ", ".join(map(str, list(obj)[:6]))
            raise CheckpointError(f"{path}: no state dict found (top-level keys: {keys}; looked "
                                  f"for tensors or one of {', '.join(NESTED_KEYS)})")
        seen.append(key)
        obj = obj[key]
    return obj


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Read a state dict and our metadata (None for foreign files) from any supported file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    with open(path, "rb") as f:
        head = f.read(8)
    # safetensors starts with a little-endian u64 header length, then '{'
    if path.suffix == ".safetensors" or (len(head) == 8 and int.from_bytes(head, "little") < (1 << 27)
                                          and not head.startswith(b"PK")):
        if path.suffix == ".safetensors":
            weights, meta = _read_safetensors(path)
        else:
            try:
                weights, meta = _read_safetensors(path)
            except CheckpointError:
                weights, meta = _read_pickle(path)
    else:
        weights, meta = _read_pickle(path)
    if not weights:
        raise CheckpointError(f"{path}: holds no tensors")
    return strip_prefixes(weights), meta


def strip_prefixes(state_dict: dict) -> dict:
    for prefix in STRIP_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _preview(keys: list[str], n: int = 4) -> str:
    more = f", ... ({len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_state_dict_checked(model: nn.Module, state_dict: dict, source: str = "checkpoint") -> None:
    """Strict load with one clear line for missing/unexpected keys and shape mismatches."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_preview(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_preview(unexpected)})")
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + "; ".join(parts))
    mismatched = [k for k, v in expected.items() if tuple(state_dict[k].shape) != tuple(v.shape)]
    if mismatched:
        k = mismatched[0]
        more = f" (and {len(mismatched) - 1} more mismatched keys)" if len(mismatched) > 1 else ""
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: shape mismatch for {k}: "
                              f"checkpoint has {tuple(state_dict[k].shape)}, model expects "
                              f"{tuple(expected[k].shape)}{more}")
    bad = [k for k, v in state_dict.items() if not v.is_floating_point() and expected[k].is_floating_point()]
    if bad:
        raise CheckpointError(f"{source}: tensor {bad[0]} has dtype {state_dict[bad[0]].dtype}, "
                              "expected a floating point tensor")
    model.load_state_dict(state_dict, strict=True)  # copies, casting to the model's dtype


def _read_config_file(path: str | Path) -> dict:
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a JSON config ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: a config must be a JSON object")
    return d


def load_checkpoint(path: str | Path, *, name: str | None = None, config: dict | str | Path | None = None,
                    overrides: dict | None = None) -> LoadedModel:
    """Rebuild a model from a checkpoint in eval mode.

    Our `.safetensors` rebuild from their metadata alone. Foreign state dicts need `name` (a
    registered model) or `config`: a dict or JSON file with the family's constructor arguments
    (vit-pytorch's or timm's names), optionally as {"architecture", "config", "labels",
    "preprocessing"}.
    """
    path = Path(path)
    weights, meta = read_weights(path)
    overrides = overrides or {}
    if meta is not None:
        info = ModelInfo.from_dict(meta)
        if name is not None and get_spec(name).architecture != info.architecture:
            raise CheckpointError(f"{path} holds a {info.architecture} CrossViT, not a "
                                  f"{get_spec(name).architecture} one like {name!r}")
        info.config.update(overrides)
    else:
        labels = preprocessing = None
        if config is not None:
            cfg = _read_config_file(config) if isinstance(config, (str, Path)) else dict(config)
            if "config" in cfg and isinstance(cfg["config"], dict):
                labels, preprocessing = cfg.get("labels"), cfg.get("preprocessing")
                architecture = cfg.get("architecture") or guess_architecture(cfg["config"])
                cfg = dict(cfg["config"])
            else:
                cfg = dict(cfg)
                architecture = cfg.pop("architecture", None) or guess_architecture(cfg)
        elif name is not None:
            spec = get_spec(name)
            architecture, cfg = spec.architecture, dict(spec.config)
            labels, preprocessing = spec.labels, spec.preprocessing.to_dict()
        else:
            raise CheckpointError(f"{path} is a foreign checkpoint (no crossvit metadata): name its "
                                  "model with --model NAME or give its config with --config FILE.json")
        cfg.update(overrides)
        if labels is None:
            labels = [f"class_{i}" for i in range(int(cfg.get("num_classes") or 0))]
        info = ModelInfo(architecture=architecture, config=cfg, labels=labels,
                         preprocessing=preprocessing, name=name,
                         provenance={"source": path.name, "source_format": "foreign state dict",
                                     "converted_by": f"crossvit {__version__}"})
    arch = get_architecture(info.architecture)
    model = arch.build(info.config)
    if meta is None:
        weights = arch.filter_state_dict(weights)
    load_state_dict_checked(model, weights, source=str(path))
    info.config = model.config.to_dict()
    info.labels = resolve_labels(info.labels, info.config["num_classes"])
    if info.preprocessing is None:
        info.preprocessing = default_preprocessing(model.input_shape).to_dict()
    info.preprocessing = Preprocessing.from_dict(info.preprocessing).to_dict()
    return LoadedModel(model=model.eval(), info=info, source=path, sha256=sha256_file(path))


def load_model(checkpoint: str | Path | None = None, *, name: str | None = None,
               config: dict | str | Path | None = None) -> LoadedModel:
    """What the CLI calls: a checkpoint (ours or foreign + name/config), or a registered name.

    A name alone gives its shipped weights when it has some, else a random initialization
    (useful for measuring export parity and speed of an architecture).
    """
    if checkpoint is not None:
        return load_checkpoint(checkpoint, name=name, config=config)
    if name is None:
        raise ConfigError("give a checkpoint or a model name")
    spec = get_spec(name)
    if spec.weights is not None:
        from .registry import ASSETS

        return load_checkpoint(ASSETS / spec.weights, name=name)
    model = get_architecture(spec.architecture).build(spec.config).eval()
    info = ModelInfo(architecture=spec.architecture, config=model.config.to_dict(),
                     labels=resolve_labels(spec.labels, model.config.num_classes),
                     preprocessing=spec.preprocessing.to_dict(), name=name,
                     provenance={"source": "random initialization", "crossvit_version": __version__})
    return LoadedModel(model=model, info=info)
