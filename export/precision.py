"""Precision variants of an fp32 CrossViT ONNX for TensorRT's strongly typed networks.

TensorRT 11 has no precision flags: the ONNX graph decides every tensor's type. NVIDIA
ModelOpt writes those graphs on CPU:

- fp16 / bf16: AutoCast (`modelopt.onnx.autocast.convert_to_mixed_precision`) casts the graph,
  keeping LayerNormalization and Softmax in fp32 (fp16 LayerNorm overflows in transformers)
  and the graph inputs/outputs in fp32, so the runtime feeds the same float32 batch.
- int8 / fp8: post-training quantization (`modelopt.onnx.quantization.quantize`) inserts
  QuantizeLinear/DequantizeLinear pairs, calibrated on a batch of real images, and casts the
  rest to fp16 — again with LayerNormalization and Softmax left in fp32.

And one variant for the CPU, kept apart from those: int8-cpu is each attention fused into ONNX
Runtime's `com.microsoft.MultiHeadAttention` (onnxscript's ORT fusions), then ONNX Runtime's own
dynamic quantization (`onnxruntime.quantization.quantize_dynamic`: int8 weights with 7-bit range
and one scale per output channel, activations quantized per call, `MatMulInteger` kernels that
use VNNI's u8 x s8 product; the 7-bit range keeps CPUs without VNNI from saturating). It needs no
calibration and no ModelOpt, runs only in ONNX Runtime (a contrib op), and is never meant for
TensorRT (`crossvit build` refuses it).

These graphs are meant for TensorRT. ONNX Runtime on CPU runs fp16/int8/fp8 variants (slowly,
through casts and Q/DQ emulation) which is enough to measure their accuracy; it has no CPU
kernel for bf16 MatMul. For fast CPU inference use int8-cpu.

And int8-ov, for OpenVINO on the CPU: NNCF post-training quantization (static scales,
calibrated on real images) as standard Q/DQ ONNX (`_nncf_ptq`).

ModelOpt is optional and imported inside the functions that use it. Its `[onnx]` extra pins
onnx, onnxruntime-gpu and cupy; the `quant` extra installs the parts of it that are used.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from crossvit.contract import (INPUT_NAME, MAX_CALIBRATION_IMAGES, METADATA_KEY, MIN_CALIBRATION_IMAGES, ONNX_FORMAT,
                               PRECISION_TABLE, PROTOBUF_LIMIT, Precision, decode_metadata, derived_source,
                               write_onnx_metadata)
from crossvit.errors import BackendUnavailable, ExportError
from crossvit.files import atomic_write, check_output_path, first_line, sha256_file, temporary_folder
from crossvit.install import pip_install

# Kept in fp32 in every reduced-precision variant: fp16 LayerNorm/Softmax overflow in transformers.
FP32_OP_TYPES = ("LayerNormalization", "Softmax")
# Entropy (KL) clipping suits int8's narrow uniform grid; fp8's exponent covers outliers, so
# the plain absolute maximum is the usual choice there.
CALIBRATION_METHODS = {"int8": "entropy", "fp8": "max"}
# AutoCast runs its reference graph once per image to find values that overflow in the low
# precision; a few dozen real images find them, hundreds only cost time (16 s for 360 here).
AUTOCAST_IMAGES = 32
MODELOPT_VERSION = "0.47.0"
# The variants ModelOpt writes; a missing ModelOpt is one reason for all of them (deploy says it once).
MODELOPT_VARIANTS = tuple(name for name, p in PRECISION_TABLE.items() if p.toolchain.startswith("modelopt"))

Progress = Callable[[str], None]

_ONNX_DTYPE_NAMES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 9: "bool",
                     10: "float16", 11: "float64", 16: "bfloat16", 17: "float8e4m3fn",
                     18: "float8e4m3fnuz", 19: "float8e5m2", 20: "float8e5m2fnuz", 21: "uint4",
                     22: "int4", 23: "float4e2m1"}


def _dtype_name(elem_type: int) -> str:
    return _ONNX_DTYPE_NAMES.get(elem_type, f"onnx-type-{elem_type}")


# -- validation --------------------------------------------------------------------------

def _load_source(src: Path):
    """The fp32 crossvit ONNX to convert, and its metadata."""
    import onnx

    if not src.is_file():
        raise ExportError(f"source ONNX {src} does not exist")
    try:
        model = onnx.load(str(src))  # external data, if any, is loaded from src's folder
    except Exception as e:
        raise ExportError(f"{src.name}: cannot be read as ONNX ({type(e).__name__}: {first_line(e)})") from None
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise ExportError(f"{src.name}: has no crossvit metadata; convert an ONNX written by `crossvit export`")
    meta = decode_metadata(props[METADATA_KEY], ONNX_FORMAT, src.name, ExportError)
    if meta.get("precision", "fp32") != "fp32":
        raise ExportError(f"{src.name} is already {meta['precision']}; convert from the fp32 ONNX")
    if model.ByteSize() >= PROTOBUF_LIMIT:
        raise ExportError(f"{src.name}: models over 2 GB are not supported (ModelOpt needs one .onnx file)")
    return model, meta


def _random_weights(meta: dict) -> bool:
    """Whether the source's metadata says its weights are a random initialization."""
    return bool(((meta.get("model") or {}).get("provenance") or {}).get("random_weights"))


def _input_dims(model, src: Path, input_name: str) -> list[int | str]:
    """Dims of the float32 graph input `input_name`; symbolic dims as their names."""
    import onnx

    inputs = {i.name: i for i in model.graph.input}
    if input_name not in inputs:
        raise ExportError(f"{src.name}: has no graph input {input_name!r} (inputs: {sorted(inputs)})")
    tensor_type = inputs[input_name].type.tensor_type
    if tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise ExportError(f"{src.name}: input {input_name!r} is {_dtype_name(tensor_type.elem_type)}, "
                          "expected float32")
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim]


def _check_calibration(calibration, dims: list, spec: Precision) -> np.ndarray | None:
    """The calibration batch, validated against the model input; None where it is optional."""
    name = spec.name
    if calibration is None:
        if spec.calibration == "required":
            raise ExportError(f"{name} needs a calibration batch of at least {MIN_CALIBRATION_IMAGES} "
                              f"real images (N x {' x '.join(map(str, dims[1:]))} float32); got none")
        return None
    if spec.calibration == "none":
        return None
    if not isinstance(calibration, np.ndarray):
        raise ExportError(f"calibration must be a numpy array, got {type(calibration).__name__}")
    if calibration.dtype != np.float32:
        raise ExportError(f"calibration must be float32 (the model input's dtype), got {calibration.dtype}")
    expected = "N x " + " x ".join(map(str, dims[1:]))
    fits = calibration.ndim == len(dims) and all(
        axis == 0 or not isinstance(want, int) or want <= 0 or want == got
        for axis, (want, got) in enumerate(zip(dims, calibration.shape)))
    if not fits:
        raise ExportError(f"calibration shape {tuple(calibration.shape)} does not fit the model input "
                          f"{dims}: expected {expected}")
    n = calibration.shape[0]
    if n == 0:
        raise ExportError(f"calibration batch is empty; {name} needs at least {MIN_CALIBRATION_IMAGES} images")
    if spec.calibration == "required" and n < MIN_CALIBRATION_IMAGES:
        raise ExportError(f"calibration batch of {n} images is too small to be meaningful for {name}: "
                          f"need at least {MIN_CALIBRATION_IMAGES}")
    if isinstance(dims[0], int) and dims[0] > 0 and n % dims[0]:
        raise ExportError(f"calibration batch of {n} images cannot be split into the model's static "
                          f"batch of {dims[0]}")
    if not np.isfinite(calibration).all():
        raise ExportError("calibration batch contains NaN or infinite values")
    return np.ascontiguousarray(calibration)


# -- one function per toolchain: (fp32 model, spec, calibration, input name, say) -> (model, tool) --

def _keep_fp32(model, spec, calibration, input_name, source, say):
    return model, {"name": "none"}


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


def _import_modelopt():
    """(modelopt module, convert_to_mixed_precision, quantize), or BackendUnavailable: one reason,
    the same whichever variant asked, so that deploy says it once for all of them."""
    try:
        import modelopt
        from modelopt.onnx.autocast import convert_to_mixed_precision
        from modelopt.onnx.quantization import quantize
    except ImportError as e:
        raise BackendUnavailable(f"the {'/'.join(MODELOPT_VARIANTS)} variants need NVIDIA ModelOpt "
                                 f"({first_line(e)}); install it with: {pip_install('quant')}") from None
    return modelopt, convert_to_mixed_precision, quantize


@contextlib.contextmanager
def _modelopt_run(model, precision: str, src_name: str):
    """A private folder holding a copy of the model (ModelOpt writes side files next to its
    input), with ModelOpt's output captured; its failures become one ExportError line."""
    import onnx

    with temporary_folder() as workdir, _quiet_modelopt() as log:
        work_src = workdir / "model.onnx"
        onnx.save(model, str(work_src))
        try:
            yield workdir, work_src
        except ExportError:
            raise
        except Exception as e:  # ModelOpt raises AssertionError, ValueError, ORT errors...
            msg = f"{precision} conversion of {src_name} failed in ModelOpt: {type(e).__name__}"
            if str(e).strip():
                msg += f": {first_line(e)}"
            elif log.getvalue().strip():
                msg += f" (last log line: {log.getvalue().strip().splitlines()[-1]})"
            raise ExportError(msg) from None


def _autocast(model, spec: Precision, calibration, input_name: str, source: str, say: Progress):
    """fp16/bf16 with ModelOpt AutoCast: LayerNorm, Softmax and the graph I/O stay fp32."""
    modelopt, convert, _ = _import_modelopt()
    n = 0 if calibration is None else int(min(calibration.shape[0], AUTOCAST_IMAGES))
    say(f"{spec.name}: ModelOpt AutoCast ({'/'.join(FP32_OP_TYPES)} and I/O kept fp32, "
        f"{n or 'random'} calibration inputs)")
    with _modelopt_run(model, spec.name, source) as (workdir, work_src):
        calib_path = None
        if calibration is not None:  # AutoCast reads its reference inputs from an .npz file
            calib_path = workdir / "calibration.npz"
            np.savez(calib_path, **{input_name: calibration[:AUTOCAST_IMAGES]})
        converted = convert(str(work_src), low_precision_type=spec.name, op_types_to_exclude=list(FP32_OP_TYPES),
                            keep_io_types=True, calibration_data=str(calib_path) if calib_path else None,
                            providers=["cpu"])
    tool = {"name": "nvidia-modelopt", "modelopt_version": modelopt.__version__,
            "calibration": {"images": n}, "fp32_op_types": list(FP32_OP_TYPES)}
    return _fresh_value_info(converted), tool


def _ptq(model, spec: Precision, calibration: np.ndarray, input_name: str, source: str, say: Progress):
    """int8/fp8 with ModelOpt PTQ: Q/DQ pairs calibrated on real images, the rest fp16."""
    import onnx

    modelopt, _, quantize = _import_modelopt()
    method = CALIBRATION_METHODS[spec.name]
    say(f"{spec.name}: ModelOpt PTQ (Q/DQ, {method} calibration on {calibration.shape[0]} images, "
        f"{'/'.join(FP32_OP_TYPES)} kept fp32)")
    with _modelopt_run(model, spec.name, source) as (workdir, work_src):
        out = workdir / f"model.{spec.name}.onnx"
        quantize(str(work_src), quantize_mode=spec.name, calibration_data=calibration,
                 calibration_method=method, calibration_eps=["cpu"],
                 op_types_to_exclude_fp16=list(FP32_OP_TYPES), high_precision_dtype="fp16",
                 output_path=str(out), log_level="WARNING", use_external_data_format=False)
        if not out.is_file():
            raise ExportError(f"{spec.name}: ModelOpt reported success but wrote no {out.name}")
        converted = onnx.load(str(out))
    tool = {"name": "nvidia-modelopt", "modelopt_version": modelopt.__version__,
            "calibration": {"method": method, "images": int(calibration.shape[0])},
            "fp32_op_types": list(FP32_OP_TYPES)}
    return _fresh_value_info(converted), tool


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


def fuse_attention_for_ort(model, say: Progress):
    """Each attention of the export (the exporter's decomposed scaled-dot-product attention:
    reshapes, transposes, two MatMuls and a Softmax per head group) as one ONNX Runtime
    `com.microsoft.MultiHeadAttention` node, through onnxscript's ORT fusions. Returns (model,
    number of attentions fused); the model unchanged, with 0, where the rewriter is missing or no
    pattern matched. A CPU-only graph: TensorRT never sees it (the variant's target is "cpu")."""
    try:
        import onnx_ir as ir
        import onnx_ir.passes.common as common_passes
        from onnxscript.optimizer import optimize
        from onnxscript.rewriter.ort_fusions import shape_optimization
        from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa
        from onnxscript.rewriter.ort_fusions.sdpa_via_mha import replace_sdpa_by_mha
    except ImportError as e:
        say(f"int8-cpu: attention left unfused (this onnxscript has no ORT fusions: {first_line(e)})")
        return model, 0
    graph = ir.from_proto(model)
    common_passes.ShapeInferencePass()(graph)
    optimize(graph)
    shape_optimization.rules.apply_to_model(graph)
    optimize(graph)
    found = fuse_sdpa(graph, apply_shape_inference=True)
    fused = replace_sdpa_by_mha(graph) if found else 0
    if not fused:
        say("int8-cpu: no attention pattern matched; attention stays decomposed")
        return model, 0
    optimize(graph)
    common_passes.ShapeInferencePass()(graph)
    return ir.to_proto(graph), fused


def _perm(node) -> list[int] | None:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


def fold_key_transposes(model):
    """Each attention's transposed key as one 4-D Transpose. Returns (model, number folded).

    The exporter writes q @ k^T of scaled-dot-product attention as Mul(q, c) @ Mul(K, c), with
    K = Reshape(Transpose(Reshape(k, [-1, N, D]), [0, 2, 1]), [B, H, D, N]) and c a one-element
    scale; here K becomes Transpose(Mul(k, c), [0, 1, 3, 2]), or, where k is itself
    Transpose(x, [0, 2, 1, 3]) (the cross-attention's heads), Transpose(Mul(x, c), [0, 2, 3, 1]):
    the same numbers (the scale is one number, so it commutes), two or three fewer layout copies
    per attention. Nodes left without a consumer are dropped (onnx_ir's RemoveUnusedNodesPass).

    For OpenVINO (int8-ov): on crossvit_15_240 at batch 1 (2-core AMD EPYC, AVX-512 VNNI/BF16)
    OpenVINO ran 50 Transposes for 1.99 ms a call, 26 for 0.83 ms after this, and the int8-ov file
    was 3 % faster (median of 12 interleaved turns' ratios, 0.96-1.16). Rewriting the self-attention's
    5-D head split into a Split and per-head transposes as well removed no further transpose."""
    import onnx
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, int] = Counter(name for node in graph.node for name in node.input)
    consumers.update(out.name for out in graph.output)
    one_number = {i.name for i in graph.initializer if np.prod(i.dims, dtype=np.int64) == 1}
    one_number |= {n.output[0] for n in graph.node if n.op_type == "Constant" and n.attribute
                   and n.attribute[0].HasField("t") and np.prod(n.attribute[0].t.dims) == 1}
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # without ranks nothing can be proven 4-D: leave the graph as it is
        return model, 0
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*inferred.value_info, *inferred.input]
             if v.type.tensor_type.HasField("shape")}

    def made_by(name: str, op_type: str):
        node = producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    replaced = {}
    for softmax in (n for n in graph.node if n.op_type == "Softmax"):
        scores = made_by(softmax.input[0], "MatMul")
        scaled = scores and made_by(scores.input[1], "Mul")
        if not scaled or consumers[scaled.output[0]] != 1 or scaled.input[1] not in one_number:
            continue
        heads = made_by(scaled.input[0], "Reshape")
        flipped = heads and made_by(heads.input[0], "Transpose")
        rows = flipped and _perm(flipped) == [0, 2, 1] and made_by(flipped.input[0], "Reshape")
        if not rows or ranks.get(rows.input[0]) != 4 or ranks.get(heads.output[0]) != 4:
            continue
        key, perm = rows.input[0], [0, 1, 3, 2]
        split = made_by(key, "Transpose")
        if split is not None and _perm(split) == [0, 2, 1, 3]:
            key, perm = split.input[0], [0, 2, 3, 1]
        mid = f"{scaled.output[0]}_before_transpose"
        replaced[id(scaled)] = [
            onnx.helper.make_node("Mul", [key, scaled.input[1]], [mid], name=f"{scaled.name}_folded"),
            onnx.helper.make_node("Transpose", [mid], [scaled.output[0]], perm=perm, name=f"{scaled.name}_key_T")]
    if not replaced:
        return model, 0
    edited = onnx.ModelProto()
    edited.CopyFrom(model)  # the caller's model stays as it was
    del edited.graph.node[:]
    edited.graph.node.extend(new for node in graph.node for new in replaced.get(id(node), [node]))
    del edited.graph.value_info[:]  # stale for the rewritten tensors; only a hint
    rewritten = ir.from_proto(edited)
    RemoveUnusedNodesPass()(rewritten)  # the old key path's reshapes and their shape arithmetic
    return ir.to_proto(rewritten), len(replaced)


def _ort_dynamic(model, spec: Precision, calibration, input_name: str, source: str, say: Progress):
    """int8-cpu: attention fused into ONNX Runtime's MultiHeadAttention (fp32), then the weights
    of every MatMul/Gemm int8 with a 7-bit range, one scale per output channel, with activations
    quantized at run time.

    Per channel, because 7-bit weights (see below) cost accuracy that per-channel scales win back:
    on crossvit_15_240 (2-core AMD EPYC, AVX-512 VNNI; 32 random inputs / 96 held-out images,
    each row alone, median relative L2 against fp32) 8-bit per tensor 0.040 / 0.053, 7-bit per
    tensor 0.073 / 0.081, 7-bit per channel 0.055 / 0.058; per channel took 1.8 % more time at
    batch 1 (median of 30 adjacent pairs; 7-bit and 8-bit ran at the same speed there).

    Measured on crossvit_15_240 at batch 1 (2-core AMD EPYC, AVX-512 VNNI): the fused
    attention takes 6-8 % off the dynamic-int8 graph (the head transposes, splits and the
    separate Softmax go); static QDQ int8 (calibrated, per channel, attention MatMuls
    included) was 1.4–1.65x *slower* (QLinearSoftmax and u8 x u8 QLinearMatMul kernels); fusing
    SkipLayerNormalization/BiasGelu as well was slower too."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model, fused = fuse_attention_for_ort(model, say)
    say(f"int8-cpu: ONNX Runtime dynamic quantization (int8 MatMul weights, no calibration; "
        f"{fused} attention blocks fused)")
    with temporary_folder() as tmp:
        work_src, out = tmp / "model.onnx", tmp / "model.int8.onnx"
        onnx.save(model, str(work_src))
        quiet = logging.getLogger()
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # "Please consider to run pre-processing before quantization"
        try:
            # reduce_range: 7-bit weights. Without VNNI (AVX2-only x86), MatMulInteger's u8 x s8 product
            # sums pairs into int16 (VPMADDUBSW) and saturates with 8-bit weights: on a small random
            # model, relative L2 0.18 against fp32 (0.011 with 7-bit weights; 2-core AVX2 EPYC). With
            # 7-bit weights no x86 CPU saturates, so a gate passed on one machine holds on another.
            quantize_dynamic(str(work_src), str(out), weight_type=QuantType.QInt8, reduce_range=True,
                             op_types_to_quantize=["MatMul", "Gemm"], per_channel=True)
        except Exception as e:
            raise ExportError(f"int8-cpu quantization failed: {type(e).__name__}: {first_line(e)}") from None
        finally:
            quiet.setLevel(level)
        converted = onnx.load(str(out))
    tool = {"name": "onnxruntime.quantization.quantize_dynamic", "onnxruntime_version": onnxruntime.__version__,
            "target": "onnxruntime-cpu", "weight_type": "int8", "reduce_range": True, "per_channel": True,
            "attention": f"com.microsoft.MultiHeadAttention x{fused} (onnxscript ORT fusions)" if fused
            else "decomposed"}
    return converted, tool


# A model with random weights is gated on random inputs as well as images (contract.py), so
# its static scales are calibrated on both: measured on crossvit_15_240 (2-core AMD EPYC, 32
# fresh random inputs and 161 held-out images not used for calibration, per-row rel L2 max):
#   images only, NNCF defaults                  random 0.69  images 0.107
#   images only, SmoothQuant off                random 0.116 images 0.078
#   images + random draws, defaults             random 0.104 images 0.071
#   images + random draws, min-max ranges       random 0.089 images 0.064   <- kept
#   images + random draws, SmoothQuant off      random 0.082 images 0.171
# SmoothQuant's per-channel scales, fitted to images alone, do not hold for random inputs.
# And SmoothQuant's alpha for MatMuls at 0.5, not NNCF's 0.95: over three draws of crossvit_15_240's
# random weights (2-core AMD EPYC, AVX-512 VNNI/BF16; 360 held-out images / 32 random inputs, rel L2
# against the fp32 file)
#   alpha 0.95  images 0.114 0.075 0.074   random 0.092 0.094 0.092   (the first fails the 0.1 gate)
#   alpha 0.5   images 0.083 0.072 0.068   random 0.078 0.083 0.075
# at the same speed (median of 12 interleaved turns' ratios 1.01). The files behind these figures:
# benchmarks/results/cpu_epyc_2core/cpu_path/smooth_quant_alpha/.
RANDOM_DRAWS_SEED = 20261205  # not the gate's: its random inputs are fresh on every run
RANDOM_WEIGHTS_MATMUL_ALPHA = 0.5


def _random_weights_calibration(calibration: np.ndarray) -> np.ndarray:
    """Half images, half standard-normal draws shaped like them (at most MAX_CALIBRATION_IMAGES)."""
    k = min(len(calibration), MAX_CALIBRATION_IMAGES // 2)
    draws = np.random.default_rng(RANDOM_DRAWS_SEED).standard_normal((k, *calibration.shape[1:]), dtype=np.float32)
    return np.concatenate([calibration[:k], draws])


def _import_nncf(precision: str):
    """(nncf, AdvancedQuantizationParameters, RangeEstimatorParametersSet), or BackendUnavailable."""
    try:
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
        from nncf.quantization.range_estimator import RangeEstimatorParametersSet
    except ImportError as e:
        raise BackendUnavailable(f"{precision} needs NNCF ({first_line(e)}): {pip_install('openvino')}") from None
    return nncf, AdvancedQuantizationParameters, RangeEstimatorParametersSet


def _nncf_ptq(model, spec: Precision, calibration: np.ndarray, input_name: str, source: str, say: Progress, *,
              random_weights: bool = False):
    """int8-ov: NNCF post-training quantization of the fp32 graph (transformer mode: SmoothQuant,
    int8 weights per channel and activations with static, calibrated scales), written as
    standard QuantizeLinear/DequantizeLinear ONNX that OpenVINO compiles into its int8 kernels.

    Static scales make a row's answer independent of its batch-mates (dynamic int8 is not).
    Measured on crossvit_15_240, 2-core AMD EPYC: quantizing the ONNX or OpenVINO's own model
    gave the same speed (29.7 ms at batch 1) and accuracy (rel L2 0.075), so the artifact stays
    an ONNX file with our metadata. A model with random weights is calibrated on images and as
    many random draws, with min-max activation ranges and SmoothQuant's alpha at 0.5 (see above).
    Each attention's key transpose is folded into one first (`fold_key_transposes`): an
    OpenVINO-only graph, like int8-cpu's."""
    nncf, AdvancedQuantizationParameters, RangeEstimatorParametersSet = _import_nncf(spec.name)
    from nncf.quantization.advanced_parameters import AdvancedSmoothQuantParameters, OverflowFix

    from crossvit.runtime.cpu_choice import VNNI_ONLY, sums_int8_in_int32

    n_images = int(calibration.shape[0])
    # Without VNNI (AVX2-only x86) u8 x s8 pairs are summed in int16 and saturate with 8-bit weights
    # (a random crossvit_digits, 2-core AVX2 EPYC: relative L2 0.12-0.14 with NNCF's default, over
    # the 0.1 limit), so there the overflow fix is on in every layer (7-bit weights; NNCF's default
    # fixes the first only). On a CPU with VNNI or AMX, where int8-ov is made for the machine that
    # runs it, 8-bit weights with symmetric activations: on crossvit_15_240 (2-core AVX-512 VNNI AMD
    # EPYC) the same accuracy as 7-bit weights with NNCF's asymmetric ones (images relative L2 0.059
    # against 0.060) and 3.5-4.5 % faster at batch 1; the file says so, and a CPU without VNNI leaves
    # it out (cpu_choice._saturates_here).
    eight_bit = sums_int8_in_int32()
    advanced = {"overflow_fix": OverflowFix.DISABLE if eight_bit else OverflowFix.ENABLE}
    preset = {"preset": nncf.QuantizationPreset.PERFORMANCE} if eight_bit else {}
    used = {"images": n_images}
    if random_weights:
        calibration = _random_weights_calibration(calibration)
        n_images = len(calibration) // 2
        used = {"images": n_images, "random_draws": len(calibration) - n_images, "seed": RANDOM_DRAWS_SEED,
                "activation_ranges": "min-max", "smooth_quant_alpha_matmul": RANDOM_WEIGHTS_MATMUL_ALPHA,
                "why": "random weights: gated on random inputs too"}
        advanced["activations_range_estimator_params"] = RangeEstimatorParametersSet.MINMAX
        advanced["smooth_quant_alphas"] = AdvancedSmoothQuantParameters(matmul=RANDOM_WEIGHTS_MATMUL_ALPHA)
    options = {"advanced_parameters": AdvancedQuantizationParameters(**advanced), **preset}
    model, folded = fold_key_transposes(model)
    n = int(calibration.shape[0])
    what = f"{n_images} calibration images" + (f" and {n - n_images} random draws (random weights)"
                                               if random_weights else "")
    say(f"{spec.name}: NNCF post-training quantization (transformer mode, {what}; "
        f"{folded} attention key transposes folded; "
        + ("8-bit weights and symmetric activations: this CPU has VNNI)" if eight_bit
           else "7-bit weights: this CPU has no VNNI)"))
    buf = io.StringIO()
    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    nncf_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            converted = nncf.quantize(model, nncf.Dataset([{input_name: x[None]} for x in calibration]),
                                      model_type=nncf.ModelType.TRANSFORMER, subset_size=n, **options)
    except Exception as e:
        raise ExportError(f"{spec.name} quantization of {source} failed in NNCF: {type(e).__name__}: "
                          f"{first_line(e)}") from None
    finally:
        nncf_log.setLevel(level)
    tool = {"name": "nncf.quantize", "nncf_version": nncf.__version__, "target": "openvino-cpu",
            "model_type": "transformer", "calibration": used, "scales": "static",
            "overflow_fix": VNNI_ONLY if eight_bit else "all layers",
            "activations": "symmetric" if eight_bit else "asymmetric where NNCF chooses (its mixed preset)",
            "attention": f"key transposes folded x{folded}" if folded else "as exported"}
    return converted, tool


TOOLCHAINS = {
    "torch.onnx.export": _keep_fp32,
    "modelopt-autocast": _autocast,
    "modelopt-ptq": _ptq,
    "onnxruntime-dynamic": _ort_dynamic,
    "nncf-ptq": _nncf_ptq,
}


# -- the checked write -------------------------------------------------------------------

def _write_checked(converted, dst: Path, source, meta: dict, spec: Precision, tool: dict, src_name: str) -> None:
    """The source's metadata (precision updated), a size check, then write + full ONNX check on
    a temp file, renamed into place."""
    import onnx

    write_onnx_metadata(converted, {**meta, "precision": spec.name, "precision_tool": tool},
                        others=[(p.key, p.value) for p in source.metadata_props])
    if converted.ByteSize() >= PROTOBUF_LIMIT:
        raise ExportError(f"{spec.name} variant of {src_name} is over 2 GB and cannot be one .onnx file")

    def write(tmp: Path) -> None:
        onnx.save(converted, str(tmp))
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as e:
            raise ExportError(f"{spec.name} variant of {src_name} fails the ONNX checker: {first_line(e)}") from None

    atomic_write(dst, write)


def require_toolchain(precision: str) -> None:
    """Raise the BackendUnavailable that `convert_precision` to `precision` would raise for a
    missing tool (ModelOpt for fp16/bf16/int8/fp8, NNCF for int8-ov), before any work: `export
    --precision` checks this before it exports the fp32 graph."""
    spec = PRECISION_TABLE.get(precision)
    if spec is None:
        return  # convert_precision says so
    if spec.toolchain in ("modelopt-autocast", "modelopt-ptq"):
        _import_modelopt()
    elif spec.toolchain == "nncf-ptq":
        _import_nncf(precision)


def convert_precision(src: Path, dst: Path, precision: str, calibration: np.ndarray | None, *,
                      input_name: str = INPUT_NAME, progress: Progress | None = None) -> Path:
    """Write the `precision` variant of the fp32 ONNX `src` to `dst` (one self-contained, checked file).

    Args:
        calibration: float32 images shaped like the model input (N x C x H x W), already
            preprocessed. Required for int8/fp8 (at least MIN_CALIBRATION_IMAGES); used for
            AutoCast's range analysis for fp16/bf16 when given (random data otherwise).
        progress: called with one line per stage.
    """
    say = progress or (lambda msg: None)
    src, dst = Path(src), Path(dst)
    spec = PRECISION_TABLE.get(precision)
    if spec is None:
        raise ExportError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISION_TABLE)}")
    check_output_path(dst, suffix=".onnx")
    if src.resolve() == dst.resolve():
        raise ExportError(f"output {dst} would overwrite the source ONNX")
    model, meta = _load_source(src)
    calibration = _check_calibration(calibration, _input_dims(model, src, input_name), spec)
    start = time.perf_counter()
    options = {"random_weights": _random_weights(meta)} if spec.toolchain == "nncf-ptq" else {}
    converted, tool = TOOLCHAINS[spec.toolchain](model, spec, calibration, input_name, src.name, say, **options)
    # which fp32 file this came from, so a runtime can tell a variant of *this* model beside it,
    # and the checkpoint that file came from, so `check` can compare a reference with it
    meta = {**meta, "source": derived_source(src.name, sha256_file(src), meta.get("source"))}
    _write_checked(converted, dst, model, meta, spec, tool, src.name)
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
