"""The scripts a maintainer runs by hand, smoke-run on a few steps so they cannot rot unseen."""

import csv
import subprocess
import sys

from conftest import REPO


def test_train_default_trains_writes_and_reloads_the_model(tmp_path):
    """One epoch instead of 40: the script trains, writes a checkpoint that loads, and regenerates
    the very held-out split the package ships (same files, same labels)."""
    out, heldout = tmp_path / "digits.safetensors", tmp_path / "heldout"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train_default.py"), "--epochs", "1",
                           "--out", str(out), "--heldout-dir", str(heldout)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epoch   1/1" in proc.stdout and f"wrote {out}" in proc.stdout, proc.stdout
    from crossvit.model import load_checkpoint

    loaded = load_checkpoint(out)
    assert loaded.info.labels == [str(i) for i in range(10)]
    assert loaded.info.provenance["epochs"] == 1
    shipped = REPO / "crossvit" / "assets" / "heldout"
    with open(heldout / "labels.csv") as mine, open(shipped / "labels.csv") as theirs:
        assert list(csv.reader(mine)) == list(csv.reader(theirs))
    first = sorted(p.name for p in shipped.glob("*.png"))[0]
    assert (heldout / first).read_bytes() == (shipped / first).read_bytes()


def test_openvino_profile_adds_up_the_calls_and_the_linear_layers(digits_onnx):
    """The per-node counters OpenVINO keeps, summed per kind, and the linear layers' FLOP rate
    (the README's batch-1 breakdown of crossvit_15_240 comes from this script)."""
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "openvino_profile.py"), str(digits_onnx),
                           "--batch", "2", "--calls", "3", "--top", "5"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "batch 2 (static shapes), f32 hint" in lines[0] and "ms per call" in lines[0]
    assert len([l for l in lines if "% " in l and " x " in l]) == 5
    assert lines[-1].startswith("fully connected layers: ") and "GFLOP/s" in lines[-1]
    total = float(lines[0].split(": ")[-1].split(" ms")[0])
    listed = [float(l.split()[0]) for l in lines[1:6]]
    assert listed == sorted(listed, reverse=True) and 0 < sum(listed) <= total + 0.01
    fc_ms = float(lines[-1].split("layers: ")[1].split(" ms")[0])
    assert 0 < fc_ms <= total + 0.01 and float(lines[-1].split(" for ")[1].split(" GFLOP")[0]) > 0


def test_cpu_class_run_says_what_failed_and_refuses_to_run_without_openvino(tmp_path):
    """The script another CPU class's session runs for half an hour: a failing step's own line and
    its log are said (it was only in the log), a run without OpenVINO (the paths it measures) is
    refused before any step, and --help is usage, not a results folder."""
    import os

    script = str(REPO / "scripts" / "cpu_class_run.sh")
    env = {**os.environ, "CROSSVIT": str(REPO / ".venv" / "bin" / "crossvit")}
    if not os.access(env["CROSSVIT"], os.X_OK):
        env["CROSSVIT"] = str(os.path.join(os.path.dirname(sys.executable), "crossvit"))
    usage = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert usage.returncode == 0 and "RESULTS_DIR" in usage.stdout and not (REPO / "--help").exists()
    (tmp_path / "fake" / "openvino").mkdir(parents=True)
    (tmp_path / "fake" / "openvino" / "__init__.py").write_text("raise ImportError('no openvino here')\n")
    proc = subprocess.run(["bash", script, str(tmp_path / "r1"), str(tmp_path / "w1")], capture_output=True,
                          text=True, env={**env, "PYTHONPATH": str(tmp_path / "fake")}, timeout=120)
    assert proc.returncode == 2 and "OpenVINO or NNCF cannot be imported here" in proc.stderr, proc.stderr
    assert not (tmp_path / "r1" / "deploy.log").exists()
    proc = subprocess.run(["bash", script, str(tmp_path / "r2"), str(tmp_path / "w2")], capture_output=True,
                          text=True, env={**env, "MODEL": "nosuch"}, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "unknown model name 'nosuch'" in proc.stderr and "that step failed (exit 1)" in proc.stderr, proc.stderr


def test_cpu_class_table_is_what_the_readme_shows():
    """Every committed `table.md` (a CPU class's rows of the README's "Where each CPU class stands",
    written by cpu_class_run.sh) is the script's output on the files beside it, and the README shows
    the rows of each class's `cpu_choice_run/`: the table cannot drift from its files. The measured
    order is printed beside the flag rule's."""
    tables = sorted((REPO / "benchmarks" / "results").glob("*/*/table.md"))
    assert REPO / "benchmarks" / "results" / "cpu_epyc_2core" / "cpu_choice_run" / "table.md" in tables
    readme = (REPO / "README.md").read_text().splitlines()
    for table in tables:
        committed = table.read_text()
        first = next(l for l in committed.splitlines() if l.startswith("| ") and not l.startswith("| machine"))
        machine = first.split(" | ")[0][2:].rsplit(" (deploy", 1)[0]
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / "cpu_class_table.py"), str(table.parent),
                               "--machine", machine], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout == committed, table
        if table.parent.name == "cpu_choice_run":
            for row in (l for l in committed.splitlines() if l.startswith("| ") and not l.startswith("| machine")):
                assert row in readme, (table, row)
    epyc = (REPO / "benchmarks" / "results" / "cpu_epyc_2core" / "cpu_choice_run" / "table.md").read_text()
    assert "| **OpenVINO int8-ov with the bf16 hint** (chosen in deploy, retune a) | 3.58x, 3.60x, - |" in epyc
    assert "measured order (median p50 at batch 1 times batch 8, gated paths): OV_INT8_BF16, " in epyc
    assert "RULES for this CPU (avx512_vnni): OV_INT8_BF16, " in epyc


def test_cpu_class_table_refuses_a_folder_without_a_record(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "cpu_class_table.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "expected one NAME.cpu.json" in proc.stderr and "Traceback" not in proc.stderr
