"""`crossvit build`: a TensorRT engine from a crossvit ONNX, and its manifest beside it.

One code path for TensorRT 10.x and 11.x on the raw Python API: a strongly typed network and
no precision flags (TensorRT 11 has none), so the engine computes in the precision the ONNX
variant was written in (fp32, or fp16/bf16/int8/fp8 by `crossvit export --precision`).
int8-cpu graphs hold ONNX Runtime-only ops and are refused.

Everything that can be decided without a GPU (the batch profile, what may be built, the I/O
check of the built engine, the manifest) is a plain function here, tested on CPU; the TensorRT
calls are confined to `build_engine` and `engine_io`, and made only after `cuda_device()` has
found a GPU (a TensorRT object created without one segfaults later).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from crossvit import __version__
from crossvit.contract import (ENGINE_FORMAT, ENGINE_SUFFIXES, atomic_write, check_output_path, derived_source,
                               get_precision, manifest_path, new_metadata, sha256_file, to_json)
from crossvit.errors import BackendUnavailable, ExportError
from crossvit.runtime.artifact import ArtifactInfo, read_artifact
from crossvit.runtime.gpu import CudaDevice, cuda_device, import_tensorrt, make_logger

Progress = Callable[[str], None]
HARDWARE_COMPAT = {"none": "NONE", "ampere+": "AMPERE_PLUS", "same-cc": "SAME_COMPUTE_CAPABILITY"}
# The oldest GPU architecture whose TensorRT kernels compute in each precision.
MIN_COMPUTE_CAPABILITY = {"bf16": (8, 0), "fp8": (8, 9)}


@dataclass(frozen=True)
class Profile:
    """The optimization profile's batch sizes: TensorRT tunes kernels for `opt`."""

    min: int
    opt: int
    max: int

    @staticmethod
    def middle(lo: int, hi: int) -> int:
        """A power of two near the geometric middle of lo..hi (8 for 1..64)."""
        return min(hi, max(lo, 2 ** round(math.log2(math.sqrt(lo * hi)))))

    @classmethod
    def parse(cls, text: str | None, lo: int, hi: int) -> "Profile":
        """'MIN:OPT:MAX', 'MIN:MAX' or 'N', within the ONNX's batch range lo..hi (default: all of it)."""
        if not text:
            return cls(lo, cls.middle(lo, hi), hi)
        try:
            parts = [int(p) for p in text.split(":")]
        except ValueError:
            raise ExportError(f"--batch must look like MIN:OPT:MAX, MIN:MAX or N, got {text!r}") from None
        if len(parts) == 1:
            parts = parts * 3
        elif len(parts) == 2:
            parts = [parts[0], cls.middle(*parts) if 1 <= parts[0] <= parts[1] else parts[0], parts[1]]
        elif len(parts) != 3:
            raise ExportError(f"--batch must look like MIN:OPT:MAX, MIN:MAX or N, got {text!r}")
        p = cls(*parts)
        if not 1 <= p.min <= p.opt <= p.max:
            raise ExportError(f"--batch {text}: needs 1 <= MIN <= OPT <= MAX")
        if p.min < lo or p.max > hi:
            raise ExportError(f"--batch {text} is outside the ONNX's batch range {lo}..{hi} "
                              "(export it with a wider --batch)")
        return p


@dataclass(frozen=True)
class BuildOptions:
    batch: str | None = None  # profile text, see Profile.parse
    workspace_gib: float | None = None
    opt_level: int | None = None  # TensorRT's builder_optimization_level 0..5 (its default 3)
    timing_cache: Path | None = None
    hardware_compat: str = "none"
    version_compatible: bool = False

    def check(self) -> None:
        if self.workspace_gib is not None and not 0 < self.workspace_gib <= 1024:
            raise ExportError(f"--workspace must be in (0, 1024] GiB, got {self.workspace_gib}")
        if self.opt_level is not None and self.opt_level not in range(6):
            raise ExportError(f"--opt-level must be 0..5, got {self.opt_level}")
        if self.hardware_compat not in HARDWARE_COMPAT:
            raise ExportError(f"--hardware-compat must be one of {', '.join(HARDWARE_COMPAT)}, "
                              f"got {self.hardware_compat!r}")
        if self.timing_cache is not None and self.timing_cache.is_dir():
            raise ExportError(f"--timing-cache {self.timing_cache} is a folder; give a file")


def check_buildable(info: ArtifactInfo, graph) -> None:
    """Refuse what TensorRT must never be fed: CPU-only precisions and ONNX Runtime's own ops."""
    precision = get_precision(info.precision)
    if precision.target == "cpu":
        raise ExportError(f"{info.path.name} is {info.precision}, a graph for ONNX Runtime on CPUs, not for "
                          "TensorRT; build from the fp32 ONNX or a TensorRT variant (fp16, bf16, int8, fp8)")
    foreign = sorted({n.domain for n in graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise ExportError(f"{info.path.name} has ops from {', '.join(foreign)} (ONNX Runtime-only); "
                          "TensorRT cannot build it")


def check_device(precision: str, device: CudaDevice) -> None:
    need = MIN_COMPUTE_CAPABILITY.get(precision)
    if need and device.compute_capability < need:
        have = ".".join(map(str, device.compute_capability))
        raise BackendUnavailable(f"{precision} engines need compute capability {need[0]}.{need[1]} or newer; "
                                 f"{device.name} has {have}")


def verify_io(io: list[dict], info: ArtifactInfo, profile: Profile) -> None:
    """The built engine's I/O must be the ONNX's: the same names, float32, [batch, C, H, W] in and
    [batch, classes] out, and the profile we asked for. A mismatch is an error: never a silently
    different engine. `io` entries: {name, mode ("input"/"output"), dtype, shape, profile}."""
    by_name = {t["name"]: t for t in io}
    expected = {info.input_name: "input", info.output_name: "output"}
    if set(by_name) != set(expected):
        raise ExportError(f"the engine's tensors {sorted(by_name)} are not the ONNX's {sorted(expected)}")
    for name, mode in expected.items():
        t = by_name[name]
        if t["mode"] != mode:
            raise ExportError(f"engine tensor {name!r} is an {t['mode']}, expected an {mode}")
        if t["dtype"] != "float32":
            raise ExportError(f"engine tensor {name!r} is {t['dtype']}, expected float32 (the ONNX's)")
    c, h, w = info.input_shape
    checks = ((info.input_name, [-1, c, h, w]), (info.output_name, [-1, info.num_classes]))
    for name, want in checks:
        got = list(by_name[name]["shape"])
        if len(got) != len(want) or any(g != x for g, x in zip(got[1:], want[1:])) or \
                got[0] not in (-1, profile.min if profile.min == profile.max else -1):
            raise ExportError(f"engine tensor {name!r} has shape {got}, expected {want} (-1: the batch)")
    got_profile = by_name[info.input_name].get("profile")
    want_profile = [[profile.min, c, h, w], [profile.opt, c, h, w], [profile.max, c, h, w]]
    if got_profile is not None and [list(s) for s in got_profile] != want_profile:
        raise ExportError(f"engine profile {got_profile} differs from the requested {want_profile}")


def engine_manifest(info: ArtifactInfo, *, onnx_sha256: str, profile: Profile, io: list[dict],
                    device: CudaDevice, tensorrt_version: str, options: BuildOptions, seconds: float) -> dict:
    """What the runtime needs to load and use the plan without anything else (DESIGN.md)."""
    c, h, w = info.input_shape
    return new_metadata(
        ENGINE_FORMAT,
        model=info.model,
        precision=info.precision,
        batch={"min": profile.min, "opt": profile.opt, "max": profile.max},
        inputs=[{"name": info.input_name, "dtype": "float32", "shape": ["batch", c, h, w]}],
        outputs=[{"name": info.output_name, "dtype": "float32", "shape": ["batch", info.num_classes]}],
        engine_io=io,
        source=derived_source(info.path.name, onnx_sha256, info.raw.get("source"), random_weights=info.random_weights),
        tensorrt={"version": tensorrt_version, "hardware_compatibility": options.hardware_compat,
                  "version_compatible": options.version_compatible,
                  "builder_optimization_level": options.opt_level, "workspace_gib": options.workspace_gib},
        device=device.to_dict(),
        builder={"crossvit": __version__, "seconds": round(seconds, 1)},
    )


# -- the TensorRT calls ----------------------------------------------------------------------

def _dtype_name(trt, dtype) -> str:
    names = {trt.DataType.FLOAT: "float32", trt.DataType.HALF: "float16", trt.DataType.INT32: "int32",
             trt.DataType.INT8: "int8", trt.DataType.BOOL: "bool"}
    for attr, name in (("BF16", "bfloat16"), ("FP8", "float8"), ("INT64", "int64")):
        if hasattr(trt.DataType, attr):
            names[getattr(trt.DataType, attr)] = name
    return names.get(dtype, str(dtype))


def engine_io(trt, engine) -> list[dict]:
    """The engine's I/O tensors as plain dicts (see verify_io)."""
    io = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        entry = {"name": name, "mode": "input" if is_input else "output",
                 "dtype": _dtype_name(trt, engine.get_tensor_dtype(name)),
                 "shape": [int(d) for d in engine.get_tensor_shape(name)]}
        if is_input:
            entry["profile"] = [[int(d) for d in s] for s in engine.get_tensor_profile_shape(name, 0)]
        io.append(entry)
    return io


def _parse(trt, builder, logger, onnx_path: Path):
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            errors.append(f"node {e.node_name() or '?'} ({e.node_operator() or '?'}): {e.desc()}")
        raise ExportError(f"TensorRT cannot parse {onnx_path.name}: " + "; ".join(errors or logger.messages[-3:]))
    return network, parser


def _config(trt, builder, info: ArtifactInfo, profile: Profile, options: BuildOptions):
    config = builder.create_builder_config()
    c, h, w = info.input_shape
    p = builder.create_optimization_profile()
    p.set_shape(info.input_name, (profile.min, c, h, w), (profile.opt, c, h, w), (profile.max, c, h, w))
    config.add_optimization_profile(p)
    if options.workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * 1024**3))
    if options.opt_level is not None:
        config.builder_optimization_level = options.opt_level
    if options.hardware_compat != "none":
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel,
                                                      HARDWARE_COMPAT[options.hardware_compat])
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if options.timing_cache is not None:  # loaded if present, saved after the build
        data = options.timing_cache.read_bytes() if options.timing_cache.is_file() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, False)
    return config


@contextlib.contextmanager
def _heartbeat(say: Progress, every: float = 20.0):
    """A progress line every `every` seconds while TensorRT builds (it says nothing for minutes)."""
    done = threading.Event()
    start = time.perf_counter()

    def beat():
        while not done.wait(every):
            say(f"still building ({time.perf_counter() - start:.0f} s)")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def build_engine(onnx_path: str | Path, plan_path: str | Path, options: BuildOptions = BuildOptions(), *,
                 progress: Progress | None = None) -> dict:
    """Build, verify and write `plan_path` and its manifest `plan_path + '.json'`; returns the manifest."""
    say = progress or (lambda m: None)
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if plan_path.suffix not in ENGINE_SUFFIXES:
        raise ExportError(f"output file must end in .plan or .engine, got {plan_path.name}")
    options.check()
    check_output_path(plan_path)
    info = read_artifact(onnx_path)
    if info.kind != "onnx":
        raise ExportError(f"{onnx_path.name}: build engines from an .onnx file")
    import onnx

    check_buildable(info, onnx.load(str(onnx_path), load_external_data=False).graph)
    profile = Profile.parse(options.batch, info.batch_min, info.batch_max)
    device = cuda_device()  # before any TensorRT object exists
    check_device(info.precision, device)
    trt = import_tensorrt()

    start = time.perf_counter()
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    say(f"parsing {onnx_path.name} ({info.precision}, strongly typed) with TensorRT {trt.__version__}")
    network, _parser = _parse(trt, builder, logger, onnx_path)
    config = _config(trt, builder, info, profile, options)
    say(f"building for {device.name} (batch {profile.min}..{profile.max}, tuned for {profile.opt}); "
        "this can take minutes")
    with _heartbeat(say):
        plan = builder.build_serialized_network(network, config)
    if plan is None:
        reasons = "; ".join(logger.messages[-5:]) or "no reason logged"
        raise ExportError(f"TensorRT could not build an engine from {onnx_path.name}: {reasons}")
    plan_bytes = bytes(memoryview(plan))
    seconds = time.perf_counter() - start
    say(f"built in {seconds:.0f} s; checking the engine's inputs and outputs")
    runtime = trt.Runtime(logger)
    if options.version_compatible:
        runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine(plan_bytes)
    if engine is None:
        raise ExportError(f"TensorRT cannot load the engine it just built: {'; '.join(logger.messages[-3:])}")
    io = engine_io(trt, engine)
    verify_io(io, info, profile)
    manifest = engine_manifest(info, onnx_sha256=sha256_file(onnx_path), profile=profile, io=io, device=device,
                               tensorrt_version=trt.__version__, options=options, seconds=seconds)
    write_plan(plan_path, plan_bytes, manifest)
    if options.timing_cache is not None:
        cache = bytes(memoryview(config.get_timing_cache().serialize()))
        atomic_write(options.timing_cache, lambda tmp: tmp.write_bytes(cache))
    say(f"wrote {plan_path.name} ({len(plan_bytes) / 1e6:.1f} MB) and {manifest_path(plan_path).name}")
    return manifest


def write_plan(plan_path: Path, plan: bytes, manifest: dict) -> None:
    """The plan and its manifest, each written atomically; the manifest last, so a manifest
    never describes a plan that is not there (a plan without one is refused by the runtime)."""
    text = to_json(manifest, indent=2) + "\n"
    manifest_file = manifest_path(plan_path)
    manifest_file.unlink(missing_ok=True)
    atomic_write(plan_path, lambda tmp: tmp.write_bytes(plan))
    atomic_write(manifest_file, lambda tmp: tmp.write_text(text))
