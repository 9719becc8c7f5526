"""What GPU this machine has, asked without creating any TensorRT object.

TensorRT objects created without a usable GPU do not raise: `trt.Runtime` logs a CUDA
initialization failure and returns an object that segfaults on first use. So every path that
runs a plan asks `cuda_device()` first (cuda-python's runtime API, no torch), then imports its
TensorRT library (`trt_library`). Only TensorRT-RTX's builder is meant to work without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from crossvit.errors import BackendUnavailable
from crossvit.install import pip_install


def cuda_python_install() -> str:
    return (f"{pip_install('gpu-cu12')}, {pip_install('gpu-cu13')} or {pip_install('rtx')} on a machine with an "
            "NVIDIA GPU (the TensorRT library and the cuda-python of its CUDA major)")


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
                                     f"{cuda_python_install()}") from None
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


def tensorrt_unavailable(library: str = "tensorrt") -> str | None:
    """None when plans of `library` can run here (a GPU, cuda-python and the library), else why."""
    from .trt_library import get_library

    try:
        cuda_device()
        get_library(library).module()
    except BackendUnavailable as e:
        return str(e)
    return None
