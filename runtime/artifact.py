"""What an artifact says about itself: read from ONNX metadata_props or an engine manifest.

Everything the runtime needs (input size, batch range, tensor names, labels, preprocessing,
precision) travels inside the artifact; nothing here imports torch or the model package.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from crossvit.errors import ArtifactError

METADATA_KEY = "crossvit"
ONNX_FORMAT = "crossvit-onnx"
ENGINE_FORMAT = "crossvit-engine"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


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

    @classmethod
    def from_metadata(cls, path: Path, kind: str, meta: dict) -> "ArtifactInfo":
        try:
            model = meta["model"]
            inp, out = meta["inputs"][0], meta["outputs"][0]
            c, h, w = (int(v) for v in inp["shape"][1:])
            return cls(path=path, kind=kind, precision=str(meta["precision"]),
                       batch_min=int(meta["batch"]["min"]), batch_max=int(meta["batch"]["max"]),
                       input_name=str(inp["name"]), input_shape=(c, h, w), output_name=str(out["name"]),
                       labels=tuple(str(x) for x in model["labels"]),
                       preprocessing=dict(model["preprocessing"]), model=model, raw=meta)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise ArtifactError(f"{path}: crossvit metadata is incomplete ({type(e).__name__}: {e})") from None


def read_onnx_metadata(path: str | Path) -> dict:
    """The "crossvit" JSON entry of an ONNX file's metadata_props (weights are not loaded)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such file" if not path.exists() else f"{path}: is not a file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # DecodeError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"{path}: not a readable ONNX file ({first})") from None
    if not proto.graph.node:
        raise ArtifactError(f"{path}: not a readable ONNX file (empty graph)")
    props = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in props:
        raise ArtifactError(f"{path}: has no crossvit metadata (export it with `crossvit export`)")
    try:
        meta = json.loads(props[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: crossvit metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != ONNX_FORMAT:
        raise ArtifactError(f"{path}: crossvit metadata has an unknown format")
    return meta


def read_artifact(path: str | Path) -> ArtifactInfo:
    """Describe an `.onnx` file or a TensorRT engine (through its `NAME.plan.json` manifest)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return ArtifactInfo.from_metadata(path, "onnx", read_onnx_metadata(path))
    if suffix in (".plan", ".engine"):
        manifest = path.with_name(path.name + ".json")
        if not path.is_file():
            raise ArtifactError(f"{path}: no such file")
        if not manifest.is_file():
            raise ArtifactError(f"{path}: its manifest {manifest.name} is missing (built by crossvit engine)")
        try:
            meta = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{manifest}: not a readable manifest ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != ENGINE_FORMAT:
            raise ArtifactError(f"{manifest}: not a crossvit engine manifest")
        return ArtifactInfo.from_metadata(path, "engine", meta)
    if suffix in CHECKPOINT_SUFFIXES:
        raise ArtifactError(f"{path}: a checkpoint is served by the torch backend (backend='torch')")
    raise ArtifactError(f"{path}: unknown artifact type {path.suffix!r} (expected .onnx or .plan)")
