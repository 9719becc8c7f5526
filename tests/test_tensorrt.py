"""TensorRT engines: everything but the TensorRT and CUDA calls themselves, on the CPU; the rest
on a GPU (`gpu` marker; skipped here with the reason).

The manifests here are written by `engine_manifest`, the same function `crossvit build` uses.
"""

import importlib
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from crossvit.contract import manifest_path
from crossvit.errors import ArtifactError, BackendUnavailable, ExportError
from crossvit.export.engine import (BuildOptions, Profile, check_buildable, check_device, engine_manifest,
                                    verify_io, write_plan)
from crossvit.runtime.artifact import read_artifact
from crossvit.runtime.gpu import CudaDevice
from crossvit.runtime.tensorrt import manifest_mismatch

H100 = CudaDevice(0, "NVIDIA H100 80GB HBM3", (9, 0), "12.8", "12.8")
A10 = CudaDevice(0, "NVIDIA A10", (8, 6), "12.8", "12.8")
T4 = CudaDevice(0, "Tesla T4", (7, 5), "12.8", "12.8")


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory):
    from crossvit.export.onnx import BatchRange, export_onnx
    from crossvit.model import load_model

    path = tmp_path_factory.mktemp("trt") / "digits.onnx"
    return export_onnx(load_model(name="crossvit_digits"), path, batch=BatchRange(1, 64)).path


def _io(info, profile=Profile(1, 8, 64), **change):
    c, h, w = info.input_shape
    io = [{"name": "input", "mode": "input", "dtype": "float32", "shape": [-1, c, h, w],
           "profile": [[profile.min, c, h, w], [profile.opt, c, h, w], [profile.max, c, h, w]]},
          {"name": "logits", "mode": "output", "dtype": "float32", "shape": [-1, info.num_classes]}]
    for key, value in change.items():
        which, field = key.split("__")
        io[0 if which == "in" else 1][field] = value
    return io


def _fake_plan(onnx_path: Path, folder: Path, *, device=H100, trt="10.13.0.35", **options) -> Path:
    """A plan file (not a real engine) with a real manifest, as `crossvit build` writes them."""
    info = read_artifact(onnx_path)
    profile = Profile(1, 8, 64)
    manifest = engine_manifest(info, onnx_sha256=__import__("crossvit.contract").contract.sha256_file(onnx_path),
                               profile=profile, io=_io(info), device=device, tensorrt_version=trt,
                               options=BuildOptions(**options), seconds=1.0)
    plan = folder / "digits.plan"
    write_plan(plan, b"not a real engine", manifest)
    return plan


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
    verify_io(_io(info), info, Profile(1, 8, 64))


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
        verify_io(_io(info, **change), info, Profile(1, 8, 64))


# -- the manifest --------------------------------------------------------------------------------

def test_manifest_holds_everything_the_runtime_needs(digits_onnx, tmp_path):
    plan = _fake_plan(digits_onnx, tmp_path, hardware_compat="ampere+", version_compatible=True)
    m = json.loads(manifest_path(plan).read_text())
    assert m["format"] == "crossvit-engine" and m["precision"] == "fp32"
    assert m["batch"] == {"min": 1, "opt": 8, "max": 64}
    assert m["tensorrt"]["version"] == "10.13.0.35" and m["tensorrt"]["hardware_compatibility"] == "ampere+"
    assert m["tensorrt"]["version_compatible"] is True
    assert m["device"] == {"name": "NVIDIA H100 80GB HBM3", "compute_capability": [9, 0], "cuda_runtime": "12.8",
                           "cuda_driver": "12.8"}
    assert m["source"]["onnx"] == "digits.onnx" and len(m["source"]["sha256"]) == 64
    info = read_artifact(plan)  # the runtime reads it like ONNX metadata
    assert info.kind == "engine" and info.labels == read_artifact(digits_onnx).labels
    assert info.preprocessing == read_artifact(digits_onnx).preprocessing
    assert oct(plan.stat().st_mode & 0o777) == oct(manifest_path(plan).stat().st_mode & 0o777) == "0o644"


def test_plan_without_manifest_or_with_a_broken_one_is_refused(digits_onnx, tmp_path):
    plan = _fake_plan(digits_onnx, tmp_path)
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
    (H100, H100, "10.13.0.35", "11.0.0.1", dict(version_compatible=True), "TensorRT version differ"),
    (H100, A10, "10.13.0.35", "10.13.0.35", {}, "GPU architecture differ"),
    (H100, A10, "10.13.0.35", "10.13.0.35", dict(hardware_compat="same-cc"), "GPU architecture differ"),
    (H100, A10, "10.13.0.35", "10.13.0.35", dict(hardware_compat="ampere+"), None),
    (H100, T4, "10.13.0.35", "10.13.0.35", dict(hardware_compat="ampere+"), "GPU architecture differ"),
    (A10, T4, "10.13.0.35", "11.0.0.1", {}, "TensorRT version and GPU architecture differ"),
])
def test_manifest_mismatch_names_both_sides(digits_onnx, tmp_path, built, here, trt_built, trt_here, options,
                                            words):
    plan = _fake_plan(digits_onnx, tmp_path, device=built, trt=trt_built, **options)
    reason = manifest_mismatch(read_artifact(plan).raw, here, trt_here)
    if words is None:
        assert reason is None
    else:
        assert words in reason and built.name in reason and here.name in reason
        assert trt_built in reason and trt_here in reason and "crossvit build" in reason


# -- backends ------------------------------------------------------------------------------------

def test_backends_run_only_their_kind_of_artifact(digits_onnx, tmp_path):
    from crossvit.runtime.session import open_session

    plan = _fake_plan(digits_onnx, tmp_path)
    with pytest.raises(ArtifactError, match="the tensorrt backend runs TensorRT engines"):
        open_session(digits_onnx, backend="tensorrt")
    with pytest.raises(ArtifactError, match="the onnxruntime backend runs .onnx files, not .plan"):
        open_session(plan, backend="onnxruntime")
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        open_session(digits_onnx, backend="trt")
    with open_session(digits_onnx, backend="ort-tensorrt") as s:  # without onnxruntime-gpu: the CPU, said
        assert s.backend == "onnxruntime"


def test_a_plan_that_cannot_run_here_falls_back_to_its_onnx_with_the_reason(digits_onnx, tmp_path, caplog):
    import shutil

    from crossvit.runtime.session import open_session

    onnx_copy = tmp_path / "digits.onnx"
    shutil.copy(digits_onnx, onnx_copy)
    plan = _fake_plan(onnx_copy, tmp_path)
    with caplog.at_level(logging.WARNING, logger="crossvit.runtime"):
        with open_session(plan) as s:  # no GPU or no TensorRT here
            assert s.backend == "onnxruntime" and s.info.path == onnx_copy
    assert "digits.plan cannot run here" in caplog.text and "digits.onnx" in caplog.text
    with pytest.raises((BackendUnavailable, ArtifactError)):  # asked for TensorRT: no fallback
        open_session(plan, backend="tensorrt")
    onnx_copy.write_bytes(onnx_copy.read_bytes() + b"\0")  # the ONNX changed since the build
    with pytest.raises((BackendUnavailable, ArtifactError)):
        open_session(plan)


def test_build_without_gpu_or_tensorrt_is_one_line_and_leaves_no_plan(digits_onnx, tmp_path, cli, one_line_error):
    proc = cli("build", digits_onnx, "-o", tmp_path / "d.plan")
    line = one_line_error(proc, "", code=3)
    assert any(w in line for w in ("NVIDIA GPU", "cuda-python", "no usable CUDA device", "TensorRT is not installed"))
    assert "crossvit[gpu]" in line or "GPU" in line
    assert list(tmp_path.iterdir()) == []


def test_build_with_a_gpu_but_no_tensorrt_names_the_install_route(digits_onnx, tmp_path, monkeypatch):
    import crossvit.export.engine as engine

    monkeypatch.setattr(engine, "cuda_device", lambda: H100)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(BackendUnavailable, match=r"TensorRT is not installed: .*pip install 'crossvit\[gpu\]'"):
        engine.build_engine(digits_onnx, tmp_path / "d.plan")
    assert list(tmp_path.iterdir()) == []


def test_check_on_a_plan_without_gpu_is_not_run_with_the_reason(digits_onnx, tmp_path, cli):
    plan = _fake_plan(digits_onnx, tmp_path)
    proc = cli("check", plan, "--batch-sizes", "2")
    assert proc.returncode == 4 and "NOT RUN" in proc.stdout, proc.stdout + proc.stderr


# -- the real bindings: every TensorRT runtime name the session uses exists ---------------------

RUNTIME_NAMES = {
    "ILogger": ["log"], "ILogger.Severity": ["INTERNAL_ERROR", "ERROR", "WARNING"],
    "Runtime": ["deserialize_cuda_engine", "engine_host_code_allowed"],
    "ICudaEngine": ["num_io_tensors", "get_tensor_name", "get_tensor_mode", "get_tensor_dtype", "get_tensor_shape",
                    "get_tensor_profile_shape", "create_execution_context"],
    "IExecutionContext": ["set_input_shape", "set_tensor_address", "execute_async_v3"],
    "TensorIOMode": ["INPUT", "OUTPUT"],
    "DataType": ["FLOAT", "HALF", "INT32", "INT8", "BOOL", "BF16", "FP8", "INT64"],
}
CUDART_NAMES = ["cudaGetDeviceCount", "cudaGetDeviceProperties", "cudaRuntimeGetVersion", "cudaDriverGetVersion",
                "cudaMallocHost", "cudaFreeHost", "cudaMalloc", "cudaFree", "cudaStreamCreate", "cudaStreamDestroy",
                "cudaMemcpyAsync", "cudaStreamSynchronize", "cudaMemcpyKind", "cudaError_t"]


def _lean_tensorrt():
    for name in ("tensorrt_lean", "tensorrt"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    pytest.skip("the TensorRT lean runtime wheel is not installed (CI installs tensorrt-lean-cu12)")


def test_tensorrt_runtime_names_exist_in_the_real_bindings():
    """Inspection only: no TensorRT object is created (without a GPU they crash later)."""
    trt = _lean_tensorrt()
    missing = []
    for owner, names in RUNTIME_NAMES.items():
        obj = trt
        for part in owner.split("."):
            obj = getattr(obj, part, None)
        missing += [f"{owner}.{n}" for n in names if obj is None or not hasattr(obj, n)]
    assert not missing, f"TensorRT {trt.__version__} lacks {missing}"


def test_cuda_runtime_names_exist_and_report_no_device_without_crashing():
    try:
        from cuda.bindings import runtime as rt
    except ImportError:
        pytest.skip("cuda-python is not installed (CI installs cuda-bindings)")
    assert [n for n in CUDART_NAMES if not hasattr(rt, n)] == []
    assert hasattr(rt.cudaMemcpyKind, "cudaMemcpyHostToDevice") and hasattr(rt.cudaError_t, "cudaSuccess")
    from crossvit.runtime.gpu import cuda_device

    try:
        device = cuda_device()
    except BackendUnavailable as e:  # the CPU machines: one clear reason
        assert "GPU" in str(e) or "CUDA" in str(e)
    else:
        assert device.compute_capability >= (3, 0)


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
    src, dst = _Pinned(shape), _Pinned(shape)
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
    import time

    from crossvit.export.engine import _heartbeat

    lines = []
    with _heartbeat(lines.append, every=0.05):
        time.sleep(0.3)
    assert lines and lines[0].startswith("still building")
    n = len(lines)
    time.sleep(0.15)
    assert len(lines) == n  # stopped with the build
