"""TensorRT engines. On every machine: real TensorRT-RTX builds (its builder needs no GPU) and
everything around the TensorRT calls; names of standard TensorRT 11.4 checked against its real
bindings. On a GPU (`gpu` marker; skipped here with the reason): running the plans.

The fake plans' manifests are written by `engine_manifest`, the function `crossvit build` uses.
"""

import importlib
import re
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import H100, engine_io, fake_plan
from crossvit.contract import manifest_path
from crossvit.errors import ArtifactError, BackendUnavailable, ExportError
from crossvit.export.engine import BuildOptions, Profile, check_buildable, check_device, check_options
from crossvit.install import pip_install
from crossvit.runtime.artifact import read_artifact
from crossvit.runtime.gpu import CudaDevice
from crossvit.runtime.tensorrt import manifest_mismatch, verify_io
from crossvit.runtime.trt_library import TENSORRT, TENSORRT_RTX

L4 = CudaDevice(0, "NVIDIA L4", (8, 9), "12.8", "12.8")
A10 = CudaDevice(0, "NVIDIA A10", (8, 6), "12.8", "12.8")
T4 = CudaDevice(0, "Tesla T4", (7, 5), "12.8", "12.8")
V100 = CudaDevice(0, "Tesla V100", (7, 0), "12.8", "12.8")


# -- the profile and the options ---------------------------------------------------------------

@pytest.mark.parametrize("text, lo, hi, expected", [
    (None, 1, 64, (1, 8, 64)),
    (None, 1, 1, (1, 1, 1)),
    (None, 4, 4, (4, 4, 4)),
    (None, 1, 256, (1, 16, 256)),
    ("1:8:32", 1, 64, (1, 8, 32)),
    ("2:32", 1, 64, (2, 8, 32)),
    ("16", 1, 64, (16, 16, 16)),
])
def test_profile_defaults_to_the_onnx_range_tuned_for_a_middle_batch(text, lo, hi, expected):
    p = Profile.parse(text, lo, hi)
    assert (p.min, p.opt, p.max) == expected


@pytest.mark.parametrize("text, words", [
    ("8:4", "1 <= MIN <= OPT <= MAX"), ("1:64:8", "1 <= MIN <= OPT <= MAX"), ("0:1:4", "1 <= MIN"),
    ("1:8:128", "outside the ONNX's batch range 1..64"), ("x", "must look like"), ("1:2:3:4", "must look like"),
])
def test_bad_profiles_are_refused_before_tensorrt_is_touched(text, words):
    with pytest.raises(ExportError, match=words):
        Profile.parse(text, 1, 64)


@pytest.mark.parametrize("options, words", [
    (dict(workspace_gib=0), "--workspace"), (dict(opt_level=6), "--opt-level"),
    (dict(hardware_compat="turing+"), "--hardware-compat"),
])
def test_bad_build_options_are_refused(options, words):
    with pytest.raises(ExportError, match=words):
        BuildOptions(**options).check()


# -- what may be built, on which GPU -------------------------------------------------------------

def test_int8_cpu_and_onnxruntime_only_graphs_are_never_built(digits_onnx, tmp_path):
    import onnx
    from onnx import helper

    from crossvit.export.precision import convert_precision

    cpu = convert_precision(digits_onnx, tmp_path / "d.int8-cpu.onnx", "int8-cpu", None)
    with pytest.raises(ExportError, match="int8-cpu, a graph for ONNX Runtime on CPUs, not for TensorRT"):
        check_buildable(read_artifact(cpu), onnx.load(str(cpu)).graph)
    proto = onnx.load(str(digits_onnx))
    proto.graph.node.append(helper.make_node("FusedGelu", ["logits"], ["unused"], domain="com.microsoft"))
    with pytest.raises(ExportError, match="com.microsoft"):
        check_buildable(read_artifact(digits_onnx), proto.graph)
    check_buildable(read_artifact(digits_onnx), onnx.load(str(digits_onnx)).graph)  # fp32 is fine


@pytest.mark.parametrize("precision, device, ok", [
    ("fp16", T4, True), ("bf16", T4, False), ("bf16", A10, True), ("fp8", A10, False), ("fp8", H100, True),
    ("int8", T4, True),
])
def test_precisions_need_a_gpu_that_computes_in_them(precision, device, ok):
    if ok:
        check_device(precision, device)
    else:
        with pytest.raises(BackendUnavailable, match=f"{precision} engines need compute capability"):
            check_device(precision, device)


# -- the built engine must be the ONNX's ---------------------------------------------------------

def test_verify_io_accepts_the_engine_the_onnx_describes(digits_onnx):
    info = read_artifact(digits_onnx)
    verify_io(engine_io(info), info, (1, 8, 64), ExportError)


@pytest.mark.parametrize("change, words", [
    (dict(in__name="images"), "are not the ONNX's"),
    (dict(out__dtype="float16"), "is float16, expected float32"),
    (dict(in__mode="output"), "is an output, expected an input"),
    (dict(in__shape=[-1, 3, 64, 64]), "has shape"),
    (dict(out__shape=[-1, 1000]), "has shape"),
    (dict(in__profile=[[1, 3, 32, 32], [4, 3, 32, 32], [64, 3, 32, 32]]), "profile"),
])
def test_verify_io_refuses_a_different_engine(digits_onnx, change, words):
    info = read_artifact(digits_onnx)
    with pytest.raises(ExportError, match=words):
        verify_io(engine_io(info, **change), info, (1, 8, 64), ExportError)


# -- the manifest --------------------------------------------------------------------------------

def test_manifest_holds_everything_the_runtime_needs(digits_onnx, tmp_path):
    plan = fake_plan(digits_onnx, tmp_path, hardware_compat="ampere+", version_compatible=True)
    m = json.loads(manifest_path(plan).read_text())
    assert m["format"] == "crossvit-engine" and m["precision"] == "fp32"
    assert m["batch"] == {"min": 1, "opt": 8, "max": 64}
    assert m["tensorrt"]["version"] == "10.13.0.35" and m["tensorrt"]["hardware_compatibility"] == "ampere+"
    assert m["tensorrt"]["version_compatible"] is True and m["tensorrt"]["library"] == "tensorrt"
    assert m["tensorrt"]["target_compute_capabilities"] == [[8, 0]]  # ampere+: 8.0 and newer
    assert m["plan_sha256"] == __import__("hashlib").sha256(plan.read_bytes()).hexdigest()
    assert m["device"] == {"name": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0], "cuda_runtime": "12.8",
                           "cuda_driver": "12.8"}
    assert m["source"]["onnx"] == "digits.onnx" and len(m["source"]["sha256"]) == 64
    info = read_artifact(plan)  # the runtime reads it like ONNX metadata
    assert info.kind == "engine" and info.labels == read_artifact(digits_onnx).labels
    assert info.preprocessing == read_artifact(digits_onnx).preprocessing
    assert oct(plan.stat().st_mode & 0o777) == oct(manifest_path(plan).stat().st_mode & 0o777) == "0o644"


def test_plan_without_manifest_or_with_a_broken_one_is_refused(digits_onnx, tmp_path):
    plan = fake_plan(digits_onnx, tmp_path)
    manifest_path(plan).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_artifact(plan)
    manifest_path(plan).unlink()
    with pytest.raises(ArtifactError, match="manifest digits.plan.json is missing"):
        read_artifact(plan)


@pytest.mark.parametrize("built, here, trt_built, trt_here, options, words", [
    (H100, H100, "10.13.0.35", "10.13.0.35", {}, None),
    (H100, H100, "10.13.0.35", "10.14.1.48", {}, "TensorRT version differ"),
    (H100, H100, "10.13.0.35", "10.14.1.48", dict(version_compatible=True), None),
    (H100, H100, "10.14.1.48", "10.13.0.35", dict(version_compatible=True), "TensorRT version differ"),
    # NVIDIA's support matrix: a version-compatible 10.x plan runs on an 11.x runtime (not the reverse,
    # not two majors on)
    (H100, H100, "10.13.0.35", "11.0.0.1", dict(version_compatible=True), None),
    (H100, H100, "11.0.0.1", "10.13.0.35", dict(version_compatible=True), "TensorRT version differ"),
    (H100, H100, "8.6.1.6", "11.0.0.1", dict(version_compatible=True), "TensorRT version differ"),
    (H100, H100, "10.13.0.35", "11.0.0.1", {}, "TensorRT version differ"),
    (H100, A10, "10.13.0.35", "10.13.0.35", {}, "GPU architecture differ"),
    (H100, A10, "10.13.0.35", "10.13.0.35", dict(hardware_compat="same-cc"), "GPU architecture differ"),
    (H100, A10, "10.13.0.35", "10.13.0.35", dict(hardware_compat="ampere+"), None),
    (H100, T4, "10.13.0.35", "10.13.0.35", dict(hardware_compat="ampere+"), "GPU architecture differ"),
    (A10, T4, "10.13.0.35", "11.0.0.1", {}, "TensorRT version and GPU architecture differ"),
])
def test_manifest_mismatch_names_both_sides(digits_onnx, tmp_path, built, here, trt_built, trt_here, options,
                                            words):
    plan = fake_plan(digits_onnx, tmp_path, device=built, trt=trt_built, **options)
    reason = manifest_mismatch(read_artifact(plan).raw, here, TENSORRT, trt_here)
    if words is None:
        assert reason is None
    else:
        assert words in reason and built.name in reason and here.name in reason
        assert trt_built in reason and trt_here in reason and "crossvit build" in reason


def test_ampere_plus_plans_need_a_gpu_that_computes_in_their_precision(digits_onnx, tmp_path):
    """An ampere+ plan loads on any GPU >= 8.0, except where its precision needs more (fp8: 8.9)."""
    plan = fake_plan(digits_onnx, tmp_path, device=H100, hardware_compat="ampere+")
    manifest = read_artifact(plan).raw
    assert manifest_mismatch(manifest, A10, TENSORRT, "10.13.0.35") is None
    manifest["precision"] = "fp8"
    assert "GPU architecture differ" in manifest_mismatch(manifest, A10, TENSORRT, "10.13.0.35")
    assert manifest_mismatch(manifest, L4, TENSORRT, "10.13.0.35") is None


def test_rtx_plans_run_only_on_their_library_and_target_gpus(digits_onnx, tmp_path):
    plan = fake_plan(digits_onnx, tmp_path, device=None, trt="1.7.1.116", library="tensorrt-rtx",
                      targets=[(8, 6), (8, 9)])
    manifest = read_artifact(plan).raw
    assert manifest_mismatch(manifest, A10, TENSORRT_RTX, "1.7.1.116") is None
    assert manifest_mismatch(manifest, L4, TENSORRT_RTX, "1.7.1.116") is None
    wrong_library = manifest_mismatch(manifest, A10, TENSORRT, "10.13.0.35")
    assert "built by TensorRT-RTX 1.7.1.116" in wrong_library and "--library tensorrt" in wrong_library
    hopper = manifest_mismatch(manifest, H100, TENSORRT_RTX, "1.7.1.116")
    assert "GPU architecture differ" in hopper and "need standard TensorRT" in hopper and "8.6, 8.9" in hopper
    rtx_3050 = CudaDevice(0, "NVIDIA GeForce RTX 3050", (8, 6), "13.0", "13.0")
    assert manifest_mismatch(manifest, rtx_3050, TENSORRT_RTX, "1.7.1.116") is None
    ampere_a100 = CudaDevice(0, "NVIDIA A100", (8, 0), "13.0", "13.0")
    not_targeted = manifest_mismatch(manifest, ampere_a100, TENSORRT_RTX, "1.7.1.116")
    assert "--compute-capability 8.0" in not_targeted
    assert "TensorRT version differ" in manifest_mismatch(manifest, A10, TENSORRT_RTX, "1.6.1.120")


# -- backends ------------------------------------------------------------------------------------

def test_backends_run_only_their_kind_of_artifact(digits_onnx, tmp_path):
    from crossvit.runtime.session import open_session

    plan = fake_plan(digits_onnx, tmp_path)
    with pytest.raises(ArtifactError, match="the tensorrt backend runs TensorRT engines"):
        open_session(digits_onnx, backend="tensorrt")
    with pytest.raises(ArtifactError, match="the onnxruntime backend runs .onnx files, not .plan"):
        open_session(plan, backend="onnxruntime")
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        open_session(digits_onnx, backend="trt")
    with open_session(digits_onnx, backend="ort-tensorrt") as s:  # without onnxruntime-gpu: the CPU, said
        assert s.backend == "onnxruntime"


@pytest.mark.no_gpu
def test_a_plan_that_cannot_run_here_falls_back_to_its_onnx_with_the_reason(digits_onnx, tmp_path, caplog):
    import shutil

    from crossvit.runtime.session import open_session

    onnx_copy = tmp_path / "digits.onnx"
    shutil.copy(digits_onnx, onnx_copy)
    plan = fake_plan(onnx_copy, tmp_path)
    with caplog.at_level(logging.WARNING, logger="crossvit.runtime"):
        with open_session(plan) as s:  # no GPU or no TensorRT here
            assert s.backend == "onnxruntime" and s.info.path == onnx_copy
    assert "digits.plan cannot run here" in caplog.text and "digits.onnx" in caplog.text
    with pytest.raises(BackendUnavailable, match="TensorRT needs an NVIDIA GPU") as refused:  # asked for it: no fallback
        open_session(plan, backend="tensorrt")
    assert "digits.onnx" not in str(refused.value)
    onnx_copy.write_bytes(onnx_copy.read_bytes() + b"\0")  # the ONNX changed since the build
    with pytest.raises(BackendUnavailable, match="NVIDIA GPU.*; the ONNX it was built from, digits.onnx, has changed "
                                                 "since the build, so it cannot run instead"):
        open_session(plan)
    onnx_copy.unlink()
    with pytest.raises(BackendUnavailable, match="digits.onnx, is not beside it"):
        open_session(plan)
    import os

    os.mkfifo(onnx_copy)  # a read would hang
    with pytest.raises(BackendUnavailable, match="digits.onnx, is not a regular file"):
        open_session(plan)
    manifest = json.loads(manifest_path(plan).read_text())
    for elsewhere in ("../digits.onnx", str(onnx_copy), "a" * 300 + ".onnx", ".", ".."):
        manifest_path(plan).write_text(json.dumps({**manifest, "source": {**manifest["source"], "onnx": elsewhere}}))
        with pytest.raises(BackendUnavailable, match="its manifest names the ONNX it was built from as .*, not a "
                                                     "file beside it, so it cannot run instead"):
            open_session(plan)  # only a file beside the plan stands in for it, not one a manifest points to
    manifest_path(plan).unlink()
    os.mkfifo(manifest_path(plan))
    with pytest.raises(ArtifactError, match=r"digits.plan.json: is not a regular file"):
        open_session(plan)
    manifest_path(plan).unlink()
    with open(manifest_path(plan), "wb") as f:
        f.truncate(17 << 20)  # sparse: 17 MB, not read whole
    with pytest.raises(ArtifactError, match=r"digits.plan.json: 17 MB is not a manifest of ours"):
        open_session(plan)


@pytest.mark.no_gpu
def test_standard_tensorrt_without_it_or_a_gpu_is_one_line_and_leaves_no_plan(digits_onnx, tmp_path, cli,
                                                                              one_line_error):
    proc = cli("build", digits_onnx, "-o", tmp_path / "d.plan", "--library", "tensorrt")
    line = one_line_error(proc, "TensorRT is not installed", code=3)
    assert pip_install("gpu-cu12") in line, line
    assert list(tmp_path.iterdir()) == []


def test_build_with_a_gpu_but_no_tensorrt_library_names_both_install_routes(digits_onnx, tmp_path, monkeypatch):
    import crossvit.export.engine as engine

    monkeypatch.setattr(engine, "cuda_device", lambda: H100)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    cu12, rtx = re.escape(pip_install("gpu-cu12")), re.escape(pip_install("rtx"))
    with pytest.raises(BackendUnavailable, match=f"no TensorRT library is installed: .*{cu12}.*{rtx}"):
        engine.build_engine(digits_onnx, tmp_path / "d.plan")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.no_gpu
def test_check_on_a_plan_without_gpu_is_not_run_with_the_reason(digits_onnx, tmp_path, cli):
    plan = fake_plan(digits_onnx, tmp_path)
    proc = cli("check", plan, "--batch-sizes", "2")
    assert proc.returncode == 4 and "NOT RUN" in proc.stdout, proc.stdout + proc.stderr


# -- the real bindings: every TensorRT name the project uses exists ------------------------------
# Runtime names (the session): on standard TensorRT 11.4's lean runtime module (a real wheel that
# imports without a GPU) and on tensorrt_rtx. Build names (engine.py and the Polygraphy loaders it
# uses): on tensorrt_rtx's module, and read from standard TensorRT 11.4's own bindings binary
# (tensorrt-cu13-bindings, a real wheel; it cannot be imported without NVIDIA's libraries, which
# PyPI does not carry, so its names are read as the strings pybind11 registers).

RUNTIME_NAMES = {
    "ILogger": ["log"], "ILogger.Severity": ["INTERNAL_ERROR", "ERROR", "WARNING"],
    "Runtime": ["deserialize_cuda_engine", "engine_host_code_allowed"],
    "ICudaEngine": ["num_io_tensors", "get_tensor_name", "get_tensor_mode", "get_tensor_dtype", "get_tensor_shape",
                    "get_tensor_profile_shape", "create_execution_context"],
    "IExecutionContext": ["set_input_shape", "set_tensor_address", "execute_async_v3", "get_tensor_shape"],
    "TensorIOMode": ["INPUT", "OUTPUT"],
    "DataType": ["FLOAT", "HALF", "INT32", "INT8", "BOOL", "BF16", "FP8", "INT64"],
}
RTX_ONLY_NAMES = {
    "Runtime": ["get_engine_validity"], "EngineValidity": ["INVALID"],
    "EngineInvalidityDiagnostics": ["MALFORMED_ENGINE", "UNSUPPORTED_CC", "CUDA_ERROR"],
    "ICudaEngine": ["create_runtime_config"],
    "IRuntimeConfig": ["create_runtime_cache", "set_runtime_cache"], "IRuntimeCache": ["serialize", "deserialize"],
    "IBuilderConfig": ["set_compute_capability", "num_compute_capabilities"], "ComputeCapability": ["SM80", "SM89"],
}
BUILD_NAMES = {  # engine.py's own calls and what the Polygraphy loaders it uses call
    "Builder": ["create_network", "create_builder_config", "create_optimization_profile",
                "build_serialized_network"],
    "NetworkDefinitionCreationFlag": ["STRONGLY_TYPED"], "OnnxParser": ["parse_from_file", "num_errors", "get_error"],
    "INetworkDefinition": ["num_inputs", "num_outputs", "get_input", "get_output"],
    "ITensor": ["name", "dtype", "shape"], "IOptimizationProfile": ["set_shape", "get_shape"],
    "IBuilderConfig": ["add_optimization_profile", "set_memory_pool_limit", "builder_optimization_level",
                       "create_timing_cache", "set_timing_cache", "get_timing_cache", "profiling_verbosity"],
    "MemoryPoolType": ["WORKSPACE"], "ProfilingVerbosity": ["LAYER_NAMES_ONLY"],
}
STANDARD_BUILD_NAMES = {  # standard TensorRT only (refused for TensorRT-RTX)
    "IBuilderConfig": ["hardware_compatibility_level", "set_flag"], "ITimingCache": ["combine", "serialize"],
    "HardwareCompatibilityLevel": ["NONE", "AMPERE_PLUS", "SAME_COMPUTE_CAPABILITY"],
    "BuilderFlag": ["VERSION_COMPATIBLE"],
}

CUDART_NAMES = ["cudaGetDeviceCount", "cudaGetDeviceProperties", "cudaRuntimeGetVersion", "cudaDriverGetVersion",
                "cudaMallocHost", "cudaFreeHost", "cudaMalloc", "cudaFree", "cudaStreamCreate", "cudaStreamDestroy",
                "cudaMemcpyAsync", "cudaStreamSynchronize", "cudaMemcpyKind", "cudaError_t"]


def _missing(trt, names: dict) -> list[str]:
    missing = []
    for owner, attrs in names.items():
        obj = trt
        for part in owner.split("."):
            obj = getattr(obj, part, None)
        missing += [f"{owner}.{n}" for n in attrs if obj is None or not hasattr(obj, n)]
    return missing


def test_tensorrt_runtime_names_exist_in_the_real_lean_bindings():
    """Inspection only: no TensorRT object is created (without a GPU they crash later)."""
    try:
        trt = importlib.import_module("tensorrt_lean")
    except ImportError:
        pytest.fail("the TensorRT 11.4 lean runtime is not installed (make test installs tensorrt-lean-cu12)")
    assert not _missing(trt, RUNTIME_NAMES), f"TensorRT {trt.__version__} lacks {_missing(trt, RUNTIME_NAMES)}"


def test_tensorrt_rtx_has_every_name_the_project_calls():
    trt = _rtx()
    names = {k: RUNTIME_NAMES.get(k, []) + RTX_ONLY_NAMES.get(k, []) + BUILD_NAMES.get(k, [])
             for k in {*RUNTIME_NAMES, *RTX_ONLY_NAMES, *BUILD_NAMES}}
    assert not _missing(trt, names), f"TensorRT-RTX {trt.__version__} lacks {_missing(trt, names)}"


def test_standard_tensorrt_build_names_are_in_its_real_bindings():
    import importlib.metadata

    try:
        files = importlib.metadata.files("tensorrt-cu13-bindings") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("tensorrt-cu13-bindings 11.4 is not installed (make test installs it with --no-deps)")
    so = [f for f in files if f.name.startswith("tensorrt") and f.suffix == ".so"]
    assert so, files
    binary = so[0].locate().read_bytes()
    words = set(re.findall(rb"[A-Za-z_][A-Za-z0-9_]*", binary))
    wanted = {n for group in (BUILD_NAMES, STANDARD_BUILD_NAMES) for owner, attrs in group.items()
              for n in [*owner.split("."), *attrs]}  # the runtime's: on the lean module, imported
    assert sorted(n for n in wanted if n.encode() not in words) == []
    # and what TensorRT 11 removed, or never had, is not there: the check can fail
    assert b"set_compute_capability" not in words and b"get_engine_validity" not in words


def test_cuda_runtime_names_exist():
    from cuda.bindings import runtime as rt  # make test installs cuda-bindings

    assert [n for n in CUDART_NAMES if not hasattr(rt, n)] == []
    assert hasattr(rt.cudaMemcpyKind, "cudaMemcpyHostToDevice") and hasattr(rt.cudaError_t, "cudaSuccess")


@pytest.mark.no_gpu
def test_cuda_device_without_a_gpu_is_one_clear_reason():
    from crossvit.runtime.gpu import cuda_device

    with pytest.raises(BackendUnavailable, match="GPU|CUDA"):
        cuda_device()


@pytest.mark.gpu
def test_cuda_device_describes_the_gpu():
    from crossvit.runtime.gpu import cuda_device

    device = cuda_device()
    assert device.compute_capability >= (3, 0) and device.name


@pytest.mark.gpu
def test_cuda_python_path_of_the_session_round_trips_through_the_gpu():
    """What TensorRTSession does around `execute_async_v3`, on a real GPU without TensorRT:
    cuda_device() agrees with torch, and pinned host -> device -> pinned host copies on our own
    stream return the data (fresh random values, the output buffer poisoned first)."""
    import torch

    from crossvit.runtime.gpu import check, cuda_device, cudart
    from crossvit.runtime.tensorrt import _Pinned

    device = cuda_device()
    assert device.name == torch.cuda.get_device_name(0)
    assert device.compute_capability == torch.cuda.get_device_capability(0)
    rt = cudart()
    shape = (3, 5, 7)
    src, dst = _Pinned(int(np.prod(shape)) * 4), _Pinned(int(np.prod(shape)) * 4)
    stream = check(rt.cudaStreamCreate(), "cudaStreamCreate")
    buf = check(rt.cudaMalloc(src.nbytes), "cudaMalloc")
    try:
        values = np.random.default_rng().standard_normal(src.nbytes // 4).astype(np.float32)
        src.array[:] = values
        dst.array[:] = np.nan
        check(rt.cudaMemcpyAsync(buf, src.ptr, src.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream),
              "cudaMemcpyAsync")
        check(rt.cudaMemcpyAsync(dst.ptr, buf, dst.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream),
              "cudaMemcpyAsync")
        check(rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        assert np.array_equal(dst.array, values)
    finally:
        rt.cudaFree(buf)
        rt.cudaStreamDestroy(stream)
        src.free()
        dst.free()


# -- on a GPU with TensorRT ----------------------------------------------------------------------

def _need_tensorrt():
    from crossvit.runtime.gpu import tensorrt_unavailable

    reason = tensorrt_unavailable()
    if reason:
        pytest.skip(reason)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engines_of_the_embedded_model_pass_the_gate_and_predict(digits_onnx, tmp_path, precision, cli):
    _need_tensorrt()
    from crossvit.assets import heldout_images
    from crossvit.export.engine import build_engine
    from crossvit.export.parity import check_parity
    from crossvit.export.precision import convert_precision
    from crossvit.model import load_model

    import shutil

    fp32 = Path(shutil.copy(digits_onnx, tmp_path / "d.onnx"))  # beside the plan, for the auto fallback below
    src = fp32 if precision == "fp32" else convert_precision(fp32, tmp_path / "d16.onnx", "fp16", None)
    plan = tmp_path / f"d.{precision}.plan"
    build_engine(src, plan, BuildOptions(batch="1:8:32"))
    report = check_parity(plan, load_model(name="crossvit_digits"), batch_sizes=[1, 7, 32])
    assert report.verdict == "pass", report.table()
    assert report.backend.startswith("tensorrt")
    proc = cli("predict", plan, heldout_images(), "--top-k", "1")
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 360, proc.stderr
    m = json.loads(manifest_path(plan).read_text())
    m["device"]["compute_capability"] = [1, 0]  # tampered: built for another GPU
    manifest_path(plan).write_text(json.dumps(m))
    from crossvit.runtime.session import open_session

    with pytest.raises(ArtifactError, match="GPU architecture differ"):
        open_session(plan, backend="tensorrt")
    x = np.zeros((2, 3, 32, 32), np.float32)
    with open_session(plan) as s:  # auto: falls back to the unchanged ONNX beside the plan
        assert s.backend == "onnxruntime" and s.infer(x).shape == (2, 10)


def test_long_builds_report_progress():
    import threading

    from crossvit.export.engine import _heartbeat

    lines, two = [], threading.Event()

    def say(line):
        lines.append(line)
        if len(lines) >= 2:
            two.set()

    threads = threading.active_count()
    with _heartbeat(say, every=0.01):
        assert two.wait(60)  # it keeps saying so while the build runs
        assert threading.active_count() == threads + 1
    assert lines[0].startswith("still building") and lines[1].startswith("still building")
    assert threading.active_count() == threads  # its thread ended with the build: no line after it


# -- real TensorRT-RTX builds, on every machine (its builder needs no GPU) ------------------------

GPU_PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")


def _rtx():
    try:
        return importlib.import_module("tensorrt_rtx")
    except ImportError:
        pytest.fail(f"tensorrt-rtx is not installed: {pip_install('rtx')} (make test does)")


@pytest.fixture(scope="module")
def gpu_variants(digits_onnx):
    """The embedded model's fp32 ONNX and its TensorRT variants, in one folder."""
    import shutil

    from crossvit.export.calibration import calibration_batch
    from crossvit.export.precision import convert_precision

    folder = digits_onnx.parent / "variants"
    folder.mkdir(exist_ok=True)
    fp32 = Path(shutil.copy(digits_onnx, folder / "d.fp32.onnx"))
    calib = calibration_batch(read_artifact(fp32).raw, None)  # the shipped held-out digits
    out = {"fp32": fp32}
    for precision in GPU_PRECISIONS[1:]:
        out[precision] = convert_precision(fp32, folder / f"d.{precision}.onnx", precision, calib)
    return out


def _check_rtx_manifest(manifest: dict, plan: Path, onnx: Path, precision: str, profile=(1, 8, 64)):
    """Everything item 3 asks a CPU-only build to verify, read back from the files."""
    import hashlib

    from crossvit.files import sha256_file

    trt = _rtx()
    assert manifest == json.loads(manifest_path(plan).read_text())
    t = manifest["tensorrt"]
    assert t["library"] == "tensorrt-rtx" and t["version"] == trt.__version__
    assert "hardware_compatibility" not in t and "version_compatible" not in t  # RTX ignores them: never recorded
    need = {"bf16": (8, 0), "fp8": (8, 9)}.get(precision, (8, 0))
    targets = [tuple(c) for c in t["target_compute_capabilities"]]
    assert targets and all(c >= need for c in targets) and (9, 0) not in targets
    assert manifest["device"] is None  # built without a GPU
    assert manifest["source"]["sha256"] == sha256_file(onnx) and manifest["source"]["onnx"] == onnx.name
    assert manifest["plan_sha256"] == hashlib.sha256(plan.read_bytes()).hexdigest()
    assert manifest["precision"] == precision
    assert manifest["batch"] == dict(zip(("min", "opt", "max"), profile))
    io = {x["name"]: x for x in manifest["engine_io"]}
    assert io["input"] == {"name": "input", "mode": "input", "dtype": "float32", "shape": [-1, 3, 32, 32],
                           "profile": [[b, 3, 32, 32] for b in profile]}
    assert io["logits"] == {"name": "logits", "mode": "output", "dtype": "float32", "shape": [-1, 10]}
    info = read_artifact(plan)  # the runtime reads it
    assert info.kind == "engine" and (info.batch_min, info.batch_max) == (profile[0], profile[2])


@pytest.mark.parametrize("precision", GPU_PRECISIONS)
def test_rtx_builds_every_gpu_variant_through_the_python_api(gpu_variants, tmp_path, precision):
    from crossvit.export.engine import build_engine

    lines = []
    plan = tmp_path / f"d.{precision}.plan"
    manifest = build_engine(gpu_variants[precision], plan, BuildOptions(library="tensorrt-rtx"),
                            progress=lines.append)
    _check_rtx_manifest(manifest, plan, gpu_variants[precision], precision)
    assert plan.stat().st_size > 1_000_000
    assert any("not run here" in line for line in lines), lines
    assert sorted(p.name for p in tmp_path.iterdir()) == [plan.name, plan.name + ".json"]  # no temp files left


def test_rtx_builds_through_the_cli_with_auto_library_and_chosen_targets(gpu_variants, tmp_path, cli):
    plan = tmp_path / "d.plan"
    proc = cli("build", gpu_variants["fp16"], "-o", plan, "--batch", "1:4:16", "--compute-capability", "8.6,8.9")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "TensorRT-RTX" in proc.stdout and "compute capability 8.6, 8.9" in proc.stdout, proc.stdout
    assert "through Polygraphy" in proc.stderr and "not run here" in proc.stderr
    manifest = json.loads(manifest_path(plan).read_text())
    _check_rtx_manifest(manifest, plan, gpu_variants["fp16"], "fp16", profile=(1, 4, 16))
    assert manifest["tensorrt"]["target_compute_capabilities"] == [[8, 6], [8, 9]]


def test_two_rtx_builds_of_one_file_describe_the_same_engine(gpu_variants, tmp_path):
    """Two builds of one file: the same manifest but for the plan's hash and build time, and each plan
    the bytes its own manifest names. Not the same bytes: TensorRT-RTX 1.7's Myelin compiler names
    its internal tensors and symbolic shapes differently from build to build (seen on the digits
    model's fp32 file and on an int8 file with Einsums; the same size there, about 1,000 bytes apart), and
    NVIDIA does not promise identical plans."""
    import hashlib

    from crossvit.export.engine import build_engine

    a, b = tmp_path / "a.plan", tmp_path / "b.plan"
    build_engine(gpu_variants["int8"], a, BuildOptions(library="tensorrt-rtx", batch="1:8:32"))
    build_engine(gpu_variants["int8"], b, BuildOptions(library="tensorrt-rtx", batch="1:8:32"))
    ma, mb = (json.loads(manifest_path(p).read_text()) for p in (a, b))
    for m, plan in ((ma, a), (mb, b)):
        assert m["plan_sha256"] == hashlib.sha256(plan.read_bytes()).hexdigest()
        del m["plan_sha256"], m["builder"]["seconds"]
    assert ma == mb and ma["source"]["sha256"] == hashlib.sha256(gpu_variants["int8"].read_bytes()).hexdigest()


@pytest.mark.slow
def test_rtx_builds_crossvit_15_240_fp16(tmp_path):
    """A real ImageNet-size model (27M parameters, 240x240, the bicubic branch as matmuls)."""
    from crossvit.export.engine import build_engine
    from crossvit.export.onnx import BatchRange, export_onnx
    from crossvit.export.precision import convert_precision
    from crossvit.model import load_model

    fp32 = export_onnx(load_model(name="crossvit_15_240"), tmp_path / "m.fp32.onnx", batch=BatchRange(1, 16)).path
    fp16 = convert_precision(fp32, tmp_path / "m.fp16.onnx", "fp16", None)
    plan = tmp_path / "m.fp16.plan"
    manifest = build_engine(fp16, plan, BuildOptions(library="tensorrt-rtx"))
    io = {x["name"]: x for x in manifest["engine_io"]}
    assert io["input"]["shape"] == [-1, 3, 240, 240] and io["logits"]["shape"] == [-1, 1000]
    assert manifest["batch"] == {"min": 1, "opt": 4, "max": 16} and plan.stat().st_size > 20_000_000


@pytest.mark.parametrize("args, words", [
    (["--hardware-compat", "ampere+"], "--hardware-compat is a standard TensorRT option; TensorRT-RTX ignores"),
    (["--version-compatible"], "--version-compatible is a standard TensorRT option; TensorRT-RTX cannot build"),
    (["--timing-cache", "{tmp}/t.cache"], "--timing-cache is a standard TensorRT option; TensorRT-RTX has no timing"),
    (["--compute-capability", "9.0"], "--compute-capability 9.0: TensorRT-RTX builds for"),
    (["--compute-capability", "8"], "a compute capability looks like 8.6"),
])
def test_rtx_refuses_what_it_would_ignore_or_fail_on(gpu_variants, tmp_path, args, words, cli, one_line_error):
    code = 2 if "looks like" in words else 1
    one_line_error(cli("build", gpu_variants["fp16"], "-o", tmp_path / "d.plan", "--library", "tensorrt-rtx",
                       *[a.format(tmp=tmp_path) for a in args]), words, code=code)
    assert list(tmp_path.iterdir()) == []


def test_rtx_refuses_fp8_for_targets_older_than_ada(gpu_variants, tmp_path, cli, one_line_error):
    one_line_error(cli("build", gpu_variants["fp8"], "-o", tmp_path / "d.plan", "--compute-capability", "8.6,8.9"),
                   "fp8 engines need compute capability 8.9 or newer; --compute-capability 8.6 is older")
    assert list(tmp_path.iterdir()) == []


def test_int8_cpu_is_refused_before_tensorrt_is_called(digits_onnx, tmp_path, monkeypatch):
    import crossvit.export.engine as engine
    from crossvit.export.precision import convert_precision

    cpu = convert_precision(digits_onnx, tmp_path / "d.int8-cpu.onnx", "int8-cpu", None)

    def must_not_run(*a, **k):
        raise AssertionError("a TensorRT library was chosen for an int8-cpu graph")

    monkeypatch.setattr(engine, "choose_library", must_not_run)
    with pytest.raises(ExportError, match="int8-cpu, a graph for ONNX Runtime on CPUs"):
        engine.build_engine(cpu, tmp_path / "d.plan")


def test_parser_errors_are_one_line_naming_the_operators(digits_onnx, tmp_path, cli, one_line_error):
    """A graph TensorRT cannot parse (a standard-domain op it has no importer for, so our own
    refusals do not fire first): TensorRT-RTX's parser errors become one line."""
    import onnx
    from onnx import helper

    proto = onnx.load(str(digits_onnx))
    proto.graph.node.append(helper.make_node("DynamicQuantizeLinear", ["input"], ["q", "q_scale", "q_zero"]))
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken))
    line = one_line_error(cli("build", broken, "-o", tmp_path / "d.plan"), "TensorRT-RTX cannot parse broken.onnx")
    assert "DynamicQuantizeLinear" in line and "1 node(s) failed" in line, line
    assert not (tmp_path / "d.plan").exists()


@pytest.mark.no_gpu
def test_a_real_rtx_plan_without_a_gpu_falls_back_to_its_onnx_and_refuses_tampering(gpu_variants, tmp_path,
                                                                                    caplog):
    import shutil

    from crossvit.export.engine import build_engine
    from crossvit.runtime.session import open_session

    onnx = Path(shutil.copy(gpu_variants["fp16"], tmp_path / "d.fp16.onnx"))
    plan = tmp_path / "d.fp16.plan"
    build_engine(onnx, plan, BuildOptions(library="tensorrt-rtx", batch="1:8:32"))
    x = np.random.default_rng().standard_normal((3, 3, 32, 32)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="crossvit.runtime"):
        with open_session(plan) as s:  # no GPU here: its ONNX, with the reason logged
            assert s.backend == "onnxruntime" and s.info.path == onnx and s.infer(x).shape == (3, 10)
    assert "d.fp16.plan cannot run here" in caplog.text
    with pytest.raises(BackendUnavailable, match="NVIDIA GPU"):
        open_session(plan, backend="tensorrt")
    gate = tmp_path / "d.fp16.parity.json"  # a variant whose gate on the CPU did not pass is not run instead
    for said in ("fail", "not run"):
        gate.write_text(json.dumps({"verdict": said, "precision": "fp16", "backend": "onnxruntime (cpu, fp16)"}))
        with pytest.raises(BackendUnavailable, match=f"NVIDIA GPU.*; the ONNX it was built from, d.fp16.onnx, did "
                                                     f"not pass its gate on the CPU \\(its gate said '{said}'\\)"):
            open_session(plan)
    gate.unlink()  # no gate beside it (a file of the user's own): it stands in, as the plan was built from it
    with open_session(plan) as s:
        assert s.info.path == onnx
    onnx.write_bytes(onnx.read_bytes() + b"\0")  # the ONNX changed since the build: no fallback
    with pytest.raises(BackendUnavailable, match="d.fp16.onnx, has changed since the build"):
        open_session(plan)


def test_a_plan_that_differs_from_its_manifest_is_refused(gpu_variants, tmp_path):
    from crossvit.export.engine import build_engine
    from crossvit.runtime.tensorrt import check_plan

    plan = tmp_path / "d.plan"
    build_engine(gpu_variants["fp32"], plan, BuildOptions(library="tensorrt-rtx"))
    info = read_artifact(plan)
    check_plan(info, plan.read_bytes())
    with pytest.raises(ArtifactError, match="differs from the one its manifest describes"):
        check_plan(info, plan.read_bytes()[:-1] + b"\0")


@pytest.mark.no_gpu
def test_rtx_validity_tells_garbage_from_a_plan_without_a_gpu(gpu_variants, tmp_path):
    """get_engine_validity is the one RTX runtime call that answers on a CPU: garbage is malformed."""
    from crossvit.export.engine import build_engine
    from crossvit.runtime.tensorrt import rtx_validity
    from crossvit.runtime.trt_library import trt_logger

    trt = _rtx()
    runtime = trt.Runtime(trt_logger(trt))
    assert "malformed engine" in rtx_validity(trt, runtime, b"not an engine" * 100)
    plan = tmp_path / "d.plan"
    build_engine(gpu_variants["fp32"], plan, BuildOptions(library="tensorrt-rtx"))
    # without a GPU: invalid, for want of one (TensorRT-RTX 1.7 says only that), never malformed
    assert rtx_validity(trt, runtime, plan.read_bytes()) == "invalid"


def test_polygraphy_drives_one_tensorrt_library_per_process():
    from crossvit.runtime.trt_library import use_polygraphy

    use_polygraphy(TENSORRT_RTX)  # this process already built RTX engines above, or does now
    from polygraphy import config

    assert config.USE_TENSORRT_RTX is True
    with pytest.raises(BackendUnavailable, match="one TensorRT library per process"):
        use_polygraphy(TENSORRT)


# -- the rules a build checks before any library is called ---------------------------------------

@pytest.mark.parametrize("library, options, precision, gpu, words", [
    (TENSORRT, dict(compute_capabilities=((8, 6),)), "fp16", H100, "--compute-capability is a TensorRT-RTX option"),
    (TENSORRT, {}, "fp16", None, "standard TensorRT builds on the GPU it targets"),
    (TENSORRT, dict(hardware_compat="ampere+"), "fp16", T4, "--hardware-compat ampere+ needs a build GPU of "
                                                            "compute capability 8.0"),
    (TENSORRT, dict(hardware_compat="same-cc"), "fp16", V100, "--hardware-compat same-cc needs a build GPU of "
                                                              "compute capability 7.5"),
    (TENSORRT, dict(hardware_compat="ampere+"), "fp8", H100, "fp8 needs 8.9: build fp8 without it"),
    (TENSORRT, dict(hardware_compat="ampere+"), "bf16", A10, None),
    (TENSORRT, dict(hardware_compat="same-cc"), "fp16", T4, None),
    (TENSORRT_RTX, dict(compute_capabilities=((8, 0),)), "bf16", None, None),
    (TENSORRT_RTX, dict(compute_capabilities=((7, 5),)), "bf16", None, "bf16 engines need compute capability 8.0"),
])
def test_build_options_are_checked_against_the_library_precision_and_gpu(library, options, precision, gpu, words):
    known = [(7, 5), (8, 0), (8, 6), (8, 9), (12, 0), (12, 1)]
    if words is None:
        check_options(BuildOptions(**options), library, precision, gpu, known)
    else:
        with pytest.raises((ExportError, BackendUnavailable), match=re.escape(words)):
            check_options(BuildOptions(**options), library, precision, gpu, known)


def test_same_cc_on_a_tensorrt_without_it_is_one_line():
    """TensorRT 10.8/10.9 accept `tensorrt>=10.8` but have no SAME_COMPUTE_CAPABILITY: an
    AttributeError there is one line. (No such TensorRT installs here: its enum is stood in for.)"""
    from types import SimpleNamespace

    from crossvit.export.engine import _config_loader

    old_trt = SimpleNamespace(__version__="10.8.0.43", ProfilingVerbosity=SimpleNamespace(LAYER_NAMES_ONLY=0),
                              HardwareCompatibilityLevel=SimpleNamespace(NONE=0, AMPERE_PLUS=1))
    with pytest.raises(ExportError, match=r"--hardware-compat same-cc is not in TensorRT 10.8.0.43"):
        _config_loader(None, TENSORRT, old_trt, None, BuildOptions(hardware_compat="same-cc"), [])


def test_close_waits_for_a_running_inference():
    """close() frees the buffers only when no thread is inside execute_async_v3 (NVIDIA: freeing
    them under a running enqueue is undefined behaviour): it takes the session lock."""
    import threading

    from crossvit.runtime.tensorrt import TensorRTSession

    s = TensorRTSession.__new__(TensorRTSession)  # the state a loaded session has, with no GPU behind it
    s._lock, s._host, s._device, s._stream, s._runtime_cache, s._rt = threading.Lock(), {}, {}, None, None, None
    s._closed = False
    s._lock.acquire()  # an inference in flight
    closer = threading.Thread(target=s.close)
    closer.start()
    closer.join(0.5)  # a bound on a wait that must not end, not a handshake: on a slow machine it can only
    assert closer.is_alive() and not s._closed  # pass for the wrong reason, never fail for it
    s._lock.release()
    closer.join(5)
    assert not closer.is_alive() and s._closed


def test_triton_repo_offers_the_onnx_for_an_rtx_plan(gpu_variants, tmp_path, cli, one_line_error):
    """Triton has no backend for TensorRT-RTX plans: one line, the ONNX offered, nothing written."""
    import shutil

    from crossvit.export.engine import build_engine

    onnx = Path(shutil.copy(gpu_variants["fp16"], tmp_path / "d.fp16.onnx"))
    plan = tmp_path / "d.fp16.plan"
    build_engine(onnx, plan, BuildOptions(library="tensorrt-rtx"))
    line = one_line_error(cli("triton-repo", plan, "-o", tmp_path / "repo"), "Triton has no backend for those")
    assert "give d.fp16.onnx instead" in line and "--library tensorrt" in line
    assert not (tmp_path / "repo").exists()
    assert cli("triton-repo", onnx, "-o", tmp_path / "repo").returncode == 0


@pytest.mark.gpu
def test_rtx_plans_on_this_gpu_run_and_pass_the_gate_or_fall_back_with_one_line(gpu_variants, tmp_path):
    """On an RTX/Ampere+ GPU the plan runs, passes its gate, keeps its runtime cache, and a manifest
    that lies about the classes is refused on load (buffers are sized from the engine). On a GPU that
    is not a target (an H100): a one-line refusal, and auto falls back to the ONNX."""
    import shutil

    from crossvit.export.engine import build_engine
    from crossvit.export.parity import check_parity
    from crossvit.model import load_model
    from crossvit.runtime.gpu import cuda_device
    from crossvit.runtime.session import open_session
    from crossvit.runtime.tensorrt import runtime_cache_path

    gpu = cuda_device()
    onnx = Path(shutil.copy(gpu_variants["fp16"], tmp_path / "d.fp16.onnx"))
    plan = tmp_path / "d.fp16.plan"
    manifest = build_engine(onnx, plan, BuildOptions(library="tensorrt-rtx", batch="1:8:32"))
    targets = [tuple(t) for t in manifest["tensorrt"]["target_compute_capabilities"]]
    if gpu.compute_capability not in targets:
        with pytest.raises(ArtifactError, match="GPU architecture differ") as e:
            open_session(plan, backend="tensorrt")
        assert "\n" not in str(e.value)
        with open_session(plan) as s:
            assert s.backend == "onnxruntime" and s.info.path == onnx
        return
    report = check_parity(plan, load_model(name="crossvit_digits"), batch_sizes=[1, 7, 32])
    assert report.verdict == "pass" and report.backend.startswith("tensorrt-rtx"), report.table()
    assert runtime_cache_path(plan).is_file()  # kept by close(): the next start skips the JIT compile
    m = json.loads(manifest_path(plan).read_text())
    m["model"]["labels"] = m["model"]["labels"] + ["extra"]  # 11 classes claimed, the engine has 10
    manifest_path(plan).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="has shape"):
        open_session(plan, backend="tensorrt")


def test_an_rtx_plan_on_a_hopper_gpu_is_refused_for_the_gpu_even_without_the_library(digits_onnx, tmp_path,
                                                                                    monkeypatch):
    """The reason a user on an H100 gets is the one that matters (no RTX target for this GPU), not
    the install line of a library that could not run the plan anyway."""
    import crossvit.runtime.tensorrt as session_module
    from crossvit.runtime.session import open_session

    plan = fake_plan(digits_onnx, tmp_path, device=None, trt="1.7.1.116", library="tensorrt-rtx",
                      targets=[(8, 0), (8, 6), (8, 9), (12, 0), (12, 1)])
    monkeypatch.setattr(session_module, "cuda_device", lambda: H100)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    with pytest.raises(ArtifactError, match="TensorRT-RTX has no target for this GPU") as e:
        open_session(plan, backend="tensorrt")
    assert "need standard TensorRT" in str(e.value) and "\n" not in str(e.value)
