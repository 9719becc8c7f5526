"""The TensorRT session: a `.plan` built by `crossvit build`, run with TensorRT + cuda-python.

No torch. An engine only runs on the TensorRT version and GPU architecture it was built for
(unless built version- or hardware-compatible): the manifest beside the plan says which, and
`manifest_mismatch` compares it with this machine before TensorRT sees the plan, so the user
gets one line naming both sides instead of TensorRT's deserialization error.

Memory: device buffers for the profile's largest batch and pinned host buffers are allocated
once; each call sets the input shape, copies in, runs `execute_async_v3` on one stream, copies
out and synchronizes. One execution context is shared, so calls are serialized by a lock
(the server calls sessions from several threads).
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np

from crossvit.errors import ArtifactError, BackendUnavailable

from .artifact import ArtifactInfo
from .gpu import CudaDevice, check, cuda_device, cudart, import_tensorrt, make_logger
from .session import Session


def _cc(v) -> tuple[int, int]:
    return tuple(int(x) for x in v)[:2]  # type: ignore[return-value]


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in str(v).split(".") if p.isdigit())


def manifest_mismatch(manifest: dict, device: CudaDevice, tensorrt_version: str) -> str | None:
    """Why this machine cannot run the engine described by `manifest`, or None when it can.

    - TensorRT: the exact version that built it; a version-compatible engine also runs on a
      later TensorRT of the same major version.
    - GPU: the same compute capability (hardware compatibility "none" or "same-cc"), or any
      GPU of compute capability 8.0 or newer for "ampere+".
    """
    trt_info, built_on = manifest.get("tensorrt") or {}, manifest.get("device") or {}
    built_trt, built_cc = str(trt_info.get("version")), _cc(built_on.get("compute_capability") or (0, 0))
    here_cc = device.compute_capability
    built = f"{built_on.get('name', '?')} (compute capability {built_cc[0]}.{built_cc[1]}) with TensorRT {built_trt}"
    here = f"{device.name} (compute capability {here_cc[0]}.{here_cc[1]}) with TensorRT {tensorrt_version}"
    if trt_info.get("version_compatible"):
        b, h = _version_tuple(built_trt), _version_tuple(tensorrt_version)
        trt_ok = bool(b) and bool(h) and h[0] == b[0] and h >= b
    else:
        trt_ok = built_trt == str(tensorrt_version)
    level = trt_info.get("hardware_compatibility", "none")
    gpu_ok = here_cc >= (8, 0) if level == "ampere+" else here_cc == built_cc
    if trt_ok and gpu_ok:
        return None
    what = " and ".join(w for w, ok in (("TensorRT version", trt_ok), ("GPU architecture", gpu_ok)) if not ok)
    return (f"engine built on {built}, this machine is {here}: the {what} differ; rebuild it here with "
            "`crossvit build`")


def _nptype(dtype_name: str):
    if dtype_name != "float32":
        raise ArtifactError(f"engine tensor of dtype {dtype_name}: this runtime feeds and reads float32 only")
    return np.float32


class _Pinned:
    """A pinned host buffer seen as a numpy array."""

    def __init__(self, shape: tuple[int, ...]):
        rt = cudart()
        self.nbytes = int(np.prod(shape)) * 4
        self.ptr = check(rt.cudaMallocHost(self.nbytes), "cudaMallocHost")
        self.array = np.ctypeslib.as_array((ctypes.c_float * (self.nbytes // 4)).from_address(self.ptr))

    def free(self) -> None:
        if self.ptr:
            cudart().cudaFreeHost(self.ptr)
            self.ptr = 0


class TensorRTSession(Session):
    """A TensorRT engine on one CUDA device, behind the common Session interface."""

    backend = "tensorrt"

    def __init__(self, info: ArtifactInfo, device: str = "auto"):
        super().__init__(info)
        if device not in ("auto", "cuda"):
            raise BackendUnavailable(f"TensorRT runs on a CUDA device, not {device!r}")
        gpu = cuda_device()  # before any TensorRT object: without a GPU they segfault later
        trt = import_tensorrt()
        reason = manifest_mismatch(info.raw, gpu, trt.__version__)
        if reason:
            raise ArtifactError(f"{info.path}: {reason}")
        self.device, self.gpu = "cuda", gpu
        self._lock = threading.Lock()
        self._buffers: list = []
        self._rt = cudart()
        self._trt = trt
        self._logger = make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        if (info.raw.get("tensorrt") or {}).get("version_compatible"):
            self._runtime.engine_host_code_allowed = True  # a version-compatible plan carries its lean runtime
        try:
            self._engine = self._runtime.deserialize_cuda_engine(info.path.read_bytes())
        except OSError as e:
            raise ArtifactError(f"{info.path}: cannot read it ({e.strerror})") from None
        if self._engine is None:
            raise ArtifactError(f"{info.path}: TensorRT cannot load it ({'; '.join(self._logger.messages[-2:])})")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise BackendUnavailable(f"{info.path}: TensorRT could not create an execution context "
                                     f"({'; '.join(self._logger.messages[-2:]) or 'out of GPU memory?'})")
        try:
            self._allocate()
        except BaseException:
            self.close()
            raise

    def _allocate(self) -> None:
        """Device and pinned host buffers for the profile's largest batch, and one stream."""
        rt, info = self._rt, self.info
        c, h, w = info.input_shape
        self._stream = check(rt.cudaStreamCreate(), "cudaStreamCreate")
        shapes = {info.input_name: (info.batch_max, c, h, w), info.output_name: (info.batch_max, info.num_classes)}
        self._host, self._device = {}, {}
        for name, shape in shapes.items():
            _nptype(self._dtype(name))
            self._host[name] = _Pinned(shape)
            self._device[name] = check(rt.cudaMalloc(self._host[name].nbytes), "cudaMalloc")
            if not self._context.set_tensor_address(name, self._device[name]):
                raise ArtifactError(f"{info.path}: TensorRT refused the buffer for tensor {name!r}")

    def _dtype(self, name: str) -> str:
        for t in self.info.raw.get("engine_io") or []:
            if t.get("name") == name:
                return str(t.get("dtype"))
        return "float32"

    def _run(self, x: np.ndarray) -> np.ndarray:
        rt, info = self._rt, self.info
        n = x.shape[0]
        inp, out = info.input_name, info.output_name
        h2d, d2h = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with self._lock:
            host_in = self._host[inp].array[:x.size]
            host_in[:] = x.reshape(-1)
            if not self._context.set_input_shape(inp, x.shape):
                raise ArtifactError(f"TensorRT refused input shape {x.shape} (profile {info.batch_min}..{info.batch_max})")
            out_count = n * info.num_classes
            check(rt.cudaMemcpyAsync(self._device[inp], self._host[inp].ptr, x.nbytes, h2d, self._stream),
                  "cudaMemcpyAsync (to the GPU)")
            if not self._context.execute_async_v3(int(self._stream)):  # TensorRT takes the handle as an int
                raise ArtifactError(f"TensorRT failed to run the engine ({'; '.join(self._logger.messages[-2:])})")
            check(rt.cudaMemcpyAsync(self._host[out].ptr, self._device[out], out_count * 4, d2h, self._stream),
                  "cudaMemcpyAsync (from the GPU)")
            check(rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
            return self._host[out].array[:out_count].reshape(n, info.num_classes).copy()

    def close(self) -> None:
        rt = getattr(self, "_rt", None)
        for ptr in (getattr(self, "_device", None) or {}).values():
            rt.cudaFree(ptr)
        for buf in (getattr(self, "_host", None) or {}).values():
            buf.free()
        if getattr(self, "_stream", None) is not None:
            rt.cudaStreamDestroy(self._stream)
        self._device, self._host, self._stream = {}, {}, None
        self._context = self._engine = None
        super().close()
