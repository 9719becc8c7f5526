"""OpenVINO on the CPU: our ONNX files read directly by OpenVINO's runtime (no conversion step).

Two kinds of file run here:
- the fp32 reference, with OpenVINO's inference-precision hint `fp32` or `bf16` (bf16 only on a
  CPU with bf16 arithmetic: AVX512-BF16 or AMX). The bf16 hint is a different computation from
  the file's, so a session opened with it reports precision "bf16" and is gated as bf16;
- the int8-ov variant: NNCF post-training quantization of the fp32 file (static scales,
  calibrated on real images), which OpenVINO runs with its int8 kernels (VNNI / AMX).

`openvino` is optional and imported here only; nothing else in `runtime/` imports it.
"""

from __future__ import annotations

import threading

import numpy as np

from crossvit.errors import ArtifactError, BackendUnavailable
from crossvit.files import first_line
from crossvit.install import pip_install

from .artifact import ArtifactInfo
from .base import Session, intra_op_threads

# file precision -> the inference-precision hints that may run it
HINTS = {"fp32": ("fp32", "bf16"), "int8-ov": ("fp32",)}
_OV_HINT = {"fp32": "f32", "bf16": "bf16"}


def import_openvino():
    try:
        import openvino
    except ImportError:
        raise BackendUnavailable(f"the openvino backend needs OpenVINO: {pip_install('openvino')}") from None
    return openvino


def openvino_version() -> str | None:
    try:
        return import_openvino().__version__
    except BackendUnavailable:
        return None


_CORE = None
_CORE_LOCK = threading.Lock()


def core():
    """One `openvino.Core` per process (it holds the CPU plugin and its thread pools)."""
    global _CORE
    with _CORE_LOCK:
        if _CORE is None:
            _CORE = import_openvino().Core()
        return _CORE


def cpu_capabilities() -> tuple[str, ...]:
    """OpenVINO's own word on what this CPU computes natively (e.g. FP32, BF16, INT8)."""
    try:
        return tuple(core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except BackendUnavailable:
        return ()


def effective_precision(file_precision: str, hint: str | None) -> str:
    """What a session computes in: the bf16 hint on an fp32 file is bf16; otherwise the file's."""
    return "bf16" if hint == "bf16" else file_precision


class OpenVinoSession(Session):
    """An ONNX file compiled by OpenVINO for this CPU.

    - `hint`: "fp32" (default) or "bf16" (the fp32 file computed in bf16 where the CPU has it);
    - the LATENCY performance hint (one stream, all the threads this process may use: the
      same `intra_op_threads` rule as ONNX Runtime);
    - dynamic batch: one compiled model serves every batch size in the file's range;
    - one infer request, used under a lock (a request is not thread-safe; the server calls from
      one batching thread anyway).
    """

    backend = "openvino"

    def __init__(self, info: ArtifactInfo, device: str = "auto", *, hint: str | None = None,
                 threads: int | None = None, spin: bool = True):
        super().__init__(info)
        if device not in ("auto", "cpu"):
            raise BackendUnavailable(f"the openvino backend runs on the CPU here, not on {device!r}")
        hint = hint or "fp32"
        allowed = HINTS.get(info.precision)
        if allowed is None:
            raise ArtifactError(f"{info.path.name}: the openvino backend runs fp32 and int8-ov files, "
                                f"not {info.precision} (that one is for "
                                f"{'ONNX Runtime' if info.precision == 'int8-cpu' else 'TensorRT'})")
        if hint not in allowed:
            raise ArtifactError(f"{info.path.name}: a {info.precision} file runs with the "
                                f"{' or '.join(allowed)} hint, not {hint}")
        if hint == "bf16" and "BF16" not in cpu_capabilities():
            raise BackendUnavailable("this CPU has no bf16 arithmetic (OpenVINO lists "
                                     f"{', '.join(cpu_capabilities()) or 'nothing'}): the bf16 hint needs "
                                     "AVX512-BF16 or AMX")
        config = {"INFERENCE_PRECISION_HINT": _OV_HINT[hint], "PERFORMANCE_HINT": "LATENCY"}
        threads = threads or intra_op_threads()
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            model = core().read_model(str(info.path))
            self._compiled = core().compile_model(model, "CPU", config)
        except BackendUnavailable:
            raise
        except Exception as e:
            raise ArtifactError(f"{info.path}: OpenVINO cannot compile it ({first_line(e)})") from None
        self.hint = hint
        self.precision = effective_precision(info.precision, hint)
        self._request = self._compiled.create_infer_request()
        self._lock = threading.Lock()

    def describe(self) -> str:
        hint = f", {self.hint} hint" if self.info.precision == "fp32" else ""
        return f"openvino (cpu, {self.info.precision} file{hint})"

    def _run(self, x: np.ndarray) -> np.ndarray:
        with self._lock:
            out = self._request.infer({0: x}, share_inputs=True)
            return np.array(out[0], dtype=np.float32, copy=True)

    def close(self) -> None:
        with getattr(self, "_lock", threading.Lock()):
            self._request = self._compiled = None
        super().close()
