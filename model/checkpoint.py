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
import json
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from crossvit import __version__
from crossvit.contract import (CHECKPOINT_FORMAT, MAX_PARAMETERS, METADATA_KEY, decode_metadata, encode_metadata,
                               new_metadata, validate_preprocessing)
from crossvit.errors import CheckpointError, ConfigError, UsageError
from crossvit.files import atomic_write, check_input_file, first_line, sha256_file

from .registry import (MODELS, Architecture, get_architecture, get_spec, guess_architecture,
                       resolve_labels)
from .spec import Preprocessing
# Containers that training scripts wrap state dicts in, most specific first.
NESTED_KEYS = ("model_ema", "state_dict_ema", "state_dict", "model", "module", "net")
# Prefixes added by DataParallel/DistributedDataParallel and torch.compile.
STRIP_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class ModelInfo:
    """Everything needed to rebuild and use a model; travels in checkpoints and ONNX metadata."""

    architecture: str
    config: dict
    labels: list[str] | None  # None only between reading a foreign config and checking it
    preprocessing: dict
    name: str | None = None
    provenance: dict = field(default_factory=dict)

    @property
    def random_weights(self) -> bool:
        """True for a model that was never trained: useful for speed, meaningless for answers."""
        return bool(self.provenance.get("random_weights"))

    def to_dict(self) -> dict:
        return new_metadata(CHECKPOINT_FORMAT, architecture=self.architecture, name=self.name,
                            config=self.config, labels=self.labels, preprocessing=self.preprocessing,
                            provenance=self.provenance)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelInfo":
        if not isinstance(d, dict) or d.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError("metadata is not crossvit checkpoint metadata")
        try:
            info = cls(architecture=d["architecture"], config=dict(d["config"]),
                       labels=[str(x) for x in d["labels"]], preprocessing=dict(d["preprocessing"]),
                       name=d.get("name"), provenance=dict(d.get("provenance") or {}))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"crossvit metadata is incomplete: {e!r}") from None
        try:
            info.preprocessing = validate_preprocessing(info.preprocessing)
        except ConfigError as e:
            raise CheckpointError(f"crossvit metadata: {e}") from None
        return info


@dataclass
class LoadedModel:
    """A model in eval mode with the facts about it, and where it came from."""

    model: nn.Module
    info: ModelInfo
    source: Path | None = None
    sha256: str | None = None


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
        preprocessing = spec.preprocessing if spec else {"input_size": list(model.input_shape)}
    if isinstance(preprocessing, Preprocessing):
        preprocessing = preprocessing.to_dict()
    info = ModelInfo(
        architecture=architecture, config=config, labels=labels,
        preprocessing=validate_preprocessing(preprocessing), name=name,
        provenance={"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "crossvit_version": __version__, "torch_version": torch.__version__,
                    **(provenance or {})},
    )
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    bad = next((k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise CheckpointError(f"cannot save: tensor {bad} holds NaN or infinite values")
    metadata = {METADATA_KEY: encode_metadata(info.to_dict())}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _read_safetensors(path: Path) -> tuple[dict, dict | None]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError, OSError on truncation, ...
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): "
                              f"{first_line(e)}") from None
    meta = None
    if METADATA_KEY in metadata:
        meta = decode_metadata(metadata[METADATA_KEY], CHECKPOINT_FORMAT, str(path), CheckpointError)
    return tensors, meta


def _sniff(path: Path, head: bytes) -> str:
    """What a file that is not a checkpoint is, in a few words, for the error message."""
    if path.suffix.lower() == ".onnx" or head[:1] == b"\x08":  # ONNX: protobuf field 1 (ir_version)
        try:
            import onnx

            onnx.load(str(path), load_external_data=False)
            return "an ONNX model, not a checkpoint (give the checkpoint it was exported from)"
        except Exception:
            pass
    try:  # text: UTF-8 without control bytes (a random binary starting with "{" is not JSON)
        text = head.decode("utf-8", errors="strict")
    except UnicodeDecodeError as e:  # a multi-byte character cut off at the end of `head` is still text
        text = head[:e.start].decode("utf-8") if e.start >= len(head) - 3 and e.reason == "unexpected end of data" \
            else None
    if text is not None and all(c.isprintable() or c in "\t\r\n" for c in text):
        if text.lstrip()[:1] in ("{", "["):
            return "a JSON or text file, not a checkpoint"
        return "a text file, not a checkpoint"
    return "not a PyTorch checkpoint or a safetensors file (unrecognised content)"


def _read_pickle(path: Path, head: bytes) -> tuple[dict, dict | None]:
    # torch.save writes a zip archive (PK..) or, before torch 1.6, a pickle (protocol byte \x80)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise CheckpointError(f"{path}: {_sniff(path, head)}")
    try:
        with warnings.catch_warnings():  # torch warns about legacy formats; we say it ourselves
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Weights only" in str(e):
            raise CheckpointError(
                f"{path}: refused: loading it needs arbitrary unpickling (it stores Python objects, "
                "not just tensors); only tensors, dicts, lists and numbers are read. Re-save its "
                "state_dict with torch.save(model.state_dict(), ...) or as .safetensors"
            ) from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first_line(e)})") from None
    except Exception as e:  # garbage makes the unpickler raise almost anything (IndexError, ...)
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): "
                              f"{first_line(e)}") from None
    return _unwrap(obj, path), None


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _unwrap(obj, path: Path) -> dict:
    """Find the state dict inside training containers ({'model': ..., 'optimizer': ...})."""
    while not _is_state_dict(obj):
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: not a state dict (found a {type(obj).__name__})")
        key = next((k for k in NESTED_KEYS if k in obj and isinstance(obj[k], dict)), None)
        if key is None:  # tensor names are strings: {1: tensor} is not a state dict
            tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
            if tensors and len(tensors) >= len(obj) // 2:
                return tensors  # a state dict with a few non-tensor extras (e.g. a version int)
            keys = ", ".join(map(str, list(obj)[:6]))
            raise CheckpointError(f"{path}: no state dict found (top-level keys: {keys}; looked "
                                  f"for tensors or one of {', '.join(NESTED_KEYS)})")
        obj = obj[key]
    return obj


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Read a state dict and our metadata (None for foreign files) from any supported file."""
    path = Path(path)
    check_input_file(path, CheckpointError)
    with open(path, "rb") as f:
        head = f.read(64)
    # safetensors starts with a little-endian u64 header length, then '{'
    looks_safetensors = len(head) > 8 and int.from_bytes(head[:8], "little") < (1 << 27) and head[8:9] == b"{"
    if path.suffix == ".safetensors" or looks_safetensors:
        weights, meta = _read_safetensors(path)
    else:
        weights, meta = _read_pickle(path, head)
    if not weights:
        raise CheckpointError(f"{path}: holds no tensors")
    return strip_prefixes(weights), meta


def strip_prefixes(state_dict: dict) -> dict:
    for prefix in STRIP_PREFIXES:
        if state_dict and all(isinstance(k, str) and k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _preview(keys: list[str], n: int = 4) -> str:
    more = f", ... ({len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _mismatch(expected: dict, state_dict: dict) -> str | None:
    """Why `state_dict` does not fit a model whose state dict is `expected` (shapes only), or None."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{_count(len(missing), 'missing key')} ({_preview(missing)})")
        if unexpected:
            parts.append(f"{_count(len(unexpected), 'unexpected key')} ({_preview(unexpected)})")
        return "; ".join(parts)
    mismatched = [k for k, v in expected.items() if tuple(state_dict[k].shape) != tuple(v.shape)]
    if mismatched:
        k = mismatched[0]
        more = f" (and {_count(len(mismatched) - 1, 'more mismatched key')})" if len(mismatched) > 1 else ""
        return (f"shape mismatch for {k}: checkpoint has {tuple(state_dict[k].shape)}, model expects "
                f"{tuple(expected[k].shape)}{more}")
    return None


def _meta_state_dict(arch: Architecture, config: dict) -> dict:
    """The model's state dict shapes without allocating memory, after bounding its size.

    A config from an untrusted file could ask for a model of many gigabytes; built on the meta
    device it costs nothing, and the checkpoint's tensors must match it before the real build.
    """
    with torch.device("meta"):
        model = arch.build(config)
    n = sum(p.numel() for p in model.parameters())
    if n > MAX_PARAMETERS:
        raise ConfigError(f"config asks for {n / 1e9:.1f}G parameters; the limit is "
                          f"{MAX_PARAMETERS / 1e9:.0f}G (is the config corrupt?)")
    return model.state_dict()


def _fitting_models(weights: dict) -> list[str]:
    """Registered model names whose architecture the (filtered) weights fit."""
    fits = []
    for spec in MODELS.values():
        arch = get_architecture(spec.architecture)
        try:
            if _mismatch(_meta_state_dict(arch, spec.config), arch.filter_state_dict(weights)) is None:
                fits.append(spec.name)
        except Exception:  # a filter that does not apply to these keys
            continue
    return fits


def check_weights(model: nn.Module | dict, state_dict: dict, source: str, what: str) -> None:
    """Keys, shapes, dtypes and finiteness of `state_dict` against a model (or its state dict)."""
    expected = model if isinstance(model, dict) else model.state_dict()
    problem = _mismatch(expected, state_dict)
    if problem:
        raise CheckpointError(f"{source} does not fit {what}: {problem}")
    for k, v in state_dict.items():
        if not v.is_floating_point() and expected[k].is_floating_point():
            raise CheckpointError(f"{source}: tensor {k} has dtype {v.dtype}, expected a floating point tensor")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{source}: tensor {k} holds NaN or infinite values; refusing a "
                                  "model that cannot give meaningful outputs")


MAX_CONFIG_BYTES = 1 << 20  # a config is a few hundred bytes of constructor arguments


def _read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise ConfigError(f"{path}: no such config file")
    check_input_file(path, ConfigError)  # a FIFO would hang, /dev/zero read for ever
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size} bytes is not a config (limit {MAX_CONFIG_BYTES})")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except RecursionError:
        raise ConfigError(f"{path}: not a JSON config (nested too deeply)") from None
    except (OSError, ValueError) as e:  # UnicodeDecodeError, JSONDecodeError, a number too long
        raise ConfigError(f"{path}: not a JSON config ({first_line(e)})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: a config must be a JSON object")
    return d


def _foreign_info(path: Path, name: str | None, config) -> ModelInfo:
    """ModelInfo of a foreign state dict from a registered name or a user config."""
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
    # labels=None: named class_0.. in load_checkpoint, once the config has been checked (its types,
    # and its size against MAX_PARAMETERS): a tiny hostile config must not make us build a huge list
    return ModelInfo(architecture=architecture, config=cfg, labels=labels, preprocessing=preprocessing,
                     name=name, provenance={"source": path.name, "source_format": "foreign state dict",
                                            "converted_by": f"crossvit {__version__}"})


def load_checkpoint(path: str | Path, *, name: str | None = None, config: dict | str | Path | None = None,
                    overrides: dict | None = None) -> LoadedModel:
    """Rebuild a model from a checkpoint in eval mode.

    Our `.safetensors` rebuild from their metadata alone. Foreign state dicts need `name` (a
    registered model) or `config`: a dict or JSON file with the family's constructor arguments
    (vit-pytorch's or timm's names), optionally as {"architecture", "config", "labels",
    "preprocessing"}. Keys and shapes are checked against the config before the model is
    built, so a corrupt or hostile config cannot make us allocate a huge model.
    """
    path = Path(path)
    weights, meta = read_weights(path)
    if meta is not None:
        if config is not None:  # it would be silently ignored: the checkpoint's own config is the one built
            raise UsageError(f"--config is for a foreign checkpoint; {path.name} describes itself (its config is "
                             "in its metadata)")
        info = ModelInfo.from_dict(meta)
        if name is not None and get_spec(name).architecture != info.architecture:
            raise CheckpointError(f"{path} holds a {info.architecture} CrossViT, not a "
                                  f"{get_spec(name).architecture} one like {name!r}")
    else:
        info = _foreign_info(path, name, config)
    info.config.update(overrides or {})
    arch = get_architecture(info.architecture)
    if meta is None:
        weights = arch.filter_state_dict(weights)
    what = f"{name!r}" if name and meta is None else f"its {info.architecture} CrossViT config"
    try:
        check_weights(_meta_state_dict(arch, info.config), weights, str(path), what)
    except CheckpointError as e:
        if meta is None and "does not fit" in str(e):
            fits = [n for n in _fitting_models(read_weights(path)[0]) if n != name]
            if fits:
                raise CheckpointError(f"{e}. The file fits {', '.join(fits)}: use --model {fits[0]}") from None
        raise
    model = arch.build(info.config)
    model.load_state_dict(weights, strict=True)  # checked above; copies, casting to the model's dtype
    info.config = model.config.to_dict()
    if info.labels is None:  # a foreign config without labels
        info.labels = [f"class_{i}" for i in range(info.config["num_classes"])]
    info.labels = resolve_labels(info.labels, info.config["num_classes"])
    if info.preprocessing is None:
        info.preprocessing = {"input_size": list(model.input_shape)}
    try:
        info.preprocessing = validate_preprocessing(info.preprocessing)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if tuple(info.preprocessing["input_size"]) != tuple(model.input_shape):  # it would fail in forward
        raise CheckpointError(f"{path}: its preprocessing input_size {info.preprocessing['input_size']} does "
                              f"not fit the model, which takes {list(model.input_shape)} (C, H, W)")
    return LoadedModel(model=model.eval(), info=info, source=path, sha256=sha256_file(path))
