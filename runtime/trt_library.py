"""The two TensorRT libraries NVIDIA ships, and every difference between them this project meets.

- **tensorrt** (TensorRT 10.x/11.x): every NVIDIA GPU, the data-centre ones (H100, H200, B200)
  included. It builds on the GPU it targets, so a build needs that GPU.
- **tensorrt-rtx** (TensorRT for RTX 1.x, module `tensorrt_rtx`): Ampere and later RTX and
  workstation GPUs and the A100 (compute capability 8.0, 8.6, 8.9, 12.x; 7.5 on request), not
  Hopper or Blackwell data-centre GPUs. It builds ahead of time on any machine, one without a GPU
  included, and compiles its kernels just in time at a plan's first run on the GPU; its runtime
  cache keeps them for the next start.

Building (Builder, a strongly typed network, OnnxParser, profiles, build_serialized_network) and
running (Runtime, deserialize_cuda_engine, set_input_shape, set_tensor_address,
execute_async_v3) are the same API in both. What differs is decided here, by which library is in
use, never by `hasattr`: TensorRT-RTX has attributes that it ignores or that fail the build
(`hardware_compatibility_level`, `BuilderFlag.VERSION_COMPATIBLE`, the timing cache).

Polygraphy drives either library, chosen once per process (`polygraphy.config.USE_TENSORRT_RTX`,
read when `polygraphy.backend.trt` is first imported); `use_polygraphy` makes that choice
explicit, logs it, and refuses to switch libraries within one process.
"""

from __future__ import annotations

import collections
import importlib
import logging
import sys
from dataclasses import dataclass

from crossvit.errors import BackendUnavailable
from crossvit.install import pip_install

log = logging.getLogger("crossvit.tensorrt")

# The oldest GPU architecture whose TensorRT kernels compute in each precision (NVIDIA's support
# matrix: bf16 from Ampere, fp8 from Ada). Used when building and again when loading.
MIN_COMPUTE_CAPABILITY = {"bf16": (8, 0), "fp8": (8, 9)}


def cc_text(cc) -> str:
    return f"{cc[0]}.{cc[1]}"


def parse_compute_capability(text: str) -> tuple[int, int]:
    """'8.6' -> (8, 6); anything else is a ValueError naming the expected form."""
    major, dot, minor = str(text).strip().partition(".")
    if not dot or not major.isdigit() or not minor.isdigit():
        raise ValueError(f"a compute capability looks like 8.6, got {text!r}")
    return int(major), int(minor)


@dataclass(frozen=True)
class TensorRTLibrary:
    """One of the two TensorRT libraries: what it is called, how it installs, what it honours."""

    name: str  # what manifests record: "tensorrt" or "tensorrt-rtx"
    module_name: str  # what Python imports
    title: str  # what messages say
    extras: tuple[str, ...]  # crossvit's extras that install it, any one of them
    install_note: str
    builds_without_gpu: bool
    # BuildOptions fields this library honours; the others are refused before a build (RTX ignores
    # the hardware compatibility level, fails on VERSION_COMPATIBLE and has no timing cache).
    options: frozenset
    runtime_cache: bool  # JIT-compiled kernels kept in a file beside the plan

    @property
    def install(self) -> str:
        """The install line for this install of crossvit (a checkout or a wheel: `crossvit.install`)."""
        return f"{' or '.join(pip_install(extra) for extra in self.extras)} ({self.install_note})"

    @property
    def is_rtx(self) -> bool:
        return self.name == "tensorrt-rtx"

    def module(self):
        """The library's Python module, or BackendUnavailable naming the install line."""
        try:
            return importlib.import_module(self.module_name)
        except ImportError:
            raise BackendUnavailable(f"{self.title} is not installed: {self.install}") from None

    def installed(self) -> bool:
        try:
            self.module()
        except BackendUnavailable:
            return False
        return True

    def default_targets(self, trt, precision: str) -> list[tuple[int, int]]:
        """TensorRT-RTX's default targets (8.0, 8.6, 8.9, 12.x: every one its ComputeCapability enum
        has but 7.5, which is on request) that compute in `precision`. Standard TensorRT: none (it
        targets the build GPU)."""
        if not self.is_rtx:
            return []
        need = MIN_COMPUTE_CAPABILITY.get(precision, (0, 0))
        return [cc for cc in self.known_targets(trt) if cc >= (8, 0) and cc >= need]

    def known_targets(self, trt) -> list[tuple[int, int]]:
        """The compute capabilities this TensorRT-RTX can build for, read off its enum."""
        out = []
        for member in trt.ComputeCapability.__members__:
            if member.startswith("SM") and member[2:].isdigit():
                digits = member[2:]
                out.append((int(digits[:-1]), int(digits[-1])))
        return sorted(out)

    def capability_enum(self, trt, cc: tuple[int, int]):
        return getattr(trt.ComputeCapability, f"SM{cc[0]}{cc[1]}")


TENSORRT = TensorRTLibrary(
    name="tensorrt", module_name="tensorrt", title="TensorRT",
    extras=("gpu-cu12", "gpu-cu13"),
    install_note="on a machine with an NVIDIA GPU: TensorRT and cuda-python of one CUDA major; the tensorrt wheels "
                 "come from NVIDIA's package index",
    builds_without_gpu=False, options=frozenset({"hardware_compat", "version_compatible", "timing_cache"}),
    runtime_cache=False)
TENSORRT_RTX = TensorRTLibrary(
    name="tensorrt-rtx", module_name="tensorrt_rtx", title="TensorRT-RTX",
    extras=("rtx",),
    install_note="TensorRT for RTX from PyPI; it builds engines without a GPU, running them needs an Ampere or "
                 "later RTX GPU or an A100",
    builds_without_gpu=True, options=frozenset({"compute_capabilities"}), runtime_cache=True)
LIBRARIES = {lib.name: lib for lib in (TENSORRT, TENSORRT_RTX)}
LIBRARY_CHOICES = ("auto", *LIBRARIES)


def get_library(name: str) -> TensorRTLibrary:
    try:
        return LIBRARIES[name]
    except KeyError:
        raise BackendUnavailable(f"unknown TensorRT library {name!r}; choose from {', '.join(LIBRARY_CHOICES)}") \
            from None


def library_of(manifest: dict) -> TensorRTLibrary:
    """The library a manifest says built the plan (manifests before TensorRT-RTX: standard TensorRT)."""
    trt_info = manifest.get("tensorrt") if isinstance(manifest.get("tensorrt"), dict) else {}
    name = trt_info.get("library", "tensorrt")
    if name not in LIBRARIES:
        raise BackendUnavailable(f"the manifest names an unknown TensorRT library {name!r} "
                                 f"(this crossvit knows {', '.join(LIBRARIES)})")
    return LIBRARIES[name]


def choose_library(requested: str = "auto", *, gpu: bool | None = None) -> TensorRTLibrary:
    """`requested`, or for "auto": standard TensorRT where it is installed and a GPU is present,
    else TensorRT-RTX where it is installed, else BackendUnavailable saying what to install."""
    if requested != "auto":
        library = get_library(requested)
        library.module()  # installed, or the install line
        return library
    if gpu is None:
        from .gpu import cuda_device

        try:
            cuda_device()
            gpu = True
        except BackendUnavailable:
            gpu = False
    if gpu and TENSORRT.installed():
        return TENSORRT
    if TENSORRT_RTX.installed():
        return TENSORRT_RTX
    if gpu:
        raise BackendUnavailable(f"no TensorRT library is installed: {TENSORRT.install}; or {TENSORRT_RTX.install}")
    raise BackendUnavailable("no TensorRT library can build here: standard TensorRT needs an NVIDIA GPU and "
                             f"TensorRT-RTX is not installed ({TENSORRT_RTX.install})")


# -- one logger and one record of messages per process -------------------------------------------
# TensorRT keeps the first logger a process gives it and ignores later ones ("The logger passed
# into createInferRuntime differs from one already registered"), so every TensorRT object here is
# given the same one, and Polygraphy's messages (routed through Python logging) land in the same
# record: a failed build or load reports its reason whoever created the first object.

MESSAGES: collections.deque = collections.deque(maxlen=200)
_LOGGERS: dict = {}


def _keep(text: str) -> None:
    MESSAGES.append(" ".join(str(text).split()))


def trt_logger(trt):
    """This process's TensorRT logger for module `trt`: keeps warnings and errors in MESSAGES."""
    if trt.__name__ in _LOGGERS:
        return _LOGGERS[trt.__name__]
    sev = trt.ILogger.Severity

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            if severity in (sev.INTERNAL_ERROR, sev.ERROR, sev.WARNING):
                _keep(msg)
                log.debug("%s", msg)

    _LOGGERS[trt.__name__] = Logger()
    return _LOGGERS[trt.__name__]


def recent_messages(since: int = 0, last: int = 3) -> list[str]:
    """The last `last` warnings/errors after position `since` of MESSAGES (see `message_mark`)."""
    items = list(MESSAGES)[since:]
    return items[-last:]


def message_mark() -> int:
    return len(MESSAGES)


class _PolygraphyRecord(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            text = record.getMessage()
            for prefix in ("[E] ", "[W] ", "[!] "):
                text = text.replace(prefix, "", 1) if text.startswith(prefix) else text
            _keep(text)


_polygraphy_library: str | None = None


def use_polygraphy(library: TensorRTLibrary):
    """Point Polygraphy at `library` for this process and return its TensorRT backend module.

    Polygraphy reads the choice once, when `polygraphy.backend.trt` is first imported; a second
    library in the same process would silently get the first one's module, so it is refused."""
    global _polygraphy_library
    try:
        from polygraphy import config
    except ImportError:
        raise BackendUnavailable(f"building engines needs Polygraphy: {pip_install('quant')}") from None
    want = library.is_rtx
    if "polygraphy.backend.trt" in sys.modules:
        current = _polygraphy_library or (TENSORRT_RTX.name if config.USE_TENSORRT_RTX else TENSORRT.name)
        if current != library.name:
            raise BackendUnavailable(f"this process already drives {get_library(current).title} through Polygraphy, "
                                     f"which takes one TensorRT library per process; build {library.title} engines "
                                     "in another process")
    else:
        config.USE_TENSORRT_RTX = want
    if _polygraphy_library != library.name:
        from polygraphy.logger import G_LOGGER

        G_LOGGER.use_python_logging_system = True  # into Python logging, where MESSAGES records it
        G_LOGGER.module_severity = G_LOGGER.WARNING
        plog = logging.getLogger("Polygraphy")
        if not any(isinstance(h, _PolygraphyRecord) for h in plog.handlers):
            plog.addHandler(_PolygraphyRecord())
            plog.propagate = False  # its lines are ours to report, in one line
        _polygraphy_library = library.name
        log.info("Polygraphy drives %s (%s) in this process", library.title, library.module_name)
    import polygraphy.backend.trt as backend

    return backend
