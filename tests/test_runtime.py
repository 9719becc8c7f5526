"""crossvit.runtime: sessions validate, batch, predict, and never import torch."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from crossvit.errors import ArtifactError, BackendUnavailable, InputError
from crossvit.runtime.artifact import read_artifact
from crossvit.runtime.session import OnnxRuntimeSession, Session, open_session


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([(32, 32), (64, 48), (20, 90)]):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_runtime_never_imports_torch(small_artifacts, images):
    _, onnx_path = small_artifacts
    code = textwrap.dedent(f"""
        import sys
        from crossvit.runtime.session import open_session
        with open_session({str(onnx_path)!r}) as s:
            out = s.predict([{str(images[0])!r}, {str(images[1])!r}], top_k=3)
        assert all(p.ok for p in out), out
        bad = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")
                     or m.startswith("crossvit.model") or m.startswith("crossvit.export"))
        print("IMPORTED", bad)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "IMPORTED []" in proc.stdout


def test_session_matches_torch_and_splits_large_batches(small_artifacts):
    import torch

    from crossvit.model import load_checkpoint

    ckpt, onnx_path = small_artifacts
    model = load_checkpoint(ckpt).model
    x = np.random.default_rng().standard_normal((19, 3, 32, 32), dtype=np.float32)  # > batch max 8
    with open_session(onnx_path, backend="onnxruntime", device="cpu") as s:
        out = s.infer(x)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert out.shape == (19, 10)
    assert np.abs(out - ref).max() <= 1e-4


class Recorder(Session):
    """The base class's batching logic with a backend that records what it was given."""

    def __init__(self, info):
        super().__init__(info)
        self.calls = []

    def _run(self, x):
        self.calls.append(x.shape[0])
        return np.tile(x[:, :1, 0, 0], (1, self.info.num_classes))


def test_batches_are_split_to_max_and_padded_to_min(small_artifacts):
    import dataclasses

    info = dataclasses.replace(read_artifact(small_artifacts[1]), batch_min=4, batch_max=8)
    s = Recorder(info)
    x = np.arange(19, dtype=np.float32)[:, None, None, None] * np.ones((1, 3, 32, 32), np.float32)
    out = s.infer(x)
    assert s.calls == [8, 8, 4]  # the last 3 padded to the minimum of 4
    np.testing.assert_array_equal(out[:, 0], np.arange(19))
    s.calls.clear()
    s.infer(x[:2])
    assert s.calls == [4]


@pytest.mark.parametrize("bad, words", [
    ([[1.0]], "numpy.ndarray"),
    (np.zeros((2, 3, 32, 32), np.float64), "dtype float32, got float64"),
    (np.zeros((3, 32, 32), np.float32), "4-D batch"),
    (np.zeros((2, 1, 32, 32), np.float32), "images of shape (3, 32, 32), got (1, 32, 32)"),
    (np.zeros((2, 3, 30, 32), np.float32), "got (3, 30, 32)"),
    (np.zeros((0, 3, 32, 32), np.float32), "empty batch"),
])
def test_infer_validates_input_and_says_what_it_got(small_artifacts, bad, words):
    with open_session(small_artifacts[1], device="cpu") as s:
        with pytest.raises(InputError) as e:
            s.infer(bad)
    assert words in str(e.value)


def test_predict_answers_good_images_and_reports_the_bad_one(small_artifacts, images, tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    missing = tmp_path / "missing.jpg"
    with open_session(small_artifacts[1]) as s:
        out = s.predict([images[0], bad, images[1], missing, images[2]], top_k=3, batch_size=2)
    assert [p.ok for p in out] == [True, False, True, False, True]
    assert str(bad) in out[1].error and str(missing) in out[3].error
    good = out[0]
    assert len(good.labels) == 3 and set(good.labels) <= {str(i) for i in range(10)}
    assert sorted(good.probs, reverse=True) == list(good.probs) and 0 < sum(good.probs) <= 1 + 1e-6
    json.dumps([p.to_dict() for p in out])


def test_predict_matches_preprocessing_plus_infer(small_artifacts, images):
    from crossvit.runtime.preprocess import Preprocessor

    with open_session(small_artifacts[1]) as s:
        pre = Preprocessor.from_dict(s.info.preprocessing)
        logits = s.infer(np.stack([pre(p) for p in images]))
        out = s.predict(images, top_k=1)
    assert [p.indices[0] for p in out] == list(logits.argmax(1))


def test_closed_session_refuses_work(small_artifacts):
    s = open_session(small_artifacts[1])
    s.close()
    with pytest.raises(ArtifactError, match="closed"):
        s.infer(np.zeros((1, 3, 32, 32), np.float32))


def test_missing_gpu_provider_falls_back_to_cpu_with_a_logged_reason(small_artifacts, caplog):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    with caplog.at_level("WARNING", logger="crossvit.runtime"):
        with open_session(small_artifacts[1], device="cuda") as s:
            assert s.device == "cpu" and s.providers == ["CPUExecutionProvider"]
    assert "using the CPU" in caplog.text


def test_torch_backend_runs_checkpoints(small_artifacts):
    ckpt, onnx_path = small_artifacts
    x = np.random.default_rng(2).standard_normal((3, 3, 32, 32), dtype=np.float32)
    with open_session(ckpt) as t, open_session(onnx_path) as o:
        assert t.backend == "torch" and o.backend == "onnxruntime"
        assert np.abs(t.infer(x) - o.infer(x)).max() <= 1e-4


@pytest.mark.parametrize("name, content, words", [
    ("m.onnx", None, "no such file"),
    ("m.txt", b"x", "unknown artifact type"),
    ("m.plan", b"x", "manifest"),
    ("m.onnx", b"\x08\x07junk" * 10, "not a readable ONNX file"),
])
def test_bad_artifacts_are_refused_with_one_line(tmp_path, name, content, words):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises((ArtifactError, BackendUnavailable)) as e:
        open_session(path)
    assert words in str(e.value)


def test_onnx_without_crossvit_metadata_is_refused(tmp_path):
    import onnx
    from onnx import helper, TensorProto

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), tmp_path / "plain.onnx")
    with pytest.raises(ArtifactError, match="no crossvit metadata"):
        open_session(tmp_path / "plain.onnx")


def test_predict_cli_prints_table_json_and_exits_1_on_a_bad_file(small_artifacts, images, tmp_path, cli):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    proc = cli("predict", small_artifacts[1], tmp_path, "--top-k", "2", "--json")
    assert proc.returncode == 1
    rows = [json.loads(l) for l in proc.stdout.splitlines()]
    assert len(rows) == 4 and sum("error" in r for r in rows) == 1
    assert "Traceback" not in proc.stderr
    proc = cli("predict", small_artifacts[1], *images)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 3 and "%" in proc.stdout


def test_ort_threads_follow_the_cpus_this_process_may_use(monkeypatch):
    import os

    from crossvit.runtime.session import intra_op_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert intra_op_threads() == 2  # restricted (taskset/cpuset): do not oversubscribe
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert intra_op_threads() is None  # whole machine: ORT's default, one per physical core


class FakeOrt:
    def __init__(self, providers):
        self._providers = providers

    def get_available_providers(self):
        return list(self._providers)


@pytest.mark.parametrize("available, device, expected", [
    (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], "tensorrt",
     ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]),
    (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], "auto",
     ["CUDAExecutionProvider", "CPUExecutionProvider"]),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], "tensorrt", ["CUDAExecutionProvider", "CPUExecutionProvider"]),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], "cpu", ["CPUExecutionProvider"]),
    (["CPUExecutionProvider"], "auto", ["CPUExecutionProvider"]),
])
def test_execution_provider_choice(available, device, expected):
    """The GPU provider logic, checked on CPU with the providers a GPU build would list."""
    assert OnnxRuntimeSession._providers(FakeOrt(available), device) == expected


def test_unknown_device_is_refused():
    with pytest.raises(BackendUnavailable, match="unknown device"):
        OnnxRuntimeSession._providers(FakeOrt(["CPUExecutionProvider"]), "tpu")


def test_torch_backend_on_cuda_without_a_gpu_says_so(small_artifacts):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(BackendUnavailable, match="no CUDA device"):
        open_session(small_artifacts[0], device="cuda")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_torch_backend_matches_onnxruntime_on_each_device(small_artifacts, device):
    ckpt, onnx_path = small_artifacts
    x = np.random.default_rng().standard_normal((3, 3, 32, 32), dtype=np.float32)
    with open_session(onnx_path, device="cpu") as ref, open_session(ckpt, backend="torch", device=device) as s:
        assert s.device == device
        assert np.abs(s.infer(x) - ref.infer(x)).max() <= 1e-4


def test_predict_table_columns_line_up_with_long_file_names(small_artifacts, images, tmp_path, cli):
    """Issue 24: each line began with its file name, so a long one pushed its labels right."""
    import re
    import shutil

    long = tmp_path / ("a-much-longer-file-name-than-the-others" + "x" * 20 + ".png")
    shutil.copy(images[0], long)
    proc = cli("predict", small_artifacts[1], *images, long, "--top-k", "3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 4
    columns = {tuple(m.start() for m in re.finditer("%", line)) for line in lines}
    assert len(columns) == 1 and len(next(iter(columns))) == 3, lines
