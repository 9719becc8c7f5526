"""The `crossvit` command: models, info, convert; errors are one line, never a traceback."""

import json

import pytest
import torch

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


def test_no_subcommand_prints_help(cli):
    proc = cli()
    assert proc.returncode == 0 and "deploy" in proc.stdout


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
