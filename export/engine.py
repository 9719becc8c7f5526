"""`crossvit build`: a TensorRT or TensorRT-RTX engine from a crossvit ONNX, and its manifest.

One code path for both TensorRT libraries (`runtime/trt_library.py` holds what differs), built
through Polygraphy's loaders (network from the ONNX path, strongly typed; the builder config with
one profile; engine bytes from the network). A strongly typed network and no precision flags
(TensorRT 11 has none), so the engine computes in the precision the ONNX variant was written in.
int8-cpu graphs hold ONNX Runtime-only ops and are refused before TensorRT is called.

What a machine without a GPU can verify is verified before the plan is written: zero parser
errors, the network's I/O (strongly typed: the engine's) against the artifact contract, the
profile TensorRT holds against the request, and (TensorRT-RTX) that the plan is not malformed.
Where a GPU can load the plan, the engine's own I/O is checked too. Standard TensorRT builds on
the GPU it targets, so it asks `cuda_device()` first (a TensorRT object created without one
segfaults later); TensorRT-RTX builds anywhere, for the compute capabilities it is given.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from crossvit import __version__
from crossvit.contract import (ENGINE_FORMAT, ENGINE_SUFFIXES, derived_source, get_precision, manifest_path,
                               new_metadata, to_json)
from crossvit.errors import BackendUnavailable, ExportError
from crossvit.files import atomic_write, check_output_path, sha256_file
from crossvit.runtime.artifact import ArtifactInfo, read_artifact
from crossvit.runtime.gpu import CudaDevice, cuda_device
from crossvit.runtime.tensorrt import engine_io, network_io, rtx_validity, verify_io
from crossvit.runtime.trt_library import (LIBRARY_CHOICES, MIN_COMPUTE_CAPABILITY, TensorRTLibrary, cc_text,
                                          choose_library, message_mark, recent_messages, trt_logger, use_polygraphy)

Progress = Callable[[str], None]
HARDWARE_COMPAT = {"none": "NONE", "ampere+": "AMPERE_PLUS", "same-cc": "SAME_COMPUTE_CAPABILITY"}
# The oldest build GPU for each hardware compatibility level (NVIDIA's docstrings).
HARDWARE_COMPAT_BUILD_GPU = {"ampere+": (8, 0), "same-cc": (7, 5)}
OPTION_FLAGS = {"hardware_compat": "--hardware-compat", "version_compatible": "--version-compatible",
                "timing_cache": "--timing-cache", "compute_capabilities": "--compute-capability"}
# Standard TensorRT options that exist in TensorRT-RTX but must not be used there (tried here).
RTX_REFUSES = {"hardware_compat": "ignores the hardware compatibility level (it logs \"unsupported\")",
               "version_compatible": "cannot build version-compatible plans (it has no lean runtime)",
               "timing_cache": "has no timing cache (a deprecated no-op there)"}


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
    timing_cache: Path | None = None  # standard TensorRT only
    hardware_compat: str = "none"  # standard TensorRT only
    version_compatible: bool = False  # standard TensorRT only
    library: str = "auto"  # "auto", "tensorrt" or "tensorrt-rtx" (trt_library.choose_library)
    compute_capabilities: tuple[tuple[int, int], ...] | None = None  # TensorRT-RTX's targets (default: all it has)

    def check(self) -> None:
        """What can be judged without knowing the library."""
        if self.workspace_gib is not None and not (0 < self.workspace_gib <= 1024):
            raise ExportError(f"--workspace must be in (0, 1024] GiB, got {self.workspace_gib}")
        if self.opt_level is not None and self.opt_level not in range(6):
            raise ExportError(f"--opt-level must be 0..5, got {self.opt_level}")
        if self.hardware_compat not in HARDWARE_COMPAT:
            raise ExportError(f"--hardware-compat must be one of {', '.join(HARDWARE_COMPAT)}, "
                              f"got {self.hardware_compat!r}")
        if self.library not in LIBRARY_CHOICES:
            raise ExportError(f"--library must be one of {', '.join(LIBRARY_CHOICES)}, got {self.library!r}")
        if self.timing_cache is not None and self.timing_cache.is_dir():
            raise ExportError(f"--timing-cache {self.timing_cache} is a folder; give a file")
        if self.compute_capabilities is not None and not self.compute_capabilities:
            raise ExportError("--compute-capability needs at least one compute capability, e.g. 8.6")

    def given(self) -> dict[str, bool]:
        """The library-specific options the user set."""
        return {"hardware_compat": self.hardware_compat != "none", "version_compatible": self.version_compatible,
                "timing_cache": self.timing_cache is not None,
                "compute_capabilities": self.compute_capabilities is not None}


def check_buildable(info: ArtifactInfo, graph) -> None:
    """Refuse what TensorRT must never be fed: CPU-only precisions and ONNX Runtime's own ops."""
    precision = get_precision(info.precision)
    if precision.target == "cpu":
        runtime = {"openvino": "OpenVINO"}.get(precision.runtime, "ONNX Runtime")
        raise ExportError(f"{info.path.name} is {info.precision}, a graph for {runtime} on CPUs, not for "
                          "TensorRT; build from the fp32 ONNX or a TensorRT variant (fp16, bf16, int8, fp8)")
    foreign = sorted({n.domain for n in graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise ExportError(f"{info.path.name} has ops from {', '.join(foreign)} (ONNX Runtime-only); "
                          "TensorRT cannot build it")


def check_device(precision: str, device: CudaDevice) -> None:
    need = MIN_COMPUTE_CAPABILITY.get(precision)
    if need and device.compute_capability < need:
        raise BackendUnavailable(f"{precision} engines need compute capability {cc_text(need)} or newer; "
                                 f"{device.name} has {cc_text(device.compute_capability)}")


def check_options(options: BuildOptions, library: TensorRTLibrary, precision: str,
                  build_gpu: CudaDevice | None, known_targets: list[tuple[int, int]]) -> None:
    """Refuse, in one line, what this library would ignore, fail on, or build wrong: options of the
    other library, precision vs target GPU, and hardware compatibility vs precision and build GPU."""
    for option, set_ in options.given().items():
        if not set_ or option in library.options:
            continue
        flag = OPTION_FLAGS[option]
        if library.is_rtx:
            raise ExportError(f"{flag} is a standard TensorRT option; TensorRT-RTX {RTX_REFUSES[option]}: choose "
                              "the GPUs an RTX plan runs on with --compute-capability instead")
        raise ExportError(f"{flag} is a TensorRT-RTX option (--library tensorrt-rtx); standard TensorRT builds for "
                          "the GPU it runs on (--hardware-compat ampere+ for any Ampere or later GPU)")
    need = MIN_COMPUTE_CAPABILITY.get(precision)
    if library.is_rtx:
        for cc in options.compute_capabilities or ():
            if cc not in known_targets:
                raise ExportError(f"--compute-capability {cc_text(cc)}: TensorRT-RTX builds for "
                                  f"{', '.join(map(cc_text, known_targets))} (Hopper and Blackwell data-centre GPUs "
                                  "need standard TensorRT: --library tensorrt)")
            if need and cc < need:
                raise ExportError(f"{precision} engines need compute capability {cc_text(need)} or newer; "
                                  f"--compute-capability {cc_text(cc)} is older")
        return
    if build_gpu is None:
        raise BackendUnavailable("standard TensorRT builds on the GPU it targets, and this machine has none "
                                 "(TensorRT-RTX builds without one: --library tensorrt-rtx)")
    check_device(precision, build_gpu)
    level = options.hardware_compat
    oldest = HARDWARE_COMPAT_BUILD_GPU.get(level)
    if oldest and build_gpu.compute_capability < oldest:
        raise ExportError(f"--hardware-compat {level} needs a build GPU of compute capability {cc_text(oldest)} or "
                          f"newer; {build_gpu.name} has {cc_text(build_gpu.compute_capability)}")
    if level == "ampere+" and need and need > (8, 0):
        raise ExportError(f"--hardware-compat ampere+ makes a plan that loads on any GPU of compute capability 8.0 "
                          f"or newer, but {precision} needs {cc_text(need)}: build {precision} without it")


def rtx_targets(options: BuildOptions, library: TensorRTLibrary, trt, precision: str) -> list[tuple[int, int]]:
    if not library.is_rtx:
        return []
    if options.compute_capabilities:
        return sorted(set(options.compute_capabilities))
    return library.default_targets(trt, precision)


def engine_manifest(info: ArtifactInfo, *, onnx_sha256: str, plan_sha256: str, profile: Profile, io: list[dict],
                    library: TensorRTLibrary, version: str, targets: list[tuple[int, int]],
                    device: CudaDevice | None, options: BuildOptions, seconds: float) -> dict:
    """What the runtime needs to load and use the plan without anything else (DESIGN.md).

    `tensorrt.target_compute_capabilities`: the GPUs the plan runs on. TensorRT-RTX: exactly
    these. Standard TensorRT: the build GPU's (hardware compatibility "none"/"same-cc"), or 8.0
    and every newer one ("ampere+"). `device` is the build GPU, null for a build without one."""
    c, h, w = info.input_shape
    trt_info = {"library": library.name, "version": version}
    if library.is_rtx:
        trt_info["target_compute_capabilities"] = [list(t) for t in targets]
    else:
        level = options.hardware_compat
        trt_info["target_compute_capabilities"] = [[8, 0]] if level == "ampere+" else \
            [list(device.compute_capability)] if device else []
        trt_info.update(hardware_compatibility=level, version_compatible=options.version_compatible)
    trt_info.update(builder_optimization_level=options.opt_level, workspace_gib=options.workspace_gib)
    return new_metadata(
        ENGINE_FORMAT,
        model=info.model,
        precision=info.precision,
        batch={"min": profile.min, "opt": profile.opt, "max": profile.max},
        inputs=[{"name": info.input_name, "dtype": "float32", "shape": ["batch", c, h, w]}],
        outputs=[{"name": info.output_name, "dtype": "float32", "shape": ["batch", info.num_classes]}],
        engine_io=io,
        source=derived_source(info.path.name, onnx_sha256, info.raw.get("source"), random_weights=info.random_weights),
        plan_sha256=plan_sha256,
        tensorrt=trt_info,
        device=device.to_dict() if device else None,
        builder={"crossvit": __version__, "seconds": round(seconds, 1)},
    )


# -- the build, through Polygraphy ---------------------------------------------------------------

def _parse_failure(library: TensorRTLibrary, onnx_path: Path, messages: list[str]) -> str:
    """One line from the parser's errors: how many nodes failed, their operators, the first in full."""
    nodes = [m for m in messages if m.startswith("In node ")]
    ops = sorted({m.group(1) for m in (re.search(r"operator: (\S+)", n) for n in nodes) if m})
    if nodes:
        return (f"{library.title} cannot parse {onnx_path.name}: {len(nodes)} node(s) failed "
                f"({', '.join(ops)}); first: {nodes[0]}")
    return f"{library.title} cannot parse {onnx_path.name}: {'; '.join(messages[-3:]) or 'no reason logged'}"


def _optional_gpu() -> CudaDevice | None:
    try:
        return cuda_device()
    except BackendUnavailable:
        return None


def _config_loader(backend, library: TensorRTLibrary, trt, profile, options: BuildOptions,
                   targets: list[tuple[int, int]]):
    """Polygraphy's CreateConfig (or CreateConfigRTX) for one profile and the options this library honours."""
    kwargs = dict(profiles=[profile], profiling_verbosity=trt.ProfilingVerbosity.LAYER_NAMES_ONLY)
    if options.workspace_gib is not None:
        kwargs["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: int(options.workspace_gib * 1024**3)}
    if options.opt_level is not None:
        kwargs["builder_optimization_level"] = options.opt_level
    if library.is_rtx:
        from polygraphy.backend.tensorrt_rtx import CreateConfigRTX

        return CreateConfigRTX(compute_capabilities=targets, **kwargs)
    if options.hardware_compat != "none":
        try:
            kwargs["hardware_compatibility_level"] = getattr(trt.HardwareCompatibilityLevel,
                                                             HARDWARE_COMPAT[options.hardware_compat])
        except AttributeError:  # same-cc came after 10.8/10.9
            raise ExportError(f"--hardware-compat {options.hardware_compat} is not in TensorRT {trt.__version__} "
                              "(it came in a later 10.x); upgrade TensorRT or use ampere+") from None
    if options.version_compatible:
        kwargs["version_compatible"] = True
    config = backend.CreateConfig(**kwargs)
    if options.timing_cache is None or not options.timing_cache.is_file():
        return config

    def load_timing_cache(builder, network, cfg):
        cache = cfg.create_timing_cache(options.timing_cache.read_bytes())
        if cache is None or not cfg.set_timing_cache(cache, False):
            # Polygraphy merges the file's entries with this build's when it saves (ignore_mismatch)
            from crossvit.runtime.trt_library import log

            log.warning("timing cache %s is from another GPU or TensorRT version: not used for this build; its "
                        "entries are kept when the cache is saved", options.timing_cache)

    return backend.PostprocessConfig(config, load_timing_cache)


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
    gpu = _optional_gpu()  # before any TensorRT object exists
    library = choose_library(options.library, gpu=gpu is not None)
    if not library.builds_without_gpu and gpu is None:
        cuda_device()  # raises with the reason
    trt = library.module()
    known = library.known_targets(trt) if library.is_rtx else []
    check_options(options, library, info.precision, gpu, known)
    targets = rtx_targets(options, library, trt, info.precision)
    backend = use_polygraphy(library)
    from polygraphy.exception import PolygraphyException

    trt_logger(trt)  # the process's one TensorRT logger (trt_library): every message is recorded
    mark = message_mark()
    start = time.perf_counter()
    say(f"parsing {onnx_path.name} ({info.precision}, strongly typed) with {library.title} {trt.__version__} "
        "through Polygraphy")
    try:
        builder, network, parser = backend.network_from_onnx_path(str(onnx_path), strongly_typed=True)
    except PolygraphyException:
        raise ExportError(_parse_failure(library, onnx_path, recent_messages(mark, last=200))) from None
    if parser.num_errors:
        raise ExportError(_parse_failure(library, onnx_path, recent_messages(mark, last=200)))
    c, h, w = info.input_shape
    verify_io(network_io(trt, network), info, None, ExportError)  # strongly typed: the engine's I/O
    poly_profile = backend.Profile().add(info.input_name, (profile.min, c, h, w), (profile.opt, c, h, w),
                                         (profile.max, c, h, w))
    held = [[int(d) for d in s] for s in poly_profile.to_trt(builder, network).get_shape(info.input_name)]
    if held != [[b, c, h, w] for b in (profile.min, profile.opt, profile.max)]:
        raise ExportError(f"TensorRT holds the profile {held}, not the requested "
                          f"{profile.min}:{profile.opt}:{profile.max}")
    config = _config_loader(backend, library, trt, poly_profile, options, targets)
    where = (f"compute capabilities {', '.join(map(cc_text, targets))}" if library.is_rtx else gpu.name)
    say(f"building for {where} (batch {profile.min}..{profile.max}, tuned for {profile.opt})"
        + ("" if library.is_rtx else "; this can take minutes"))
    with _heartbeat(say), warnings.catch_warnings():
        # Polygraphy's CreateConfig always sets an (empty) timing cache, a deprecated no-op in TensorRT-RTX
        warnings.filterwarnings("ignore", message=".*Timing cache operations are no-ops", category=DeprecationWarning)
        try:
            plan = backend.engine_bytes_from_network(
                (builder, network, parser), config=config,
                save_timing_cache=str(options.timing_cache) if options.timing_cache else None)
        except PolygraphyException:
            reasons = "; ".join(recent_messages(mark, last=3)) or "no reason logged"
            raise ExportError(f"{library.title} could not build an engine from {onnx_path.name}: {reasons}") from None
    plan_bytes = bytes(memoryview(plan))
    seconds = time.perf_counter() - start
    io = _check_plan(backend, trt, library, plan_bytes, info, profile, gpu, targets, network, say, mark)
    manifest = engine_manifest(info, onnx_sha256=sha256_file(onnx_path),
                               plan_sha256=hashlib.sha256(plan_bytes).hexdigest(), profile=profile, io=io,
                               library=library, version=trt.__version__, targets=targets, device=gpu,
                               options=options, seconds=seconds)
    write_plan(plan_path, plan_bytes, manifest)
    say(f"wrote {plan_path.name} ({len(plan_bytes) / 1e6:.1f} MB, {library.title} {trt.__version__}, "
        f"{seconds:.1f} s) and {manifest_path(plan_path).name}")
    return manifest


def _check_plan(backend, trt, library: TensorRTLibrary, plan: bytes, info: ArtifactInfo, profile: Profile,
                gpu: CudaDevice | None, targets, network, say: Progress, mark: int) -> list[dict]:
    """The built plan's I/O: from the engine itself where this GPU can load it, else from the
    strongly typed network (the engine's by construction) with the profile that was verified."""
    runs_here = gpu is not None and (not library.is_rtx or gpu.compute_capability in targets)
    if runs_here:
        say("checking the engine's inputs and outputs on the GPU")
        runtime = trt.Runtime(trt_logger(trt))
        if library.is_rtx:
            why = rtx_validity(trt, runtime, plan)
            if why:
                raise ExportError(f"TensorRT-RTX says the plan it just built is invalid here ({why})")
        from polygraphy.exception import PolygraphyException

        try:
            engine = backend.engine_from_bytes(plan, runtime=runtime)
        except PolygraphyException:
            raise ExportError(f"{library.title} cannot load the engine it just built: "
                              f"{'; '.join(recent_messages(mark, 3))}") from None
        io = engine_io(trt, engine)
        verify_io(io, info, (profile.min, profile.opt, profile.max), ExportError)
        return io
    if library.is_rtx:
        runtime = trt.Runtime(trt_logger(trt))  # without a GPU: only a malformed plan can be told apart
        _, diagnostics = runtime.get_engine_validity(plan)
        if int(diagnostics) & int(trt.EngineInvalidityDiagnostics.MALFORMED_ENGINE):
            raise ExportError("TensorRT-RTX reports the plan it just built as malformed")
        say(f"built for GPUs of compute capability {', '.join(map(cc_text, targets))} "
            f"(RTX/Ampere+), not run here: {'no GPU on this machine' if gpu is None else gpu.name + ' is not a target'}")
    c, h, w = info.input_shape
    io = network_io(trt, network)
    for t in io:
        if t["mode"] == "input":
            t["profile"] = [[b, c, h, w] for b in (profile.min, profile.opt, profile.max)]
    return io


def write_plan(plan_path: Path, plan: bytes, manifest: dict) -> None:
    """The plan and its manifest, each written atomically; the manifest last, so a manifest
    never describes a plan that is not there (a plan without one is refused by the runtime)."""
    text = to_json(manifest, indent=2) + "\n"
    manifest_file = manifest_path(plan_path)
    manifest_file.unlink(missing_ok=True)
    atomic_write(plan_path, lambda tmp: tmp.write_bytes(plan))
    atomic_write(manifest_file, lambda tmp: tmp.write_text(text))
