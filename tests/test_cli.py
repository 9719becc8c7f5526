"""The `crossvit` command: models, info, convert; errors are one line, never a traceback."""

import json

import numpy as np
import pytest
import torch

from conftest import REPO, random_png
from crossvit.model import load_checkpoint


def test_models_lists_every_registered_name_with_parameter_counts_and_flops(cli):
    proc = cli("models")
    assert proc.returncode == 0, proc.stderr
    assert "crossvit_digits" in proc.stdout and "[weights shipped]" in proc.stdout
    line = next(l for l in proc.stdout.splitlines() if l.startswith("crossvit_15_240 "))
    assert "27.53M" in line and "3x240x240" in line  # timm's crossvit_15_240: 27,528,464 params
    assert " 11.73 " in line  # 5.87 G multiply-adds; the paper: 5.8 (test_bench checks the count itself)
    digits = next(l for l in proc.stdout.splitlines() if l.startswith("crossvit_digits "))
    assert float(digits.split()[3]) > 0  # the seed's, counted by a run


def test_convert_foreign_checkpoint_then_info_reads_it(tmp_path, vit_pytorch_cross_vit, cli):
    from crossvit.model import create_model

    cfg = create_model("crossvit_digits").config.to_dict()
    ref = vit_pytorch_cross_vit.CrossViT(**cfg).eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, tmp_path / "vp.pth")
    proc = cli("convert", tmp_path / "vp.pth", "--model", "crossvit_digits", "-o", tmp_path / "ours.safetensors")
    assert proc.returncode == 0, proc.stderr
    loaded = load_checkpoint(tmp_path / "ours.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (loaded.model(x) - ref(x)).abs().max() <= 1e-5
    assert loaded.info.provenance["source"] == "vp.pth"
    proc = cli("info", tmp_path / "ours.safetensors")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["architecture"] == "seed" and info["labels"][:3] == ["0", "1", "2"]


@pytest.mark.parametrize("args, words", [
    (["info", "{tmp}/nope.pth"], "no such file"),
    (["info", "{tmp}/foreign.pth"], "foreign checkpoint"),
    (["convert", "{tmp}/foreign.pth", "--config", "{tmp}/nope.json", "-o", "{tmp}/o.safetensors"],
     "no such config file"),
    (["convert", "{tmp}/foreign.pth", "--model", "crossvit_9_240", "-o", "{tmp}/o.safetensors"],
     "missing keys"),
    (["convert", "{tmp}/foreign.pth", "--config", "{tmp}/weird.json", "-o", "{tmp}/o.safetensors"],
     "cannot tell the architecture"),
])
def test_checkpoint_errors_are_one_line_with_nonzero_exit(tmp_path, args, words, cli, one_line_error):
    torch.save({"w": torch.zeros(2)}, tmp_path / "foreign.pth")
    (tmp_path / "weird.json").write_text(json.dumps({"width": 3}))
    proc = cli(*[a.format(tmp=tmp_path) for a in args])
    one_line_error(proc, words)
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.safetensors").exists()


def test_a_config_without_its_checkpoint_is_a_usage_error_not_ignored(tmp_path, cli, one_line_error):
    (tmp_path / "cfg.json").write_text(json.dumps({"image_size": 64}))
    proc = cli("export", "--model", "crossvit_digits", "--config", tmp_path / "cfg.json", "-o", tmp_path / "x.onnx")
    one_line_error(proc, "give that checkpoint too", code=2)
    assert not (tmp_path / "x.onnx").exists()
    # nor beside a checkpoint that describes itself, or an ONNX file: `info` printed as if it had been read
    ours = REPO / "crossvit" / "assets" / "crossvit_digits.safetensors"
    one_line_error(cli("info", ours, "--config", tmp_path / "cfg.json"), "describes itself", code=2)
    assert cli("export", "-o", tmp_path / "d.onnx").returncode == 0
    one_line_error(cli("info", tmp_path / "d.onnx", "--config", tmp_path / "cfg.json"), "describes itself", code=2)


def test_no_subcommand_prints_help(cli):
    proc = cli()
    assert proc.returncode == 0 and "deploy" in proc.stdout


def test_check_limits_tighten_the_gate_and_are_refused_looser(small_artifacts, cli, one_line_error):
    ckpt, onnx_path = small_artifacts
    args = ("check", onnx_path, "--reference", ckpt, "--batch-sizes", "1,3")
    assert cli(*args).returncode == 0  # fp32 against its checkpoint: rel L2 ~1e-7
    proc = cli(*args, "--rel-l2", "1e-15")  # tighter than float32 can be
    assert proc.returncode == 2 and "FAIL" in proc.stdout and "1e-15" in proc.stdout, proc.stdout + proc.stderr
    # fp32's gate has no rel L2 limit of its own (--rel-l2 adds one); its max |diff| is 1e-4
    one_line_error(cli(*args, "--max-abs", "0.5"), "--max-abs 0.5 is looser than the 0.0001 default", code=2)


def test_predict_batch_sets_the_calls_and_not_the_answers(small_artifacts, tmp_path, cli):
    _, onnx_path = small_artifacts
    for i in range(7):
        random_png(tmp_path / f"{i}.png", (36, 40), seed=i)
    one_by_one = cli("predict", onnx_path, tmp_path, "--batch", "1", "--json", "--exact", "--top-k", "10")
    by_three = cli("predict", onnx_path, tmp_path, "--batch", "3", "--json", "--exact", "--top-k", "10")
    assert one_by_one.returncode == 0 and by_three.returncode == 0, one_by_one.stderr + by_three.stderr
    progress = [line for line in by_three.stderr.splitlines() if line.endswith("/7 images")]
    assert [line.split()[-2] for line in progress] == ["3/7", "6/7", "7/7"], by_three.stderr  # three calls
    rows = [[json.loads(line) for line in p.stdout.splitlines()] for p in (one_by_one, by_three)]
    assert [r["source"] for r in rows[0]] == [r["source"] for r in rows[1]] and len(rows[0]) == 7
    for a, b in zip(*rows):  # fp32 in ONNX Runtime: the batch a row rides in changes nothing it answers
        probs = [{t["label"]: t["prob"] for t in r["top"]} for r in (a, b)]
        assert probs[0].keys() == probs[1].keys() and len(probs[0]) == 10
        assert np.allclose([probs[0][k] for k in probs[0]], [probs[1][k] for k in probs[0]], atol=2e-6)


def test_bench_compile_from_the_command_line_adds_the_compiled_row(small_artifacts, tmp_path, monkeypatch, capsys):
    """The flag's wiring, in process. A real compile costs minutes on 2 cores and is tested once, in
    test_bench.py; here torch.compile is replaced by a documented fake that returns the model as is."""
    from crossvit.cli import main

    ckpt, onnx_path = small_artifacts
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(model) or model)
    code = main(["bench", str(onnx_path), "--checkpoint", str(ckpt), "--backends", "compile", "--compile",
                 "--batch-sizes", "2", "--runs", "3", "--no-accuracy", "--json", str(tmp_path / "b.json")])
    from crossvit.benchmarks.suite import has_bf16

    # a CPU with bf16 arithmetic also gets the bf16 model compiled with freezing (issue 22's peer)
    expected = [("torch.compile (cpu)", 2)] + ([("torch.compile bf16 freezing (cpu)", 2)] if has_bf16() else [])
    assert code == 0 and len(compiled) == len(expected)
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [(r["backend"], r["batch"]) for r in rows if "compile" in r["backend"]] == expected
    assert "torch.compile (cpu): first call at batch 2" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["export", "deploy"])
def test_a_batch_range_that_does_not_parse_is_a_usage_error(tmp_path, command, cli, one_line_error):
    """The README: a malformed value exits 2 (it exited 1); a range that parses but does not fit
    stays 1 (tests/test_export.py)."""
    proc = cli(command, "--batch", "1:abc", "-o", tmp_path / ("x.onnx" if command == "export" else "out"))
    one_line_error(proc, "--batch must look like MIN:MAX (e.g. 1:64) or N, got '1:abc'", code=2)
    assert list(tmp_path.iterdir()) == []


def test_deploy_help_describes_the_command_and_its_output_folder(cli):
    proc = cli("deploy", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    assert "The whole path into one folder" in text and "output folder (default deploy-out)" in text
