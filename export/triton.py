"""`crossvit triton-repo`: a Triton Inference Server model repository from a .plan or an .onnx.

    OUT/NAME/config.pbtxt        the model configuration (protobuf text format, written here)
    OUT/NAME/labels.txt          one label per line: Triton's label file (classification extension)
    OUT/NAME/1/model.plan        a TensorRT engine (platform tensorrt_plan), or
    OUT/NAME/1/model.onnx        an ONNX (onnxruntime_onnx); a folder `model.onnx/` holding
                                 `model.onnx` and its data files when it has external data
    OUT/inferenceservice.yaml    a KServe InferenceService (Triton runtime); Triton reads only
                                 folders of a repository, so the file does not disturb it

Everything in config.pbtxt comes from the artifact itself (an ONNX's metadata, a plan's
manifest): tensor names, dims without the batch, the batch limit, the labels. It declares the
graph's FP32 input only, required: `crossvit serve`'s optional BYTES input `images` (encoded
image files) is decoded by that server, and Triton's onnxruntime and tensorrt backends hand
inputs to the graph as they come, so Triton could not serve it. The options are
checked before anything is written; the repository is built in a temp folder beside OUT and
renamed into place, so a failure leaves no half-written repository.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from crossvit import __version__
from crossvit.contract import get_precision
from crossvit.errors import ArtifactError, ConfigError, ExportError, OutputError, UsageError
from crossvit.files import TEMP_TAG, atomic_write, check_input_file, check_output_dir, first_line, temp_dir
from crossvit.runtime.artifact import ArtifactInfo, read_artifact

NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")  # also a folder name: no leading dot
MAX_NAME_CHARS = 128  # a folder name, written inside a hidden temporary folder first: well under 255 bytes
VERSION = "1"
LABELS_FILE = "labels.txt"
ISVC_FILE = "inferenceservice.yaml"
STORAGE_PLACEHOLDER = "s3://YOUR-BUCKET/PATH"
ACCELERATORS = ("fp16", "fp32")  # ONNX Runtime's TensorRT execution provider, inside Triton
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16"}
PLATFORMS = {"engine": ("tensorrt_plan", "model.plan"), "onnx": ("onnxruntime_onnx", "model.onnx")}


@dataclass(frozen=True)
class TritonModel:
    """One model's folder, decided and checked before anything is written."""

    info: ArtifactInfo
    name: str
    platform: str
    model_file: str  # in the version folder
    max_batch: int
    preferred_batch: tuple[int, ...]
    max_queue_delay_us: int
    instances: int
    kind: str  # KIND_GPU or KIND_CPU
    accelerator: str | None  # "fp16"/"fp32": ONNX Runtime's TensorRT provider
    external_data: tuple[str, ...] = ()  # an ONNX's data files, relative to its folder

    def summary(self, out: Path) -> list[str]:
        """One line per file written."""
        folder = out / self.name
        model = folder / VERSION / self.model_file
        extra = f" + {len(self.external_data)} external data file(s)" if self.external_data else ""
        where = f"{self.instances} x {self.kind}" + (f", TensorRT {self.accelerator}" if self.accelerator else "")
        return [f"wrote {model} ({self.platform}, {self.info.precision}{extra})",
                f"wrote {folder / 'config.pbtxt'} (max_batch_size {self.max_batch}, preferred batch "
                f"{list(self.preferred_batch)}, {where})",
                f"wrote {folder / LABELS_FILE} ({self.info.num_classes} labels)",
                f"wrote {out / ISVC_FILE} (KServe InferenceService {_isvc_name(self.name)}: set its storageUri "
                f"to where you upload {out.name}/)"]


# Bounds that keep config.pbtxt loadable (Triton's count is an int32) and sane: a batching delay over
# a minute or a thousand copies of one model on one server is a typo, not a configuration.
MAX_INSTANCES = 1024
MAX_QUEUE_DELAY_US = 60_000_000


def parse_batch_list(text: str | None) -> tuple[int, ...] | None:
    """'4,8' -> (4, 8); None or '' -> None (the default)."""
    if not text:
        return None
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise UsageError(f"--preferred-batch must be comma-separated integers, got {text!r}") from None


def _inspect_onnx(info: ArtifactInfo) -> tuple[tuple[str, ...], list[str], bool]:
    """(its external data files, its non-standard op domains, whether its batch is fixed)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    proto = onnx.load(str(info.path), load_external_data=False)

    def tensors(graph):
        yield from graph.initializer
        for node in graph.node:
            for a in node.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    yield from tensors(g)

    locations = sorted({ExternalDataInfo(t).location for t in tensors(proto.graph) if uses_external_data(t)})
    for loc in locations:
        if PurePosixPath(loc).is_absolute() or ".." in PurePosixPath(loc).parts:
            raise ArtifactError(f"{info.path}: external data location {loc!r} is outside the ONNX's folder")
        check_input_file(info.path.parent / loc, ArtifactError)
    domains = sorted({n.domain for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    inp = next(i for i in proto.graph.input if i.name == info.input_name)
    fixed = inp.type.tensor_type.shape.dim[0].HasField("dim_value")
    return tuple(locations), domains, fixed


def _triton_type(info: ArtifactInfo, which: str) -> str:
    dtype = (info.raw.get(which) or [{}])[0].get("dtype", "float32")
    if dtype not in TRITON_TYPES:
        raise ArtifactError(f"{info.path.name}: its {which[:-1]} is {dtype}; Triton types known here: "
                            f"{', '.join(TRITON_TYPES)}")
    return TRITON_TYPES[dtype]


def plan_model(info: ArtifactInfo, *, name: str | None = None, instances: int = 1, max_batch: int | None = None,
               preferred_batch: Sequence[int] | None = None, max_queue_delay_us: int = 100,
               tensorrt_accelerator: str | None = None) -> TritonModel:
    """Check the options against the artifact; everything a repository needs, nothing written."""
    name = info.model_name if name is None else name
    if not NAME_RE.fullmatch(name):
        raise UsageError(f"--model-name {name!r}: a Triton model name here is letters, digits, '_', '.' and '-', "
                          "not starting with a dot")
    if len(name) > MAX_NAME_CHARS:
        raise UsageError(f"--model-name is {len(name)} characters long; a model name may have at most "
                          f"{MAX_NAME_CHARS}")
    if isinstance(instances, bool) or not isinstance(instances, int) or not 1 <= instances <= MAX_INSTANCES:
        raise UsageError(f"--instances must be an integer in 1..{MAX_INSTANCES}, got {instances!r}")
    if (isinstance(max_queue_delay_us, bool) or not isinstance(max_queue_delay_us, int)
            or not 0 <= max_queue_delay_us <= MAX_QUEUE_DELAY_US):
        raise UsageError(f"--max-queue-delay-us must be an integer in 0..{MAX_QUEUE_DELAY_US} (one minute), "
                          f"got {max_queue_delay_us!r}")
    what = "plan's profile" if info.kind == "engine" else "ONNX's batch range"
    if info.kind not in PLATFORMS:
        raise ExportError(f"{info.path.name}: Triton serves an .onnx or a .plan, not a {info.kind}")
    if info.kind == "engine" and (info.raw.get("tensorrt") or {}).get("library") == "tensorrt-rtx":
        onnx = (info.raw.get("source") or {}).get("onnx") or "the ONNX it was built from"
        raise ExportError(f"{info.path.name} is a TensorRT-RTX plan and Triton has no backend for those (its "
                          f"tensorrt backend runs standard TensorRT plans): give {onnx} instead (ONNX Runtime, "
                          "optionally with --tensorrt-accelerator), or build with `crossvit build --library tensorrt`")
    external, domains, fixed = _inspect_onnx(info) if info.kind == "onnx" else ((), [], False)
    if info.kind == "engine":
        io = {t.get("name"): t for t in info.raw.get("engine_io") or []}
        fixed = (io.get(info.input_name) or {}).get("shape", [-1])[0] != -1
    if info.batch_min > 1 or fixed:
        raise ExportError(f"{info.path.name} has a fixed batch or one starting at {info.batch_min} "
                          f"({what} {info.batch_min}..{info.batch_max}); Triton batches requests from 1 up: "
                          "export (and build) it with a batch range such as 1:64")
    if max_batch is None:
        max_batch = info.batch_max
    elif isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= info.batch_max:
        raise ConfigError(f"--max-batch {max_batch} is outside the {what} 1..{info.batch_max}")
    if preferred_batch is None:  # TensorRT tuned its kernels for the profile's opt batch
        opt = (info.raw.get("batch") or {}).get("opt") if info.kind == "engine" else None
        preferred = sorted({b for b in (opt, max_batch) if isinstance(b, int) and 1 <= b <= max_batch})
    else:
        preferred = list(preferred_batch)
        if not preferred or any(isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= max_batch
                                for b in preferred):
            raise ConfigError(f"--preferred-batch {preferred}: give sizes within 1..{max_batch} (max_batch_size)")
        preferred = sorted(set(preferred))
    if tensorrt_accelerator is not None:
        if tensorrt_accelerator not in ACCELERATORS:
            raise ConfigError(f"--tensorrt-accelerator must be one of {', '.join(ACCELERATORS)}, "
                              f"got {tensorrt_accelerator!r}")
        if info.kind != "onnx":
            raise ConfigError(f"--tensorrt-accelerator is for an ONNX; {info.path.name} is a TensorRT engine already")
        if get_precision(info.precision).target == "cpu" or domains:
            raise ExportError(f"{info.path.name} is {info.precision}"
                              + (f" with ops from {', '.join(domains)}" if domains else "")
                              + ": ONNX Runtime-only ops that TensorRT must never run; serve it on CPU "
                                "(without --tensorrt-accelerator) or give the fp32 ONNX or a TensorRT variant")
    for which in ("inputs", "outputs"):
        _triton_type(info, which)
    for label in info.labels:
        if label.splitlines() not in ([label], []):
            raise ArtifactError(f"{info.path.name}: label {label!r} holds a line break; Triton's label file "
                                "has one label a line")
    platform, model_file = PLATFORMS[info.kind]
    kind = "KIND_GPU" if info.kind == "engine" or tensorrt_accelerator else "KIND_CPU"
    return TritonModel(info=info, name=name, platform=platform, model_file=model_file, max_batch=max_batch,
                       preferred_batch=tuple(preferred), max_queue_delay_us=max_queue_delay_us,
                       instances=instances, kind=kind, accelerator=tensorrt_accelerator, external_data=external)


# -- the files -------------------------------------------------------------------------------

def _q(text: str) -> str:
    """A protobuf text-format string."""
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ArtifactError(f"{text!r}: control characters cannot be written into config.pbtxt")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dims(values: Sequence[int]) -> str:
    return f"[ {', '.join(map(str, values))} ]"


def _engine_note(info: ArtifactInfo) -> list[str]:
    """What the Triton server must match to load the plan (from its manifest)."""
    trt, device = info.raw.get("tensorrt") or {}, info.raw.get("device") or {}
    cc = ".".join(map(str, device.get("compute_capability") or ["?"]))
    notes = [f"built with TensorRT {trt.get('version', '?')} for {device.get('name', '?')} (compute capability "
             f"{cc}, hardware compatibility {trt.get('hardware_compatibility', 'none')}): serve it with a "
             "Triton release whose TensorRT is that version, on such a GPU"]
    if trt.get("version_compatible"):
        notes.append("version compatible: start Triton with --backend-config=tensorrt,version-compatible=true")
    return [json.dumps(n)[1:-1] for n in notes]


def render_config(m: TritonModel) -> str:
    """config.pbtxt, protobuf text format of Triton's ModelConfig."""
    info = m.info
    source = json.dumps(info.path.name)
    head = [f"# Triton model configuration written by crossvit {__version__} triton-repo from {source} "
            f"({info.precision})."]
    if info.kind == "engine":
        head += [f"# {note}" for note in _engine_note(info)]
    lines = [*head,
             f"name: {_q(m.name)}",
             f"platform: {_q(m.platform)}",
             f"max_batch_size: {m.max_batch}",
             "input [", "  {", f"    name: {_q(info.input_name)}", f"    data_type: {_triton_type(info, 'inputs')}",
             f"    dims: {_dims(info.input_shape)}", "  }", "]",
             "output [", "  {", f"    name: {_q(info.output_name)}",
             f"    data_type: {_triton_type(info, 'outputs')}", f"    dims: {_dims([info.num_classes])}",
             f"    label_filename: {_q(LABELS_FILE)}", "  }", "]",
             "dynamic_batching {", f"  preferred_batch_size: {_dims(m.preferred_batch)}",
             f"  max_queue_delay_microseconds: {m.max_queue_delay_us}", "}",
             "instance_group [", "  {", f"    count: {m.instances}", f"    kind: {m.kind}", "  }", "]",
             "model_warmup ["]
    for i, batch in enumerate(sorted({1, m.max_batch})):
        lines += [*(["  },"] if i else []), "  {", f"    name: {_q(f'random_batch_{batch}')}",
                  f"    batch_size: {batch}", "    inputs {", f"      key: {_q(info.input_name)}", "      value {",
                  f"        data_type: {_triton_type(info, 'inputs')}", f"        dims: {_dims(info.input_shape)}",
                  "        random_data: true", "      }", "    }"]
    lines += ["  }", "]"]
    if m.accelerator:
        lines += ["optimization {", "  execution_accelerators {", "    gpu_execution_accelerator: [", "      {",
                  '        name: "tensorrt"', "        parameters {", '          key: "precision_mode"',
                  f"          value: {_q(m.accelerator.upper())}", "        }", "      }", "    ]", "  }", "}"]
    return "\n".join(lines) + "\n"


def _isvc_name(name: str) -> str:
    """A Kubernetes (DNS-1035) name for the InferenceService, at most 45 characters (KServe's advice)."""
    s = re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", name.lower())).strip("-")
    s = s if s[:1].isalpha() else f"crossvit-{s}".rstrip("-")
    return s[:45].rstrip("-")


def render_inference_service(m: TritonModel, out: Path) -> str:
    """A KServe InferenceService serving the repository with its Triton runtime (plain YAML text)."""
    folder = json.dumps(out.name)[1:-1]
    lines = ["# KServe InferenceService for the Triton model repository in this folder "
             f"(written by crossvit {__version__}).",
             f"# 1. Upload this folder ({folder}/: {m.name}/ and this file) to object storage, e.g.",
             f"#      aws s3 cp --recursive {folder} {STORAGE_PLACEHOLDER}",
             f"# 2. Replace storageUri below ({STORAGE_PLACEHOLDER}) with that location.",
             "# 3. kubectl apply -f inferenceservice.yaml",
             f"# Triton serves the model as {m.name!r}: POST /v2/models/{m.name}/infer (Open Inference Protocol).",
             *(f"# The plan was {note}" for note in (_engine_note(m.info) if m.info.kind == "engine" else [])),
             "apiVersion: serving.kserve.io/v1beta1",
             "kind: InferenceService",
             "metadata:",
             f"  name: {_isvc_name(m.name)}",
             "spec:",
             "  predictor:",
             "    model:",
             "      modelFormat:",
             "        name: triton",
             "      protocolVersion: v2",
             f'      storageUri: "{STORAGE_PLACEHOLDER}"']
    if m.info.kind == "engine" and (m.info.raw.get("tensorrt") or {}).get("version_compatible"):
        lines += ["      args:", '        - "--backend-config=tensorrt,version-compatible=true"']
    if m.kind == "KIND_GPU":
        lines += ["      resources:", "        limits:", '          nvidia.com/gpu: "1"']
    return "\n".join(lines) + "\n"


def _check_replaceable(out: Path, force: bool) -> None:
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if entries and not force:
        raise OutputError(f"{out}: exists and is not empty; give another folder or --force to replace it")
    foreign = [e.name for e in entries if e.name != ISVC_FILE and not (e / "config.pbtxt").is_file()]
    if foreign:
        raise OutputError(f"{out}: --force replaces a model repository only, and it holds "
                          f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}; give another folder")


def write_repo(m: TritonModel, out: str | Path, *, force: bool = False) -> Path:
    """Write the repository of `m` as the folder `out`: built beside it, then renamed into place."""
    out = Path(os.path.abspath(out))
    check_output_dir(out)
    _check_replaceable(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out.parent, hint=out.name)
    try:
        folder = tmp / m.name
        version = folder / VERSION
        src = m.info.path
        if m.external_data:  # Triton: a folder model.onnx/ holding model.onnx and its other files
            version = version / m.model_file
            for loc in m.external_data:
                atomic_write(version / loc, lambda t, loc=loc: shutil.copyfile(src.parent / loc, t))
        atomic_write(version / m.model_file, lambda t: shutil.copyfile(src, t))
        labels = "".join(f"{label}\n" for label in m.info.labels)
        atomic_write(folder / LABELS_FILE, lambda t: t.write_text(labels, encoding="utf-8"))
        config = render_config(m)
        atomic_write(folder / "config.pbtxt", lambda t: t.write_text(config, encoding="utf-8"))
        isvc = render_inference_service(m, out)
        atomic_write(tmp / ISVC_FILE, lambda t: t.write_text(isvc, encoding="utf-8"))
        for d in (tmp, *(p for p in tmp.rglob("*") if p.is_dir())):
            d.chmod(0o755)
        _swap_into_place(tmp, out, force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _swap_into_place(tmp: Path, out: Path, force: bool) -> None:
    """Rename `tmp` to `out`. With `force`, a non-empty `out` is moved aside first and removed only
    afterwards; without it, the rename fails if `out` was filled meanwhile (it replaces only an empty folder)."""
    old = None
    try:
        if force and out.exists() and any(out.iterdir()):
            old = out.parent / f".{out.name}.old.{TEMP_TAG}-{os.getpid()}-{os.urandom(4).hex()}"
            os.replace(out, old)
        os.replace(tmp, out)  # onto a missing or empty folder
    except OSError as e:
        if old is not None and not out.exists():
            os.replace(old, out)
        raise OutputError(f"{out}: cannot write it ({e.strerror or first_line(e)})") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_triton_repo(artifact: str | Path, out_dir: str | Path, *, name: str | None = None, instances: int = 1,
                      max_batch: int | None = None, preferred_batch: Sequence[int] | None = None,
                      max_queue_delay_us: int = 100, tensorrt_accelerator: str | None = None,
                      force: bool = False) -> Path:
    """A Triton model repository (and a KServe InferenceService beside it) for an .onnx or a .plan
    with its manifest; returns `out_dir`."""
    info = read_artifact(artifact)
    m = plan_model(info, name=name, instances=instances, max_batch=max_batch, preferred_batch=preferred_batch,
                   max_queue_delay_us=max_queue_delay_us, tensorrt_accelerator=tensorrt_accelerator)
    return write_repo(m, out_dir, force=force)


# -- the command -----------------------------------------------------------------------------

def add_parser(sub) -> argparse.ArgumentParser:
    """Add `triton-repo` to the `crossvit` subcommands (`sub`: the add_subparsers object)."""
    p = sub.add_parser(
        "triton-repo", help="write a Triton Inference Server model repository (+ a KServe InferenceService)",
        description="Write a Triton model repository for an artifact: REPO/NAME/config.pbtxt, labels.txt and "
                    "1/model.plan (TensorRT, on a GPU) or 1/model.onnx (ONNX Runtime, on CPU unless "
                    "--tensorrt-accelerator), and REPO/inferenceservice.yaml for KServe. Names, dims, the batch "
                    "limit and the labels come from the artifact's metadata or manifest.")
    p.add_argument("artifact", type=Path, metavar="ARTIFACT", help="MODEL.onnx, or MODEL.plan with MODEL.plan.json")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="REPO",
                   help="the repository folder to write (must be missing or empty, unless --force)")
    p.add_argument("--model-name", "--name", dest="model_name", default=None, metavar="NAME",
                   help="model name in Triton, as `crossvit serve --model-name` (letters, digits, _ . -; default: "
                        "the name serve uses, the model's registered name or the file name up to its first dot; "
                        "--name is the same option, kept for old command lines)")
    p.add_argument("--instances", type=int, default=1, metavar="N",
                   help="model instances Triton runs side by side (default 1)")
    p.add_argument("--max-batch", type=int, default=None, metavar="N",
                   help="max_batch_size (default: the plan's profile max or the ONNX's batch max; "
                        "may only be smaller)")
    p.add_argument("--preferred-batch", default=None, metavar="4,8",
                   help="batch sizes the dynamic batcher aims for (default: the plan's opt and max, "
                        "or the max batch)")
    p.add_argument("--max-queue-delay-us", type=int, default=100, metavar="D",
                   help="how long a request may wait for a fuller batch, in microseconds (default 100)")
    p.add_argument("--tensorrt-accelerator", default=None, choices=ACCELERATORS,
                   help="ONNX only: run it on a GPU with TensorRT inside ONNX Runtime in this precision "
                        "(refused for int8-cpu)")
    p.add_argument("--force", action="store_true",
                   help="replace REPO if it holds a model repository already")
    p.set_defaults(func=cmd_triton_repo)
    return p


def cmd_triton_repo(args) -> int:
    info = read_artifact(args.artifact)
    m = plan_model(info, name=args.model_name, instances=args.instances, max_batch=args.max_batch,
                   preferred_batch=parse_batch_list(args.preferred_batch),
                   max_queue_delay_us=args.max_queue_delay_us, tensorrt_accelerator=args.tensorrt_accelerator)
    if info.random_weights:
        print(f"crossvit: warning: {args.artifact.name!r} was exported from random weights: its predictions "
              "mean nothing", file=sys.stderr)
    out = write_repo(m, args.output, force=args.force)
    for line in m.summary(out):
        print(line.encode("unicode_escape").decode("ascii") if not line.isprintable() else line)
    return 0
