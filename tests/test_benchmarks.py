"""The latency benchmark runs end to end and writes its JSON and CSV."""

import csv
import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_latency_benchmark_writes_results_with_ratios(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "crossvit.benchmarks.latency", "--batch", "1,2", "--runs", "6",
                           "--out", tmp_path], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "results.json").read_text())
    backends = {(r["backend"], r["batch"]) for r in data["rows"]}
    for b in (1, 2):
        assert {("torch eager (cpu)", b), ("onnxruntime default", b), ("onnxruntime tuned", b)} <= backends
    assert {r["precision"] for r in data["rows"] if r["backend"] == "onnxruntime tuned"} == {"fp32", "int8-cpu"}
    base = [r for r in data["rows"] if r["backend"] == "torch eager (cpu)"]
    assert all(r["ratio_vs_torch_cpu"] == 1.0 for r in base)
    assert all(r["p50_ms"] <= r["p99_ms"] and r["runs"] == 6 for r in data["rows"])
    assert data["machine"]["onnxruntime"]
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(rows) == len(data["rows"])
    assert "vs torch" in proc.stdout


def test_gpu_acceptance_says_plainly_when_there_is_no_gpu():
    import torch

    if torch.cuda.is_available():
        import pytest

        pytest.skip("a CUDA device is present: run the script itself")
    proc = subprocess.run([sys.executable, "-m", "crossvit.benchmarks.gpu_acceptance"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and "Traceback" not in proc.stderr
