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
