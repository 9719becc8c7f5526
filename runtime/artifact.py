"""What an artifact says about itself: read from ONNX metadata_props or an engine manifest.

Everything the runtime needs (input size, batch range, tensor names, labels, preprocessing,
precision) travels inside the artifact; nothing here imports torch or the model package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from crossvit.contract import (CHECKPOINT_SUFFIXES, ENGINE_FORMAT, ENGINE_SUFFIXES, MAX_BATCH, decode_metadata,
                               get_precision, manifest_path, read_onnx_metadata, validate_preprocessing)
from crossvit.errors import ArtifactError, ConfigError
from crossvit.files import check_input_file

MANIFEST_MAX_BYTES = 16 << 20  # an engine manifest is a few kB; more is not one of ours (and is not read whole)
_MODEL_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")  # Triton's model names are also folder names


@dataclass(frozen=True)
class ArtifactInfo:
    """The facts about one deployable artifact."""

    path: Path
    kind: str  # "onnx", "engine" or "checkpoint"
    precision: str
    batch_min: int
    batch_max: int
    input_name: str
    input_shape: tuple[int, int, int]  # C, H, W
    output_name: str
    labels: tuple[str, ...]
    preprocessing: dict
    model: dict = field(default_factory=dict)  # architecture, config, provenance
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def model_name(self) -> str:
        """The name `crossvit serve` and `crossvit triton-repo` serve it under by default: the model's
        registered name, else the file name up to its first dot (a variant is served under its
        model's name, so a client's request works against any of them), made a valid model name."""
        name = self.model.get("name")
        if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name):
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.path.name.split(".")[0]).lstrip(".") or "model"
        return name

    @property
    def random_weights(self) -> bool:
        """Exported from a never-trained model: its answers mean nothing."""
        return bool((self.model.get("provenance") or {}).get("random_weights"))

    @classmethod
    def from_metadata(cls, path: Path, kind: str, meta: dict) -> "ArtifactInfo":
        """Metadata as `decode_metadata` returns it (JSON types already checked), or a dict built
        in code: anything missing or of the wrong type is an ArtifactError naming `path`."""
        def integer(value, what: str) -> int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{what} must be an integer, got {value!r}")
            return value

        def mapping(value, what: str, optional: bool = False) -> dict:
            if optional and value is None:
                return {}
            if not isinstance(value, dict):
                raise TypeError(f"{what} must be an object, got {type(value).__name__}")
            return value

        try:
            if not isinstance(meta, dict):
                raise TypeError(f"metadata must be an object, got {type(meta).__name__}")
            model = mapping(meta["model"], "model")
            mapping(model.get("provenance"), "model.provenance", optional=True)
            for key in ("source", "exporter", "tensorrt", "device"):
                mapping(meta.get(key), key, optional=True)
            inp, out = mapping(meta["inputs"][0], "inputs[0]"), mapping(meta["outputs"][0], "outputs[0]")
            batch = mapping(meta["batch"], "batch")
            shape = inp["shape"]
            if not isinstance(shape, list) or len(shape) != 4:
                raise ValueError(f"inputs[0].shape must be [batch, C, H, W], got {shape!r}")
            c, h, w = (integer(v, "inputs[0].shape") for v in shape[1:])
            labels = model["labels"]
            if not isinstance(labels, list):
                raise TypeError(f"model.labels must be a list, got {type(labels).__name__}")
            # a precision the table does not know (say "fp4") has no thresholds: `check` refuses it, so
            # predict and serve do too
            info = cls(path=path, kind=kind, precision=get_precision(str(meta["precision"])).name,
                       batch_min=integer(batch["min"], "batch.min"), batch_max=integer(batch["max"], "batch.max"),
                       input_name=str(inp["name"]), input_shape=(c, h, w), output_name=str(out["name"]),
                       labels=tuple(str(x) for x in labels),
                       preprocessing=validate_preprocessing(model["preprocessing"]), model=model, raw=meta)
        except ConfigError as e:
            raise ArtifactError(f"{path}: crossvit metadata: {e}") from None
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise ArtifactError(f"{path}: crossvit metadata is incomplete ({type(e).__name__}: {e})") from None
        problems = []
        if not 1 <= info.batch_min <= info.batch_max <= MAX_BATCH:
            problems.append(f"batch range {info.batch_min}..{info.batch_max} is not within 1..{MAX_BATCH}")
        if tuple(info.preprocessing["input_size"]) != info.input_shape:
            problems.append(f"input shape {list(info.input_shape)} differs from the preprocessing's "
                            f"input_size {info.preprocessing['input_size']}")
        if not info.labels:
            problems.append("no labels")
        if problems:
            raise ArtifactError(f"{path}: crossvit metadata is inconsistent: {'; '.join(problems)}")
        return info


def _graph_dims(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") else None
            for d in value_info.type.tensor_type.shape.dim]


def check_against_graph(info: ArtifactInfo, graph) -> None:
    """The metadata must describe the graph's real input and output, or the runtime would feed
    the wrong tensor, blame the user's image, or label the wrong number of classes."""
    import onnx

    inputs = {i.name: i for i in graph.input}
    outputs = {o.name: o for o in graph.output}
    where = f"{info.path}: crossvit metadata does not match the graph"
    if info.input_name not in inputs:
        raise ArtifactError(f"{where}: it names input {info.input_name!r}, the graph has {sorted(inputs)}")
    if info.output_name not in outputs:
        raise ArtifactError(f"{where}: it names output {info.output_name!r}, the graph has {sorted(outputs)}")
    x = inputs[info.input_name]
    if x.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise ArtifactError(f"{where}: input {info.input_name!r} is not float32")
    dims = _graph_dims(x)
    if len(dims) != 4 or any(d is not None and d != want for d, want in zip(dims[1:], info.input_shape)):
        shown = ["?" if d is None else d for d in dims]
        raise ArtifactError(f"{where}: input {info.input_name!r} is {shown}, the metadata says "
                            f"[batch, {', '.join(map(str, info.input_shape))}]")
    if dims[0] is not None and not info.batch_min <= dims[0] <= info.batch_max:
        raise ArtifactError(f"{where}: the graph's batch is fixed at {dims[0]}, the metadata says "
                            f"{info.batch_min}..{info.batch_max}")
    out_dims = _graph_dims(outputs[info.output_name])
    if len(out_dims) != 2 or out_dims[1] is not None and out_dims[1] != info.num_classes:
        shown = ["?" if d is None else d for d in out_dims]
        raise ArtifactError(f"{where}: output {info.output_name!r} is {shown}, the metadata has "
                            f"{info.num_classes} labels")


def read_artifact(path: str | Path) -> ArtifactInfo:
    """Describe an `.onnx` file or a TensorRT engine (through its `NAME.plan.json` manifest)."""
    path = Path(path)
    suffix = path.suffix.lower()
    check_input_file(path, ArtifactError)  # missing, a folder, a pipe: said before the suffix is judged
    if suffix == ".onnx":
        meta, proto = read_onnx_metadata(path)
        info = ArtifactInfo.from_metadata(path, "onnx", meta)
        check_against_graph(info, proto.graph)
        return info
    if suffix in ENGINE_SUFFIXES:
        manifest = manifest_path(path)
        if not manifest.exists() and not manifest.is_symlink():
            raise ArtifactError(f"{path}: its manifest {manifest.name} is missing (built by crossvit build)")
        check_input_file(manifest, ArtifactError)  # a folder, a pipe, a link to a device: said, never read
        if manifest.stat().st_size > MANIFEST_MAX_BYTES:
            raise ArtifactError(f"{manifest}: {manifest.stat().st_size >> 20} MB is not a manifest of ours "
                                f"(a few kB)")
        try:
            text = manifest.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{manifest}: not a readable manifest ({e})") from None
        return ArtifactInfo.from_metadata(path, "engine", decode_metadata(text, ENGINE_FORMAT, str(manifest)))
    if suffix in CHECKPOINT_SUFFIXES:
        raise ArtifactError(f"{path}: a checkpoint is served by the torch backend (backend='torch')")
    raise ArtifactError(f"{path}: unknown artifact type {path.suffix!r} (expected .onnx or .plan)")
