"""Inputs a careless or hostile user hands us, one test each: one clear line and a non-zero exit
(or a clear exception from the API), never a traceback, a huge allocation, a hang, output that
is not JSON, a forged line of output, or a half-written file."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_SEED, random_png, rewrite_onnx_metadata
from crossvit.contract import FORMAT_VERSION, METADATA_KEY, encode_metadata
from crossvit.errors import ArtifactError, CheckpointError, ConfigError, InputError
from crossvit.files import TEMP_TAG


def _strict_json(line: str):
    """json.loads that refuses NaN/Infinity, as RFC 8259 parsers do."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(line, parse_constant=refuse)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A TINY_SEED checkpoint with 3 classes and its ONNX export."""
    from crossvit.export.onnx import BatchRange, export_onnx
    from crossvit.model import CrossViT, load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny")
    model = CrossViT(**{**TINY_SEED, "num_classes": 3})
    ckpt = save_checkpoint(model, root / "tiny.safetensors", labels=["a", "b", "c"],
                           preprocessing={"input_size": [3, 32, 32], "crop_pct": 1.0})
    onnx_path = export_onnx(load_checkpoint(ckpt), root / "tiny.onnx", batch=BatchRange(1, 4)).path
    return ckpt, onnx_path


# -- untrusted configs and weights --------------------------------------------------------------

def test_config_asking_for_a_huge_model_is_refused_before_allocating(tmp_path, one_line_error):
    from safetensors.torch import save_file

    from crossvit.model import get_spec

    meta = {"format": "crossvit-checkpoint", "format_version": 1, "architecture": "seed", "name": None,
            "config": {**get_spec("crossvit_digits").config, "sm_dim": 4096, "sm_enc_mlp_dim": 65536},
            "labels": [str(i) for i in range(10)], "preprocessing": {"input_size": [3, 32, 32]},
            "provenance": {}}
    path = tmp_path / "bomb.safetensors"
    save_file({"sm_mlp_head.0.weight": torch.zeros(4)}, str(path), metadata={METADATA_KEY: json.dumps(meta)})
    assert path.stat().st_size < 3000
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "crossvit", "info", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak_kb = 0
    while proc.poll() is None:  # the child's high-water mark of resident memory, read while it runs
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peak_kb = max(peak_kb, int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1]))
        except (OSError, StopIteration):
            pass
        time.sleep(0.02)
    out, err = proc.communicate()
    elapsed = time.perf_counter() - start
    one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), "does not fit")
    # torch + onnx imported weigh ~0.5 GB; the model the config asks for would be 4.4 GB
    assert 0 < peak_kb / 1024 < 1500, peak_kb
    assert elapsed < 60


def test_config_over_the_parameter_limit_is_refused_on_the_meta_device():
    from crossvit.model.checkpoint import _meta_state_dict
    from crossvit.model.registry import get_architecture, get_spec

    cfg = {**get_spec("crossvit_digits").config, "sm_dim": 100_000, "sm_enc_mlp_dim": 400_000, "sm_enc_depth": 40}
    with pytest.raises(ConfigError, match="parameters; the limit is"):
        _meta_state_dict(get_architecture("seed"), cfg)


def _capped(*args, cwd, limit_gb: float = 6, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m crossvit ARGS` with its address space capped (RLIMIT_AS) and a timeout, so a
    command that allocates without bound fails (MemoryError) instead of eating the machine. 6 GB:
    the refusal peaks at ~0.7 GB of address space with CPU torch; a CUDA build maps more."""
    import resource

    def cap():
        limit = int(limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return subprocess.run([sys.executable, "-m", "crossvit", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, preexec_fn=cap)


@pytest.mark.parametrize("command", [["info"], ["convert", "-o", "out.safetensors"], ["export", "-o", "out.onnx"]])
def test_a_tiny_config_asking_for_a_billion_classes_is_refused_before_allocating(tmp_path, command,
                                                                                one_line_error):
    """A 100-byte --config for a foreign checkpoint used to build its billion labels first
    (~280 MB/s until killed); now the parameter limit refuses it before anything is built."""
    torch.save({"w": torch.zeros(4)}, tmp_path / "f.pt")
    config = {"image_size": 32, "num_classes": 1_000_000_000, "sm_dim": 1_000_000, "lg_dim": 1_000_000,
              "sm_patch_size": 4, "lg_patch_size": 8}
    (tmp_path / "big.json").write_text(json.dumps(config))
    proc = _capped(command[0], "f.pt", *command[1:], "--config", "big.json", cwd=tmp_path)
    one_line_error(proc, "parameters; the limit is")
    assert not (tmp_path / command[-1]).exists() or command == ["info"]


@pytest.mark.parametrize("value", ['"abc"', "[1]", "1e400", "true", "-3"])
def test_a_config_with_num_classes_of_the_wrong_type_is_one_config_error(tmp_path, value, one_line_error):
    torch.save({"w": torch.zeros(4)}, tmp_path / "f.pt")
    (tmp_path / "c.json").write_text('{"image_size": 32, "sm_dim": 32, "lg_dim": 48, "sm_patch_size": 4, '
                                     f'"lg_patch_size": 8, "num_classes": {value}}}')
    proc = _capped("info", "f.pt", "--config", "c.json", cwd=tmp_path)
    one_line_error(proc, "num_classes=")  # a ConfigError: exit 1, not an internal error (70)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_load_with_the_tensor_name(tmp_path, tiny, value, cli, one_line_error):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tiny[0]), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    tensors["sm_mlp_head.1.weight"][0, 0] = value
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    from crossvit.model import load_checkpoint

    with pytest.raises(CheckpointError, match=r"sm_mlp_head\.1\.weight holds NaN or infinite values"):
        load_checkpoint(bad)
    one_line_error(cli("export", bad, "-o", tmp_path / "bad.onnx"), "NaN or infinite")
    assert not (tmp_path / "bad.onnx").exists()


def test_saving_a_model_with_non_finite_weights_is_refused(tmp_path):
    from crossvit.model import CrossViT, save_checkpoint

    model = CrossViT(**TINY_SEED)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        save_checkpoint(model, tmp_path / "m.safetensors", labels=[str(i) for i in range(7)])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_infer_refuses_non_finite_input(tiny, value):
    from crossvit.runtime.session import open_session

    x = np.zeros((3, 3, 32, 32), np.float32)
    x[1, 0, 5, 5] = value
    with open_session(tiny[1]) as s, pytest.raises(InputError, match="NaN or infinite values .*image 1"):
        s.infer(x)


def test_predict_json_is_valid_json_even_when_the_model_overflows(tmp_path, cli):
    """A (finite) model whose logits overflow to inf: the image gets an error, the line stays JSON."""
    from crossvit.export.onnx import BatchRange, export_onnx
    from crossvit.model import CrossViT, load_checkpoint, save_checkpoint

    model = CrossViT(**{**TINY_SEED, "num_classes": 3})
    with torch.no_grad():
        for head in (model.sm_mlp_head[1], model.lg_mlp_head[1]):
            head.weight.fill_(3e38)
    ckpt = save_checkpoint(model, tmp_path / "hot.safetensors", labels=["a", "b", "c"],
                           preprocessing={"input_size": [3, 32, 32], "crop_pct": 1.0})
    onnx_path = export_onnx(load_checkpoint(ckpt), tmp_path / "hot.onnx", batch=BatchRange(1, 4)).path
    proc = cli("predict", onnx_path, random_png(tmp_path / "x.png"), "--json")
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    record = _strict_json(lines[0])
    assert "non-finite" in record["error"] and proc.returncode == 1


def test_to_json_never_writes_nan():
    from crossvit.contract import to_json

    assert _strict_json(to_json({"p": float("nan"), "q": [float("inf"), 1.0], "r": np.float32(np.nan)})) == \
        {"p": None, "q": [None, 1.0], "r": None}


# -- argument values ---------------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["--batch", "-1"], "--batch: expected an integer >= 1, got -1"),
    (["--batch", "0"], "--batch: expected an integer >= 1, got 0"),
    (["--top-k", "0"], "--top-k: expected an integer >= 1, got 0"),
    (["--top-k", "two"], "--top-k: expected an integer >= 1, got 'two'"),
])
def test_predict_refuses_bad_numbers_in_one_line(tiny, tmp_path, cli, one_line_error, args, words):
    proc = cli("predict", tiny[1], random_png(tmp_path / "x.png"), *args)
    one_line_error(proc, words, code=2)
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1


def test_predict_api_refuses_bad_numbers(tiny, tmp_path):
    from crossvit.runtime.session import open_session

    img = random_png(tmp_path / "x.png")
    with open_session(tiny[1]) as s:
        for kwargs in ({"top_k": 0}, {"top_k": -3}, {"batch_size": -1}, {"batch_size": 0}):
            with pytest.raises(ConfigError):
                s.predict([img], **kwargs)


def test_export_refuses_an_absurd_batch_range_before_exporting(tmp_path, cli, one_line_error):
    proc = cli("export", "-o", tmp_path / "x.onnx", "--batch", "1:99999999999999999999")
    one_line_error(proc, "over the limit")
    assert "exporting" not in proc.stderr and list(tmp_path.iterdir()) == []


# -- output paths ------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [
    ["export", "-o", "{dir}"],
    ["export", "--precision", "int8-cpu", "-o", "{dir}"],
    ["convert", "-o", "{dir}"],
    ["export", "-o", "/proc/crossvit-test/x.onnx"],
    ["export", "-o", "/proc/x.onnx"],
    ["check", "{onnx}", "--json", "{dir}"],
    ["deploy", "-o", "{file}"],
    ["export", "-o", "{long}"],  # fits, but its temporary name beside it would not
    ["export", "-o", "{loop}/x.onnx"],
    ["deploy", "-o", "{loop}"],
    ["check", "{onnx}", "--json", "{onnx}"],  # would replace the artifact with the report
    ["check", "{onnx}", "--json", "/dev/null"],  # as root, would replace /dev/null itself
])
def test_unwritable_outputs_are_refused_before_any_work(tiny, tmp_path, cli, one_line_error, command):
    folder = tmp_path / "existing.onnx"
    folder.mkdir()
    (tmp_path / "file").write_text("x")
    os.symlink("loop", tmp_path / "loop")
    long = tmp_path / ("a" * 240 + ".onnx")
    args = [a.format(dir=folder, onnx=tiny[1], file=tmp_path / "file", loop=tmp_path / "loop", long=long)
            for a in command]
    if command[0] == "convert":
        folder = tmp_path / "existing.safetensors"
        folder.mkdir()
        args[-1] = str(folder)
    proc = cli(*args, timeout=120)
    line = one_line_error(proc, "")
    assert any(w in line for w in ("is a directory", "cannot write there", "is not a folder", "fit here",
                                   "is an input of this command", "is not a regular file")), line
    assert "internal error" not in line
    assert "exporting" not in proc.stderr and "random inputs" not in proc.stderr  # refused before the work


def test_convert_refuses_to_overwrite_its_own_input(tiny, tmp_path, cli, one_line_error):
    import shutil

    ckpt = shutil.copy(tiny[0], tmp_path / "m.safetensors")
    before = Path(ckpt).read_bytes()
    os.symlink("m.safetensors", tmp_path / "alias.safetensors")
    for out in (ckpt, tmp_path / "alias.safetensors"):
        one_line_error(cli("convert", ckpt, "-o", out, timeout=120), "is an input of this command")
    assert Path(ckpt).read_bytes() == before


@pytest.mark.slow
def test_int8_cpu_export_creates_a_missing_folder_like_fp32(tmp_path, cli):
    for precision in ("fp32", "int8-cpu"):
        out = tmp_path / precision / "new" / "dir" / "x.onnx"
        proc = cli("export", "--precision", precision, "-o", out)
        assert proc.returncode == 0, proc.stderr
        assert out.is_file() and oct(out.stat().st_mode & 0o777) == "0o644"


def test_variants_are_written_0644(tmp_path, tiny):
    from crossvit.export.precision import convert_precision

    out = convert_precision(tiny[1], tmp_path / "t.int8-cpu.onnx", "int8-cpu", None)
    assert oct(out.stat().st_mode & 0o777) == "0o644"


# -- metadata that lies about the graph ---------------------------------------------------------

@pytest.mark.parametrize("name, change, words", [
    ("input name", lambda m: m["inputs"][0].update(name="pixels"), "it names input 'pixels'"),
    ("output name", lambda m: m["outputs"][0].update(name="probs"), "it names output 'probs'"),
    ("shape", lambda m: (m["inputs"][0].update(shape=["batch", 3, 64, 64]),
                         m["model"]["preprocessing"].update(input_size=[3, 64, 64])), "the metadata says"),
    ("channels", lambda m: (m["inputs"][0].update(shape=["batch", 1, 32, 32]),
                            m["model"]["preprocessing"].update(input_size=[1, 32, 32], mean=[0.5], std=[0.5])),
     "the metadata says"),
    ("labels", lambda m: m["model"].update(labels=["a", "b", "c", "d"]), "the metadata has 4 labels"),
    ("inconsistent", lambda m: m["inputs"][0].update(shape=["batch", 3, 64, 64]), "inconsistent"),
    ("newer format", lambda m: m.update(format_version=FORMAT_VERSION + 1), "upgrade crossvit"),
])
def test_metadata_is_checked_against_the_graph(tiny, tmp_path, cli, one_line_error, name, change, words):
    from crossvit.runtime.session import open_session

    bad = rewrite_onnx_metadata(tiny[1], tmp_path / "lying.onnx", lambda meta, _: change(meta))
    with pytest.raises(ArtifactError, match=words):
        open_session(bad)
    proc = cli("predict", bad, random_png(tmp_path / "x.png"))
    one_line_error(proc, words)


@pytest.mark.parametrize("name, change, words", [
    ("precision fp4", lambda m: m.update(precision="fp4"), "unknown precision 'fp4'"),  # check refuses it too
    ("10 MB label", lambda m: m["model"].update(labels=["a" * 10_000_000, "b", "c"]),
     "labels[0] is 10000000 characters long"),
    ("std 1e308", lambda m: m["model"]["preprocessing"].update(std=[1e308] * 3), "std must be finite in float32"),
    ("std 1e-50", lambda m: m["model"]["preprocessing"].update(std=[1e-50] * 3), "std must be >= 1e-06"),
    ("mean 1e300", lambda m: m["model"]["preprocessing"].update(mean=[1e300] * 3), "mean must be finite in float32"),
    ("crop_pct 1e-9", lambda m: m["model"]["preprocessing"].update(crop_pct=1e-9), "crops less than one pixel"),
])
def test_predict_refuses_absurd_metadata_in_one_line(tiny, tmp_path, cli, one_line_error, name, change, words):
    bad = rewrite_onnx_metadata(tiny[1], tmp_path / "absurd.onnx", lambda meta, _: change(meta))
    proc = cli("predict", bad, random_png(tmp_path / "x.png"))
    one_line_error(proc, words)
    assert proc.stdout == "" and len(proc.stderr) < 1000


def test_a_label_over_the_length_limit_is_refused_when_saving(tmp_path):
    from crossvit.model import CrossViT, save_checkpoint

    with pytest.raises(ConfigError, match="label 1 is 5000 characters long"):
        save_checkpoint(CrossViT(**{**TINY_SEED, "num_classes": 2}), tmp_path / "m.safetensors",
                        labels=["a", "b" * 5000])


def _rewrite_metadata_text(src: Path, dst: Path, edit) -> Path:
    """Like `_rewrite_metadata`, but `edit(text) -> text` on the raw JSON (to write what
    `encode_metadata` refuses: Infinity, 1e400, absurd nesting)."""
    import onnx

    proto = onnx.load(str(src))
    for p in proto.metadata_props:
        if p.key == METADATA_KEY:
            p.value = edit(p.value)
    onnx.save(proto, str(dst))
    return dst


_DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("name, edit, words", [
    ("Infinity", lambda t: t.replace('"max":4', '"max":Infinity'), "Infinity is not a JSON number"),
    ("1e400", lambda t: t.replace('"max":4', '"max":1e400'), "1e400 is out of range"),
    ("float batch", lambda t: t.replace('"max":4', '"max":4.0'), "batch.max must be an integer"),
    ("provenance list", lambda t: json.dumps({**json.loads(t), "model": {**json.loads(t)["model"], "provenance": [1]}}),
     "model.provenance must be an object"),
    ("source string", lambda t: json.dumps({**json.loads(t), "source": "abc"}), "source must be an object"),
    ("model list", lambda t: json.dumps({**json.loads(t), "model": [1]}), "model must be an object"),
    ("labels string", lambda t: json.dumps({**json.loads(t), "model": {**json.loads(t)["model"], "labels": "abc"}}),
     "model.labels must be a list"),
    ("deep nesting", lambda t: _DEEP, "nested too deeply"),
    ("deep exporter", lambda t: json.dumps({**json.loads(t), "exporter": json.loads("[" * 500 + "]" * 500)}),
     "nested more than"),
])
def test_metadata_of_the_wrong_types_is_refused_in_one_line(tiny, tmp_path, name, edit, words):
    from crossvit.runtime.artifact import read_artifact
    from crossvit.runtime.session import open_session

    bad = _rewrite_metadata_text(tiny[1], tmp_path / "typed.onnx", edit)
    with pytest.raises(ArtifactError, match=f"typed.onnx: crossvit metadata .*{words}"):
        read_artifact(bad)
    with pytest.raises(ArtifactError, match=words):
        open_session(bad)


@pytest.mark.parametrize("command", ["info", "check"])
def test_metadata_of_the_wrong_types_is_one_line_from_the_cli(tiny, tmp_path, cli, one_line_error, command):
    bad = _rewrite_metadata_text(tiny[1], tmp_path / "src.onnx",
                                 lambda t: json.dumps({**json.loads(t), "source": "abc"}))
    one_line_error(cli(command, bad), "src.onnx: crossvit metadata is invalid: source must be an object")


def _engine_manifest_beside(tiny_onnx: Path, plan: Path, change) -> Path:
    """A fake engine `plan` (not runnable) with a manifest made from the ONNX's metadata."""
    import onnx

    meta = json.loads({p.key: p.value for p in onnx.load(str(tiny_onnx)).metadata_props}[METADATA_KEY])
    meta["format"] = "crossvit-engine"
    text = change(meta)
    plan.write_bytes(b"not an engine")
    plan.with_name(plan.name + ".json").write_text(text if isinstance(text, str) else json.dumps(meta))
    return plan


@pytest.mark.parametrize("change, words", [
    (lambda m: m.update(source="abc"), "source must be an object"),
    (lambda m: _DEEP, "nested too deeply"),
    (lambda m: m.update(device={"compute_capability": "8.0"}), "device.compute_capability"),
])
def test_an_engine_manifest_of_the_wrong_types_is_refused(tiny, tmp_path, change, words):
    from crossvit.runtime.session import open_session

    plan = _engine_manifest_beside(tiny[1], tmp_path / "m.plan", change)
    with pytest.raises(ArtifactError, match=f"m.plan.json: crossvit metadata .*{words}"):
        open_session(plan)  # the engine path and the ONNX fallback both read the manifest


def test_a_broken_cpu_variant_beside_a_good_onnx_is_skipped(tiny, tmp_path):
    import shutil

    from crossvit.runtime.cpu_choice import choose_cpu_path
    from crossvit.runtime.session import open_session

    good = shutil.copy(tiny[1], tmp_path / "m.onnx")
    variant = _rewrite_metadata_text(tiny[1], tmp_path / "m.int8-cpu.onnx", lambda t: json.dumps(
        {**json.loads(t), "precision": "int8-cpu", "source": "abc"}))
    (tmp_path / "m.int8-cpu.parity.json").write_text(json.dumps({"verdict": "pass"}))
    assert variant.is_file() and choose_cpu_path(Path(good)) is None
    with open_session(good, device="cpu") as s:
        assert s.chosen is None and s.info.path == Path(good)
    (tmp_path / "m.int8-cpu.parity.json").write_text(_DEEP)  # a hostile report is skipped too
    assert choose_cpu_path(Path(good)) is None
    (tmp_path / "m.int8-cpu.parity.json").unlink()
    os.mkfifo(tmp_path / "m.int8-cpu.parity.json")  # reading it would hang predict/serve for ever
    assert choose_cpu_path(Path(good)) is None


def test_a_deeply_nested_config_file_is_refused(tmp_path):
    from crossvit.model import load_checkpoint

    torch.save({"w": torch.zeros(2)}, tmp_path / "f.pth")
    (tmp_path / "deep.json").write_text(_DEEP)
    with pytest.raises(ConfigError, match="deep.json: not a JSON config .nested too deeply"):
        load_checkpoint(tmp_path / "f.pth", config=tmp_path / "deep.json")
    os.mkfifo(tmp_path / "fifo.json")  # would hang
    with pytest.raises(ConfigError, match="fifo.json: is not a regular file"):
        load_checkpoint(tmp_path / "f.pth", config=tmp_path / "fifo.json")
    (tmp_path / "big.json").write_text("[" + "0," * 600_000 + "0]")
    with pytest.raises(ConfigError, match="big.json: .* bytes is not a config"):
        load_checkpoint(tmp_path / "f.pth", config=tmp_path / "big.json")


@pytest.mark.parametrize("labels", [["a", "b"], ["a", "b", "c", "d"]], ids=["more columns", "fewer columns"])
def test_logits_that_do_not_match_the_labels_are_refused_at_run_time(tiny, tmp_path, labels):
    """The graph's class dim made symbolic passes the load-time check; its 3 columns must still
    not be labelled with 2 or 4 labels (an IndexError, or silently wrong probabilities)."""
    import onnx

    from crossvit.runtime.session import open_session

    proto = onnx.load(str(tiny[1]))
    dim = proto.graph.output[0].type.tensor_type.shape.dim[1]
    dim.ClearField("dim_value")
    dim.dim_param = "classes"
    meta = json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])
    meta["model"]["labels"] = labels
    for p in proto.metadata_props:
        if p.key == METADATA_KEY:
            p.value = encode_metadata(meta)
    bad = tmp_path / "classes.onnx"
    onnx.save(proto, str(bad))
    img = random_png(tmp_path / "x.png")
    with open_session(bad, exact=True) as s:
        with pytest.raises(ArtifactError, match=rf"classes.onnx: the model gave logits of shape \(1, 3\), "
                                                rf"expected \(1, {len(labels)}\)"):
            s.predict(img)
        with pytest.raises(ArtifactError, match="logits of shape"):
            s.infer(np.zeros((6, 3, 32, 32), np.float32))  # split into chunks of the batch max, 4


def test_logits_mismatch_is_one_line_from_the_cli(tiny, tmp_path, cli, one_line_error):
    import onnx

    proto = onnx.load(str(tiny[1]))
    dim = proto.graph.output[0].type.tensor_type.shape.dim[1]
    dim.ClearField("dim_value")
    dim.dim_param = "classes"
    meta = json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])
    meta["model"]["labels"] = ["a", "b"]
    for p in proto.metadata_props:
        if p.key == METADATA_KEY:
            p.value = encode_metadata(meta)
    onnx.save(proto, str(tmp_path / "more.onnx"))
    one_line_error(cli("predict", tmp_path / "more.onnx", random_png(tmp_path / "x.png"), "--exact"),
                   "the model gave logits of shape (1, 3)")


def test_checkpoint_from_a_newer_format_asks_for_an_upgrade(tiny, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from crossvit.model import load_checkpoint

    with safe_open(str(tiny[0]), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()[METADATA_KEY])
    meta["format_version"] = FORMAT_VERSION + 1
    save_file(tensors, str(tmp_path / "new.safetensors"), metadata={METADATA_KEY: json.dumps(meta)})
    with pytest.raises(CheckpointError, match="newer crossvit .*upgrade crossvit"):
        load_checkpoint(tmp_path / "new.safetensors")


# -- text that would forge output ---------------------------------------------------------------

def test_labels_and_file_names_with_control_characters_are_escaped(tmp_path, cli):
    from crossvit.export.onnx import BatchRange, export_onnx
    from crossvit.model import CrossViT, load_checkpoint, save_checkpoint

    evil = ["ok\nforged.png  cat 99.00%", "\x1b[31mred\x1b[0m", "c"]
    ckpt = save_checkpoint(CrossViT(**{**TINY_SEED, "num_classes": 3}), tmp_path / "m.safetensors", labels=evil,
                           preprocessing={"input_size": [3, 32, 32], "crop_pct": 1.0})
    onnx_path = export_onnx(load_checkpoint(ckpt), tmp_path / "m.onnx", batch=BatchRange(1, 4)).path
    img = random_png(tmp_path / "we\nird\x1b[2J.png")
    proc = cli("predict", onnx_path, img, "--top-k", "3")
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout + proc.stderr
    assert len(proc.stdout.splitlines()) == 1  # one image, one line
    assert "\\n" in proc.stdout and "\\x1b[31mred" in proc.stdout
    # --json keeps the real strings (JSON escapes them itself)
    record = _strict_json(cli("predict", onnx_path, img, "--json", "--top-k", "3").stdout)
    assert {t["label"] for t in record["top"]} == set(evil) and record["source"] == str(img)
    # the "wrote PATH" lines too
    proc = cli("check", onnx_path, "--reference", ckpt, "--batch-sizes", "1", "--json", tmp_path / "re\nport.json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == f"wrote {tmp_path}/re\\nport.json"


# -- interrupted writes -------------------------------------------------------------------------

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.slow
def test_sigterm_during_export_leaves_nothing_behind(tmp_path):
    tmp, out = tmp_path / "tmp", tmp_path / "out"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = subprocess.Popen([sys.executable, "-m", "crossvit", "export", "--precision", "int8-cpu",
                             "-o", out / "x.onnx"], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while not _temp_files(tmp, out):  # wait until the export has written something it must clean up
        assert proc.poll() is None and time.monotonic() < deadline, "the export never wrote a temp file"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 143, rest
    assert "terminated" in rest and "Traceback" not in rest
    assert [p for p in tmp.iterdir() if "crossvit" in p.name] == []  # (torch keeps its own caches there)
    assert not out.exists() or list(out.iterdir()) == []


def _temp_files(*folders: Path) -> list[Path]:
    return [p for folder in folders if folder.is_dir() for p in folder.iterdir() if TEMP_TAG in p.name]


@pytest.mark.slow
def test_leftovers_of_a_killed_run_are_removed_by_the_next_one(tmp_path, cli):
    tmp, out = tmp_path / "tmp", tmp_path / "out"
    tmp.mkdir()
    out.mkdir()
    pid = _dead_pid()
    stale = [out / f".x.onnx.{TEMP_TAG}-{pid}-abcd", tmp / f"{TEMP_TAG}-{pid}-efgh"]
    for d in stale:
        d.mkdir()
        (d / "x.onnx").write_bytes(b"half")
    alive = out / f".y.onnx.{TEMP_TAG}-{os.getpid()}-ijkl"  # a live writer's: kept
    alive.write_bytes(b"")
    proc = subprocess.run([sys.executable, "-m", "crossvit", "export", "--precision", "int8-cpu", "-o",
                           out / "x.onnx"], capture_output=True, text=True, env={**os.environ, "TMPDIR": str(tmp)})
    assert proc.returncode == 0, proc.stderr
    assert not any(d.exists() for d in stale) and alive.exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(["x.onnx", alive.name])


# -- messages that say what the file is ----------------------------------------------------------

@pytest.mark.parametrize("name, content, words", [
    ("random.pth", os.urandom(4096), "not a PyTorch checkpoint or a safetensors file"),
    ("notes.pt", b"just some notes\nabout a model\n", "a text file, not a checkpoint"),
    ("config.bin", b'{"sm_dim": 64}', "a JSON or text file, not a checkpoint"),
])
def test_files_that_are_not_checkpoints_are_named_for_what_they_are(tmp_path, name, content, words):
    from crossvit.model import load_checkpoint

    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=words) as e:
        load_checkpoint(tmp_path / name, name="crossvit_digits")
    assert "Python objects" not in str(e.value)


@pytest.mark.parametrize("suffix", [".onnx", ".pth"])
def test_an_onnx_given_as_a_checkpoint_is_called_an_onnx_model(tiny, tmp_path, suffix):
    from crossvit.model import load_checkpoint

    path = tmp_path / f"model{suffix}"
    path.write_bytes(tiny[1].read_bytes())
    with pytest.raises(CheckpointError, match="an ONNX model, not a checkpoint"):
        load_checkpoint(path, name="crossvit_digits")


def test_legacy_pickle_refusal_prints_no_torch_warning(tmp_path, cli, one_line_error):
    import argparse

    torch.save({"model": argparse.Namespace(w=torch.zeros(2))}, tmp_path / "obj.pth",
               _use_new_zipfile_serialization=False)
    proc = cli("info", tmp_path / "obj.pth", "--model", "crossvit_digits")
    one_line_error(proc, "refused")
    assert "Warning" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("obj", [{1: torch.zeros(2)}, {"model": {1: torch.zeros(2), 2: torch.ones(2)}}],
                         ids=["top level", "nested"])
def test_a_state_dict_with_keys_that_are_not_names_is_refused(tmp_path, obj):
    from crossvit.model import load_checkpoint

    torch.save(obj, tmp_path / "intkey.pth")
    with pytest.raises(CheckpointError, match="intkey.pth: no state dict found"):
        load_checkpoint(tmp_path / "intkey.pth", name="crossvit_digits")


def test_a_checkpoint_whose_preprocessing_does_not_fit_its_model_is_refused(tmp_path):
    from crossvit.model import CrossViT, load_checkpoint, save_checkpoint

    ckpt = save_checkpoint(CrossViT(**{**TINY_SEED, "num_classes": 3}), tmp_path / "pp.safetensors",
                           labels=["a", "b", "c"], preprocessing={"input_size": [3, 64, 64]})
    with pytest.raises(CheckpointError, match=r"pp.safetensors: its preprocessing input_size \[3, 64, 64\] "
                                              r"does not fit the model, which takes \[3, 32, 32\]"):
        load_checkpoint(ckpt)


def test_wrong_model_name_for_a_foreign_checkpoint_names_the_one_that_fits(tmp_path):
    from crossvit.model import create_model, load_checkpoint

    torch.save({"model": create_model("crossvit_tiny_240").state_dict()}, tmp_path / "ibm.pth")
    with pytest.raises(CheckpointError, match=r"does not fit 'crossvit_small_240': shape mismatch .*"
                                              r"The file fits crossvit_tiny_240: use --model crossvit_tiny_240"):
        load_checkpoint(tmp_path / "ibm.pth", name="crossvit_small_240")


# -- random weights are said to be random -------------------------------------------------------

@pytest.mark.slow
def test_random_weights_are_announced_recorded_and_warned_about(tmp_path, cli, one_line_error):
    proc = cli("export", "--model", "crossvit_tiny_240", "--batch", "1:2", "-o", tmp_path / "t.onnx")
    assert proc.returncode == 0, proc.stderr
    assert "no checkpoint: random weights, for speed measurements only" in proc.stderr
    from crossvit.runtime.artifact import read_artifact

    info = read_artifact(tmp_path / "t.onnx")
    assert info.random_weights and info.raw["source"]["random_weights"] is True
    assert info.model["provenance"]["init_seed"] == 0 and len(info.model["provenance"]["weights_sha256"]) == 64
    # --init-seed draws other weights, recorded; a model with weights refuses it rather than ignore it
    proc = cli("export", "--model", "crossvit_tiny_240", "--init-seed", "1", "--batch", "1:2", "-o", tmp_path / "s.onnx")
    assert proc.returncode == 0, proc.stderr
    seeded = read_artifact(tmp_path / "s.onnx").model["provenance"]
    assert seeded["init_seed"] == 1 and seeded["weights_sha256"] != info.model["provenance"]["weights_sha256"]
    shown = cli("info", tmp_path / "s.onnx")
    assert shown.returncode == 0 and '"init_seed": 1' in shown.stdout, shown.stdout
    one_line_error(cli("export", "--model", "crossvit_digits", "--init-seed", "1", "-o", tmp_path / "d.onnx"),
                   "crossvit_digits has weights", code=2)
    assert not (tmp_path / "d.onnx").exists()
    proc = cli("predict", tmp_path / "t.onnx", random_png(tmp_path / "x.png"))
    assert proc.returncode == 0 and "random weights" in proc.stderr and "mean nothing" in proc.stderr


def test_a_trained_model_gets_no_random_weights_warning(tiny, tmp_path, cli):
    proc = cli("predict", tiny[1], random_png(tmp_path / "x.png"))
    assert proc.returncode == 0 and "random" not in proc.stderr


# -- smaller ones -------------------------------------------------------------------------------

def test_a_fifo_given_as_an_image_is_refused_without_hanging(tiny, tmp_path, cli):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    proc = cli("predict", tiny[1], fifo, timeout=60)
    assert proc.returncode == 1 and "not a regular file" in proc.stdout


def test_a_fifo_given_as_a_checkpoint_or_artifact_is_refused(tmp_path, cli, one_line_error):
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    one_line_error(cli("info", fifo, timeout=60), "not a regular file")
    one_line_error(cli("export", fifo, "-o", tmp_path / "x.onnx", timeout=60), "not a regular file")


def test_a_symlink_loop_is_called_a_symlink_loop_not_a_missing_file(tiny, tmp_path, cli, one_line_error):
    os.symlink("b.onnx", tmp_path / "a.onnx")
    os.symlink("a.onnx", tmp_path / "b.onnx")
    one_line_error(cli("predict", tmp_path / "a.onnx", random_png(tmp_path / "x.png"), timeout=120), "is a symlink loop")
    one_line_error(cli("info", tmp_path / "a.onnx", timeout=120), "is a symlink loop")
    os.symlink("loop.png", tmp_path / "loop.png")
    proc = cli("predict", tiny[1], tmp_path / "loop.png", timeout=120)
    assert proc.returncode == 1 and "loop.png: is a symlink loop" in proc.stdout, proc.stdout


def test_check_refuses_a_missing_images_folder_before_any_case(tiny, tmp_path, cli, one_line_error):
    proc = cli("check", tiny[1], "--reference", tiny[0], "--images", tmp_path / "missing", timeout=300)
    one_line_error(proc, "missing: no such folder")
    assert "random inputs" not in proc.stderr and proc.stdout == ""  # refused before the first case


def test_triton_repo_refuses_an_overlong_name_up_front(tiny, tmp_path, cli, one_line_error):
    from crossvit.files import TEMP_TAG

    proc = cli("triton-repo", tiny[1], "-o", tmp_path / "repo", "--name", "a" * 300, timeout=120)
    line = one_line_error(proc, "--model-name is 300 characters long; a model name may have at most 128",
                          code=2)  # a malformed option value, as argparse refuses one
    assert TEMP_TAG not in line and not (tmp_path / "repo").exists()


def test_session_predict_accepts_one_path(tiny, tmp_path):
    from crossvit.runtime.session import open_session

    img = random_png(tmp_path / "x.png")
    with open_session(tiny[1]) as s:
        one, many = s.predict(str(img)), s.predict([img])
    assert len(one) == 1 and one[0].ok and one[0].indices == many[0].indices


def test_api_misuse_gets_the_projects_errors(tiny):
    """open_session and predict given things that are not paths or images: our error classes
    with a clear message, not a builtin TypeError; numpy integers are integers."""
    from crossvit.runtime.session import open_session

    for bad in (None, 3, b"m.onnx"):
        with pytest.raises(ArtifactError, match="needs a path"):
            open_session(bad)
    with open_session(tiny[1]) as s:
        for bad in (None, 5):
            with pytest.raises(InputError, match="images must be"):
                s.predict(bad)
        img = random_png(Path(tiny[1]).parent / "api.png")
        assert len(s.predict([img], top_k=np.int64(2), batch_size=np.int32(1))[0].labels) == 2
