"""`crossvit export`: dynamic batch, metadata inside, checked, atomic; bad input refused."""


import numpy as np
import onnx
import pytest
import torch

from conftest import TINY_SEED
from crossvit.errors import ExportError, UsageError
from crossvit.export.onnx import BatchRange, export_onnx
from crossvit.model import CrossViT, load_checkpoint, save_checkpoint
from crossvit.runtime.artifact import read_artifact
from crossvit.runtime.session import OnnxRuntimeSession

LABELS = [f"c{i}" for i in range(7)]


@pytest.fixture(scope="module")
def seed_checkpoint(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("ckpt") / "seed.safetensors"
    return save_checkpoint(CrossViT(**TINY_SEED), path, labels=LABELS,
                           preprocessing=dict(input_size=[3, 32, 32], crop_pct=1.0, mean=[0.5] * 3, std=[0.5] * 3))


@pytest.fixture(scope="module")
def exported(seed_checkpoint, tmp_path_factory):
    loaded = load_checkpoint(seed_checkpoint)
    out = tmp_path_factory.mktemp("onnx") / "seed.onnx"
    return loaded, export_onnx(loaded, out, batch=BatchRange(1, 8))


def test_export_writes_one_checked_self_contained_file(exported):
    _, result = exported
    assert sorted(p.name for p in result.path.parent.iterdir()) == ["seed.onnx"]  # no .data, no temp
    assert not result.external_data
    onnx.checker.check_model(str(result.path), full_check=True)
    proto = onnx.load(str(result.path))
    assert proto.opset_import[0].version == 20
    assert "Resize" not in {n.op_type for n in proto.graph.node}


def test_metadata_round_trips_everything_the_runtime_needs(exported, seed_checkpoint):
    loaded, result = exported
    info = read_artifact(result.path)
    assert info.precision == "fp32"
    assert (info.batch_min, info.batch_max) == (1, 8)
    assert info.input_shape == (3, 32, 32)
    assert info.labels == tuple(LABELS)
    assert info.preprocessing == loaded.info.preprocessing
    assert info.model["config"] == loaded.info.config
    assert info.model["architecture"] == "seed"
    assert info.raw["source"]["sha256"] == loaded.sha256 and len(loaded.sha256) == 64
    assert info.raw["exporter"]["torch"] == torch.__version__
    assert info.raw["exporter"]["onnx"] == onnx.__version__


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_one_file_runs_every_batch_size_in_its_range(exported, batch):
    loaded, result = exported
    x = np.random.default_rng().standard_normal((batch, 3, 32, 32), dtype=np.float32)
    with OnnxRuntimeSession(read_artifact(result.path), device="cpu") as s:
        out = s.infer(x)
    with torch.no_grad():
        ref = loaded.model(torch.from_numpy(x)).numpy()
    assert out.shape == (batch, 7)
    assert np.abs(out - ref).max() <= 1e-4


def test_batch_dimension_is_symbolic_with_the_declared_range(exported):
    _, result = exported
    proto = onnx.load(str(result.path))
    dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param and not dim.dim_value


def test_a_weightless_model_exports_the_same_bytes_every_run(tmp_path):
    """Random weights come from a recorded seed (default 0), so the same export twice writes the
    same file (crossvit_15_240's 110 MB fp32 export was checked the same way by hand), and
    another seed another one."""
    import hashlib

    from crossvit.model import load_model

    def digest(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    runs = [export_onnx(load_model(name="crossvit_digits", pretrained=False, init_seed=seed),
                        tmp_path / f"{i}.onnx", batch=BatchRange(1, 4)).path for i, seed in enumerate((0, 0, 1))]
    assert digest(runs[0]) == digest(runs[1]) != digest(runs[2])


def test_static_batch_when_min_equals_max(seed_checkpoint, tmp_path):
    result = export_onnx(load_checkpoint(seed_checkpoint), tmp_path / "s.onnx", batch=BatchRange(4, 4))
    dim = onnx.load(str(result.path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_value == 4


@pytest.mark.parametrize("text, expect", [("1:64", (1, 64)), ("8", (8, 8)), (":32", (1, 32))])
def test_batch_range_parsing(text, expect):
    b = BatchRange.parse(text)
    assert (b.min, b.max) == expect


@pytest.mark.parametrize("text, error, words", [
    ("5:2", ExportError, "max 2 is smaller than min 5"), ("0:4", ExportError, ">= 1"),
    ("a:b", UsageError, "MIN:MAX"), ("", UsageError, "MIN:MAX"),  # does not parse: a usage error (exit 2)
])
def test_bad_batch_ranges_are_refused(text, error, words):
    with pytest.raises(error, match=words):
        BatchRange.parse(text)


def test_failed_export_leaves_no_partial_files(seed_checkpoint, tmp_path, monkeypatch):
    import crossvit.export.onnx as mod

    def broken_check(path):
        raise ExportError("simulated checker failure")

    monkeypatch.setattr(mod, "check_onnx", broken_check)
    with pytest.raises(ExportError):
        export_onnx(load_checkpoint(seed_checkpoint), tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, words", [
    (["export", "{tmp}/missing.safetensors", "-o", "{tmp}/o.onnx"], "no such file"),
    (["export", "{tmp}/corrupt.safetensors", "-o", "{tmp}/o.onnx"], "not a readable safetensors"),
    (["export", "--model", "crossvit_nope", "-o", "{tmp}/o.onnx"], "unknown model name"),
    (["export", "--model", "crossvit_tiny_240", "--batch", "8:2", "-o", "{tmp}/o.onnx"], "smaller than min"),
    (["export", "--model", "crossvit_tiny_240", "--batch", "0:2", "-o", "{tmp}/o.onnx"], ">= 1"),
    (["export", "--model", "crossvit_tiny_240", "--opset", "9", "-o", "{tmp}/o.onnx"], "opset 9 is not supported"),
    (["export", "--model", "crossvit_tiny_240", "-o", "{tmp}/o.txt"], "must end in .onnx"),
    (["info", "{tmp}/corrupt.onnx"], "not a readable ONNX file"),
    (["check", "{tmp}/corrupt.onnx"], "not a readable ONNX file"),
    (["check", "{tmp}/missing.onnx"], "no such file"),
])
def test_cli_bad_input_gets_one_line_and_nonzero_exit(tmp_path, args, words, cli, one_line_error):
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    (tmp_path / "corrupt.onnx").write_bytes(b"\x08\x07garbage" * 20)
    one_line_error(cli(*[a.format(tmp=tmp_path) for a in args]), words)
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "o.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.onnx", "corrupt.safetensors"]


def test_cli_help_and_version(cli):
    proc = cli("--help")
    assert proc.returncode == 0
    for sub in ("models", "info", "convert", "export", "check"):
        assert sub in proc.stdout
    proc = cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("crossvit ")


def test_int8_export_refuses_calibration_images_that_are_not_images(tmp_path, cli, one_line_error):
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(20):
        (calib / f"{i:02d}.png").write_bytes(b"\x89PNG not really" if i == 7 else b"")
    one_line_error(cli("export", "--precision", "int8", "--calibration", calib, "-o", tmp_path / "q.onnx"),
                   "calibration image")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib"]


@pytest.mark.slow
def test_export_fp16_writes_only_the_requested_file(tmp_path, cli):
    proc = cli("export", "--precision", "fp16", "-o", tmp_path / "d16.onnx")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d16.onnx"]
    assert read_artifact(tmp_path / "d16.onnx").precision == "fp16"


@pytest.mark.parametrize("setup, words", [("missing", "no such folder"), ("empty", "contains no images"),
                                          ("few", "at least 16")])
def test_int8_export_refuses_missing_empty_or_tiny_calibration_sets(tmp_path, setup, words, cli, one_line_error):
    from PIL import Image

    calib = tmp_path / "calib"
    if setup != "missing":
        calib.mkdir()
    if setup == "few":
        for i in range(3):
            Image.new("RGB", (32, 32), (i, i, i)).save(calib / f"{i}.png")
    one_line_error(cli("export", "--model", "crossvit_tiny_240", "--precision", "int8", "--calibration", calib,
                       "-o", tmp_path / "q.onnx"), words)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["calib"] if setup != "missing" else [])


@pytest.mark.parametrize("opset", [18, 23])
def test_every_advertised_opset_exports_and_runs(seed_checkpoint, tmp_path, opset):
    loaded = load_checkpoint(seed_checkpoint)
    path = export_onnx(loaded, tmp_path / f"o{opset}.onnx", batch=BatchRange(1, 4), opset=opset).path
    assert onnx.load(str(path)).opset_import[0].version == opset
    x = np.random.default_rng().standard_normal((3, 3, 32, 32), dtype=np.float32)
    with OnnxRuntimeSession(read_artifact(path), device="cpu") as s:
        out = s.infer(x)
    with torch.no_grad():
        assert np.abs(out - loaded.model(torch.from_numpy(x)).numpy()).max() <= 1e-4
