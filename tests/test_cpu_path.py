"""The CPU path: every candidate gated, answers that do not depend on batch-mates, and the choice
measured per machine (`NAME.cpu.json`) that predict/serve/open_session(auto) run."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from crossvit.errors import ArtifactError
from crossvit.runtime.artifact import read_artifact
from crossvit.runtime.cpu_choice import (Candidate, candidates_for, choice_path, choose_cpu_path, cpu_fingerprint,
                                         decide_cpu_path, gate_report_path, rule_for_flags)
from crossvit.runtime.session import open_session

DIGITS = "crossvit_digits"


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """What `crossvit deploy --variants int8-cpu,int8-ov` leaves: the files, every gate and the choice,
    measured here (few runs: the choice's speed is not what these tests judge)."""
    from crossvit.export.onnx import BatchRange
    from crossvit.model import load_model
    from crossvit.pipeline import deploy

    out = tmp_path_factory.mktemp("deployed")
    (out / "notes.txt").write_text("a file no deploy writes: named in its warning")
    result = deploy(load_model(name=DIGITS), out, variants=("int8-cpu", "int8-ov"), batch=BatchRange(1, 16),
                    bench_runs=3, bench_seconds=1.0)
    fp32 = out / f"{DIGITS}.fp32.onnx"
    assert choice_path(fp32).is_file() and result.cpu_path
    return out, fp32, result


def _copy(deployed, tmp_path):
    out, fp32, _ = deployed
    for f in out.iterdir():
        shutil.copy(f, tmp_path / f.name)
    return tmp_path / fp32.name


def _chosen(fp32):
    found = choose_cpu_path(fp32)
    return (found[0], found[1]) if found else (None, None)


def test_deploy_gates_every_candidate_and_records_its_choice_with_this_cpu(deployed):
    out, fp32, result = deployed
    record = json.loads(choice_path(fp32).read_text())
    assert record["fingerprint"] == cpu_fingerprint() and record["source"]["onnx"] == fp32.name
    by = {(c["backend"], c["precision"], c["hint"]): c for c in record["candidates"]}
    assert {("onnxruntime", "fp32", None), ("openvino", "fp32", "fp32"), ("openvino", "bf16", "bf16"),
            ("onnxruntime", "int8-cpu", None), ("openvino", "int8-ov", None),
            ("openvino", "int8-ov", "bf16")} <= set(by)
    for c in record["candidates"]:  # each candidate's gate is a report beside it, about these bytes
        report = json.loads(gate_report_path(out, Candidate(c["file"], c["backend"], c["precision"],
                                                            c["hint"])).read_text())
        assert report["verdict"] == c["gate"] and report["precision"] == c["precision"]
    chosen = record["chosen"]
    assert by[(chosen["backend"], chosen["precision"], chosen["hint"])]["gate"] == "pass"
    timed = [c for c in record["candidates"] if c["gate"] == "pass" and c["latency"]["1"]]
    # pick_cpu_path: by the ratios to eager where every gated path has both turn by turn, else by the
    # medians (a ratio is left out where turns disagree: issue 24)
    if all(c["speedup"]["1"] and c["speedup"]["8"] for c in timed):
        best = max(timed, key=lambda c: c["speedup"]["1"] * c["speedup"]["8"])
        assert record["how"].startswith("the gated CPU path with the highest product of its ratios")
    else:
        best = min(timed, key=lambda c: c["latency"]["1"]["p50_ms"] * c["latency"]["8"]["p50_ms"])
        assert record["how"].startswith("the gated CPU path with the lowest product of its median latencies")
    key = ("backend", "precision", "hint")
    assert [best[k] for k in key] == [chosen[k] for k in key]
    assert chosen["file"] in result.cpu_path and "PyTorch eager at batch 1" in result.cpu_path
    candidate, why = _chosen(fp32)
    assert candidate == Candidate(**chosen) and why.startswith("measured fastest")
    with open_session(fp32) as s:
        assert s.info.path.name == chosen["file"] and s.backend == chosen["backend"]
        assert s.chosen.startswith(candidate.label)
    with open_session(fp32, exact=True) as s:  # forced: the file given, in ONNX Runtime
        assert s.info.path == fp32 and s.backend == "onnxruntime" and s.chosen is None


def _write_choice(fp32, **changes):
    path = choice_path(fp32)
    record = json.loads(path.read_text())
    record.update(changes)
    path.write_text(json.dumps(record))
    return record


def test_a_record_from_another_cpu_gives_way_to_the_rule_for_this_cpus_flags(deployed, tmp_path):
    fp32 = _copy(deployed, tmp_path)
    _write_choice(fp32, fingerprint={"cpu_model": "Some Other CPU", "cores": 96, "flags": ["amx_bf16"]})
    candidate, why = _chosen(fp32)
    assert "measured on another CPU (Some Other CPU, 96 cores" in why and why.startswith("the rule for this CPU")
    flags = set(cpu_fingerprint()["flags"])
    gated = [c for c in candidates_for(fp32) if json.loads(gate_report_path(tmp_path, c).read_text())["verdict"]
             == "pass"]
    assert candidate == rule_for_flags(flags, gated)
    with open_session(fp32) as s:
        assert "measured on another CPU" in s.chosen


def test_a_failed_gate_is_never_run_even_when_the_record_names_it(deployed, tmp_path):
    fp32 = _copy(deployed, tmp_path)
    int8_ov = Candidate(f"{DIGITS}.int8-ov.onnx", "openvino", "int8-ov")
    _write_choice(fp32, chosen=int8_ov.to_dict())
    report = gate_report_path(tmp_path, int8_ov)
    gate = json.loads(report.read_text())
    assert gate["verdict"] == "pass"
    assert _chosen(fp32)[0] == int8_ov
    report.write_text(json.dumps({**gate, "verdict": "fail"}))
    candidate, why = _chosen(fp32)
    assert candidate != int8_ov and "no longer has a passing gate" in why
    report.write_text(json.dumps({**gate, "artifact_sha256": "0" * 64}))  # the file changed after its gate
    assert _chosen(fp32)[0] != int8_ov
    for garbage in ("not json", "[]", '{"verdict": ["pass"]}'):  # a mangled report is no pass
        report.write_text(garbage)
        assert _chosen(fp32)[0] != int8_ov


def test_the_bf16_hint_is_gated_as_bf16(deployed):
    out, fp32, _ = deployed
    report = json.loads(gate_report_path(out, Candidate(fp32.name, "openvino", "bf16", "bf16")).read_text())
    assert report["precision"] == "bf16" and "bf16 hint" in report["backend"]
    assert report["thresholds"]["rel_l2"] == 1e-2  # bf16's gate, not fp32's max abs 1e-4
    from crossvit.runtime.openvino import cpu_capabilities

    if "BF16" in cpu_capabilities():  # run (OpenVINO's own word on this CPU), and judged on bf16's limits
        assert report["verdict"] in ("pass", "fail") and report["cases"], report
    else:  # not run, for a reason that names the machine, never a pass
        assert report["verdict"] == "not run" and "no bf16 arithmetic" in report["not_run"], report


def test_int8_ov_with_the_bf16_hint_is_gated_as_int8_ov_in_a_report_of_its_own(deployed):
    """OpenVINO's own default on a CPU with bf16: int8 where NNCF quantized, bf16 elsewhere. Still
    an int8-ov computation (its thresholds), but not the file as deploy's fp32 hint runs it: a
    report of its own, and a session that says which."""
    from crossvit.export.parity import gate_thresholds
    from crossvit.runtime.openvino import cpu_capabilities

    out, fp32, _ = deployed
    plain = Candidate(f"{DIGITS}.int8-ov.onnx", "openvino", "int8-ov")
    hinted = Candidate(f"{DIGITS}.int8-ov.onnx", "openvino", "int8-ov", "bf16")
    assert hinted in candidates_for(fp32) and hinted.label.startswith("OpenVINO int8-ov with the bf16 hint")
    assert gate_report_path(out, hinted).name == f"{DIGITS}.int8-ov.openvino-bf16.parity.json" \
        != gate_report_path(out, plain).name
    report = json.loads(gate_report_path(out, hinted).read_text())
    assert report["precision"] == "int8-ov" and "bf16 hint" in report["backend"]
    assert report["thresholds"] == json.loads(gate_report_path(out, plain).read_text())["thresholds"]
    assert report["thresholds"] == json.loads(json.dumps(dataclasses.asdict(gate_thresholds("int8-ov", False))))
    if "BF16" not in cpu_capabilities():
        assert report["verdict"] == "not run" and "no bf16 arithmetic" in report["not_run"], report
        return
    assert report["verdict"] in ("pass", "fail") and report["cases"], report
    with open_session(out / hinted.file, backend="openvino", device="cpu", hint="bf16") as s, \
            open_session(out / plain.file, backend="openvino", device="cpu") as f32:
        assert s.precision == "int8-ov" and "bf16 hint" in s.describe() and "hint" not in f32.describe()
        x = np.random.default_rng(0).standard_normal((4, *s.info.input_shape), dtype=np.float32)
        a, b = s.infer(x), f32.infer(x)
        assert 0 < np.linalg.norm(a - b) / np.linalg.norm(b) < 0.1  # another computation, near the same


def test_bench_times_int8_ov_as_deploy_runs_it_and_as_openvinos_default(deployed, tmp_path, cli):
    """Issue 22's peers include OpenVINO's int8 defaults: on a CPU with bf16 that is the bf16 hint
    for the layers NNCF left in float, so `crossvit bench` times int8-ov both ways, in rows of
    their own."""
    from crossvit.benchmarks.suite import session_rows
    from crossvit.runtime.cpu_choice import cpu_flags

    out, fp32, _ = deployed
    int8_ov = out / f"{DIGITS}.int8-ov.onnx"
    bf16 = bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    assert [(p.name, k, o) for p, k, o in session_rows([int8_ov], "cpu")] == \
        [(int8_ov.name, "openvino", {})] + [(int8_ov.name, "openvino", {"hint": "bf16"})] * bf16
    assert session_rows([int8_ov], "cpu", openvino=False) == []
    proc = cli("bench", int8_ov, "--batch-sizes", "2", "--runs", "3", "--max-seconds", "1",
               "--json", tmp_path / "b.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "b.json").read_text())
    rows = [r for r in data["rows"] if r["precision"] == "int8-ov"]
    assert sorted(r["backend"] for r in rows) == [f"openvino ({DIGITS}.int8-ov)"] + \
        [f"openvino ({DIGITS}.int8-ov, bf16 hint)"] * bf16
    assert data["accuracy"][int8_ov.name]["verdict"] == "pass"
    if bf16:
        assert data["accuracy"][f"{int8_ov.name} in openvino (int8-ov, bf16 hint)"]["verdict"] in ("pass", "fail")


def test_an_edited_fp32_file_voids_the_record_and_every_variant(deployed, tmp_path):
    import onnx

    fp32 = _copy(deployed, tmp_path)
    proto = onnx.load(str(fp32))
    proto.metadata_props.add(key="edited", value="after the variants were made")
    onnx.save(proto, str(fp32))
    assert _chosen(fp32) == (None, None)  # fp32's own gate is about the old bytes too
    _, why = decide_cpu_path(fp32)  # and it is said why, not only the fp32 line (issue 24)
    assert f"ONNX Runtime int8-cpu ({DIGITS}.int8-cpu.onnx): it was made from another {fp32.name} (that file " \
           "changed since)" in why
    with open_session(fp32) as s:
        assert s.info.path == fp32 and s.chosen is None and s.passed_over == f"{fp32.name} as given: {why}"


def test_without_openvino_the_candidates_that_exist_are_the_ones_used(deployed, tmp_path):
    """OpenVINO uninstalled (its import fails, as for a user without it): the record's OpenVINO
    choice cannot run, the rule picks among the rest, and predict says so in one line."""
    fp32 = _copy(deployed, tmp_path)
    _write_choice(fp32, chosen=Candidate(f"{DIGITS}.int8-ov.onnx", "openvino", "int8-ov").to_dict())
    code = ("import sys; sys.modules['openvino'] = None\n"
            "from crossvit.runtime.cpu_choice import choose_cpu_path\n"
            "from crossvit.runtime.session import open_session\n"
            f"c, why = choose_cpu_path(__import__('pathlib').Path({str(fp32)!r}))\n"
            "print(c.backend, c.precision); print(why)\n"
            f"s = open_session({str(fp32)!r}); print(s.backend, s.info.precision)\n"
            # asked for by name with the bf16 hint: the missing OpenVINO is the reason, not this CPU
            f"try: open_session({str(fp32)!r}, backend='openvino', hint='bf16')\n"
            "except Exception as e: print(type(e).__name__, e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "onnxruntime int8-cpu" and "cannot run here (the openvino backend needs OpenVINO: pip " in lines[1]
    assert lines[2] == "onnxruntime int8-cpu"
    assert lines[3].startswith("BackendUnavailable the openvino backend needs OpenVINO: pip "), lines[3]


@pytest.mark.parametrize("module, why", [
    ('raise RuntimeError("libtbb missing")', "OpenVINO is installed but cannot be imported (RuntimeError: libtbb missing)"),
    ('raise OSError("libopenvino.so: cannot open shared object file")', "cannot be imported (OSError: libopenvino.so"),
    ('__version__ = "9.9"', "is not OpenVINO (no __version__ or Core)"),
    ('__version__ = OPENVINO_VERSION\nclass Core:\n    def __getattr__(self, name):\n        raise RuntimeError("Device with '
     '\\"CPU\\" name is not registered")', 'Device with "CPU" name is not registered'),
])
def test_a_broken_openvino_install_is_a_path_that_cannot_run_not_a_crash(deployed, tmp_path, module, why):
    """An OpenVINO that raises on import (a missing shared library), a module named openvino that is
    not OpenVINO, or one without a CPU plugin: the OpenVINO paths cannot run, the choice takes another
    gated path and says why; nothing raises past open_session."""
    (tmp_path / "out").mkdir()
    fp32 = _copy(deployed, tmp_path / "out")
    _write_choice(fp32, chosen=Candidate(f"{DIGITS}.int8-ov.onnx", "openvino", "int8-ov").to_dict())
    (tmp_path / "fake" / "openvino").mkdir(parents=True)
    version = pytest.importorskip("openvino").__version__  # the gates' own: only the plugin is broken
    (tmp_path / "fake" / "openvino" / "__init__.py").write_text(module.replace("OPENVINO_VERSION", repr(version)) + "\n")
    code = ("import sys; from crossvit.runtime.session import open_session\n"
            f"s = open_session({str(fp32)!r}); print(s.backend, s.info.precision); print(s.chosen or s.passed_over)\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    backend, said = proc.stdout.splitlines()
    assert backend.startswith("onnxruntime ") and why in said, said


def test_a_choice_record_or_gate_report_that_is_not_ours_gives_way_to_the_rule_with_the_reason(deployed, tmp_path):
    """A record naming a path that is not one of the CPU candidates beside the file (another backend,
    a TensorRT variant, a file elsewhere), or holding fields of other types, or unreadable, is not
    used, and the reason says which; a gate report copied from the other hint, made with another
    OpenVINO or on another CPU (other cores: other threads, another function), or saying pass over
    failed cases vouches for nothing. No case raises."""
    pytest.importorskip("openvino")
    fp32 = _copy(deployed, tmp_path)
    record = json.loads(choice_path(fp32).read_text())
    name = choice_path(fp32).name
    int8_ov = Candidate(f"{DIGITS}.int8-ov.onnx", "openvino", "int8-ov")
    hinted = Candidate(int8_ov.file, "openvino", "int8-ov", "bf16")
    for change, why in (({"chosen": {**int8_ov.to_dict(), "backend": "tensorrt"}}, "not one of the CPU paths beside"),
                        ({"chosen": {**int8_ov.to_dict(), "file": 5}}, "names its choice in a form crossvit does not"),
                        ({"chosen": {**int8_ov.to_dict(), "file": f"../{tmp_path.name}/{int8_ov.file}"}},
                         "not one of the CPU paths beside"),
                        ({"chosen": Candidate(f"{DIGITS}.fp8.onnx", "onnxruntime", "fp8").to_dict()},
                         f"names '{DIGITS}.fp8.onnx' (onnxruntime, fp8), not one of the CPU paths"),
                        ({"chosen": "int8-ov"}, "names its choice in a form crossvit does not write"),
                        ({"speedup": [1.5]}, "gives its speed-ups in a form crossvit does not write"),
                        ({"speedup": {"1": 10 ** 400}}, "gives its speed-ups in a form"),
                        ({"speedup": {"1": float("nan")}}, "gives its speed-ups in a form"),
                        ({"speedup_range": {"8": [2.0]}}, "gives its speed-ups in a form"),
                        ({"speedup_range": {"8": [3.0, 2.0]}}, "gives its speed-ups in a form"),
                        ({"speedup_range": {"8": [0, 2.0]}}, "gives its speed-ups in a form"),
                        ({"speedup_range": ["1.5-2"]}, "gives its speed-ups in a form"),
                        ({"format": 2}, f"{name} is not a choice record crossvit can read")):
        choice_path(fp32).write_text(json.dumps({**record, **change}))
        candidate, said = decide_cpu_path(fp32)
        assert said.startswith("the rule for this CPU's flags") and why in said, (change, said)
    choice_path(fp32).write_text(json.dumps(record)[:-5])
    assert f"{name} is not a choice record crossvit can read" in decide_cpu_path(fp32)[1]
    # a batch whose turns' ratios disagreed is said by their range, as deploy's line says it
    choice_path(fp32).write_text(json.dumps({**record, "speedup": {"1": 2.5, "8": None},
                                             "speedup_range": {"8": [1.5, 2.25]}}))
    candidate, said = decide_cpu_path(fp32)
    assert said.startswith("measured fastest of the gated CPU paths on this CPU (2.50x PyTorch eager at batch 1, "
                           "1.50-2.25x PyTorch eager at batch 8 turn by turn)"), said

    choice_path(fp32).write_text(json.dumps({**record, "chosen": hinted.to_dict()}))
    bf16_report, plain_report = gate_report_path(tmp_path, hinted), gate_report_path(tmp_path, int8_ov)
    original = json.loads(bf16_report.read_text())
    if original["verdict"] != "pass":
        pytest.skip("int8-ov with the bf16 hint did not pass its gate here (no bf16 arithmetic?)")
    plain = json.loads(plain_report.read_text())
    failed = {**original, "cases": [{**c, "failures": ["rel L2 0.5 > 0.1"]} for c in original["cases"]]}
    other = {**original, "environment": {**original["environment"], "openvino": "2024.6.0"}}
    xeon = {"cpu_model": "Some Xeon", "cores": 2, "flags": ["amx_bf16", "amx_int8"]}
    elsewhere = {**original, "environment": {**original["environment"], "cpu": xeon}}
    fewer = {**original, "environment": {**original["environment"], "cpu": {**cpu_fingerprint(), "cores": 64}}}
    for report, why in ((plain, "is about the fp32 hint, not the bf16 one"),
                        (failed, "says pass, but its cases do not all pass"),
                        (other, "was gated with OpenVINO 2024.6.0, this is "),
                        (elsewhere, "was gated on another CPU (Some Xeon, 2 cores, amx_bf16 amx_int8; this one: "),
                        (fewer, "was gated on another CPU (")):
        bf16_report.write_text(json.dumps(report))
        candidate, said = decide_cpu_path(fp32)
        assert candidate != hinted and f"no longer has a passing gate beside it (its gate report {bf16_report.name} " \
            f"{why}" in said, said
    bf16_report.write_text(json.dumps(original))
    assert decide_cpu_path(fp32)[0] == hinted


def test_with_no_record_the_rule_picks_among_gated_candidates(deployed, tmp_path):
    fp32 = _copy(deployed, tmp_path)
    choice_path(fp32).unlink()
    candidate, why = _chosen(fp32)
    assert "no crossvit_digits.cpu.json beside it" in why
    int8_ov = Candidate(f"{DIGITS}.int8-ov.onnx", "openvino", "int8-ov")
    int8_ov_bf16 = Candidate(f"{DIGITS}.int8-ov.onnx", "openvino", "int8-ov", "bf16")
    # the bf16 hint first (measured faster on the AVX-512 EPYC); candidates are filtered by what the
    # CPU can run before the rule (decide_cpu_path), so a CPU without bf16 gets the file as it is
    assert rule_for_flags({"avx512_vnni"}, candidates_for(fp32)) == int8_ov_bf16
    assert rule_for_flags({"avx512_vnni"}, [c for c in candidates_for(fp32) if c != int8_ov_bf16]) == int8_ov
    assert rule_for_flags({"amx_bf16", "avx512_vnni"}, candidates_for(fp32)).precision == "bf16"
    assert rule_for_flags(set(), candidates_for(fp32)).precision == "int8-cpu"
    assert rule_for_flags(set(), []) is None
    # without VNNI OpenVINO's int8 measured slower than the fp32 file (2-core AVX2 EPYC): never by rule there
    no_int8_cpu = [c for c in candidates_for(fp32) if c.precision != "int8-cpu"]
    assert (rule_for_flags({"avx2", "fma"}, no_int8_cpu).backend, rule_for_flags({"avx2", "fma"}, no_int8_cpu).precision) \
        == ("openvino", "fp32")
    assert rule_for_flags({"avx2", "fma"}, [c for c in no_int8_cpu if c.backend == "openvino" and c.precision == "int8-ov"]) is None


def _rows_alone_and_together(session, x):
    together = session.infer(x)
    alone = np.concatenate([session.infer(x[i:i + 1]) for i in range(len(x))])
    rel = np.linalg.norm(together - alone, axis=1) / np.linalg.norm(alone, axis=1)
    return rel, together.argmax(1), alone.argmax(1)


def test_every_candidate_gives_a_row_the_same_answer_alone_or_in_any_batch(deployed):
    """A server's dynamic batcher puts unrelated requests side by side: no candidate's answer may
    depend on them (float noise only: rel L2 <= 1e-4, top-1 unchanged). Dynamic int8 takes one
    scale per batch, so its session runs one row at a time."""
    from crossvit.assets import heldout_images
    from crossvit.errors import BackendUnavailable
    from crossvit.runtime.images import list_images, load_image_set

    _, fp32, _ = deployed
    rng = np.random.default_rng()
    checked = []
    for c in candidates_for(fp32):
        try:
            session = open_session(fp32.parent / c.file, backend=c.backend, device="cpu", **c.options)
        except BackendUnavailable as e:  # the bf16 hint on a CPU without bf16
            assert c.hint == "bf16" and "no bf16 arithmetic" in str(e)
            continue
        with session:
            images, _, _ = load_image_set(list_images(heldout_images()), session.preprocessor)
            for x in (images[:16], rng.standard_normal((16, 3, 32, 32), dtype=np.float32),
                      np.concatenate([images[:1], 40 * rng.standard_normal((15, 3, 32, 32), dtype=np.float32)])):
                rel, top_together, top_alone = _rows_alone_and_together(session, x)
                assert rel.max() <= 1e-4, (c, rel.max())
                assert (top_together == top_alone).all(), c
        checked.append((c.backend, c.precision))
    assert ("onnxruntime", "int8-cpu") in checked and ("openvino", "int8-ov") in checked


def test_openvino_runs_static_shapes_and_splits_other_batch_sizes_into_them(deployed):
    """OpenVINO fuses the element-wise work between matrix products only for static shapes, so a
    session compiles a model per batch size in 1, 2, 4, 8, 16 (each on first use) and runs 13 rows as
    8 + 4 + 1; a row's answer is the same in any split. One dynamic-batch model is the same function
    for an fp32 file, and refused for an int8-ov file (OpenVINO compiles that into another int8
    function than the gated one)."""
    pytest.importorskip("openvino")
    from crossvit.assets import heldout_images
    from crossvit.runtime.images import list_images, load_image_set
    from crossvit.runtime.openvino import cpu_capabilities, split_batch, static_batch_sizes

    assert static_batch_sizes(1, 16) == (1, 2, 4, 8, 16) and static_batch_sizes(1, 12) == (1, 2, 4, 8, 12)
    assert static_batch_sizes(4, 4) == (4,) and static_batch_sizes(3, 16) == (3, 6, 12, 16)
    assert split_batch(13, (1, 2, 4, 8, 16)) == [8, 4, 1] and split_batch(16, (1, 2, 4, 8, 16)) == [16]
    assert split_batch(5, (3, 6, 12, 16)) == [3, 3]  # the rest, 2 rows, padded to the smallest size

    out, fp32, _ = deployed
    x = np.random.default_rng().standard_normal((13, 3, 32, 32), dtype=np.float32)
    with pytest.raises(ArtifactError, match=r"int8-ov file runs with static shapes only \(OpenVINO compiles"):
        open_session(out / f"{DIGITS}.int8-ov.onnx", backend="openvino", static_shapes=False)
    if "BF16" in cpu_capabilities():
        with pytest.raises(ArtifactError, match="the bf16 hint runs with static shapes only"):
            open_session(fp32, backend="openvino", hint="bf16", static_shapes=False)
    with open_session(out / f"{DIGITS}.int8-ov.onnx", backend="openvino") as static, \
            open_session(fp32, backend="openvino", static_shapes=False) as dynamic:
        assert "static shapes" in static.describe() and "dynamic batch" in dynamic.describe()
        assert static.compiled_batch_sizes == (1,)  # the smallest at open: a file that cannot compile fails there
        rel, top_together, top_alone = _rows_alone_and_together(static, x)
        assert static.compiled_batch_sizes == (1, 4, 8)
        assert rel.max() <= 1e-4 and (top_together == top_alone).all()
        assert dynamic.compiled_batch_sizes == (None,) and dynamic.prepare(16) is None
        assert static.prepare(4).startswith("OpenVINO models compiled for batch sizes 1, 2, 4 (")
        assert static.compiled_batch_sizes == (1, 2, 4, 8)
        # one stream each: OpenVINO 2026.4.1 compiles an int8-ov with two into wrong answers at times
        streams = {int(r.get_compiled_model().get_property("NUM_STREAMS")) for r in static._requests.values()}
        assert streams == {1}
        images, _, _ = load_image_set(list_images(heldout_images()), static.preprocessor)
        with open_session(fp32, backend="openvino") as static_fp32:
            ours, theirs = static_fp32.infer(images[:13]), dynamic.infer(images[:13])
        # the same fp32 function: kernels that may sum in another order
        assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 1e-5
        assert (ours.argmax(1) == theirs.argmax(1)).all()

    from crossvit.runtime.serving.server import ServeOptions, Server

    said = []  # a server compiles every size it may need before it listens: no request waits for one
    server = Server(out / f"{DIGITS}.int8-ov.onnx", ServeOptions(max_batch=4), say=said.append)
    try:
        assert server.session.compiled_batch_sizes == (1, 2, 4)
        assert [line for line in said if line.startswith("OpenVINO models compiled for batch sizes 1, 2, 4 (")]
    finally:
        server.session.close()


def _batch_mixing_copy(fp32, dst):
    """A copy of the fp32 file whose rows depend on their batch-mates: the spread of each logit over
    the batch (its maximum less its minimum: 0 for a row alone) is added to every row."""
    import onnx
    from onnx import helper, numpy_helper

    from conftest import rewrite_onnx_metadata

    def mix(meta, proto):
        g = proto.graph
        name = g.output[0].name
        next(n for n in g.node if name in n.output).output[:] = ["own_logits"]
        g.initializer.append(numpy_helper.from_array(np.array([0], dtype=np.int64), "batch_axis"))
        g.node.extend([helper.make_node("ReduceMax", ["own_logits", "batch_axis"], ["batch_max"], keepdims=1),
                       helper.make_node("ReduceMin", ["own_logits", "batch_axis"], ["batch_min"], keepdims=1),
                       helper.make_node("Sub", ["batch_max", "batch_min"], ["batch_spread"]),
                       helper.make_node("Add", ["own_logits", "batch_spread"], [name])])
        onnx.checker.check_model(proto)

    return rewrite_onnx_metadata(fp32, dst, mix)


def test_openvino_refuses_a_batch_size_whose_model_answers_a_row_differently(deployed, tmp_path):
    """Every static model a session compiles after its first must answer two probe rows as the first
    did, in every position of its batch: a file whose rows depend on their batch-mates runs alone and
    is refused at batch 2 with one line (after a second compile), and its gate does not pass, so no
    choice can take it. The file's own rows are the same function alone."""
    pytest.importorskip("openvino")
    from crossvit.errors import BatchSizeRefused
    from crossvit.export.parity import check_parity
    from crossvit.model import load_model

    _, fp32, _ = deployed
    mixed = _batch_mixing_copy(fp32, tmp_path / f"{DIGITS}.fp32.onnx")
    x = np.random.default_rng().standard_normal((2, 3, 32, 32), dtype=np.float32)
    with open_session(fp32, backend="openvino") as plain, open_session(mixed, backend="openvino") as s:
        assert np.array_equal(s.infer(x[:1]), plain.infer(x[:1]))  # a row alone: no spread
        with pytest.raises(BatchSizeRefused, match=r"^crossvit_digits.fp32.onnx: OpenVINO compiled it for batch 2 "
                                                   r"into a model that answers a row differently from batch 1's "
                                                   r"\(relative L2 [0-9.e-]+, over 0.0001\), 2 times: refused$"):
            s.infer(x)
        assert s.compiled_batch_sizes == (1,)
        assert plain.prepare(16).startswith("OpenVINO models compiled for batch sizes 1, 2, 4, 8, 16 (")
    report = check_parity(mixed, load_model(name=DIGITS), backend="openvino")
    assert report.verdict == "not run" and not report and "answers a row differently" in report.not_run


def _scaled_probe(report_path, factor):
    """The gate report with its probe answer scaled by `factor`: an answer the file does not give."""
    import base64

    report = json.loads(report_path.read_text())
    answer = np.frombuffer(base64.b64decode(report["probe"]["answer"]), dtype="<f4") * np.float32(factor)
    report["probe"]["answer"] = base64.b64encode(answer.astype("<f4").tobytes()).decode("ascii")
    report_path.write_text(json.dumps(report))
    return report


def test_a_session_holds_its_first_openvino_model_to_the_answer_its_gate_recorded(deployed, tmp_path):
    """Each OpenVINO gate records its first model's answer to the probe rows with how it was computed
    (OpenVINO, CPU, hint, threads, batch size); a later session computing the same way holds its own
    first model to it (in another process too: OpenVINO's one-stream compile is deterministic there).
    One that answers otherwise is compiled again and then refused, so the CPU choice falls back to the
    fp32 file, saying why; a record computed another way is not used, and the session says why not."""
    pytest.importorskip("openvino")
    import base64

    from crossvit.errors import BatchSizeRefused
    from crossvit.runtime.openvino import GATE_ANSWER, PROBE_ROWS, decode_answer, openvino_version

    out, fp32, _ = deployed
    int8_ov = Candidate(f"{DIGITS}.int8-ov.onnx", "openvino", "int8-ov")
    gate = json.loads(gate_report_path(out, int8_ov).read_text())
    assert gate["verdict"] == "pass" and gate["probe"]["openvino"] == openvino_version()
    assert gate["probe"]["cpu"] == cpu_fingerprint() == gate["environment"]["cpu"]
    assert decode_answer(gate["probe"]).shape == (PROBE_ROWS, 10) and gate["probe"]["batch"] == 1
    for c in candidates_for(fp32):  # every OpenVINO gate keeps one
        report = json.loads(gate_report_path(out, c).read_text())
        assert isinstance(report.get("probe"), dict) == (c.backend == "openvino" and report["verdict"] != "not run")
    with open_session(out / int8_ov.file) as s:
        assert s.yardstick == GATE_ANSWER
    code = ("import sys; from crossvit.runtime.session import open_session; "
            "print(open_session(sys.argv[1]).yardstick)")
    proc = subprocess.run([sys.executable, "-c", code, str(out / int8_ov.file)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == GATE_ANSWER, proc.stderr[-2000:]

    fp32 = _copy(deployed, tmp_path)
    _write_choice(fp32, chosen=int8_ov.to_dict())
    report = _scaled_probe(gate_report_path(tmp_path, int8_ov), 1.01)
    with pytest.raises(BatchSizeRefused, match=r"^crossvit_digits.int8-ov.onnx: OpenVINO compiled it for batch 1 "
                                               r"into a model that answers a row differently from the answer its "
                                               r"gate recorded \(relative L2 0.0099, over 0.0001\), 2 times: refused$"):
        open_session(tmp_path / int8_ov.file)
    with open_session(fp32) as s:
        assert s.backend == "onnxruntime" and s.info.precision == "fp32" and s.chosen is None
        assert "cannot run here" in s.passed_over and "from the answer its gate recorded" in s.passed_over
    report["probe"]["openvino"] = "2020.1"
    gate_report_path(tmp_path, int8_ov).write_text(json.dumps(report))
    with open_session(tmp_path / int8_ov.file) as s:
        assert s.yardstick == (f"the gate's answer was not used: computed another way (OpenVINO 2020.1 there, "
                               f"{openvino_version()} here)")
    with open_session(tmp_path / int8_ov.file, backend="openvino", yardstick=None) as s:
        assert s.yardstick is None  # the gate's own session: held to nothing earlier
    nan = base64.b64encode(np.full(20, np.nan, dtype="<f4").tobytes()).decode("ascii")
    for probe, why in (({**gate["probe"], "answer": "not base64!"}, "its probe answer cannot be read"),
                       ({**gate["probe"], "shape": [3, 10]}, "its probe answer cannot be read"),
                       ({**gate["probe"], "shape": [float("inf"), 10]}, "its probe answer cannot be read"),
                       ({**gate["probe"], "shape": [1, 20]}, "its probe answer is not 2 rows of 10 logits"),
                       ({**gate["probe"], "answer": nan}, "its probe answer is not finite"),
                       ({**gate["probe"], "cpu": {"flags": 5}}, "computed another way (CPU unknown CPU, None "
                                                                "cores, 5 there"),
                       ({**gate["probe"], "format": "1"}, "its gate report has no probe answer"),
                       ([], None)):
        gate_report_path(tmp_path, int8_ov).write_text(json.dumps({**gate, "probe": probe}))
        with open_session(tmp_path / int8_ov.file) as s:  # a report that is not one of ours: its answer is not used
            assert s.yardstick == why if why is None else s.yardstick.startswith(
                f"the gate's answer was not used: {why}"), s.yardstick



def test_opening_the_chosen_openvino_path_reads_each_file_once_for_its_sha256(deployed, tmp_path, monkeypatch):
    """The choice checks the variant's bytes against its gate, and the session takes the gate's answer
    for the same bytes: one sha256 of each file (crossvit_15_240's: 0.1-0.2 s for the fp32 file, 35-70 ms for int8-ov)."""
    pytest.importorskip("openvino")
    import crossvit.runtime.cpu_choice as cpu_choice
    from crossvit.runtime.openvino import GATE_ANSWER

    fp32 = _copy(deployed, tmp_path)
    int8_ov = Candidate(f"{DIGITS}.int8-ov.onnx", "openvino", "int8-ov")
    _write_choice(fp32, chosen=int8_ov.to_dict())
    hashed = []
    real = cpu_choice.sha256_file
    monkeypatch.setattr(cpu_choice, "sha256_file", lambda path: hashed.append(path.name) or real(path))
    with open_session(fp32) as s:
        assert s.chosen.startswith(int8_ov.label) and s.yardstick == GATE_ANSWER
    assert sorted(hashed) == sorted([fp32.name, int8_ov.file])


def test_serve_refuses_a_batch_size_a_model_answers_differently_and_says_exact_serves_the_file(
        deployed, tmp_path, monkeypatch):
    """A server compiles every size its batches may need before it listens: a refused one stops it
    with one line, and when the refused model is the CPU path chosen for this machine, the line says
    that `--exact` serves the file given. (OpenVINO's wrong compiles come at random, so the chosen
    path's is simulated here by a probe check that fails above batch 1; the batch-mixing file's is real.)"""
    pytest.importorskip("openvino")
    from crossvit.errors import BatchSizeRefused
    from crossvit.runtime.openvino import OpenVinoSession
    from crossvit.runtime.serving.server import ServeOptions, Server

    out, fp32, _ = deployed
    mixed = _batch_mixing_copy(fp32, tmp_path / "mixed.fp32.onnx")
    with pytest.raises(BatchSizeRefused, match=r"^mixed.fp32.onnx: OpenVINO compiled it for batch 2 .*: refused$"):
        Server(mixed, ServeOptions(backend="openvino", max_batch=4))
    chosen = json.loads(choice_path(fp32).read_text())["chosen"]
    if chosen["backend"] != "openvino":
        pytest.skip(f"the CPU path chosen here is {chosen['backend']}'s, not OpenVINO's")
    real = OpenVinoSession._probe_check

    def wrong_above_one(self, request, size):
        worst, answer = real(self, request, size)
        return (0.5 if size > 1 else worst), answer

    monkeypatch.setattr(OpenVinoSession, "_probe_check", wrong_above_one)
    with pytest.raises(BatchSizeRefused, match=rf"^{chosen['file']}: OpenVINO compiled it for batch 2 into a model "
                                               rf"that answers a row differently from batch 1's \(relative L2 0.5, "
                                               rf"over 0.0001\), 2 times: refused; `--exact` serves {fp32.name} as it is$"):
        Server(fp32, ServeOptions(max_batch=4))


def test_predict_says_which_path_ran_and_exact_runs_the_file_given(deployed, cli):
    from crossvit.assets import heldout_images

    _, fp32, _ = deployed
    chosen = json.loads(choice_path(fp32).read_text())["chosen"]
    image = sorted(heldout_images().glob("*.png"))[0]
    proc = cli("predict", fp32, image)
    assert proc.returncode == 0, proc.stderr
    assert f"# {chosen['file']} on {chosen['backend']}" in proc.stderr and "measured fastest" in proc.stderr
    proc = cli("predict", fp32, image, "--exact")
    assert proc.returncode == 0, proc.stderr
    assert f"# {fp32.name} on onnxruntime" in proc.stderr and "# running" not in proc.stderr


@pytest.mark.slow
def test_serve_load_measures_what_serve_runs_in_turns(deployed, tmp_path):
    """serve_load --artifact serves a deploy output as users get it (the chosen CPU path), the two
    batching configurations take turns, and the result says how the server spent its time."""
    from crossvit.benchmarks.serve_load import main

    out, fp32, _ = deployed
    assert main(["--artifact", str(fp32), "--seconds", "1", "--rounds", "2", "--clients", "4",
                 "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "serve.json").read_text())
    served = result["throughput"]
    assert len(served["ratio_by_round"]) == 2 and served["ratio"] > 0
    largest = min(32, read_artifact(fp32).batch_max)  # serve refuses a --max-batch beyond the file's range
    for mode, max_batch in (("dynamic_batching", largest), ("max_batch_1", 1)):
        r = served[mode]
        assert r["max_batch"] == max_batch and len(r["images_per_s_by_round"]) == 2 and r["requests"] > 0
        assert 1.0 <= r["mean_batch"] <= max_batch
    added = result["overhead_batch_1"]
    assert {"HTTP binary", "gRPC", "session.infer (as the server runs it)"} <= set(added)
    side = added["server side, mean per request"]
    assert 0 < side["compute_ms"] <= side["request_ms"]


def test_deploy_says_what_predict_and_serve_will_run(deployed, tmp_path, capsys):
    from crossvit.cli import _say_cpu_path

    fp32 = _copy(deployed, tmp_path)
    chosen = json.loads(choice_path(fp32).read_text())["chosen"]
    _say_cpu_path(tmp_path)
    assert f"predict/serve {fp32.name} run " in (out := capsys.readouterr().out) and chosen["file"] in out
    for f in tmp_path.glob("*.parity.json"):
        f.unlink()
    _say_cpu_path(tmp_path)
    assert (f"run it as is in ONNX Runtime: ONNX Runtime int8-cpu ({DIGITS}.int8-cpu.onnx): no gate report beside "
            f"it ({DIGITS}.int8-cpu.parity.json)") in capsys.readouterr().out


def test_retune_measures_the_choice_again_from_the_gates_beside_the_files(deployed, tmp_path, cli, one_line_error):
    fp32 = _copy(deployed, tmp_path)
    record = choice_path(fp32)
    record.write_text(json.dumps({**json.loads(record.read_text()), "fingerprint": {"cpu_model": "elsewhere"}}))
    failed = Candidate(f"{DIGITS}.int8-ov.onnx", "openvino", "int8-ov")
    report = gate_report_path(tmp_path, failed)
    report.write_text(json.dumps({**json.loads(report.read_text()), "verdict": "fail"}))  # never chosen now
    proc = cli("deploy", "--retune", "-o", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads(record.read_text())
    assert again["fingerprint"] == cpu_fingerprint() and Candidate(**again["chosen"]) != failed
    assert f"CPU path for {fp32.name}: " in proc.stdout and "[2/2]" in proc.stderr
    assert _chosen(fp32)[1].startswith("measured fastest")
    one_line_error(cli("deploy", "--retune", "-o", tmp_path / "empty"), "run `crossvit deploy -o")


def test_retune_gates_again_an_openvino_path_gated_with_another_cpu_or_openvino(deployed, tmp_path, cli):
    """OpenVINO's kernels, and so the function a path computes, depend on the CPU and on OpenVINO's
    version: `deploy --retune` gates such a path again on this machine before timing it (a report
    from before reports named them is gated again too). Other reports are read as they are."""
    pytest.importorskip("openvino")
    fp32 = _copy(deployed, tmp_path)
    int8_ov = Candidate(f"{DIGITS}.int8-ov.onnx", "openvino", "int8-ov")
    fp32_hint = Candidate(fp32.name, "openvino", "fp32", "fp32")
    path = gate_report_path(tmp_path, int8_ov)
    gate = json.loads(path.read_text())
    elsewhere = {"cpu_model": "Some Xeon", "cores": 2, "flags": ["amx_bf16", "amx_int8"]}
    path.write_text(json.dumps({**gate, "verdict": "fail", "probe": None,
                                "environment": {**gate["environment"], "cpu": elsewhere}}))
    old = gate_report_path(tmp_path, fp32_hint)
    report = json.loads(old.read_text())
    del report["environment"]["cpu"]
    old.write_text(json.dumps(report))
    ort = gate_report_path(tmp_path, Candidate(f"{DIGITS}.int8-cpu.onnx", "onnxruntime", "int8-cpu"))
    before = ort.read_text()
    proc = cli("deploy", "--retune", "-o", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"{int8_ov.label}: gated again on this machine (gated on another CPU: Some Xeon, 2 cores, amx_bf16 "
            f"amx_int8)") in proc.stderr
    assert (f"{fp32_hint.label}: gated again on this machine (gated before reports named their CPU and "
            f"OpenVINO)") in proc.stderr
    for c in (int8_ov, fp32_hint):
        again = json.loads(gate_report_path(tmp_path, c).read_text())
        assert again["verdict"] == "pass" and again["environment"]["cpu"] == cpu_fingerprint()
        assert again["probe"]["cpu"] == cpu_fingerprint()
    assert ort.read_text() == before and "gated again" not in proc.stderr.split("[1/2]")[1]


def test_retune_leaves_out_what_it_cannot_read_and_refuses_a_folder_it_cannot_write(deployed, tmp_path, cli,
                                                                                     one_line_error):
    """A gate report that is a FIFO (a read would hang), or of another shape than crossvit writes, or a
    variant that cannot be gated again: that path is left out with its reason, the others are timed
    and the choice recorded. A folder the record cannot be written into is said before any timing."""
    pytest.importorskip("openvino")
    fp32 = _copy(deployed, tmp_path)
    int8_cpu = Candidate(f"{DIGITS}.int8-cpu.onnx", "onnxruntime", "int8-cpu")
    int8_ov = Candidate(f"{DIGITS}.int8-ov.onnx", "openvino", "int8-ov")
    bf16 = Candidate(fp32.name, "openvino", "bf16", "bf16")
    gate_report_path(tmp_path, int8_cpu).unlink()
    os.mkfifo(gate_report_path(tmp_path, int8_cpu))
    report = json.loads(gate_report_path(tmp_path, bf16).read_text())
    gate_report_path(tmp_path, bf16).write_text(json.dumps({**report, "not_run": 1}))
    report = json.loads(gate_report_path(tmp_path, int8_ov).read_text())
    gate_report_path(tmp_path, int8_ov).write_text(json.dumps({**report, "environment": {**report["environment"],
                                                                                        "openvino": "2024.6.0"}}))
    (tmp_path / int8_ov.file).write_bytes(b"not an onnx file" * 64)
    proc = cli("deploy", "--retune", "-o", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = " ".join(proc.stderr.split())
    assert f"{int8_cpu.label}: left out ({gate_report_path(tmp_path, int8_cpu).name}: is not a regular file" in err
    assert f"{bf16.label}: left out ({gate_report_path(tmp_path, bf16).name}: not a parity report: not_run is " \
           f"not what crossvit writes)" in err
    assert f"{int8_ov.label}: not gated again: " in err and "not a readable ONNX file" in err
    chosen = Candidate(**json.loads(choice_path(fp32).read_text())["chosen"])
    assert chosen.key not in (int8_cpu.key, int8_ov.key, bf16.key) and chosen.file == fp32.name

    folder = tmp_path / "record_is_a_folder"
    folder.mkdir()
    choice_path(_copy(deployed, folder)).unlink()
    choice_path(folder / fp32.name).mkdir()
    one_line_error(cli("deploy", "--retune", "-o", folder), f"{choice_path(folder / fp32.name)}: is a directory")
    locked = tmp_path / "locked"
    locked.mkdir()
    _copy(deployed, locked)
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not possible here (root writes into a read-only folder)")
    try:
        one_line_error(cli("deploy", "--retune", "-o", locked), f"{choice_path(locked / fp32.name)}: cannot write "
                                                                "there (Operation not permitted)")
    finally:
        subprocess.run(["chattr", "-i", str(locked)])


def test_retune_gates_nothing_against_another_model(deployed, tmp_path):
    """A gate against a model other than the one the files came from would judge nothing: retune
    then gates no path again and says why, in a warning."""
    import torch

    from crossvit.model import load_model
    from crossvit.pipeline import DeployResult, regate_stage
    from crossvit.export.parity import ParityReport, reference_problem

    fp32 = _copy(deployed, tmp_path)
    same = load_model(name=DIGITS)
    assert reference_problem(fp32, same) is None
    other = load_model(name=DIGITS)
    with torch.no_grad():
        next(other.model.parameters()).mul_(1.5)
    assert "cosine" in reference_problem(fp32, other) or "max abs" in reference_problem(fp32, other)
    c = Candidate(fp32.name, "openvino", "fp32", "fp32")
    report = ParityReport.from_dict(json.loads(gate_report_path(tmp_path, c).read_text()))
    report.environment = {**report.environment, "cpu": {"cpu_model": "elsewhere"}}
    result, said = DeployResult(out_dir=tmp_path), []
    assert regate_stage(fp32, other, None, {c: report}, result, said.append) == {}
    assert result.warnings == said and len(said) == 1
    assert said[0].startswith(f"{c.label}: its gate does not hold here (gated on another CPU: elsewhere") and \
        said[0].endswith("give its checkpoint")


def _with_model_metadata(src, dst, **changes):
    """A copy of the ONNX file `src` at `dst` whose crossvit metadata's `model` has `changes`."""
    import onnx

    m = onnx.load(str(src))
    prop = next(p for p in m.metadata_props if p.key == "crossvit")
    meta = json.loads(prop.value)
    meta["model"] = {**meta["model"], **changes}
    prop.value = json.dumps(meta)
    onnx.save(m, str(dst))
    return dst


def test_retune_without_a_model_takes_the_one_its_folder_holds(deployed, small_artifacts, tmp_path, cli, one_line_error):
    """Deploy's own hint, `crossvit deploy --retune -o DIR`, names no model: after a crossvit_15_240
    deploy it built the default model's baseline and stopped at 'crossvit_digits.fp32.onnx is
    missing'. Given no model, retune takes the registered one named in the folder's fp32 file."""
    from crossvit.cli import retune_model
    from crossvit.model import DEFAULT_MODEL

    _, fp32, _ = deployed
    one = tmp_path / "one"
    one.mkdir()
    _with_model_metadata(fp32, one / "crossvit_15_240.fp32.onnx", name="crossvit_15_240")
    name, model = retune_model(one)
    assert name == "crossvit_15_240" and model["name"] == name
    assert retune_model(tmp_path / "nothing here") == (DEFAULT_MODEL, None)  # retune then says what is missing

    shutil.copy(fp32, one / fp32.name)
    line = one_line_error(cli("deploy", "--retune", "-o", one), "holds the deploys of several models", code=2)
    assert "crossvit_15_240.fp32.onnx" in line and fp32.name in line and "--model NAME" in line

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    shutil.copy(small_artifacts[1], foreign / "small.fp32.onnx")
    one_line_error(cli("deploy", "--retune", "-o", foreign), "was not made from a registered model", code=2)

    changed = tmp_path / "changed"
    changed.mkdir()
    config = json.loads(json.dumps(model["config"]))
    _with_model_metadata(fp32, changed / fp32.name, name="crossvit_15_240", config={**config, "num_classes": 7},
                         provenance={"random_weights": True, "init_seed": 3})
    proc = cli("deploy", "--retune", "-o", changed)
    one_line_error(proc, "is not the model its deploy", code=2)
    assert "random weights, for speed measurements only (init seed 3)" in proc.stderr  # the seed its files record


def test_deploy_names_the_files_in_its_folder_it_did_not_write(deployed):
    """Issue 24: deploying into a folder that holds other files (an earlier run's variants) left
    them without a word."""
    out, _, result = deployed
    said = [w for w in result.warnings if "this run did not write" in w]
    assert len(said) == 1 and "holds 1 file(s)" in said[0] and "notes.txt" in said[0]
    summary = json.loads((out / "summary.json").read_text())
    assert said[0] in summary["warnings"]


def test_predict_and_serve_say_why_they_run_the_fp32_file_when_the_other_paths_are_out(deployed, tmp_path, cli):
    """Issue 24: when the gated CPU paths beside an fp32 file are not used (a gate failed, a report
    is missing) predict and serve printed only the fp32 line; now one line says why."""
    from crossvit.assets import heldout_images
    from crossvit.runtime.serving.server import ServeOptions, Server

    fp32 = _copy(deployed, tmp_path)
    choice_path(fp32).unlink()
    int8_cpu = Candidate(f"{DIGITS}.int8-cpu.onnx", "onnxruntime", "int8-cpu")
    report = gate_report_path(tmp_path, int8_cpu)
    report.write_text(json.dumps({**json.loads(report.read_text()), "verdict": "fail"}))
    gate_report_path(tmp_path, Candidate(f"{DIGITS}.int8-ov.onnx", "openvino", "int8-ov")).unlink()
    for c in candidates_for(fp32):  # a file run with an OpenVINO hint: not gated here, so not named
        if c.hint:
            gate_report_path(tmp_path, c).unlink(missing_ok=True)
    candidate, why = decide_cpu_path(fp32)
    assert candidate is None and why == (
        f"ONNX Runtime int8-cpu ({DIGITS}.int8-cpu.onnx): its gate said 'fail'; OpenVINO int8-ov "
        f"({DIGITS}.int8-ov.onnx): no gate report beside it ({DIGITS}.int8-ov.parity.json)")
    proc = cli("predict", fp32, sorted(heldout_images().glob("*.png"))[0])
    assert proc.returncode == 0, proc.stderr
    assert [l for l in proc.stderr.splitlines() if l.startswith("# running")] == [
        f"# running {fp32.name} as given: {why}"]
    said = []
    server = Server(fp32, ServeOptions(), say=said.append)
    server.session.close()
    assert f"running {fp32.name} as given: {why}" in said
    assert not any("compiled" in line for line in said)  # ONNX Runtime: nothing to prepare
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(fp32, lone / fp32.name)
    assert decide_cpu_path(lone / fp32.name) == (None, None)  # a lone file: nothing to say
    with open_session(lone / fp32.name) as s:
        assert s.passed_over is None and s.chosen is None


def test_an_int8_file_with_8_bit_weights_is_left_out_on_a_cpu_without_vnni(small_artifacts, tmp_path):
    """int8 made before 7-bit weights (int8-cpu's reduce_range) saturates on x86 without VNNI: a gate
    passed on a VNNI machine says nothing there, so such a file is left out, with the reason."""
    import platform

    from conftest import rewrite_onnx_metadata
    from crossvit.export.precision import convert_precision
    from crossvit.runtime.cpu_choice import _saturates_here

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the saturation is x86's (VPMADDUBSW)")
    _, onnx_path = small_artifacts
    made = convert_precision(onnx_path, tmp_path / "s.int8-cpu.onnx", "int8-cpu", None)
    int8 = Candidate(made.name, "onnxruntime", "int8-cpu")
    assert read_artifact(made).raw["precision_tool"]["reduce_range"] is True
    assert _saturates_here(tmp_path, int8, {"avx2"}) is None  # 7-bit weights: safe everywhere
    old = rewrite_onnx_metadata(made, tmp_path / "o.int8-cpu.onnx",
                                lambda meta, _: meta["precision_tool"].pop("reduce_range"))
    old_int8 = Candidate(old.name, "onnxruntime", "int8-cpu")
    assert "saturate on a CPU without VNNI" in _saturates_here(tmp_path, old_int8, {"avx2", "fma"})
    assert _saturates_here(tmp_path, old_int8, {"avx2", "avx512_vnni"}) is None
    assert _saturates_here(tmp_path, Candidate(onnx_path.name, "onnxruntime", "fp32"), {"avx2"}) is None


def test_int8_ov_takes_8_bit_weights_only_where_this_cpu_has_vnni(small_artifacts, tmp_path, monkeypatch):
    """int8-ov is made for the machine that runs it: where int8 products sum in int32 (VNNI, AMX),
    8-bit weights and symmetric activations (crossvit_15_240: the same accuracy, 3.5-4.5 % faster
    at batch 1); elsewhere 7-bit weights, which no x86 CPU saturates. The file says which, and a CPU
    without VNNI leaves a VNNI-made file out, with the reason."""
    import platform

    import onnx
    from onnx import numpy_helper

    from crossvit.export.precision import convert_precision
    from crossvit.runtime import cpu_choice

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the saturation is x86's (VPMADDUBSW)")
    _, onnx_path = small_artifacts
    images = np.random.default_rng(0).standard_normal((32, 3, 32, 32), dtype=np.float32)
    made = {}
    for label, flags in (("vnni", {"avx2", "avx512f", "avx512_vnni"}), ("avx2", {"avx2", "fma"})):
        monkeypatch.setattr(cpu_choice, "cpu_flags", lambda flags=flags: set(flags))
        made[label] = convert_precision(onnx_path, tmp_path / f"{label}.int8-ov.onnx", "int8-ov", images)
    vnni, avx2 = (read_artifact(made[k]).raw["precision_tool"] for k in ("vnni", "avx2"))
    assert vnni["overflow_fix"] == cpu_choice.VNNI_ONLY and vnni["activations"] == "symmetric"
    assert avx2["overflow_fix"] == "all layers" and avx2["activations"].startswith("asymmetric")

    def zero_points(path):
        m = onnx.load(str(path))
        init = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
        return [init[n.input[2]] for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[2] in init]

    assert zero_points(made["vnni"]) and not any(np.any(z != 0) for z in zero_points(made["vnni"]))
    assert any(np.any(z != 0) for z in zero_points(made["avx2"]))  # NNCF's mixed preset: some asymmetric
    on_vnni = Candidate(made["vnni"].name, "openvino", "int8-ov")
    assert "made on one with VNNI" in cpu_choice._saturates_here(tmp_path, on_vnni, {"avx2", "fma"})
    assert cpu_choice._saturates_here(tmp_path, on_vnni, {"avx2", "amx_int8"}) is None
    assert cpu_choice._saturates_here(tmp_path, Candidate(made["avx2"].name, "openvino", "int8-ov"), {"avx2"}) is None
