"""What GPU and TensorRT this machine has, asked without creating any TensorRT object.

TensorRT objects created without a usable GPU do not raise: `trt.Runtime` logs a CUDA
initialization failure and returns an object that segfaults on first use. So every TensorRT
path asks `cuda_device()` first (cuda-python's runtime API, no torch), then `import_tensorrt()`.
"""

from __future__ import annotations

from dataclasses import dataclass

from crossvit.errors import BackendUnavailable

TENSORRT_INSTALL = ("on a machine with an NVIDIA GPU, pip install 'crossvit[gpu]' (TensorRT and cuda-python; "
                    "the tensorrt package fetches its wheels from NVIDIA's package index)")


@dataclass(frozen=True)
class CudaDevice:
    index: int
    name: str
    compute_capability: tuple[int, int]
    cuda_runtime: str  # e.g. "12.8"
    cuda_driver: str

    def to_dict(self) -> dict:
        return {"name": self.name, "compute_capability": list(self.compute_capability),
                "cuda_runtime": self.cuda_runtime, "cuda_driver": self.cuda_driver}


def cudart():
    """cuda-python's runtime module (`cuda.bindings.runtime`; the older `cuda.cudart` before 12.6.1)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.6.1; removed in cuda-bindings 13
        except ImportError:
            raise BackendUnavailable(f"TensorRT engines need cuda-python, which is not installed: "
                                     f"{TENSORRT_INSTALL}") from None
    return runtime


def check(result, what: str):
    """cuda-python returns (err, *values): raise on an error, return the value(s)."""
    rt = cudart()
    err, *values = result
    if err != rt.cudaError_t.cudaSuccess:
        name = getattr(err, "name", str(err))
        raise BackendUnavailable(f"CUDA error in {what}: {name}")
    return values[0] if len(values) == 1 else tuple(values)


def _version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def cuda_device(index: int = 0) -> CudaDevice:
    """The CUDA device `index`, or BackendUnavailable with the reason (no driver, no GPU)."""
    rt = cudart()
    err, count = rt.cudaGetDeviceCount()
    if err != rt.cudaError_t.cudaSuccess or count < 1:
        reason = "no CUDA device" if err == rt.cudaError_t.cudaSuccess else \
            f"no usable CUDA device ({getattr(err, 'name', err)})"
        raise BackendUnavailable(f"TensorRT needs an NVIDIA GPU: {reason} on this machine")
    if index >= count:
        raise BackendUnavailable(f"CUDA device {index} does not exist (this machine has {count})")
    props = check(rt.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return CudaDevice(index=index, name=name.rstrip("\x00"), compute_capability=(props.major, props.minor),
                      cuda_runtime=_version(check(rt.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")),
                      cuda_driver=_version(check(rt.cudaDriverGetVersion(), "cudaDriverGetVersion")))


def import_tensorrt():
    """The `tensorrt` module, or BackendUnavailable naming the install route."""
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailable(f"TensorRT is not installed: {TENSORRT_INSTALL}") from None
    return tensorrt


def make_logger(trt):
    """A TensorRT logger that keeps every warning and error (the reasons a build or load failed)."""

    sev = trt.ILogger.Severity

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity, msg):
            if severity in (sev.INTERNAL_ERROR, sev.ERROR, sev.WARNING):
                self.messages.append(" ".join(str(msg).split()))

    return Logger()


def tensorrt_unavailable() -> str | None:
    """None when TensorRT engines can be built and run here, else the reason (one line)."""
    try:
        cuda_device()
        import_tensorrt()
    except BackendUnavailable as e:
        return str(e)
    return None
