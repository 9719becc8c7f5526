"""Precision variants of an fp32 CrossViT ONNX for TensorRT's strongly typed networks.

TensorRT 11 has no precision flags: the ONNX graph decides every tensor's type. NVIDIA
ModelOpt writes those graphs on CPU:

- fp16 / bf16: AutoCast (`modelopt.onnx.autocast.convert_to_mixed_precision`) casts the graph,
  keeping LayerNormalization and Softmax in fp32 (fp16 LayerNorm overflows in transformers)
  and the graph inputs/outputs in fp32, so the runtime feeds the same float32 batch.
- int8 / fp8: post-training quantization (`modelopt.onnx.quantization.quantize`) inserts
  QuantizeLinear/DequantizeLinear pairs, calibrated on a batch of real images, and casts the
  rest to fp16 — again with LayerNormalization and Softmax left in fp32.

And one variant for the CPU, kept apart from those: int8-cpu is ONNX Runtime's own dynamic
quantization (`onnxruntime.quantization.quantize_dynamic`: int8 weights, activations quantized
per call, `MatMulInteger` kernels that use VNNI). It needs no calibration and no ModelOpt, is
fast only in ONNX Runtime on a CPU, and is never meant for TensorRT.

These graphs are meant for TensorRT. ONNX Runtime on CPU runs fp16/int8/fp8 variants (slowly,
through casts and Q/DQ emulation) which is enough to measure their accuracy; it has no CPU
kernel for bf16 MatMul. For fast CPU inference use int8-cpu.

ModelOpt is optional and imported inside the functions that use it. Its `[onnx]` extra pins
onnx, onnxruntime-gpu and cupy; install it without the extra (see MODELOPT_INSTALL).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from crossvit.errors import BackendUnavailable, ExportError

TENSORRT_PRECISIONS = ("fp16", "bf16", "int8", "fp8")
CPU_INT8 = "int8-cpu"
PRECISIONS = ("fp32", *TENSORRT_PRECISIONS, CPU_INT8)
METADATA_KEY = "crossvit"
# Kept in fp32 in every reduced-precision variant: fp16 LayerNorm/Softmax overflow in transformers.
FP32_OP_TYPES = ("LayerNormalization", "Softmax")
# A calibration set smaller than this gives activation ranges that are noise.
MIN_CALIBRATION_IMAGES = 16
# Entropy (KL) clipping suits int8's narrow uniform grid; fp8's exponent covers outliers, so
# the plain absolute maximum is the usual choice there.
CALIBRATION_METHODS = {"int8": "entropy", "fp8": "max"}
MODELOPT_VERSION = "0.47.0"
# Not `nvidia-modelopt[onnx]`: that extra pins onnx~=1.21, onnxruntime-gpu and cupy-cuda12x.
# These four are what `modelopt.onnx.autocast` and `modelopt.onnx.quantization` import.
MODELOPT_INSTALL = ("pip install 'crossvit[quant]' (nvidia-modelopt==0.47.0 onnx-graphsurgeon==0.6.1 "
                    "onnxslim==0.1.98 polygraphy==0.53.6 lief==1.0.0)")
PROTOBUF_LIMIT = 2 * 1024**3

Progress = Callable[[str], None]

_ONNX_DTYPE_NAMES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 9: "bool",
                     10: "float16", 11: "float64", 16: "bfloat16", 17: "float8e4m3fn",
                     18: "float8e4m3fnuz", 19: "float8e5m2", 20: "float8e5m2fnuz", 21: "uint4",
                     22: "int4", 23: "float4e2m1"}


def _dtype_name(elem_type: int) -> str:
    return _ONNX_DTYPE_NAMES.get(elem_type, f"onnx-type-{elem_type}")


def _import_modelopt(precision: str):
    """(modelopt module, convert_to_mixed_precision, quantize), or BackendUnavailable."""
    try:
        import modelopt
        from modelopt.onnx.autocast import convert_to_mixed_precision
        from modelopt.onnx.quantization import quantize
    except ImportError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BackendUnavailable(f"{precision} conversion needs NVIDIA ModelOpt ({reason}); "
                                 f"install it with: {MODELOPT_INSTALL}") from None
    return modelopt, convert_to_mixed_precision, quantize


def _load_source(src: Path):
    import onnx

    if not src.is_file():
        raise ExportError(f"source ONNX {src} does not exist")
    try:
        return onnx.load(str(src))  # external data, if any, is loaded from src's folder
    except Exception as e:
        raise ExportError(f"{src.name}: cannot be read as ONNX ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _input_shape(model, src: Path, input_name: str) -> tuple[int, list[int | str]]:
    """(elem_type, dims) of the graph input `input_name`; symbolic dims as their names."""
    inputs = {i.name: i for i in model.graph.input}
    if input_name not in inputs:
        raise ExportError(f"{src.name}: has no graph input {input_name!r} (inputs: {sorted(inputs)})")
    tensor_type = inputs[input_name].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim]
    return tensor_type.elem_type, dims


def _check_calibration(calibration, dims: list, precision: str, src: Path) -> np.ndarray | None:
    """The calibration batch, validated against the model input; None is allowed for fp16/bf16."""
    quantized = precision in CALIBRATION_METHODS
    if calibration is None:
        if quantized:
            raise ExportError(f"{precision} needs a calibration batch of at least {MIN_CALIBRATION_IMAGES} "
                              f"real images (N x {' x '.join(map(str, dims[1:]))} float32); got none")
        return None
    if not isinstance(calibration, np.ndarray):
        raise ExportError(f"calibration must be a numpy array, got {type(calibration).__name__}")
    if calibration.dtype != np.float32:
        raise ExportError(f"calibration must be float32 (the model input's dtype), got {calibration.dtype}")
    expected = "N x " + " x ".join(map(str, dims[1:]))
    if calibration.ndim != len(dims):
        raise ExportError(f"calibration shape {tuple(calibration.shape)} does not fit the model input "
                          f"{src.name}:{dims}: expected {expected}")
    for axis, (want, got) in enumerate(zip(dims, calibration.shape)):
        if axis > 0 and isinstance(want, int) and want > 0 and want != got:
            raise ExportError(f"calibration shape {tuple(calibration.shape)} does not fit the model input "
                              f"{dims}: expected {expected}")
    n = calibration.shape[0]
    if n == 0:
        raise ExportError(f"calibration batch is empty; {precision} needs at least {MIN_CALIBRATION_IMAGES} images")
    if quantized and n < MIN_CALIBRATION_IMAGES:
        raise ExportError(f"calibration batch of {n} images is too small to be meaningful for {precision}: "
                          f"need at least {MIN_CALIBRATION_IMAGES}")
    if isinstance(dims[0], int) and dims[0] > 0 and n % dims[0]:
        raise ExportError(f"calibration batch of {n} images cannot be split into the model's static "
                          f"batch of {dims[0]}")
    if not np.isfinite(calibration).all():
        raise ExportError("calibration batch contains NaN or infinite values")
    return np.ascontiguousarray(calibration)


def _updated_metadata(props, precision: str, tool: dict) -> list[tuple[str, str]]:
    """Source metadata_props with the crossvit entry's precision (and tool) replaced."""
    out, found = [], False
    for key, value in props:
        if key == METADATA_KEY:
            try:
                meta = json.loads(value)
            except json.JSONDecodeError:
                meta = None
            if isinstance(meta, dict):
                meta["precision"] = precision
                meta["precision_tool"] = tool
                value, found = json.dumps(meta), True
        out.append((key, value))
    if not found:
        out = [(k, v) for k, v in out if k != f"{METADATA_KEY}.precision"]
        out.append((f"{METADATA_KEY}.precision", precision))
    return out


@contextlib.contextmanager
def _quiet_modelopt():
    """Send ModelOpt's logging and ORT's calibration prints into a buffer; restore everything.

    ModelOpt logs to a stdout handler it installs itself (and `quantize` re-installs it bound to
    the current sys.stdout), and ORT's calibrator prints progress bars: both would drown our
    own progress lines. The buffer is kept to explain a failure.
    """
    buf = io.StringIO()
    root = logging.getLogger("modelopt.onnx")
    saved = (root.level, list(root.handlers), root.propagate)
    children = {name: logging.getLogger(name).level for name in list(logging.root.manager.loggerDict)
                if name.startswith("modelopt.onnx.")}
    handler = logging.StreamHandler(buf)
    root.handlers = [handler]
    root.propagate = False
    for name in children:
        logging.getLogger(name).setLevel(logging.WARNING)
    root.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            yield buf
    finally:
        root.setLevel(saved[0])
        root.handlers, root.propagate = saved[1], saved[2]
        for name, level in children.items():
            logging.getLogger(name).setLevel(level)


def _failure(precision: str, src: Path, e: BaseException, log: io.StringIO) -> ExportError:
    text = str(e).strip().splitlines()
    msg = f"{precision} conversion of {src.name} failed in ModelOpt: {type(e).__name__}"
    if text:
        msg += f": {text[0]}"
    elif log.getvalue().strip():
        msg += f" (last log line: {log.getvalue().strip().splitlines()[-1]})"
    return ExportError(msg)


# AutoCast runs its reference graph once per image to find values that overflow in the low
# precision; a few dozen real images find them, hundreds only cost time (16 s for 360 here).
AUTOCAST_IMAGES = 32


def _run_autocast(convert, work_src: Path, workdir: Path, precision: str, calibration, input_name: str):
    calib_path = None
    if calibration is not None:  # AutoCast reads its reference inputs from an .npz file
        calib_path = workdir / "calibration.npz"
        np.savez(calib_path, **{input_name: calibration[:AUTOCAST_IMAGES]})
    return convert(str(work_src), low_precision_type=precision, op_types_to_exclude=list(FP32_OP_TYPES),
                   keep_io_types=True, calibration_data=str(calib_path) if calib_path else None,
                   providers=["cpu"])


def _run_quantize(quantize, work_src: Path, workdir: Path, precision: str, calibration: np.ndarray):
    import onnx

    out = workdir / f"model.{precision}.onnx"
    quantize(str(work_src), quantize_mode=precision, calibration_data=calibration,
             calibration_method=CALIBRATION_METHODS[precision], calibration_eps=["cpu"],
             op_types_to_exclude_fp16=list(FP32_OP_TYPES), high_precision_dtype="fp16",
             output_path=str(out), log_level="WARNING", use_external_data_format=False)
    if not out.is_file():
        raise ExportError(f"{precision}: ModelOpt reported success but wrote no {out.name}")
    return onnx.load(str(out))


def _fresh_value_info(model):
    """The model with its intermediate shape annotations inferred anew.

    AutoCast marks every shape it clears with the one placeholder dim "unk" and relies on shape
    inference to overwrite it; where inference cannot (an Expand whose target shape is computed),
    tensors of different sizes are left sharing "unk", and ONNX Runtime then reuses a buffer of
    the wrong size ("Shape mismatch attempting to re-use buffer", seen with ModelOpt 0.47).
    value_info is only a hint for runtimes, so drop it and let ONNX infer consistent names.
    """
    import onnx

    del model.graph.value_info[:]
    for out in model.graph.output:  # keep the graph outputs' declared dims unless they are "unk"
        for dim in out.type.tensor_type.shape.dim:
            if dim.dim_param == "unk":
                dim.Clear()
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:  # annotations are optional: a graph without them is still valid
        return model


def _run_ort_dynamic(model, say: Progress):
    """int8-cpu: weights int8 per tensor (measured faster than per channel, as accurate on the
    embedded model), activations quantized at run time; only MatMul/Gemm are quantized."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    say("int8-cpu: ONNX Runtime dynamic quantization (int8 MatMul weights, no calibration)")
    with tempfile.TemporaryDirectory(prefix="crossvit-precision-") as tmp:
        work_src, out = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
        onnx.save(model, str(work_src))
        quiet = logging.getLogger()
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # "Please consider to run pre-processing before quantization"
        try:
            quantize_dynamic(str(work_src), str(out), weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul", "Gemm"], per_channel=False)
        except Exception as e:
            raise ExportError(f"int8-cpu quantization failed: {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
        finally:
            quiet.setLevel(level)
        converted = onnx.load(str(out))
    tool = {"name": "onnxruntime.quantization.quantize_dynamic", "onnxruntime_version": onnxruntime.__version__,
            "target": "onnxruntime-cpu", "weight_type": "int8", "per_channel": False}
    return converted, tool


def convert_precision(src: Path, dst: Path, precision: str, calibration: np.ndarray | None, *,
                      input_name: str = "input", progress: Progress | None = None) -> Path:
    """Write the `precision` variant of the fp32 ONNX `src` to `dst` (one self-contained, checked file).

    Args:
        calibration: float32 images shaped like the model input (N x C x H x W), already
            preprocessed. Required for int8/fp8 (at least MIN_CALIBRATION_IMAGES); used for
            AutoCast's range analysis for fp16/bf16 when given (random data otherwise).
        progress: called with one line per stage.
    """
    import onnx

    say = progress or (lambda msg: None)
    src, dst = Path(src), Path(dst)
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if dst.suffix != ".onnx":
        raise ExportError(f"output file must end in .onnx, got {dst.name}")
    if not dst.parent.is_dir():
        raise ExportError(f"output folder {dst.parent} does not exist")
    if src.resolve() == dst.resolve():
        raise ExportError(f"output {dst} would overwrite the source ONNX")
    model = _load_source(src)
    props = [(p.key, p.value) for p in model.metadata_props]
    source_meta = dict(props).get(METADATA_KEY)
    if source_meta:
        with contextlib.suppress(json.JSONDecodeError, AttributeError):
            source_precision = json.loads(source_meta).get("precision", "fp32")
            if source_precision != "fp32":
                raise ExportError(f"{src.name} is already {source_precision}; convert from the fp32 ONNX")
    if model.ByteSize() >= PROTOBUF_LIMIT:
        raise ExportError(f"{src.name}: models over 2 GB are not supported (ModelOpt needs one .onnx file)")
    elem_type, dims = _input_shape(model, src, input_name)
    if elem_type != onnx.TensorProto.FLOAT:
        raise ExportError(f"{src.name}: input {input_name!r} is {_dtype_name(elem_type)}, expected float32")
    calibration = _check_calibration(calibration, dims, precision, src)

    start = time.perf_counter()
    if precision == "fp32":
        tool = {"name": "none"}
        converted = model
    elif precision == CPU_INT8:
        converted, tool = _run_ort_dynamic(model, say)
    else:
        modelopt, convert, quantize = _import_modelopt(precision)
        tool = {"name": "nvidia-modelopt", "modelopt_version": modelopt.__version__}
        if precision in CALIBRATION_METHODS:
            tool["calibration"] = {"method": CALIBRATION_METHODS[precision], "images": int(calibration.shape[0])}
            say(f"{precision}: ModelOpt PTQ (Q/DQ, {CALIBRATION_METHODS[precision]} calibration on "
                f"{calibration.shape[0]} images, {'/'.join(FP32_OP_TYPES)} kept fp32)")
        else:
            tool["calibration"] = {"images": int(min(calibration.shape[0], AUTOCAST_IMAGES)) if calibration is not None else 0}
            say(f"{precision}: ModelOpt AutoCast ({'/'.join(FP32_OP_TYPES)} and I/O kept fp32, "
                f"{'random' if calibration is None else min(calibration.shape[0], AUTOCAST_IMAGES)} calibration inputs)")
        tool["fp32_op_types"] = list(FP32_OP_TYPES)
        # ModelOpt writes side files (shape-inferred copies, *.quant.onnx) next to its input:
        # give it a private copy of the model in a folder we delete afterwards.
        with tempfile.TemporaryDirectory(prefix="crossvit-precision-") as tmp:
            workdir = Path(tmp)
            work_src = workdir / "model.onnx"
            onnx.save(model, str(work_src))
            with _quiet_modelopt() as log:
                try:
                    if precision in CALIBRATION_METHODS:
                        converted = _run_quantize(quantize, work_src, workdir, precision, calibration)
                    else:
                        converted = _run_autocast(convert, work_src, workdir, precision, calibration,
                                                  input_name)
                except ExportError:
                    raise
                except Exception as e:  # ModelOpt raises AssertionError, ValueError, ORT errors...
                    raise _failure(precision, src, e, log) from None
            converted = _fresh_value_info(converted)

    del converted.metadata_props[:]
    for key, value in _updated_metadata(props, precision, tool):
        converted.metadata_props.add(key=key, value=value)
    if converted.ByteSize() >= PROTOBUF_LIMIT:
        raise ExportError(f"{precision} variant of {src.name} is over 2 GB and cannot be one .onnx file")

    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    tmp_path = Path(tmp_name)
    try:
        onnx.save(converted, str(tmp_path))
        try:
            onnx.checker.check_model(str(tmp_path), full_check=True)
        except Exception as e:
            raise ExportError(f"{precision} variant of {src.name} fails the ONNX checker: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
        os.replace(tmp_path, dst)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    say(f"{precision}: wrote {dst.name} ({dst.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s")
    return dst


def graph_precision_summary(path: str | Path) -> dict:
    """What precision the graph really computes in: op output dtypes, fp32 islands, Q/DQ, I/O types."""
    import onnx

    model = onnx.load(str(path))
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    for node in g.node:  # Constant nodes are not always in value_info
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            types.setdefault(node.output[0], node.attribute[0].t.data_type)

    def dtype(name: str) -> str:
        return _dtype_name(types[name]) if name in types else "unknown"

    ops_by_dtype: Counter = Counter()
    fp32_ops: dict[str, dict] = {}
    qdq_types: Counter = Counter()
    for node in g.node:
        out_dtype = dtype(node.output[0]) if node.output else "none"
        ops_by_dtype[f"{node.op_type}:{out_dtype}"] += 1
        if node.op_type in FP32_OP_TYPES:
            entry = fp32_ops.setdefault(node.op_type, {"count": 0, "input_dtypes": Counter(),
                                                       "output_dtypes": Counter()})
            entry["count"] += 1
            entry["input_dtypes"][dtype(node.input[0])] += 1
            entry["output_dtypes"][out_dtype] += 1
        if node.op_type == "QuantizeLinear":
            qdq_types[dtype(node.output[0])] += 1
    for entry in fp32_ops.values():
        entry["input_dtypes"] = dict(entry["input_dtypes"])
        entry["output_dtypes"] = dict(entry["output_dtypes"])
        entry["all_fp32"] = set(entry["input_dtypes"]) == {"float32"} == set(entry["output_dtypes"])
    out_dtypes = Counter()
    for key, n in ops_by_dtype.items():
        out_dtypes[key.rsplit(":", 1)[1]] += n
    return {
        "nodes": len(g.node),
        "ops_by_output_dtype": dict(sorted(ops_by_dtype.items())),
        "output_dtype_counts": dict(out_dtypes),
        "initializer_dtypes": dict(Counter(_dtype_name(t.data_type) for t in g.initializer)),
        "fp32_op_types": fp32_ops,
        "quantize_linear": sum(1 for n in g.node if n.op_type == "QuantizeLinear"),
        "dequantize_linear": sum(1 for n in g.node if n.op_type == "DequantizeLinear"),
        "quantized_dtypes": dict(qdq_types),
        "inputs": {i.name: _dtype_name(i.type.tensor_type.elem_type) for i in g.input},
        "outputs": {o.name: _dtype_name(o.type.tensor_type.elem_type) for o in g.output},
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
    }
