"""The artifact contract: what the stages hand each other, defined once.

Checkpoints, ONNX files and (later) TensorRT engine manifests carry one JSON object under the
metadata key "crossvit". This module owns that key and its format version, the I/O tensor
names, the precision table, the size limits, the validation of the preprocessing dict, the
reading and writing of metadata. File handling (input checks, temporary folders, the atomic
write) is crossvit/files.py. It imports no torch (the runtime imports it) and nothing heavy at
module level.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from crossvit.errors import ArtifactError, ConfigError, CrossViTError, UsageError
from crossvit.files import check_input_file, first_line

# -- metadata key, formats, version ---------------------------------------------------------

METADATA_KEY = "crossvit"
# Bumped when a reader of the previous version would misread a new file. A file written with
# a newer version is refused with "upgrade crossvit" rather than half understood.
FORMAT_VERSION = 1
CHECKPOINT_FORMAT = "crossvit-checkpoint"
ONNX_FORMAT = "crossvit-onnx"
ENGINE_FORMAT = "crossvit-engine"

INPUT_NAME = "input"  # float32 [batch, C, H, W], preprocessed
OUTPUT_NAME = "logits"  # float32 [batch, classes]
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
ENGINE_SUFFIXES = (".plan", ".engine")


def manifest_path(plan: str | Path) -> Path:
    """An engine's manifest: `MODEL.plan` -> `MODEL.plan.json`, beside it."""
    plan = Path(plan)
    return plan.with_name(plan.name + ".json")

# -- size limits -----------------------------------------------------------------------------

PROTOBUF_LIMIT = 2 * 1024**3  # one .onnx file cannot exceed 2 GB
MIN_CALIBRATION_IMAGES = 16  # fewer give activation ranges that are noise
MAX_CALIBRATION_IMAGES = 512
MAX_BATCH = 4096  # the largest batch range an artifact may declare
MAX_INPUT_SIDE = 4096  # pixels, height or width of a model's input
MAX_CLASSES = 100_000
MAX_LABEL_CHARS = 1024  # one class name; ImageNet's longest is under 100
MAX_IMAGE_SIDE = 30_000  # pixels, the longest side of an image the runtime decodes
MIN_STD = 1e-6  # a preprocessing std below it multiplies pixel noise by a million or more
FLOAT32_MAX = 3.4028234663852886e38  # the largest finite float32
MAX_PARAMETERS = 4_000_000_000  # a config asking for more is refused before anything is built


# -- precision table -------------------------------------------------------------------------

@dataclass(frozen=True)
class Thresholds:
    """Limits a parity case must meet; None means "not gated" (still measured and reported)."""

    max_abs: float | None = None  # on every case
    rel_l2: float | None = None  # on every case
    top1_agreement: float | None = None  # fraction, on the gated sources
    accuracy_drop: float | None = None  # percentage points vs the reference, labelled images
    agreement_sources: tuple[str, ...] = ("random", "images")
    cosine: float | None = None  # the least cosine similarity of the logits, on every case

    def tightened(self, **limits) -> "Thresholds":
        """Apply user limits; a limit looser than the default is refused, not applied."""
        changes = {}
        for name, value in limits.items():
            if value is None:
                continue
            if not math.isfinite(value):  # NaN compares false with everything: it would switch the gate off
                raise UsageError(f"{_flag(name)} {value}: a threshold must be a finite number")
            if value < 0 or (name in ("top1_agreement", "cosine") and value > 1):
                raise UsageError(f"{_flag(name)} {value}: no result can meet it (a "
                                  + ("fraction from 0 to 1)" if name in ("top1_agreement", "cosine")
                                     else "limit of 0 or more)"))
            default = getattr(self, name)
            looser = default is not None and (value < default if name in ("top1_agreement", "cosine")
                                              else value > default)
            if looser:
                raise UsageError(f"{_flag(name)} {value} is looser than the {default} "
                                  "default for this precision; thresholds may only be tightened")
            changes[name] = value
        return replace(self, **changes)


def _flag(limit: str) -> str:
    """The command-line option that sets a threshold (`crossvit check`)."""
    return {"top1_agreement": "--min-top1", "cosine": "--min-cosine"}.get(limit, "--" + limit.replace("_", "-"))


@dataclass(frozen=True)
class Precision:
    """One precision an ONNX artifact can be written in."""

    name: str
    toolchain: str  # what writes it
    target: str  # "any" (the reference), "tensorrt" (strongly typed networks) or "cpu"
    thresholds: Thresholds
    calibration: str  # "none", "optional" (AutoCast's range check) or "required" (PTQ)
    # The gate for a model with random weights (its metadata says so): near-tied logits make
    # top-1 agreement meaningless (a 1e-3 change flips it), so such a model is judged by how
    # close the logits are (rel L2, cosine) on random inputs and real images alike.
    random_weights: Thresholds = Thresholds()
    runtime: str = "onnxruntime"  # the backend that runs the file when none is named
    # False: a row's answer depends on the rows batched with it (dynamic int8 quantization takes
    # one scale for the whole batch); sessions then run such a file one row at a time.
    batch_invariant: bool = True


_CLOSE = dict(rel_l2=1e-2, top1_agreement=0.99, agreement_sources=("images",))
_QUANTIZED = dict(top1_agreement=0.97, accuracy_drop=1.0, agreement_sources=("images",))
# Random weights: bf16/fp16 within 2 % of the fp32 logits' energy, int8/fp8 within 10 % (on
# crossvit_15_240: OpenVINO bf16 1.7 %, ONNX Runtime int8-cpu 5.7 %, OpenVINO int8 7.5 %).
_CLOSE_RANDOM = Thresholds(rel_l2=2e-2, cosine=0.999)
_QUANTIZED_RANDOM = Thresholds(rel_l2=0.1, cosine=0.995)
PRECISION_TABLE: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", "torch.onnx.export", "any", Thresholds(max_abs=1e-4, top1_agreement=1.0), "none",
              random_weights=Thresholds(max_abs=1e-4, cosine=0.99999)),
    Precision("fp16", "modelopt-autocast", "tensorrt", Thresholds(**_CLOSE), "optional", _CLOSE_RANDOM),
    Precision("bf16", "modelopt-autocast", "tensorrt", Thresholds(**_CLOSE), "optional", _CLOSE_RANDOM),
    Precision("int8", "modelopt-ptq", "tensorrt", Thresholds(**_QUANTIZED), "required", _QUANTIZED_RANDOM),
    Precision("fp8", "modelopt-ptq", "tensorrt", Thresholds(**_QUANTIZED), "required", _QUANTIZED_RANDOM),
    Precision("int8-cpu", "onnxruntime-dynamic", "cpu", Thresholds(**_QUANTIZED), "none", _QUANTIZED_RANDOM,
              batch_invariant=False),
    Precision("int8-ov", "nncf-ptq", "cpu", Thresholds(**_QUANTIZED), "required", _QUANTIZED_RANDOM,
              runtime="openvino"),
)}
PRECISION_NAMES = tuple(PRECISION_TABLE)
# Everything `deploy` builds beside the fp32 reference.
VARIANT_NAMES = tuple(n for n, p in PRECISION_TABLE.items() if p.target != "any")


def get_precision(name: str) -> Precision:
    try:
        return PRECISION_TABLE[name]
    except KeyError:
        raise ConfigError(f"unknown precision {name!r}; choose from {', '.join(PRECISION_NAMES)}") from None


# -- preprocessing ---------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
PREPROCESSING_KEYS = ("input_size", "crop_pct", "interpolation", "mean", "std")
PREPROCESSING_DEFAULTS = {"crop_pct": 0.875, "interpolation": "bicubic"}


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _floats(values: object, what: str) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ConfigError(f"preprocessing {what} must be a list of numbers, got {values!r}")
    out = []
    for v in values:
        if not _is_number(v):
            raise ConfigError(f"preprocessing {what} must be finite numbers, got {values!r}")
        out.append(float(v))
    return tuple(out)


def validate_preprocessing(values: Mapping) -> dict:
    """The preprocessing dict, checked and normalized (lists of floats, ints), or ConfigError.

    Unknown keys are refused: they would mean a transform this code does not implement, and
    guessing would silently feed the model different pixels.
    """
    if not isinstance(values, Mapping):
        raise ConfigError(f"preprocessing must be a dict (a JSON object), got {type(values).__name__}")
    unknown = sorted(map(str, set(values) - set(PREPROCESSING_KEYS)))
    if unknown:
        raise ConfigError(f"unknown preprocessing keys: {', '.join(unknown)} "
                          f"(known: {', '.join(PREPROCESSING_KEYS)})")
    if "input_size" not in values:
        raise ConfigError("preprocessing lacks input_size ([C, H, W])")
    size = values["input_size"]
    if isinstance(size, (str, bytes)) or not isinstance(size, Sequence) or len(size) != 3 \
            or not all(_is_int(v) and v >= 1 for v in size):
        raise ConfigError(f"preprocessing input_size must be [C, H, W], positive integers, got {size!r}")
    c, h, w = (int(v) for v in size)
    if max(h, w) > MAX_INPUT_SIDE or c > 64:
        raise ConfigError(f"preprocessing input_size {c}x{h}x{w} is too large "
                          f"(at most 64 channels and {MAX_INPUT_SIDE} px a side)")
    crop = values.get("crop_pct", PREPROCESSING_DEFAULTS["crop_pct"])
    if not _is_number(crop) or not 0.0 < float(crop) <= 1.0:
        raise ConfigError(f"preprocessing crop_pct must be a number in (0, 1], got {crop!r}")
    if float(crop) * MAX_IMAGE_SIDE < 1:  # the crop keeps crop_pct of the image's shorter side
        raise ConfigError(f"preprocessing crop_pct {crop!r} crops less than one pixel even of the largest image "
                          f"the runtime takes ({MAX_IMAGE_SIDE} px a side): it must be >= 1/{MAX_IMAGE_SIDE}")
    interpolation = values.get("interpolation", PREPROCESSING_DEFAULTS["interpolation"])
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"preprocessing interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    default_mean, default_std = (IMAGENET_MEAN, IMAGENET_STD) if c == 3 else ((0.5,) * c, (0.5,) * c)
    mean = _floats(values.get("mean", default_mean), "mean")
    std = _floats(values.get("std", default_std), "std")
    if len(mean) != c or len(std) != c or min(std) <= 0:
        raise ConfigError(f"preprocessing mean/std need {c} values each (std > 0), "
                          f"got mean={list(mean)} std={list(std)}")
    # normalized in float32 as (x / 255 - mean) / std: every value must stay finite there
    for what, values_ in (("mean", mean), ("std", std)):
        if max(abs(v) for v in values_) > FLOAT32_MAX:
            raise ConfigError(f"preprocessing {what} must be finite in float32 (at most {FLOAT32_MAX:.4g}), "
                              f"got {list(values_)}")
    if min(std) < MIN_STD:
        raise ConfigError(f"preprocessing std must be >= {MIN_STD:g} (bounded away from 0), got {list(std)}")
    if any((abs(m) + 1) / s > FLOAT32_MAX for m, s in zip(mean, std)):
        raise ConfigError(f"preprocessing mean/std normalize pixels beyond float32's range: "
                          f"mean={list(mean)} std={list(std)}")
    return {"input_size": [c, h, w], "crop_pct": float(crop), "interpolation": interpolation,
            "mean": list(mean), "std": list(std)}


# -- metadata --------------------------------------------------------------------------------

def new_metadata(fmt: str, **fields) -> dict:
    """A metadata object of format `fmt` at this version."""
    return {"format": fmt, "format_version": FORMAT_VERSION, **fields}


def encode_metadata(meta: dict) -> str:
    """Compact JSON; NaN and infinities are refused (they are not JSON)."""
    try:
        return json.dumps(meta, separators=(",", ":"), allow_nan=False)
    except ValueError as e:
        raise ConfigError(f"metadata holds a non-finite number ({e})") from None


def decode_metadata(text: str | bytes, fmt: str, where: str,
                    error: type[CrossViTError] = ArtifactError) -> dict:
    """Parse metadata of format `fmt`; refuse other formats, newer versions, non-finite numbers
    (NaN, Infinity, 1e400: `encode_metadata` never writes them), absurd nesting and values of
    the wrong type with one line."""
    try:
        meta = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise error(f"{where}: crossvit metadata is not valid JSON (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise error(f"{where}: crossvit metadata is not valid JSON ({first_line(e)})") from None
    if not isinstance(meta, dict):
        raise error(f"{where}: crossvit metadata is not a JSON object")
    if _depth(meta) > MAX_METADATA_DEPTH:
        raise error(f"{where}: crossvit metadata is invalid (nested more than {MAX_METADATA_DEPTH} levels deep)")
    if meta.get("format") != fmt:
        found = meta.get("format")
        raise error(f"{where}: crossvit metadata has format {found!r}, expected {fmt!r}")
    version = meta.get("format_version", 1)
    if not _is_int(version) or version < 1:
        raise error(f"{where}: crossvit metadata has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise error(f"{where} was written by a newer crossvit (format version {version}; this one "
                    f"reads up to {FORMAT_VERSION}): upgrade crossvit")
    problem = _metadata_type_problem(meta, fmt)
    if problem:
        raise error(f"{where}: crossvit metadata is invalid: {problem}")
    return meta


MAX_METADATA_DEPTH = 32  # ours is 4 levels deep; deeper is corrupt or hostile


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is out of range for a number")
    return value


def _depth(obj) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_METADATA_DEPTH:
                stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _metadata_type_problem(meta: dict, fmt: str) -> str | None:
    """What in `meta` has the wrong JSON type (objects where objects are meant, integers where
    integers are meant), or None. Missing required keys are left to the readers, which say
    "incomplete"; optional ones may also be null."""

    def want(value, where: str, types: tuple, what: str, optional: bool = False) -> str | None:
        if optional and value is None:
            return None
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        return None if ok else f"{where} must be {what}, got {_kind(value)}"

    def model_problem(m, at: str) -> str | None:
        if not isinstance(m, dict):
            return f"{at or 'it'} must be an object, got {_kind(m)}"
        prefix = f"{at}." if at else ""
        checks = [("architecture", (str,), "a string", False), ("name", (str,), "a string", True),
                  ("config", (dict,), "an object", False), ("labels", (list,), "a list", False),
                  ("preprocessing", (dict,), "an object", False), ("provenance", (dict,), "an object", True)]
        for key, types, what, optional in checks:
            if key in m:
                p = want(m[key], prefix + key, types, what, optional)
                if p:
                    return p
        for i, label in enumerate(m.get("labels") or []):
            if not isinstance(label, (str, int)) or isinstance(label, bool):
                return f"{prefix}labels[{i}] must be a string, got {_kind(label)}"
            if isinstance(label, str) and len(label) > MAX_LABEL_CHARS:
                return (f"{prefix}labels[{i}] is {len(label)} characters long; a class name may have at most "
                        f"{MAX_LABEL_CHARS}")
        return None

    if fmt == CHECKPOINT_FORMAT:
        return model_problem(meta, "")
    checks = [("model", (dict,), "an object", False), ("precision", (str,), "a string", False),
              ("batch", (dict,), "an object", False), ("inputs", (list,), "a list", False),
              ("outputs", (list,), "a list", False), ("engine_io", (list,), "a list", True),
              ("source", (dict,), "an object", True), ("exporter", (dict,), "an object", True),
              ("tensorrt", (dict,), "an object", True), ("device", (dict,), "an object", True),
              ("builder", (dict,), "an object", True)]
    for key, types, what, optional in checks:
        if key in meta:
            p = want(meta[key], key, types, what, optional)
            if p:
                return p
    if "model" in meta:
        p = model_problem(meta["model"], "model")
        if p:
            return p
    for key in ("min", "opt", "max"):
        if key in meta.get("batch", {}):
            p = want(meta["batch"][key], f"batch.{key}", (int,), "an integer", key == "opt")
            if p:
                return p
    for group in ("inputs", "outputs", "engine_io"):
        for i, t in enumerate(meta.get(group) or []):
            at = f"{group}[{i}]"
            if not isinstance(t, dict):
                return f"{at} must be an object, got {_kind(t)}"
            for key, types, what in (("name", (str,), "a string"), ("dtype", (str,), "a string"),
                                     ("shape", (list,), "a list")):
                if key in t:
                    p = want(t[key], f"{at}.{key}", types, what)
                    if p:
                        return p
            for j, d in enumerate(t.get("shape") or []):
                if not isinstance(d, (int, str)) or isinstance(d, bool):
                    return f"{at}.shape[{j}] must be an integer or a name, got {_kind(d)}"
    for key in ("onnx", "name", "sha256"):
        if key in (meta.get("source") or {}):
            p = want(meta["source"][key], f"source.{key}", (str,), "a string", True)
            if p:
                return p
    origin = (meta.get("source") or {}).get("checkpoint")
    if origin is not None:
        if not isinstance(origin, dict):
            return f"source.checkpoint must be an object, got {_kind(origin)}"
        for key in ("name", "sha256"):
            p = want(origin.get(key), f"source.checkpoint.{key}", (str,), "a string", True)
            if p:
                return p
    cc = (meta.get("device") or {}).get("compute_capability")
    if cc is not None and (not isinstance(cc, list) or len(cc) < 2
                           or not all(isinstance(v, int) and not isinstance(v, bool) for v in cc)):
        return f"device.compute_capability must be a list of two integers, got {cc!r}"
    return None


def source_checkpoint(source: Mapping | None) -> dict | None:
    """The checkpoint at the start of an artifact's chain ({"name", "sha256"}), from its metadata's
    `source`: an fp32 export names its checkpoint; a variant or an engine names the ONNX it was made
    from and carries that file's checkpoint under "checkpoint". None where nothing says."""
    source = source or {}
    origin = source.get("checkpoint") if "onnx" in source else source
    if not isinstance(origin, Mapping) or not isinstance(origin.get("sha256"), str):
        return None
    return {"name": origin.get("name"), "sha256": origin["sha256"]}


def derived_source(onnx_name: str, onnx_sha256: str, parent_source: Mapping | None, **extra) -> dict:
    """The `source` of an artifact made from an ONNX file: that file's name and sha256, and the
    checkpoint the chain started from (so `check` can compare a reference with it)."""
    source = {"onnx": onnx_name, "sha256": onnx_sha256, **extra}
    origin = source_checkpoint(parent_source)
    if origin is not None:
        source["checkpoint"] = origin
    return source


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def to_json(obj, **kwargs) -> str:
    """JSON that any parser accepts (RFC 8259): NaN and infinities become null."""
    return json.dumps(_finite(obj), allow_nan=False, default=_json_default, **kwargs)


def _json_default(obj):
    if hasattr(obj, "item"):  # numpy scalars
        return _finite(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def read_onnx_metadata(path: str | Path) -> tuple[dict, object]:
    """(the crossvit metadata, the ModelProto without external weights) of an ONNX file."""
    import onnx

    path = Path(path)
    check_input_file(path, ArtifactError)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # DecodeError, ...
        raise ArtifactError(f"{path}: not a readable ONNX file ({first_line(e)})") from None
    if not proto.graph.node:
        raise ArtifactError(f"{path}: not a readable ONNX file (empty graph)")
    props = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in props:
        raise ArtifactError(f"{path}: has no crossvit metadata (export it with `crossvit export`)")
    return decode_metadata(props[METADATA_KEY], ONNX_FORMAT, str(path)), proto


def write_onnx_metadata(proto, meta: dict, others: list[tuple[str, str]] | None = None) -> None:
    """Set the crossvit entry of a ModelProto's metadata_props; the other entries are kept, or
    replaced by `others` (e.g. the source model's, for a converted copy)."""
    if others is None:
        others = [(p.key, p.value) for p in proto.metadata_props]
    kept = [(k, v) for k, v in others if k != METADATA_KEY]
    del proto.metadata_props[:]
    for key, value in [*kept, (METADATA_KEY, encode_metadata(meta))]:
        proto.metadata_props.add(key=key, value=value)
