"""One small interface over the inference backends: `open_session(artifact) -> Session`.

A session is a context manager with `infer(float32 N x C x H x W) -> logits` and
`predict(images, top_k)`. `infer` validates its input before touching the backend, splits
batches larger than the artifact allows and pads ones smaller than its minimum.
Backends: ONNX Runtime (CPU; CUDA/TensorRT execution providers when onnxruntime-gpu is
installed), OpenVINO (CPU, runtime/openvino.py), TensorRT engines (runtime/tensorrt.py) and
PyTorch checkpoints (lazily imported, for comparisons). The backend table here (BACKENDS,
`_open`) is the one place that names them all; the Session base they share is runtime/base.py,
so no backend module imports this one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from crossvit.contract import CHECKPOINT_SUFFIXES, ENGINE_SUFFIXES, INPUT_NAME, OUTPUT_NAME, PRECISION_TABLE
from crossvit.errors import ArtifactError, BackendUnavailable
from crossvit.files import check_input_file, first_line

from .artifact import ArtifactInfo, read_artifact
from .base import Session, intra_op_threads

log = logging.getLogger("crossvit.runtime")

# backend -> the artifact kind it runs; "auto" picks by kind (AUTO_BACKEND).
BACKENDS = {
    "onnxruntime": "onnx",  # ONNX Runtime: CPU, or its CUDA provider with onnxruntime-gpu
    "ort-tensorrt": "onnx",  # ONNX Runtime's TensorRT execution provider (onnxruntime-gpu)
    "openvino": "onnx",  # OpenVINO on the CPU, runtime/openvino.py
    "tensorrt": "engine",  # our engines (`crossvit build`), runtime/tensorrt.py
    "torch": "checkpoint",  # PyTorch, for comparisons
}
AUTO_BACKEND = {"onnx": "onnxruntime", "engine": "tensorrt", "checkpoint": "torch"}
BACKEND_NAMES = ("auto", *BACKENDS)


# -- ONNX Runtime ------------------------------------------------------------------------

def _ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendUnavailable("onnxruntime is not installed: pip install onnxruntime "
                                 "(or onnxruntime-gpu on a CUDA machine)") from None
    return ort


class OnnxRuntimeSession(Session):
    """ONNX Runtime with the settings that make it fast here.

    - all graph optimizations (in memory only: an optimized graph has ORT-only fused ops and
      must never be written where TensorRT could be fed it; caching it measured no gain);
    - intra-op threads fitted to the CPUs this process may use (`intra_op_threads`), one
      inter-op thread, sequential execution (a CrossViT graph is one chain);
    - inputs handed over as contiguous float32 without copies;
    - `spin=False` for a process that does other work between calls (the server): ORT's pool
      threads otherwise spin after each call, and on 2 cores that took half the server's CPU
      (measured: 1.72 -> 0.90 ms of server CPU per request under load).
    """

    backend = "onnxruntime"

    def __init__(self, info: ArtifactInfo, device: str = "auto", *, threads: int | None = None, spin: bool = True):
        super().__init__(info)
        ort = _ort()
        providers = self._providers(ort, device)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = threads or intra_op_threads()
        if threads:
            so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if not spin:  # idle pool threads sleep instead of spinning: the CPU goes to the caller
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._sess = ort.InferenceSession(str(info.path), sess_options=so, providers=providers)
        except Exception as e:
            raise ArtifactError(f"{info.path}: ONNX Runtime cannot load it ({first_line(e)})") from None
        active = self._sess.get_providers()
        self.device = "cuda" if active[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
        if active[0] != providers[0]:
            log.warning("ONNX Runtime fell back from %s to %s", providers[0], active[0])
        self.providers = active
        self._input_name = info.input_name
        self._output_names = [info.output_name]

    @staticmethod
    def _providers(ort, device: str) -> list[str]:
        available = ort.get_available_providers()
        if device == "cpu":
            return ["CPUExecutionProvider"]
        wanted = {"cuda": ["CUDAExecutionProvider"], "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
                  "auto": ["CUDAExecutionProvider"]}.get(device)
        if wanted is None:
            raise BackendUnavailable(f"unknown device {device!r} for onnxruntime (cpu, cuda, tensorrt, auto)")
        chosen = [p for p in wanted if p in available]
        if not chosen:
            if device != "auto":
                log.warning("ONNX Runtime has no %s here (available: %s; install onnxruntime-gpu "
                            "on a CUDA machine); using the CPU", wanted[0], ", ".join(available))
            return ["CPUExecutionProvider"]
        return chosen + ["CPUExecutionProvider"]

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self._sess.run(self._output_names, {self._input_name: x})[0]

    def close(self) -> None:
        self._sess = None
        super().close()


# -- PyTorch (optional, for comparisons) --------------------------------------------------

class TorchSession(Session):
    """A checkpoint run in PyTorch; imports torch and crossvit.model only when opened."""

    backend = "torch"

    def __init__(self, path: Path, device: str = "auto", *, name: str | None = None, dtype: str = "fp32"):
        try:
            import torch
        except ImportError:
            raise BackendUnavailable("the torch backend needs PyTorch: pip install torch") from None
        from crossvit.model import load_model

        loaded = load_model(path, name=name)
        c, h, w = loaded.info.preprocessing["input_size"]
        info = ArtifactInfo(path=Path(path), kind="checkpoint", precision=dtype, batch_min=1,
                            batch_max=1 << 16, input_name=INPUT_NAME, input_shape=(c, h, w), output_name=OUTPUT_NAME,
                            labels=tuple(loaded.info.labels), preprocessing=loaded.info.preprocessing,
                            model=loaded.info.to_dict())
        super().__init__(info)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable("torch backend: no CUDA device (torch.cuda.is_available() is False)")
        self.device = device
        self._torch = torch
        self._dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        self.model = loaded.model.to(device=device, dtype=self._dtype).eval()

    def _run(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            t = torch.from_numpy(x).to(self.device, self._dtype)
            return self.model(t).float().cpu().numpy()


def artifact_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in ENGINE_SUFFIXES:
        return "engine"
    if suffix in CHECKPOINT_SUFFIXES:
        return "checkpoint"
    raise ArtifactError(f"{path}: unknown artifact type {path.suffix!r} (expected .onnx, .plan or a checkpoint)")


def _open(backend: str, path: Path, device: str, options: dict, sha=None) -> Session:
    if backend == "torch":
        return TorchSession(path, device, **options)
    info = read_artifact(path)
    if backend == "auto":  # an .onnx: the backend its precision is made for
        spec = PRECISION_TABLE.get(info.precision)
        backend = spec.runtime if spec else "onnxruntime"
    if backend == "tensorrt":
        from .tensorrt import TensorRTSession

        return TensorRTSession(info, device, **options)
    if backend == "openvino":
        from .cpu_choice import gate_yardstick
        from .openvino import OpenVinoSession

        if "yardstick" not in options:  # the first model is held to its gate's answer (None: the gate itself)
            options = {**options, "yardstick": gate_yardstick(path, info.precision, options.get("hint"), sha)}
        return OpenVinoSession(info, device, **options)
    if options.get("hint"):
        raise BackendUnavailable(f"an inference-precision hint ({options['hint']}) is OpenVINO's; "
                                 f"the {backend} backend has none")
    options = {k: v for k, v in options.items() if k != "hint"}
    return OnnxRuntimeSession(info, "tensorrt" if backend == "ort-tensorrt" else device, **options)


def _fallback_onnx(plan: Path) -> tuple[Path | None, str | None]:
    """The ONNX an engine was built from when it is beside the plan (its manifest names a file name),
    unchanged since, and, for a variant, not failed by a gate report beside it
    (`cpu_choice.variant_gate_refuses`); else (None, why it cannot stand in for the plan; None when
    the plan names no ONNX)."""
    from crossvit.errors import CrossViTError
    from crossvit.files import check_input_file, first_line

    from .cpu_choice import FileHashes, variant_gate_refuses

    try:
        source = read_artifact(plan).raw.get("source") or {}
    except CrossViTError:  # the plan's own error is the one to report
        return None, None
    if not isinstance(source, dict) or not isinstance(source.get("onnx"), str) or not source["onnx"]:
        return None, None
    name = source["onnx"]
    if Path(name).name != name or name in (".", "..") or "\0" in name or \
            len(name.encode("utf-8", "surrogateescape")) > 255:  # longer than a file name can be
        return None, f"its manifest names the ONNX it was built from as {name[:80]!r}, not a file beside it"
    onnx = plan.parent / name
    if not os.path.lexists(onnx):
        return None, f"the ONNX it was built from, {name}, is not beside it"
    sha = FileHashes()  # the variant's gate below is checked against the same hash
    try:
        check_input_file(onnx, ArtifactError)
        changed = sha(onnx) != source.get("sha256")
    except (ArtifactError, OSError) as e:
        return None, f"the ONNX it was built from, {name}, {str(e).replace(f'{onnx}: ', '')[:120]}"
    if changed:
        return None, f"the ONNX it was built from, {name}, has changed since the build"

    try:
        precision = read_artifact(onnx).precision
    except CrossViTError as e:
        return None, f"the ONNX it was built from, {name}, cannot be read ({first_line(e)})"
    refused = variant_gate_refuses(onnx, precision, sha) if precision != "fp32" else None
    if refused:  # the reference file needs no gate; a variant whose gate here did not pass is not run
        return None, f"the ONNX it was built from, {name}, did not pass its gate on the CPU ({refused})"
    return onnx, None


def _runs_on_cpu(device: str) -> bool:
    if device == "cpu":
        return True
    if device != "auto":
        return False
    try:
        return "CUDAExecutionProvider" not in _ort().get_available_providers()
    except BackendUnavailable:
        return True


def open_session(artifact: str | Path, backend: str = "auto", device: str = "auto", *, exact: bool = False,
                 **options) -> Session:
    """Open `artifact` (.onnx, .plan or a checkpoint) with `backend`, or the one for its kind.

    With backend="auto":
    - an fp32 .onnx that will run on the CPU runs the CPU path chosen for this machine
      (`cpu_choice.choose_cpu_path`: the fastest gated candidate measured here by `crossvit
      deploy`, else the rule for this CPU's flags over the gated ones: OpenVINO bf16 or int8,
      ONNX Runtime int8-cpu...); `exact=True` runs the file given, in ONNX Runtime;
    - another .onnx runs in the backend its precision is made for (int8-ov: OpenVINO);
    - an engine that cannot run here (no GPU or TensorRT, or built for another GPU or TensorRT
      version) falls back to the ONNX it was built from, when that file is beside it, unchanged,
      and (a variant) not failed by a gate report beside it (and from there, as above, to its
      gated CPU variant).
    The choice is logged and kept in `session.chosen` (None when the file given runs).
    """
    if not isinstance(artifact, (str, os.PathLike)):
        raise ArtifactError(f"open_session needs a path (str or Path), got {type(artifact).__name__}")
    path = Path(artifact)
    if backend not in BACKEND_NAMES:
        raise BackendUnavailable(f"unknown backend {backend!r}; choose from {', '.join(BACKEND_NAMES)}")
    if not path.exists():
        check_input_file(path, ArtifactError)  # why: a symlink loop, a folder it may not enter, ...
        raise ArtifactError(f"{path}: no such file")
    kind = artifact_kind(path)
    chosen = AUTO_BACKEND[kind] if backend == "auto" else backend
    if backend == "auto" and kind == "onnx":
        chosen = "auto"  # by the file's precision, in _open
    elif BACKENDS[chosen] != kind:
        runs = {"onnx": ".onnx files", "engine": "TensorRT engines (.plan from `crossvit build`)",
                "checkpoint": f"checkpoints ({', '.join(CHECKPOINT_SUFFIXES)})"}[BACKENDS[chosen]]
        raise ArtifactError(f"{path}: the {chosen} backend runs {runs}, not {path.suffix} files")
    if backend == "auto" and kind == "onnx" and not exact:
        return _open_preferring_cpu_variant(path, device, options)
    try:
        return _open(chosen, path, device, options)
    except (ArtifactError, BackendUnavailable) as e:
        onnx, why_not = _fallback_onnx(path) if backend == "auto" and kind == "engine" else (None, None)
        if onnx is None:
            if why_not:
                raise type(e)(f"{e}; {why_not}, so it cannot run instead") from e
            raise
        log.warning("%s cannot run here (%s); using %s%s instead", path.name, e, onnx.name,
                    " with ONNX Runtime" if exact else "")
        if exact:
            return _open("onnxruntime", onnx, device, options)
        session = _open_preferring_cpu_variant(onnx, device, options)
        session.chosen = session.chosen or f"{onnx.name}: {path.name} cannot run here"
        return session


def _open_preferring_cpu_variant(onnx: Path, device: str, options: dict) -> Session:
    from .cpu_choice import FileHashes, decide_cpu_path

    sha = FileHashes()  # each file hashed once: by the choice, then for its gate's answer
    candidate, why = decide_cpu_path(onnx, sha) if _runs_on_cpu(device) and not options.get("hint") else (None, None)
    if candidate is None:
        session = _open("auto", onnx, device, options)
        if why:  # other CPU paths lie beside it: say why none of them runs
            log.info("using %s as given: %s", onnx.name, why)
            session.passed_over = f"{onnx.name} as given: {why}"
        return session
    try:
        session = _open(candidate.backend, onnx.parent / candidate.file, device, {**options, **candidate.options}, sha)
    except (ArtifactError, BackendUnavailable) as e:
        log.warning("%s cannot run here (%s); using %s with ONNX Runtime", candidate.label, e, onnx.name)
        session = _open("auto", onnx, device, options)
        session.passed_over = f"{onnx.name} as given: {candidate.label} cannot run here ({e})"
        return session
    log.info("using %s for %s: %s (exact=True / --exact runs the file given)", candidate.label, onnx.name, why)
    session.chosen = f"{candidate.label} for {onnx.name}: {why}"
    return session
