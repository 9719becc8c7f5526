"""The TensorRT session: a `.plan` built by `crossvit build`, run with TensorRT or TensorRT-RTX
and cuda-python.

No torch. A plan runs only on the library that built it, and only on the GPUs and library
versions its manifest allows (`manifest_mismatch`): that is checked before TensorRT sees the
plan, so the user gets one line naming both sides instead of a deserialization error, and
`open_session` falls back to the ONNX beside the plan.

After loading, everything is taken from the engine, never from the manifest: the I/O tensors
are checked against the artifact contract (`engine_io`, `verify_io`), and the device and pinned
host buffers are sized from the engine's own profile and dtypes (as NVIDIA's
`common_runtime.py` does), so a plan that does not match its manifest cannot make TensorRT write
past a buffer. Buffers for the profile's largest batch are allocated once; each call sets the
input shape, copies in, runs `execute_async_v3` on one stream, copies out and synchronizes. One
execution context is shared, so calls (and `close`) are serialized by a lock (the server calls
sessions from several threads).

TensorRT-RTX compiles kernels just in time at first run; its runtime cache is kept beside the
plan (`NAME.plan.rtcache`), so the next start skips that compile.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path

import numpy as np

from crossvit.errors import ArtifactError, BackendUnavailable, CrossViTError
from crossvit.files import atomic_write

from .artifact import ArtifactInfo
from .gpu import CudaDevice, check, cuda_device, cudart
from .base import Session
from .trt_library import (MIN_COMPUTE_CAPABILITY, TensorRTLibrary, cc_text, library_of, message_mark,
                          recent_messages, trt_logger)

log = logging.getLogger("crossvit.runtime")

RUNTIME_CACHE_SUFFIX = ".rtcache"
# A version-compatible plan of one major version also runs on the next major's runtime
# (NVIDIA's support matrix: 8.6 -> 10.x, 10.x -> 11.x).
NEXT_MAJOR = {8: 10, 10: 11}


def _cc(v) -> tuple[int, int]:
    return tuple(int(x) for x in v)[:2]  # type: ignore[return-value]


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in str(v).split(".") if p.isdigit())


def runtime_cache_path(plan: Path) -> Path:
    return plan.with_name(plan.name + RUNTIME_CACHE_SUFFIX)


def _version_ok(built: str, here: str, version_compatible: bool) -> bool:
    if not version_compatible:
        return built == str(here)
    b, h = _version_tuple(built), _version_tuple(here)
    return bool(b) and bool(h) and h >= b and (h[0] == b[0] or NEXT_MAJOR.get(b[0]) == h[0])


def manifest_mismatch(manifest: dict, device: CudaDevice, library: TensorRTLibrary, version: str) -> str | None:
    """Why this machine (GPU `device`, TensorRT `library` at `version`) cannot run the plan that
    `manifest` describes, or None when it can.

    - The library: the one that built it (TensorRT and TensorRT-RTX plans are not interchangeable).
    - The version: the exact one that built it; a version-compatible plan also runs on a later
      version of the same major or of the next one (10.x on 11.x, 8.6 on 10.x).
    - The GPU, standard TensorRT: the build GPU's compute capability (hardware compatibility
      "none" or "same-cc"), or any of 8.0 or newer for "ampere+" that computes in the plan's
      precision (fp8 needs 8.9).
    - The GPU, TensorRT-RTX: one of the plan's target compute capabilities.
    """
    trt_info = manifest.get("tensorrt") if isinstance(manifest.get("tensorrt"), dict) else {}
    built_on = manifest.get("device") if isinstance(manifest.get("device"), dict) else {}
    built_lib = library_of(manifest)
    built_version = str(trt_info.get("version"))
    here_cc = device.compute_capability
    here = f"{device.name} (compute capability {cc_text(here_cc)}) with {library.title} {version}"
    if built_lib.name != library.name:
        return (f"engine built by {built_lib.title} {built_version}, this machine runs {here}: a plan runs only on "
                f"the library that built it; rebuild it with `crossvit build --library {library.name}`")
    if built_lib.is_rtx:
        targets = [_cc(t) for t in trt_info.get("target_compute_capabilities") or []]
        version_ok = built_version == str(version)
        gpu_ok = here_cc in targets
        built = (f"TensorRT-RTX {built_version} for compute capabilities "
                 f"{', '.join(map(cc_text, targets)) or 'none recorded'}")
        if not gpu_ok and here_cc not in [_cc(t) for t in _known_rtx_targets()]:
            fix = ("TensorRT-RTX has no target for this GPU (Hopper and Blackwell data-centre GPUs need standard "
                   "TensorRT): build it with `crossvit build --library tensorrt`")
        else:
            fix = "rebuild it with `crossvit build --library tensorrt-rtx`" + \
                  (f" --compute-capability {cc_text(here_cc)}" if not gpu_ok else "")
    else:
        built_cc = _cc(built_on.get("compute_capability") or (0, 0))
        version_ok = _version_ok(built_version, version, bool(trt_info.get("version_compatible")))
        level = trt_info.get("hardware_compatibility", "none")
        if level == "ampere+":
            need = max((8, 0), MIN_COMPUTE_CAPABILITY.get(str(manifest.get("precision")), (0, 0)))
            gpu_ok = here_cc >= need
        else:
            gpu_ok = here_cc == built_cc
        built = (f"{built_on.get('name', '?')} (compute capability {cc_text(built_cc)}) with TensorRT "
                 f"{built_version}")
        fix = "rebuild it here with `crossvit build`"
    if version_ok and gpu_ok:
        return None
    what = " and ".join(w for w, ok in (("TensorRT version", version_ok), ("GPU architecture", gpu_ok)) if not ok)
    return f"engine built on {built}, this machine is {here}: the {what} differ; {fix}"


def _known_rtx_targets() -> list[tuple[int, int]]:
    from .trt_library import TENSORRT_RTX

    try:
        return TENSORRT_RTX.known_targets(TENSORRT_RTX.module())
    except BackendUnavailable:
        return [(7, 5), (8, 0), (8, 6), (8, 9), (12, 0), (12, 1)]  # TensorRT-RTX 1.7's enum


# -- the engine's I/O, as plain dicts (checked on a CPU for the network, on a GPU for the engine) ---

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4, "int64": 8, "int8": 1, "uint8": 1,
             "float8": 1, "bool": 1}


def dtype_name(trt, dtype) -> str:
    names = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
             "INT8": "int8", "UINT8": "uint8", "FP8": "float8", "BOOL": "bool"}
    return names.get(getattr(dtype, "name", ""), str(dtype))


def network_io(trt, network) -> list[dict]:
    """A parsed INetworkDefinition's inputs and outputs (strongly typed: the engine's will be these)."""
    io = []
    for mode, count, get in (("input", network.num_inputs, network.get_input),
                             ("output", network.num_outputs, network.get_output)):
        for i in range(count):
            t = get(i)
            io.append({"name": t.name, "mode": mode, "dtype": dtype_name(trt, t.dtype),
                       "shape": [int(d) for d in t.shape]})
    return io


def engine_io(trt, engine) -> list[dict]:
    """A deserialized engine's I/O tensors, with each input's profile-0 [min, opt, max] shapes."""
    io = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        entry = {"name": name, "mode": "input" if is_input else "output",
                 "dtype": dtype_name(trt, engine.get_tensor_dtype(name)),
                 "shape": [int(d) for d in engine.get_tensor_shape(name)]}
        if is_input:
            entry["profile"] = [[int(d) for d in s] for s in engine.get_tensor_profile_shape(name, 0)]
        io.append(entry)
    return io


def verify_io(io: list[dict], info: ArtifactInfo, profile: tuple[int, int, int] | None,
              error: type[CrossViTError] = ArtifactError) -> None:
    """The network's or engine's I/O must be the artifact's: the same names, float32,
    [batch, C, H, W] in and [batch, classes] out, and (where `io` has it) the profile
    (min, opt, max) asked for. A mismatch is `error`: never a silently different engine."""
    by_name = {t["name"]: t for t in io}
    expected = {info.input_name: "input", info.output_name: "output"}
    if set(by_name) != set(expected):
        raise error(f"the engine's tensors {sorted(by_name)} are not the ONNX's {sorted(expected)}")
    for name, mode in expected.items():
        t = by_name[name]
        if t["mode"] != mode:
            raise error(f"engine tensor {name!r} is an {t['mode']}, expected an {mode}")
        if t["dtype"] != "float32":
            raise error(f"engine tensor {name!r} is {t['dtype']}, expected float32 (the ONNX's)")
    c, h, w = info.input_shape
    fixed = profile is not None and profile[0] == profile[2]
    checks = ((info.input_name, [-1, c, h, w]), (info.output_name, [-1, info.num_classes]))
    for name, want in checks:
        got = list(by_name[name]["shape"])
        if len(got) != len(want) or any(g != x for g, x in zip(got[1:], want[1:])) or \
                got[0] not in (-1, profile[0] if fixed else -1):
            raise error(f"engine tensor {name!r} has shape {got}, expected {want} (-1: the batch)")
    got_profile = by_name[info.input_name].get("profile")
    if profile is not None and got_profile is not None:
        want_profile = [[b, c, h, w] for b in profile]
        if [list(s) for s in got_profile] != want_profile:
            raise error(f"engine profile {got_profile} differs from the requested {want_profile}")


# -- the session -----------------------------------------------------------------------------

class _Pinned:
    """A pinned host buffer of `nbytes`, seen as a float32 numpy array."""

    def __init__(self, nbytes: int):
        rt = cudart()
        self.nbytes = int(nbytes)
        self.ptr = check(rt.cudaMallocHost(self.nbytes), "cudaMallocHost")
        self.array = np.ctypeslib.as_array((ctypes.c_float * (self.nbytes // 4)).from_address(self.ptr))

    def free(self) -> None:
        if self.ptr:
            cudart().cudaFreeHost(self.ptr)
            self.ptr = 0


def check_plan(info: ArtifactInfo, plan: bytes) -> None:
    """The plan must be the bytes its manifest describes (manifests from before plan_sha256 have none)."""
    import hashlib

    want = info.raw.get("plan_sha256")
    if want is not None and hashlib.sha256(plan).hexdigest() != want:
        raise ArtifactError(f"{info.path}: the plan differs from the one its manifest describes (sha256); "
                            "rebuild it with `crossvit build`")


def rtx_validity(trt, runtime, plan: bytes) -> str | None:
    """TensorRT-RTX's own verdict on a plan before deserializing it: None when valid, else why."""
    validity, diagnostics = runtime.get_engine_validity(plan)
    if validity != trt.EngineValidity.INVALID:
        return None
    why = [name.lower().replace("_", " ") for name, flag in trt.EngineInvalidityDiagnostics.__members__.items()
           if int(diagnostics) & int(flag)]
    return ", ".join(why) or "invalid"


class TensorRTSession(Session):
    """A TensorRT or TensorRT-RTX engine on one CUDA device, behind the common Session interface."""

    backend = "tensorrt"

    def __init__(self, info: ArtifactInfo, device: str = "auto"):
        super().__init__(info)
        if device not in ("auto", "cuda"):
            raise BackendUnavailable(f"TensorRT runs on a CUDA device, not {device!r}")
        self._lock = threading.Lock()
        self._host, self._device, self._stream = {}, {}, None
        self._context = self._engine = self._runtime_cache = self._runtime_config = None
        library = library_of(info.raw)
        gpu = cuda_device()  # before any TensorRT object: without a GPU they segfault later
        try:
            trt = library.module()
        except BackendUnavailable:
            # a plan this GPU could never run is refused for that reason, not for a missing library
            reason = manifest_mismatch(info.raw, gpu, library, "(not installed)")
            if reason and "GPU architecture" in reason:
                raise ArtifactError(f"{info.path}: {reason}") from None
            raise
        reason = manifest_mismatch(info.raw, gpu, library, trt.__version__)
        if reason:
            raise ArtifactError(f"{info.path}: {reason}")
        if library.is_rtx:
            self.backend = "tensorrt-rtx"
        self.device, self.gpu, self.library = "cuda", gpu, library
        self._rt, self._trt = cudart(), trt
        try:
            plan = info.path.read_bytes()
        except OSError as e:
            raise ArtifactError(f"{info.path}: cannot read it ({e.strerror})") from None
        check_plan(info, plan)
        mark = message_mark()
        self._runtime = trt.Runtime(trt_logger(trt))
        if library.is_rtx:
            why = rtx_validity(trt, self._runtime, plan)
            if why:
                raise ArtifactError(f"{info.path}: TensorRT-RTX cannot run it on {gpu.name} ({why})")
        elif (info.raw.get("tensorrt") or {}).get("version_compatible"):
            self._runtime.engine_host_code_allowed = True  # a version-compatible plan carries its lean runtime
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise ArtifactError(f"{info.path}: {library.title} cannot load it "
                                f"({'; '.join(recent_messages(mark, 2)) or 'no reason logged'})")
        try:
            verify_io(engine_io(trt, self._engine), info, None)
            self._context = self._create_context(mark)
            self._allocate()
        except BaseException:
            self.close()
            raise

    def _create_context(self, mark: int):
        engine, info = self._engine, self.info
        if self.library.runtime_cache:
            config = engine.create_runtime_config()
            self._runtime_cache = config.create_runtime_cache()
            cache_file = runtime_cache_path(info.path)
            if cache_file.is_file():
                if not self._runtime_cache.deserialize(cache_file.read_bytes()):
                    log.warning("%s: its runtime cache %s was not usable; compiling again", info.path.name,
                                cache_file.name)
            if not config.set_runtime_cache(self._runtime_cache):
                log.warning("%s: TensorRT-RTX refused the runtime cache; kernels compile at every start",
                            info.path.name)
            self._runtime_config = config  # kept alive as long as the context that uses it
            context = engine.create_execution_context(config)
        else:
            context = engine.create_execution_context()
        if context is None:
            raise BackendUnavailable(f"{info.path}: {self.library.title} could not create an execution context "
                                     f"({'; '.join(recent_messages(mark, 2)) or 'out of GPU memory?'})")
        return context

    def _allocate(self) -> None:
        """Device and pinned host buffers for the engine's largest batch, sized from the engine."""
        rt, trt, engine, context, info = self._rt, self._trt, self._engine, self._context, self.info
        inp, out = info.input_name, info.output_name
        max_shape = tuple(int(d) for d in engine.get_tensor_profile_shape(inp, 0)[2])
        self._max_batch = max_shape[0]
        if not context.set_input_shape(inp, max_shape):
            raise ArtifactError(f"{info.path}: TensorRT refused its own largest input shape {max_shape}")
        shapes = {inp: max_shape, out: tuple(int(d) for d in context.get_tensor_shape(out))}
        self._stream = check(rt.cudaStreamCreate(), "cudaStreamCreate")
        for name, shape in shapes.items():
            dtype = dtype_name(trt, engine.get_tensor_dtype(name))
            if dtype != "float32":
                raise ArtifactError(f"{info.path}: engine tensor {name!r} is {dtype}; this runtime feeds and reads "
                                    "float32 only")
            nbytes = int(np.prod(shape)) * _ITEMSIZE[dtype]
            self._host[name] = _Pinned(nbytes)
            self._device[name] = check(rt.cudaMalloc(nbytes), "cudaMalloc")
            if not context.set_tensor_address(name, self._device[name]):
                raise ArtifactError(f"{info.path}: TensorRT refused the buffer for tensor {name!r}")
        self._out_row = int(np.prod(shapes[out][1:]))

    def _run(self, x: np.ndarray) -> np.ndarray:
        rt, info = self._rt, self.info
        n = x.shape[0]
        inp, out = info.input_name, info.output_name
        h2d, d2h = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        with self._lock:
            if self._context is None:
                raise BackendUnavailable(f"{info.path.name}: the session is closed")
            if n > self._max_batch or x.nbytes > self._host[inp].nbytes:
                raise ArtifactError(f"batch {n} exceeds the engine's profile (at most {self._max_batch})")
            host_in = self._host[inp].array[:x.size]
            host_in[:] = x.reshape(-1)
            if not self._context.set_input_shape(inp, x.shape):
                raise ArtifactError(f"TensorRT refused input shape {x.shape} (profile {info.batch_min}..{info.batch_max})")
            out_count = n * self._out_row
            check(rt.cudaMemcpyAsync(self._device[inp], self._host[inp].ptr, x.nbytes, h2d, self._stream),
                  "cudaMemcpyAsync (to the GPU)")
            if not self._context.execute_async_v3(int(self._stream)):  # TensorRT takes the handle as an int
                raise ArtifactError(f"TensorRT failed to run the engine ({'; '.join(recent_messages(last=2))})")
            check(rt.cudaMemcpyAsync(self._host[out].ptr, self._device[out], out_count * 4, d2h, self._stream),
                  "cudaMemcpyAsync (from the GPU)")
            check(rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
            return self._host[out].array[:out_count].reshape(n, self._out_row).copy()

    def _save_runtime_cache(self) -> None:
        if self._runtime_cache is None:
            return
        try:
            data = bytes(memoryview(self._runtime_cache.serialize()))
            atomic_write(runtime_cache_path(self.info.path), lambda tmp: tmp.write_bytes(data))
        except (CrossViTError, OSError, RuntimeError) as e:  # a read-only folder: the next start compiles again
            log.warning("%s: runtime cache not saved (%s)", self.info.path.name, e)

    def close(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is None:  # __init__ failed before anything was allocated
            return super().close()
        with lock:  # never while another thread is inside execute_async_v3
            self._save_runtime_cache()
            rt = getattr(self, "_rt", None)
            for ptr in self._device.values():
                rt.cudaFree(ptr)
            for buf in self._host.values():
                buf.free()
            if self._stream is not None:
                rt.cudaStreamDestroy(self._stream)
            self._device, self._host, self._stream = {}, {}, None
            self._context = self._engine = self._runtime_cache = self._runtime_config = None
        super().close()

