"""The fastest CPU path: an fp32 .onnx on a CPU runs as its gated int8-cpu variant, unless told not to."""

import json
import shutil

import numpy as np
import pytest

from crossvit.runtime.session import gated_cpu_variant, open_session


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """What `crossvit deploy --variants int8-cpu` leaves: fp32, int8-cpu and int8-cpu's parity report."""
    from crossvit.export.onnx import BatchRange, export_onnx
    from crossvit.export.parity import check_parity
    from crossvit.export.precision import convert_precision
    from crossvit.model import load_model

    out = tmp_path_factory.mktemp("deployed")
    loaded = load_model(name="crossvit_digits")
    fp32 = export_onnx(loaded, out / "crossvit_digits.fp32.onnx", batch=BatchRange(1, 16)).path
    int8 = convert_precision(fp32, out / "crossvit_digits.int8-cpu.onnx", "int8-cpu", None)
    report = check_parity(int8, loaded, batch_sizes=[1, 7])
    assert report.verdict == "pass"
    report.save(out / "crossvit_digits.int8-cpu.parity.json")
    return out, fp32, int8


def _copy(deployed, tmp_path):
    out, fp32, int8 = deployed
    for f in out.iterdir():
        shutil.copy(f, tmp_path / f.name)
    return tmp_path / fp32.name, tmp_path / int8.name, tmp_path / "crossvit_digits.int8-cpu.parity.json"


def test_an_fp32_onnx_on_the_cpu_runs_as_its_gated_int8_variant(deployed):
    _, fp32, int8 = deployed
    x = np.random.default_rng().standard_normal((3, 3, 32, 32), dtype=np.float32)
    with open_session(fp32, device="cpu") as s, open_session(int8, device="cpu") as direct:
        assert s.info.precision == "int8-cpu" and s.info.path == int8
        assert "int8-cpu" in s.chosen and "passed the parity gate" in s.chosen
        assert np.array_equal(s.infer(x), direct.infer(x))
    for kwargs in ({"exact": True}, {"backend": "onnxruntime"}):  # forced: the file given
        with open_session(fp32, device="cpu", **kwargs) as s:
            assert s.info.precision == "fp32" and s.chosen is None


def test_no_swap_without_a_passing_gate_about_these_very_files(deployed, tmp_path):
    import onnx

    fp32, int8, report = _copy(deployed, tmp_path)
    assert gated_cpu_variant(fp32) is not None
    gate = json.loads(report.read_text())

    report.write_text(json.dumps({**gate, "verdict": "fail"}))  # the gate failed
    assert gated_cpu_variant(fp32) is None
    report.write_text(json.dumps({**gate, "artifact_sha256": "0" * 64}))  # the variant changed after the gate
    assert gated_cpu_variant(fp32) is None
    for garbage in ("not json", "[]", '{"verdict": ["pass"]}'):  # a mangled report is no pass
        report.write_text(garbage)
        assert gated_cpu_variant(fp32) is None
    report.write_text(json.dumps(gate))
    report_saved = report.read_bytes()
    report.unlink()  # no report at all
    assert gated_cpu_variant(fp32) is None
    report.write_bytes(report_saved)
    assert gated_cpu_variant(fp32) == (int8, gated_cpu_variant(fp32)[1])

    proto = onnx.load(str(fp32))  # the fp32 file is not the one the variant was made from
    proto.metadata_props.add(key="edited", value="after the variant was made")
    onnx.save(proto, str(fp32))
    assert gated_cpu_variant(fp32) is None
    with open_session(fp32, device="cpu") as s:
        assert s.info.precision == "fp32" and s.chosen is None


def test_predict_says_which_file_ran_and_exact_runs_the_one_given(deployed, cli):
    from crossvit.assets import heldout_images

    _, fp32, _ = deployed
    image = sorted(heldout_images().glob("*.png"))[0]
    proc = cli("predict", fp32, image)
    assert proc.returncode == 0, proc.stderr
    assert "# crossvit_digits.int8-cpu.onnx on" in proc.stderr and "--exact runs the file given" in proc.stderr
    proc = cli("predict", fp32, image, "--exact")
    assert proc.returncode == 0, proc.stderr
    assert "# crossvit_digits.fp32.onnx on" in proc.stderr and "int8-cpu" not in proc.stderr


@pytest.mark.slow
def test_serve_load_measures_what_serve_runs_in_turns(deployed, tmp_path):
    """serve_load --artifact serves a deploy output as users get it (the gated int8-cpu), the two
    batching configurations take turns, and the result says how the server spent its time."""
    from crossvit.benchmarks.serve_load import main

    out, fp32, _ = deployed
    assert main(["--artifact", str(fp32), "--seconds", "1", "--rounds", "2", "--clients", "4",
                 "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "serve.json").read_text())
    served = result["throughput"]
    assert len(served["ratio_by_round"]) == 2 and served["ratio"] > 0
    for mode, max_batch in (("dynamic_batching", 32), ("max_batch_1", 1)):
        r = served[mode]
        assert r["max_batch"] == max_batch and len(r["images_per_s_by_round"]) == 2 and r["requests"] > 0
        assert 1.0 <= r["mean_batch"] <= max_batch
    added = result["overhead_batch_1"]
    assert {"HTTP binary", "gRPC", "session.infer (as the server runs it)"} <= set(added)
    side = added["server side, mean per request"]
    assert 0 < side["compute_ms"] <= side["request_ms"]


def test_deploy_says_what_predict_and_serve_will_run(deployed, tmp_path, capsys):
    from crossvit.cli import _say_cpu_path

    fp32, _, report = _copy(deployed, tmp_path)
    _say_cpu_path(tmp_path)
    assert f"predict/serve {fp32.name} run crossvit_digits.int8-cpu.onnx" in capsys.readouterr().out
    gate = json.loads(report.read_text())
    report.write_text(json.dumps({**gate, "verdict": "fail"}))
    _say_cpu_path(tmp_path)
    assert "run it as is: its int8-cpu variant did not pass its gate" in capsys.readouterr().out
