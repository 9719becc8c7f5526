"""Precision variants (fp16/bf16/int8/fp8) of the embedded model's ONNX, built with ModelOpt on CPU.

ModelOpt is required here (CI installs it): a missing ModelOpt fails these tests loudly with
BackendUnavailable, except the one test that simulates its absence.

The model is the trained embedded crossvit_digits; calibration and probe inputs are its shipped
real held-out images, so agreement and accuracy mean something. The limits are the parity
gate's (the contract's precision table), not looser ones.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crossvit.contract import MIN_CALIBRATION_IMAGES, PRECISION_NAMES, PRECISION_TABLE
from crossvit.errors import BackendUnavailable, ExportError
from crossvit.export.precision import convert_precision, graph_precision_summary
from crossvit.files import sha256_file

THRESHOLDS = {name: p.thresholds for name, p in PRECISION_TABLE.items()}

IMAGE = (3, 32, 32)


@pytest.fixture(scope="module")
def real_images():
    """The shipped held-out images, preprocessed, with their labels."""
    from crossvit.assets import heldout_images as shipped_images
    from crossvit.runtime.images import list_images, load_image_set
    from crossvit.runtime.preprocess import Preprocessor
    from crossvit.model import get_spec

    images = list_images(shipped_images())
    x, kept, errors = load_image_set(images, Preprocessor.from_dict(get_spec("crossvit_digits").preprocessing.to_dict()))
    assert not errors and len(kept) == len(images)
    return x, np.array([int(images.labels[i]) for i in kept])


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory) -> Path:
    """The trained crossvit_digits exported by our exporter, plus an unrelated metadata entry."""
    import onnx

    from crossvit.export.onnx import BatchRange, export_onnx
    from crossvit.model import load_model

    path = tmp_path_factory.mktemp("src") / "digits.onnx"
    export_onnx(load_model(name="crossvit_digits"), path, batch=BatchRange(1, 64))
    proto = onnx.load(str(path))
    proto.metadata_props.add(key="other", value="kept")
    onnx.save(proto, str(path))
    return path


@pytest.fixture(scope="module")
def calibration(real_images) -> np.ndarray:
    return real_images[0][:64]


@pytest.fixture(scope="module")
def variants(fp32_onnx, calibration, tmp_path_factory):
    """Each precision converted once, on first use."""
    out = tmp_path_factory.mktemp("variants")
    made = {}

    def get(precision: str) -> Path:
        if precision not in made:
            made[precision] = convert_precision(fp32_onnx, out / f"digits.{precision}.onnx", precision,
                                                calibration)
        return made[precision]

    return get


@pytest.fixture(scope="module")
def probe(fp32_onnx, real_images):
    """The held-out images, the fp32 ONNX's logits for them, and their labels."""
    x, labels = real_images
    return x, _run_ort(fp32_onnx, x), labels


def _run_ort(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def _errors(ref: np.ndarray, got: np.ndarray) -> dict:
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    centered_ref, centered_got = ref - ref.mean(0), got - got.mean(0)
    return {
        "rel_l2": float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
        "cosine": float((ref * got).sum() / (np.linalg.norm(ref) * np.linalg.norm(got))),
        "centered_cosine": float((centered_ref * centered_got).sum()
                                 / (np.linalg.norm(centered_ref) * np.linalg.norm(centered_got))),
        "top1": float((ref.argmax(1) == got.argmax(1)).mean()),
    }


def _assert_fp32_islands_and_io(summary: dict):
    assert summary["inputs"] == {"input": "float32"} and summary["outputs"] == {"logits": "float32"}
    for op in ("LayerNormalization", "Softmax"):
        entry = summary["fp32_op_types"][op]
        assert entry["count"] > 0 and entry["all_fp32"], (op, entry)


def _metadata(path: Path) -> dict:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


@pytest.mark.slow  # builds precision variants
@pytest.mark.parametrize("precision,dtype", [("fp16", "float16"), ("bf16", "bfloat16")])
def test_autocast_keeps_layernorm_softmax_and_io_fp32(variants, precision, dtype):
    summary = graph_precision_summary(variants(precision))
    _assert_fp32_islands_and_io(summary)
    # The bulk of the graph really is in the low precision.
    assert summary["output_dtype_counts"].get(dtype, 0) > summary["output_dtype_counts"]["float32"]
    assert summary["quantize_linear"] == 0


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean() * 100)


@pytest.mark.slow  # builds precision variants
def test_fp16_variant_passes_the_gate_on_real_images(variants, probe):
    x, ref, labels = probe
    err = _errors(ref, _run_ort(variants("fp16"), x))
    print("fp16 vs fp32 (onnxruntime CPU, real images):", err)
    t = THRESHOLDS["fp16"]
    assert err["rel_l2"] <= t.rel_l2 and err["top1"] >= t.top1_agreement, err


@pytest.mark.slow  # builds precision variants
def test_bf16_variant_passes_the_gate_in_the_onnx_reference_evaluator(variants, probe):
    """ONNX Runtime's CPU provider has no bf16 MatMul; the ONNX reference evaluator runs the graph."""
    from onnx.reference import ReferenceEvaluator

    x, ref, labels = probe
    got = ReferenceEvaluator(str(variants("bf16"))).run(None, {"input": x[:64]})[0]
    err = _errors(ref[:64], got)
    print("bf16 vs fp32 (onnx.reference, 64 real images):", err)
    t = THRESHOLDS["bf16"]
    assert err["rel_l2"] <= t.rel_l2 and err["top1"] >= t.top1_agreement, err


@pytest.mark.slow  # builds precision variants
def test_onnxruntime_cpu_refuses_the_bf16_variant_at_load(variants):
    """ONNX Runtime's CPU provider has no bf16 MatMul (the pinned onnxruntime): the file is refused at
    load with NOT_IMPLEMENTED, which is why the bf16 numbers are checked in onnx.reference (above) and
    deploy says "not run" for it. An onnxruntime that runs it fails this test: then gate it here."""
    import onnxruntime as ort

    with pytest.raises(Exception, match="NOT_IMPLEMENTED") as refused:  # no stable name for NotImplemented
        ort.InferenceSession(str(variants("bf16")), providers=["CPUExecutionProvider"])
    assert "MatMul" in str(refused.value)


@pytest.mark.slow  # builds precision variants
@pytest.mark.parametrize("precision,qdtype", [("int8", "int8"), ("fp8", "float8e4m3fn")])
def test_quantized_variant_has_qdq_and_passes_the_gate_on_real_images(variants, probe, precision, qdtype):
    path = variants(precision)
    summary = graph_precision_summary(path)
    _assert_fp32_islands_and_io(summary)
    assert summary["quantize_linear"] > 0 and summary["dequantize_linear"] >= summary["quantize_linear"]
    assert set(summary["quantized_dtypes"]) == {qdtype}, summary["quantized_dtypes"]
    x, ref, labels = probe
    got = _run_ort(path, x)
    err = _errors(ref, got)
    acc_ref, acc_got = _accuracy(ref, labels), _accuracy(got, labels)
    print(f"{precision} vs fp32 (onnxruntime CPU, real images):", err, f"accuracy {acc_ref:.2f} -> {acc_got:.2f}")
    t = THRESHOLDS[precision]
    assert err["top1"] >= t.top1_agreement, err
    assert acc_ref - acc_got <= t.accuracy_drop


def test_folded_key_transposes_compute_the_same_function_with_fewer_transposes(fp32_onnx, probe, tmp_path):
    """int8-ov's graph rewrite (fold_key_transposes): every attention's key becomes one 4-D Transpose,
    the logits stay those of the exported graph to float noise, on real images and random inputs,
    and a graph it already rewrote, or one without the pattern, is left as it is."""
    import onnx

    from crossvit.export.precision import fold_key_transposes

    original = onnx.load(str(fp32_onnx))
    ops = [n.op_type for n in original.graph.node]
    model, folded = fold_key_transposes(original)
    assert folded == ops.count("Softmax") > 0
    assert [n.op_type for n in original.graph.node] == ops  # the model given is left as it was
    after = [n.op_type for n in model.graph.node]
    assert after.count("Transpose") < ops.count("Transpose") and after.count("Reshape") < ops.count("Reshape")
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "folded.onnx"
    onnx.save(model, str(path))
    x, ref, _ = probe
    noise = np.random.default_rng(7).standard_normal((8, *x.shape[1:]), dtype=np.float32)
    for inputs, expected in ((x, ref), (noise, _run_ort(fp32_onnx, noise))):
        got = _run_ort(path, inputs)
        assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-5
        assert (got.argmax(1) == expected.argmax(1)).all()
    assert fold_key_transposes(model)[1] == 0
    assert fold_key_transposes(onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], [])))[1] == 0


@pytest.mark.slow  # builds precision variants
def test_int8_cpu_variant_uses_integer_matmuls_and_passes_the_gate_without_calibration(fp32_onnx, probe, tmp_path,
                                                                                      monkeypatch):
    import onnx

    for name in [n for n in sys.modules if n == "modelopt" or n.startswith("modelopt.")] + ["modelopt"]:
        monkeypatch.setitem(sys.modules, name, None)  # needs no ModelOpt
    path = convert_precision(fp32_onnx, tmp_path / "digits.int8-cpu.onnx", "int8-cpu", None)
    nodes = onnx.load(str(path)).graph.node
    ops = {n.op_type for n in nodes}
    assert "MatMulInteger" in ops and "QuantizeLinear" not in ops
    # every attention is ONNX Runtime's fused MultiHeadAttention (a CPU-only graph): no Softmax is left,
    # and that op is the only one outside the standard domain
    fp32_softmax = sum(n.op_type == "Softmax" for n in onnx.load(str(fp32_onnx)).graph.node)
    assert "Softmax" not in ops and fp32_softmax > 0
    assert [n.op_type for n in nodes if n.domain == "com.microsoft"] == ["MultiHeadAttention"] * fp32_softmax
    x, ref, labels = probe
    got = _run_ort(path, x)
    err = _errors(ref, got)
    print("int8-cpu vs fp32 (onnxruntime CPU, real images):", err)
    t = THRESHOLDS["int8-cpu"]
    assert err["top1"] >= t.top1_agreement and _accuracy(ref, labels) - _accuracy(got, labels) <= t.accuracy_drop
    meta = json.loads(_metadata(path)["crossvit"])
    assert meta["precision"] == "int8-cpu" and meta["precision_tool"]["target"] == "onnxruntime-cpu"
    fp32_source = json.loads(_metadata(fp32_onnx)["crossvit"])["source"]
    assert meta["source"] == {"onnx": fp32_onnx.name, "sha256": sha256_file(fp32_onnx),
                              "checkpoint": {"name": fp32_source["name"], "sha256": fp32_source["sha256"]}}


@pytest.mark.slow  # builds precision variants
def test_variants_are_self_contained_and_pass_full_check(variants, fp32_onnx):
    import onnx

    before = sorted(p.name for p in fp32_onnx.parent.iterdir())
    for precision in PRECISION_NAMES:
        path = variants(precision)
        onnx.checker.check_model(str(path), full_check=True)
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(f"digits.{p}.onnx" for p in PRECISION_NAMES)
    # ModelOpt writes side files next to its input: none may appear beside the source.
    assert sorted(p.name for p in fp32_onnx.parent.iterdir()) == before


@pytest.mark.slow  # builds precision variants
@pytest.mark.parametrize("precision", ["fp16", "bf16", "int8", "fp8"])
def test_variants_have_no_placeholder_dims_shared_across_sizes(variants, precision):
    """AutoCast leaves dim "unk" on tensors of different sizes; ORT then crashes on buffer reuse."""
    import onnx

    graph = onnx.load(str(variants(precision))).graph
    dims = {d.dim_param for v in [*graph.value_info, *graph.output] for d in v.type.tensor_type.shape.dim}
    assert "unk" not in dims


@pytest.mark.slow  # builds precision variants
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_metadata_precision_updated_and_rest_kept(variants, precision):
    meta = _metadata(variants(precision))
    assert meta["other"] == "kept"
    crossvit = json.loads(meta["crossvit"])
    assert crossvit["precision"] == precision and crossvit["model"]["labels"] == [str(i) for i in range(10)]
    assert crossvit["precision_tool"]["modelopt_version"] == "0.47.0"
    assert "crossvit.precision" not in meta


def test_source_without_crossvit_metadata_is_refused(fp32_onnx, tmp_path):
    import onnx

    proto = onnx.load(str(fp32_onnx))
    del proto.metadata_props[:]
    proto.metadata_props.add(key="author", value="someone")
    src = tmp_path / "plain.onnx"
    onnx.save(proto, str(src))
    with pytest.raises(ExportError, match="has no crossvit metadata"):
        convert_precision(src, tmp_path / "plain.fp32.onnx", "fp32", None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.onnx"]


@pytest.mark.parametrize("precision,calib,message", [
    ("int8", None, "needs a calibration batch"),
    ("fp8", None, "needs a calibration batch"),
    ("int8", np.zeros((0, *IMAGE), np.float32), "empty"),
    ("int8", np.zeros((MIN_CALIBRATION_IMAGES - 1, *IMAGE), np.float32), "too small to be meaningful"),
    ("int8", np.zeros((MIN_CALIBRATION_IMAGES, 3, 28, 28), np.float32), "does not fit"),
    ("fp8", np.zeros((MIN_CALIBRATION_IMAGES, *IMAGE[1:]), np.float32), "does not fit"),
    ("int8", np.zeros((MIN_CALIBRATION_IMAGES, *IMAGE), np.float64), "float32"),
    ("fp16", np.zeros((4, 1, 32, 32), np.float32), "does not fit"),
])
def test_bad_calibration_is_refused_and_writes_nothing(fp32_onnx, tmp_path, precision, calib, message):
    with pytest.raises(ExportError, match=message):
        convert_precision(fp32_onnx, tmp_path / "out.onnx", precision, calib)
    assert list(tmp_path.iterdir()) == []


def test_unknown_precision_is_refused(fp32_onnx, tmp_path):
    with pytest.raises(ExportError, match="unknown precision 'int4'"):
        convert_precision(fp32_onnx, tmp_path / "out.onnx", "int4", None)


@pytest.mark.slow  # builds precision variants
def test_modelopt_failure_is_one_line_and_leaves_no_file(fp32_onnx, calibration, tmp_path, monkeypatch):
    import modelopt.onnx.quantization as q

    def broken(*args, **kwargs):
        raise RuntimeError("calibration exploded\nwith a second line")

    monkeypatch.setattr(q, "quantize", broken)
    with pytest.raises(ExportError) as info:
        convert_precision(fp32_onnx, tmp_path / "out.onnx", "int8", calibration)
    assert str(info.value) == ("int8 conversion of digits.onnx failed in ModelOpt: "
                               "RuntimeError: calibration exploded")
    assert list(tmp_path.iterdir()) == []


def test_missing_modelopt_raises_backend_unavailable_with_install_command(fp32_onnx, tmp_path, monkeypatch):
    for name in [n for n in sys.modules if n == "modelopt" or n.startswith("modelopt.")] + ["modelopt"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import modelopt...` now raises ImportError
    from crossvit.install import pip_install

    with pytest.raises(BackendUnavailable, match=r"the fp16/bf16/int8/fp8 variants need NVIDIA ModelOpt") as info:
        convert_precision(fp32_onnx, tmp_path / "out.onnx", "fp16", None)
    assert str(info.value).endswith(f"install it with: {pip_install('quant')}")
    assert "[onnx]" not in str(info.value) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("precision, missing, words", [
    ("fp16", "modelopt", "the fp16/bf16/int8/fp8 variants need NVIDIA ModelOpt"),
    ("int8", "modelopt", "the fp16/bf16/int8/fp8 variants need NVIDIA ModelOpt"),
    ("int8-ov", "nncf", "int8-ov needs NNCF"),
])
def test_export_says_a_missing_tool_before_it_exports_anything(tmp_path, precision, missing, words, one_line_error):
    """Issue 24: `export --precision fp16` without ModelOpt exported and checked fp32 first and only
    then exited 3; the tool is now checked first (the CLI in a process where its import fails)."""
    out = tmp_path / "x.onnx"
    code = (f"import sys; sys.modules[{missing!r}] = None\n"
            "from crossvit.cli import main\n"
            f"sys.exit(main(['export', '--precision', {precision!r}, '-o', {str(out)!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    one_line_error(proc, words, code=3)
    assert "exporting" not in proc.stderr and not out.exists()
