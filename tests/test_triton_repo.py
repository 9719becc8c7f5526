"""Triton model repositories (`crossvit triton-repo`): config.pbtxt is parsed with Triton's own
schema (tritonclient's model_config_pb2) and every field checked against the artifact; the
ONNX in the repository is run with ONNX Runtime; plans are fake files with real manifests."""

import argparse
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import fake_plan, rewrite_onnx_metadata
from crossvit.contract import manifest_path
from crossvit.errors import ArtifactError, ConfigError, CrossViTError, ExportError, OutputError
from crossvit.export import triton
from crossvit.export.engine import Profile
from crossvit.export.triton import (add_parser, cmd_triton_repo, parse_batch_list, render_inference_service,
                                    write_triton_repo)
from crossvit.runtime.artifact import read_artifact



def parse_config(path: Path):
    """config.pbtxt as Triton reads it: text format of its ModelConfig message."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        pytest.fail(f"tritonclient is not installed ({e}): "
                    "pip install 'tritonclient[grpc]==2.73.0' 'protobuf>=6.33.5,<7'")
    return text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig()), model_config_pb2


@pytest.fixture(scope="module")
def small_onnx(small_artifacts):
    return small_artifacts[1]


@pytest.fixture(scope="module")
def int8_cpu_onnx(small_onnx, tmp_path_factory):
    from crossvit.export.precision import convert_precision

    return convert_precision(small_onnx, tmp_path_factory.mktemp("int8") / "small.int8-cpu.onnx", "int8-cpu", None)


def check_common(cfg, pb, info, out: Path, name: str):
    """The fields every repository has, against the artifact."""
    c, h, w = info.input_shape
    assert cfg.name == name and (out / name / "config.pbtxt").is_file()
    assert [i.name for i in cfg.input] == [info.input_name] and [o.name for o in cfg.output] == [info.output_name]
    assert not cfg.input[0].optional  # Triton runs the graph: `serve`'s optional BYTES input is not declared here
    assert cfg.input[0].data_type == cfg.output[0].data_type == pb.TYPE_FP32
    assert list(cfg.input[0].dims) == [c, h, w]  # without the batch
    assert list(cfg.output[0].dims) == [info.num_classes]
    assert cfg.output[0].label_filename == "labels.txt"
    assert (out / name / "labels.txt").read_text(encoding="utf-8").splitlines() == list(info.labels)
    assert [wu.batch_size for wu in cfg.model_warmup] == sorted({1, cfg.max_batch_size})
    for wu in cfg.model_warmup:
        assert list(wu.inputs) == [info.input_name]
        x = wu.inputs[info.input_name]
        assert x.random_data and x.data_type == pb.TYPE_FP32 and list(x.dims) == [c, h, w]
    assert len(cfg.instance_group) == 1
    isvc = (out / "inferenceservice.yaml").read_text()
    assert "apiVersion: serving.kserve.io/v1beta1" in isvc and "kind: InferenceService" in isvc
    assert "name: triton" in isvc and 's3://YOUR-BUCKET/PATH' in isvc and f"/v2/models/{name}/infer" in isvc
    assert f"Upload this folder ({out.name}/" in isvc


# -- ONNX ------------------------------------------------------------------------------------

def test_onnx_repository_on_cpu_matches_the_artifact_and_runs(small_onnx, tmp_path):
    import onnxruntime as ort

    out = write_triton_repo(small_onnx, tmp_path / "repo")
    info = read_artifact(small_onnx)
    cfg, pb = parse_config(out / "small" / "config.pbtxt")
    check_common(cfg, pb, info, out, "small")
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == info.batch_max == 8
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 100
    assert cfg.instance_group[0].count == 1 and cfg.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    assert not cfg.HasField("optimization")
    model = out / "small" / "1" / "model.onnx"
    assert model.read_bytes() == small_onnx.read_bytes()
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "inferenceservice.yaml", "small/1/model.onnx", "small/config.pbtxt", "small/labels.txt"]
    assert oct(model.stat().st_mode & 0o777) == "0o644" and oct(out.stat().st_mode & 0o777) == "0o755"
    # Triton's ONNX Runtime backend loads that file: a warmup-shaped batch gives [batch, classes]
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    for batch in (1, cfg.max_batch_size):
        x = np.random.default_rng(0).standard_normal((batch, *cfg.input[0].dims)).astype(np.float32)
        (y,) = session.run([cfg.output[0].name], {cfg.input[0].name: x})
        assert list(y.shape) == [batch, *cfg.output[0].dims]
    assert "nvidia.com/gpu" not in (out / "inferenceservice.yaml").read_text()


def test_onnx_options_and_the_tensorrt_accelerator(small_onnx, tmp_path):
    out = write_triton_repo(small_onnx, tmp_path / "repo", name="crossvit_small.fp32-v1", instances=3,
                            max_batch=6, preferred_batch=[4, 2, 4], max_queue_delay_us=0,
                            tensorrt_accelerator="fp16")
    cfg, pb = parse_config(out / "crossvit_small.fp32-v1" / "config.pbtxt")
    check_common(cfg, pb, read_artifact(small_onnx), out, "crossvit_small.fp32-v1")
    assert cfg.max_batch_size == 6 and list(cfg.dynamic_batching.preferred_batch_size) == [2, 4]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 0
    assert cfg.instance_group[0].count == 3 and cfg.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    (acc,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "tensorrt" and dict(acc.parameters) == {"precision_mode": "FP16"}
    assert not cfg.optimization.execution_accelerators.cpu_execution_accelerator
    isvc = (out / "inferenceservice.yaml").read_text()
    assert "name: crossvit-small-fp32-v1\n" in isvc and 'nvidia.com/gpu: "1"' in isvc

    out = write_triton_repo(small_onnx, tmp_path / "repo32", tensorrt_accelerator="fp32")
    cfg, _ = parse_config(out / "small" / "config.pbtxt")
    assert cfg.optimization.execution_accelerators.gpu_execution_accelerator[0].parameters["precision_mode"] == "FP32"


def test_int8_cpu_is_served_on_cpu_and_never_given_tensorrt(int8_cpu_onnx, tmp_path):
    out = write_triton_repo(int8_cpu_onnx, tmp_path / "repo")
    # served under its model's name, as `crossvit serve` serves it: a client's requests work on both
    assert read_artifact(int8_cpu_onnx).model_name == "small" and (out / "small").is_dir()
    cfg, pb = parse_config(out / "small" / "config.pbtxt")
    assert cfg.platform == "onnxruntime_onnx" and cfg.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    assert not cfg.HasField("optimization")
    for accelerator in ("fp16", "fp32"):
        with pytest.raises(ExportError, match="int8-cpu.*TensorRT must never run"):
            write_triton_repo(int8_cpu_onnx, tmp_path / f"trt-{accelerator}", tensorrt_accelerator=accelerator)
        assert not (tmp_path / f"trt-{accelerator}").exists()


def test_external_data_is_copied_into_a_model_onnx_folder(small_onnx, tmp_path):
    import onnx
    import onnxruntime as ort

    src = tmp_path / "src" / "ext.onnx"
    src.parent.mkdir()
    onnx.save(onnx.load(str(small_onnx)), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data")
    out = write_triton_repo(src, tmp_path / "repo")
    folder = out / "ext" / "1" / "model.onnx"  # Triton: a model of several files is a folder named model.onnx
    assert sorted(p.name for p in folder.iterdir()) == ["ext.onnx.data", "model.onnx"]
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": np.zeros((2, 3, 32, 32), np.float32)})[0].shape == (2, 10)
    (src.parent / "ext.onnx.data").unlink()
    with pytest.raises(ArtifactError, match="ext.onnx.data: no such file"):
        write_triton_repo(src, tmp_path / "repo2")
    assert not (tmp_path / "repo2").exists()


def test_labels_are_written_verbatim_and_line_breaks_refused(small_onnx, tmp_path):
    labels = ['a "quoted" cat', "ñandú", "#not a comment", "  spaced  ", "back\\slash", "", "7", "8", "9", "10"]

    def set_labels(values):
        return lambda meta, proto: meta["model"].__setitem__("labels", values)

    src = rewrite_onnx_metadata(small_onnx, tmp_path / "odd.onnx", set_labels(labels))
    out = write_triton_repo(src, tmp_path / "repo")
    assert (out / "odd" / "labels.txt").read_text(encoding="utf-8") == "".join(f"{label}\n" for label in labels)
    cfg, _ = parse_config(out / "odd" / "config.pbtxt")
    assert list(cfg.output[0].dims) == [10]
    for bad in ("two\nlines", "carriage\rreturn", "trailing\n"):
        src = rewrite_onnx_metadata(small_onnx, tmp_path / "bad.onnx", set_labels([bad, *labels[1:]]))
        with pytest.raises(ArtifactError, match="line break"):
            write_triton_repo(src, tmp_path / "bad-repo")
        assert not (tmp_path / "bad-repo").exists()


def test_batches_triton_cannot_send_are_refused(small_onnx, tmp_path):
    def min_two(meta, proto):
        meta["batch"]["min"] = 2

    def fixed(meta, proto):
        meta["batch"] = {"min": 1, "max": 1}
        proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1

    for change in (min_two, fixed):
        src = rewrite_onnx_metadata(small_onnx, tmp_path / "b.onnx", change)
        with pytest.raises(ExportError, match="Triton batches requests from 1 up"):
            write_triton_repo(src, tmp_path / "repo")


# -- plans -----------------------------------------------------------------------------------

def test_plan_repository_uses_the_profile_and_a_gpu(small_onnx, tmp_path):
    plan = fake_plan(small_onnx, tmp_path / "plans", profile=Profile(1, 4, 8))
    out = write_triton_repo(plan, tmp_path / "repo", instances=2)
    info = read_artifact(plan)
    cfg, pb = parse_config(out / "small" / "config.pbtxt")
    check_common(cfg, pb, info, out, "small")
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 8  # the profile's max
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]  # its opt, then its max
    assert cfg.instance_group[0].count == 2 and cfg.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    assert not cfg.HasField("optimization")
    assert (out / "small" / "1" / "model.plan").read_bytes() == b"not a real engine"
    assert not (out / "small" / "1" / "model.plan.json").exists()  # Triton needs no manifest
    text = (out / "small" / "config.pbtxt").read_text()
    assert "TensorRT 10.13.0.35 for NVIDIA H100 80GB HBM3 (compute capability 9.0" in text
    isvc = (out / "inferenceservice.yaml").read_text()
    assert 'nvidia.com/gpu: "1"' in isvc and "version-compatible" not in isvc

    out = write_triton_repo(plan, tmp_path / "repo6", max_batch=6)
    cfg, _ = parse_config(out / "small" / "config.pbtxt")
    assert cfg.max_batch_size == 6 and list(cfg.dynamic_batching.preferred_batch_size) == [4, 6]
    assert [wu.batch_size for wu in cfg.model_warmup] == [1, 6]


def test_version_compatible_plan_tells_triton_how_to_load_it(small_onnx, tmp_path):
    plan = fake_plan(small_onnx, tmp_path / "plans", profile=Profile(1, 4, 8), version_compatible=True)
    out = write_triton_repo(plan, tmp_path / "repo")
    assert "--backend-config=tensorrt,version-compatible=true" in (out / "small" / "config.pbtxt").read_text()
    assert '- "--backend-config=tensorrt,version-compatible=true"' in (out / "inferenceservice.yaml").read_text()


def test_plan_refusals(small_onnx, tmp_path):
    plan = fake_plan(small_onnx, tmp_path / "plans", profile=Profile(1, 4, 8))
    with pytest.raises(ConfigError, match="TensorRT engine already"):
        write_triton_repo(plan, tmp_path / "repo", tensorrt_accelerator="fp16")
    with pytest.raises(ConfigError, match=r"--max-batch 16 is outside the plan's profile 1..8"):
        write_triton_repo(plan, tmp_path / "repo", max_batch=16)
    manifest_path(plan).unlink()
    with pytest.raises(ArtifactError, match="manifest small.plan.json is missing"):
        write_triton_repo(plan, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


# -- options and the output folder -----------------------------------------------------------

@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "a/b", "a b", "ü", "x\ny"])
def test_bad_names_are_refused(small_onnx, tmp_path, name):
    with pytest.raises(ConfigError, match="--model-name"):
        write_triton_repo(small_onnx, tmp_path / "repo", name=name)
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("options, error, words", [
    (dict(instances=0), ConfigError, "--instances"),
    (dict(instances=-2), ConfigError, "--instances"),
    (dict(max_batch=0), ConfigError, "--max-batch 0 is outside the ONNX's batch range 1..8"),
    (dict(max_batch=9), ConfigError, "--max-batch 9 is outside"),
    (dict(preferred_batch=[0]), ConfigError, "--preferred-batch"),
    (dict(preferred_batch=[4, 9]), ConfigError, r"within 1..8"),
    (dict(max_batch=4, preferred_batch=[8]), ConfigError, r"within 1..4"),
    (dict(preferred_batch=[]), ConfigError, "--preferred-batch"),
    (dict(max_queue_delay_us=-1), ConfigError, "--max-queue-delay-us"),
    (dict(max_queue_delay_us=10**23), ConfigError, "--max-queue-delay-us"),  # config.pbtxt would not parse
    (dict(instances=999999999999), ConfigError, "--instances"),
    (dict(tensorrt_accelerator="int8"), ConfigError, "--tensorrt-accelerator"),
])
def test_bad_options_are_refused_on_one_line(small_onnx, tmp_path, options, error, words):
    with pytest.raises(error, match=words) as e:
        write_triton_repo(small_onnx, tmp_path / "repo", **options)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "repo").exists()


def test_parse_batch_list():
    assert parse_batch_list("4,8") == (4, 8) and parse_batch_list(None) is None and parse_batch_list("") is None
    with pytest.raises(ConfigError, match="comma-separated integers"):
        parse_batch_list("4,x")


def test_existing_folder_needs_force_and_force_replaces_only_a_repository(small_onnx, tmp_path):
    out = tmp_path / "repo"
    out.mkdir()
    assert write_triton_repo(small_onnx, out, name="first") == out  # an empty folder is fine
    with pytest.raises(OutputError, match="exists and is not empty.*--force") as e:
        write_triton_repo(small_onnx, out, name="second")
    assert "\n" not in str(e.value) and (out / "first" / "config.pbtxt").is_file()
    write_triton_repo(small_onnx, out, name="second", force=True)
    assert sorted(p.name for p in out.iterdir()) == ["inferenceservice.yaml", "second"]
    assert "name: second" in (out / "inferenceservice.yaml").read_text()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="replaces a model repository only.*notes.txt"):
        write_triton_repo(small_onnx, out, name="third", force=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "second").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="exists and is not a folder"):
        write_triton_repo(small_onnx, tmp_path / "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "repo"]  # no temp folders left


def test_a_failure_leaves_nothing_half_written(small_onnx, tmp_path, monkeypatch):
    out = tmp_path / "parent" / "repo"
    write_triton_repo(small_onnx, out, name="old")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(triton, "render_inference_service", boom)  # after the model, labels and config
    with pytest.raises(OSError):
        write_triton_repo(small_onnx, out, name="new", force=True)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(OSError):
        write_triton_repo(small_onnx, tmp_path / "parent" / "fresh")
    assert sorted(p.name for p in (tmp_path / "parent").iterdir()) == ["repo"]

    def meanwhile(m, out):  # another writer fills the folder while the repository is being built
        out.mkdir(exist_ok=True)
        (out / "theirs.txt").write_text("theirs")
        return render_inference_service(m, out)

    monkeypatch.setattr(triton, "render_inference_service", meanwhile)
    with pytest.raises(OutputError, match="cannot write it"):
        write_triton_repo(small_onnx, tmp_path / "parent" / "raced")
    assert [p.name for p in (tmp_path / "parent" / "raced").iterdir()] == ["theirs.txt"]
    shutil.rmtree(tmp_path / "parent" / "raced")

    monkeypatch.setattr(triton.shutil, "copyfile", boom)  # a full disk while copying the model
    with pytest.raises(OutputError, match="No space left"):
        write_triton_repo(small_onnx, tmp_path / "parent" / "fresh")
    assert sorted(p.name for p in (tmp_path / "parent").iterdir()) == ["repo"]


def test_inference_service_yaml_parses(small_onnx, tmp_path):
    import yaml

    out = write_triton_repo(small_onnx, tmp_path / "repo", name="9_Lives")
    doc = yaml.safe_load((out / "inferenceservice.yaml").read_text())
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1" and doc["kind"] == "InferenceService"
    assert doc["metadata"]["name"] == "crossvit-9-lives"  # a DNS-1035 name, from the model name
    model = doc["spec"]["predictor"]["model"]
    assert model["modelFormat"] == {"name": "triton"} and model["storageUri"] == "s3://YOUR-BUCKET/PATH"
    assert model["protocolVersion"] == "v2"


# -- the command -----------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crossvit")
    add_parser(parser.add_subparsers(dest="command"))
    return parser


def test_command_prints_one_line_per_file(small_onnx, tmp_path, capsys):
    args = _parser().parse_args(["triton-repo", str(small_onnx), "-o", str(tmp_path / "repo"), "--name", "m",
                                 "--instances", "2", "--max-batch", "8", "--preferred-batch", "2,8",
                                 "--max-queue-delay-us", "500", "--tensorrt-accelerator", "fp16"])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(line.startswith("wrote ") for line in lines)
    assert "m/1/model.onnx (onnxruntime_onnx, fp32)" in lines[0]
    assert "max_batch_size 8, preferred batch [2, 8], 2 x KIND_GPU, TensorRT fp16" in lines[1]
    assert "labels.txt (10 labels)" in lines[2] and "inferenceservice.yaml" in lines[3]
    cfg, _ = parse_config(tmp_path / "repo" / "m" / "config.pbtxt")
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500


@pytest.mark.parametrize("option", ["--model-name", "--name"])
def test_model_name_option_is_serves_and_name_still_works(small_onnx, tmp_path, option, capsys):
    """`serve` calls it --model-name, triton-repo called it --name: both spellings name the model."""
    args = _parser().parse_args(["triton-repo", str(small_onnx), "-o", str(tmp_path / "repo"), option, "mine"])
    assert args.func(args) == 0
    cfg, _ = parse_config(tmp_path / "repo" / "mine" / "config.pbtxt")
    assert cfg.name == "mine" and "mine/1/model.onnx" in capsys.readouterr().out


def test_a_bad_model_name_is_refused_in_one_line(small_onnx, tmp_path, cli, one_line_error):
    one_line_error(cli("triton-repo", small_onnx, "-o", tmp_path / "repo", "--model-name", "a b"),
                   "--model-name 'a b': a Triton model name here is letters", code=2)
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("option, value", [("--instances", "0"), ("--max-queue-delay-us", "-5"),
                                           ("--preferred-batch", "x")])
def test_a_malformed_option_value_exits_2_as_argparse_refusals_do(small_onnx, tmp_path, cli, one_line_error, option, value):
    one_line_error(cli("triton-repo", small_onnx, "-o", tmp_path / "repo", option, value), option, code=2)
    assert not (tmp_path / "repo").exists()


def test_command_help_names_every_option(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["triton-repo", "--help"])
    text = capsys.readouterr().out
    for option in ("--output", "--model-name", "--name", "--instances", "--max-batch", "--preferred-batch",
                   "--max-queue-delay-us", "--tensorrt-accelerator", "--force", "ARTIFACT"):
        assert option in text


def test_command_refusals_are_crossvit_errors(small_onnx, tmp_path):
    args = _parser().parse_args(["triton-repo", str(small_onnx), "-o", str(tmp_path / "r"), "--preferred-batch", "x"])
    with pytest.raises(CrossViTError, match="--preferred-batch"):
        cmd_triton_repo(args)


def test_wired_cli_reports_errors_on_one_line(small_onnx, tmp_path, cli, one_line_error):
    proc = cli("triton-repo", small_onnx, "-o", tmp_path / "repo", "--max-batch", "99")
    one_line_error(proc, "--max-batch 99 is outside")
    proc = cli("triton-repo", small_onnx, "-o", tmp_path / "repo")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 4 and (tmp_path / "repo" / "small" / "config.pbtxt").is_file()
