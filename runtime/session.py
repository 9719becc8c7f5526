"""One small interface over the inference backends: `open_session(artifact) -> Session`.

A session is a context manager with `infer(float32 N x C x H x W) -> logits` and
`predict(images, top_k)`. `infer` validates its input before touching the backend, splits
batches larger than the artifact allows and pads ones smaller than its minimum.
Backends: ONNX Runtime (CPU; CUDA/TensorRT execution providers when onnxruntime-gpu is
installed), OpenVINO (CPU, runtime/openvino.py), TensorRT engines (runtime/tensorrt.py) and
PyTorch checkpoints (lazily imported, for comparisons).
"""

from __future__ import annotations

import logging
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crossvit.contract import (CHECKPOINT_SUFFIXES, ENGINE_SUFFIXES, INPUT_NAME, OUTPUT_NAME, PRECISION_TABLE,
                               check_input_file, first_line)
from crossvit.errors import ArtifactError, BackendUnavailable, ConfigError, InputError

from .artifact import ArtifactInfo, read_artifact

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


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, int, int]  # C, H, W
    dtype: str
    batch_min: int
    batch_max: int


@dataclass(frozen=True)
class Prediction:
    """Top-k classes of one image, or the reason it could not be answered."""

    source: str
    labels: tuple[str, ...] = ()
    indices: tuple[int, ...] = ()
    probs: tuple[float, ...] = ()
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        if not self.ok:
            return {"source": self.source, "error": self.error}
        return {"source": self.source,
                "top": [{"label": l, "index": i, "prob": round(p, 6)}
                        for l, i, p in zip(self.labels, self.indices, self.probs)]}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z, dtype=np.float64)
    return e / e.sum(axis=-1, keepdims=True)


class Session:
    """Base class: validation, batching and prediction; backends implement `_run`."""

    backend = "base"

    def __init__(self, info: ArtifactInfo):
        self.info = info
        self.device = "cpu"
        self.chosen: str | None = None  # why open_session ran another file than the one given
        # why open_session ran the fp32 file given although other CPU paths lie beside it
        self.passed_over: str | None = None
        self._closed = False
        self._preprocessor = None

    # -- life cycle ---------------------------------------------------------------------
    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True

    # -- facts --------------------------------------------------------------------------
    @property
    def input_spec(self) -> InputSpec:
        i = self.info
        return InputSpec(i.input_name, i.input_shape, "float32", i.batch_min, i.batch_max)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.info.labels

    def describe(self) -> str:
        return f"{self.backend} ({self.device}, {self.info.precision})"

    @property
    def batch_invariant(self) -> bool:
        """False for a file whose rows' answers depend on their batch-mates (dynamic int8): `infer`
        then runs it one row at a time, so a row gets the same answer alone or in any batch."""
        spec = PRECISION_TABLE.get(self.info.precision)
        return spec is None or spec.batch_invariant

    # -- inference ----------------------------------------------------------------------
    def validate(self, batch) -> np.ndarray:
        """Check type, dtype, rank and C x H x W; say exactly what was received."""
        c, h, w = self.info.input_shape
        if not isinstance(batch, np.ndarray):
            raise InputError(f"infer expects a numpy.ndarray of shape (N, {c}, {h}, {w}), "
                             f"got {type(batch).__name__}")
        if batch.dtype != np.float32:
            raise InputError(f"infer expects dtype float32, got {batch.dtype} "
                             f"(convert with batch.astype(np.float32))")
        if batch.ndim != 4:
            raise InputError(f"infer expects a 4-D batch (N, {c}, {h}, {w}), got shape {batch.shape}")
        if tuple(batch.shape[1:]) != (c, h, w):
            raise InputError(f"infer expects images of shape ({c}, {h}, {w}), got {tuple(batch.shape[1:])} "
                             f"(batch shape {batch.shape})")
        if batch.shape[0] < 1:
            raise InputError("infer got an empty batch (N = 0)")
        if not np.isfinite(batch).all():
            bad = int(np.argwhere(~np.isfinite(batch).reshape(len(batch), -1).all(axis=1))[0, 0])
            raise InputError(f"infer got NaN or infinite values (first in image {bad} of the batch)")
        return np.ascontiguousarray(batch)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Logits (N, num_classes) float32 for a preprocessed batch."""
        if self._closed:
            raise ArtifactError(f"session for {self.info.path.name} is closed")
        x = self.validate(batch)
        n, lo, hi = x.shape[0], self.info.batch_min, self.info.batch_max
        step = hi if self.batch_invariant else 1  # one row (padded to the minimum) at a time
        if lo <= n <= step:
            return self._checked_run(x)
        outs = []
        for start in range(0, n, step):
            chunk = x[start:start + step]
            k = chunk.shape[0]
            if k < lo:  # pad up to the artifact's minimum batch, then drop the padding
                pad = np.zeros((lo - k, *chunk.shape[1:]), dtype=np.float32)
                chunk = np.concatenate([chunk, pad])
            outs.append(self._checked_run(np.ascontiguousarray(chunk))[:k])
        return np.concatenate(outs)

    def _checked_run(self, x: np.ndarray) -> np.ndarray:
        """`_run`, and its logits checked against the metadata: (N, num_classes). A graph whose
        output dims are symbolic passes the load-time check whatever it computes; more columns
        than labels would index past them, fewer would be labelled wrongly."""
        logits = self._run(x)
        want = (x.shape[0], self.info.num_classes)
        shape = tuple(getattr(logits, "shape", ()))
        if shape != want:
            raise ArtifactError(f"{self.info.path}: the model gave logits of shape {shape}, expected "
                                f"{want} (batch, classes): its metadata has {want[1]} labels")
        return logits

    def _run(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @property
    def preprocessor(self):
        if self._preprocessor is None:
            from .preprocess import Preprocessor

            self._preprocessor = Preprocessor.from_dict(self.info.preprocessing)
        return self._preprocessor

    def predict(self, images, top_k: int = 5, batch_size: int | None = None) -> list[Prediction]:
        """Top-k labels for image paths, bytes or PIL images; a bad one gets an error entry.

        `images` is one image (a path, bytes, a PIL image) or a list of them.
        """
        from PIL import Image

        from .preprocess import preprocess_files

        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
            raise ConfigError(f"top_k must be an integer >= 1, got {top_k!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
                                       or batch_size < 1):
            raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        top_k = min(int(top_k), self.info.num_classes)
        batch_size = int(batch_size or min(self.info.batch_max, 32))
        single = isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image))
        try:
            items = [images] if single else list(images)
        except TypeError:  # None, a number
            raise InputError(f"images must be a path, bytes, a PIL image or a list of them, got "
                             f"{type(images).__name__}") from None
        results: list[Prediction] = []
        for start in range(0, len(items), batch_size):
            group = items[start:start + batch_size]
            array, good, errors = preprocess_files(group, self.preprocessor)
            logits = self.infer(array) if len(good) else np.zeros((0, self.info.num_classes), np.float32)
            finite = np.isfinite(logits).all(axis=1)
            probs = softmax(np.where(finite[:, None], logits, 0))
            top = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
            gi = ei = 0
            for j, item in enumerate(group):  # good and errors are both in input order
                name = str(item) if isinstance(item, (str, Path)) else f"image {start + j}"
                if gi < len(good) and good[gi] is item and not finite[gi]:
                    results.append(Prediction(source=name, error=f"{name}: the model gave non-finite "
                                                                 "logits (NaN or infinity) for this image"))
                    gi += 1
                elif gi < len(good) and good[gi] is item:
                    idx = tuple(int(i) for i in top[gi])
                    results.append(Prediction(source=name, labels=tuple(self.labels[i] for i in idx),
                                              indices=idx, probs=tuple(float(probs[gi, i]) for i in idx)))
                    gi += 1
                else:
                    results.append(Prediction(source=name, error=errors[ei][1]))
                    ei += 1
        return results


# -- ONNX Runtime ------------------------------------------------------------------------

def intra_op_threads() -> int | None:
    """Threads for ONNX Runtime's intra-op pool, or None for its default.

    ORT's default is one thread per physical core of the machine. A process restricted to
    fewer CPUs (taskset, a container's cpuset) would then oversubscribe them: use the CPUs it
    may run on instead.
    """
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return None
    return allowed if allowed < (os.cpu_count() or allowed) else None


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


def _open(backend: str, path: Path, device: str, options: dict) -> Session:
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
        from .openvino import OpenVinoSession

        return OpenVinoSession(info, device, **options)
    if options.get("hint"):
        raise BackendUnavailable(f"an inference-precision hint ({options['hint']}) is OpenVINO's; "
                                 f"the {backend} backend has none")
    options = {k: v for k, v in options.items() if k != "hint"}
    return OnnxRuntimeSession(info, "tensorrt" if backend == "ort-tensorrt" else device, **options)


def _fallback_onnx(plan: Path) -> Path | None:
    """The ONNX an engine was built from, when it is beside the plan and unchanged since."""
    from crossvit.contract import sha256_file
    from crossvit.errors import CrossViTError

    try:
        source = read_artifact(plan).raw.get("source") or {}
    except CrossViTError:  # the plan's own error is the one to report
        return None
    if not isinstance(source, dict) or not isinstance(source.get("onnx"), str):
        return None
    onnx = plan.parent / str(source.get("onnx") or "")
    if not source.get("onnx") or not onnx.is_file():
        return None
    return onnx if sha256_file(onnx) == source.get("sha256") else None


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
      version) falls back to the ONNX it was built from, when that file is beside it and
      unchanged (and from there, as above, to its gated CPU variant).
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
        onnx = _fallback_onnx(path) if backend == "auto" and kind == "engine" else None
        if onnx is None:
            raise
        log.warning("%s cannot run here (%s); using %s with ONNX Runtime instead", path.name, e, onnx.name)
        if exact:
            return _open("onnxruntime", onnx, device, options)
        session = _open_preferring_cpu_variant(onnx, device, options)
        session.chosen = session.chosen or f"{onnx.name}: {path.name} cannot run here"
        return session


def _open_preferring_cpu_variant(onnx: Path, device: str, options: dict) -> Session:
    from .cpu_choice import decide_cpu_path

    candidate, why = decide_cpu_path(onnx) if _runs_on_cpu(device) and not options.get("hint") else (None, None)
    if candidate is None:
        session = _open("auto", onnx, device, options)
        if why:  # other CPU paths lie beside it: say why none of them runs
            log.info("using %s as given: %s", onnx.name, why)
            session.passed_over = f"{onnx.name} as given: {why}"
        return session
    try:
        session = _open(candidate.backend, onnx.parent / candidate.file, device, {**options, **candidate.options})
    except (ArtifactError, BackendUnavailable) as e:
        log.warning("%s cannot run here (%s); using %s with ONNX Runtime", candidate.label, e, onnx.name)
        session = _open("auto", onnx, device, options)
        session.passed_over = f"{onnx.name} as given: {candidate.label} cannot run here ({e})"
        return session
    log.info("using %s for %s: %s (exact=True / --exact runs the file given)", candidate.label, onnx.name, why)
    session.chosen = f"{candidate.label} for {onnx.name}: {why}"
    return session
