"""`crossvit bench`: all backends in one run, against the machine's own GEMM rates."""

import csv
import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_builds_variants_times_every_backend_and_writes_json_and_csv(tmp_path, cli):
    proc = cli("bench", "--batch-sizes", "1,2", "--runs", "3", "--max-seconds", "2", "--served",
               "--json", tmp_path / "b.json", "--csv", tmp_path / "b.csv", "--plot", tmp_path / "b.png")
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "b.json").read_text())
    rows = data["rows"]
    backends = {(r["backend"], r["precision"]) for r in rows}
    assert ("torch eager (cpu)", "fp32") in backends
    assert {p for _, p in backends} >= {"fp32", "int8-cpu"}
    # the fp32 file through `crossvit serve` and the real tritonclient, both protocols, every batch size
    served = [r for r in rows if r["backend"].startswith("served ")]
    assert {(r["backend"].split()[1], r["batch"]) for r in served} == {(k, b) for k in ("HTTP", "gRPC") for b in (1, 2)}
    for r in rows:
        assert 0 < r["p50_ms"] <= r["p99_ms"] and r["images_per_s"] > 0 and r["gflops"] > 0
        assert ("noisy: turns disagree" in r["note"]) == (r["spread"] > 0.25)
        if r["backend"] == "torch eager (cpu)":  # the baseline against itself, turn by turn
            assert r["vs_eager"] == 1.0
        # each turn's median, as deploy's summary has them: the ratio's turn-by-turn pairs can be read back
        assert len(r["turns_ms"]) >= 2 and min(r["turns_ms"]) <= r["p50_ms"] * 1.0001 and all(t > 0 for t in r["turns_ms"])
    assert {"torch fp32", "onnxruntime fp32", "onnxruntime int8"} <= set(data["gemm_gflops"])
    assert all(r["of_peak"] is not None for r in rows if r["precision"] in ("fp32", "int8-cpu"))
    assert data["accuracy"]["crossvit_digits.fp32.onnx"]["verdict"] == "pass"
    if ("torch autocast (cpu)", "bf16") in backends:  # CPUs with bf16 instructions, at every batch size
        for b in (1, 2):
            bf16 = data["accuracy"][f"torch autocast (cpu) bf16 b{b}"]
            assert 0 < bf16["rel_l2"] < 5e-2 and bf16["cosine"] > 0.99
        # and on the labelled held-out images, through the parity gate's real-image case
        images = data["accuracy"]["torch autocast (cpu) bf16 images"]
        assert images["top1_agreement_images"] >= 0.99 and images["accuracy_reference"] >= 97
        assert abs(images["accuracy"] - images["accuracy_reference"]) <= 1.0
    assert data["machine"]["onnxruntime"] and "bench" in data["command"]
    table = list(csv.DictReader(open(tmp_path / "b.csv")))
    assert len(table) == len(rows)
    assert [float(t) for t in table[0]["turns_ms"].split()] == pytest.approx(rows[0]["turns_ms"], rel=1e-5)
    assert "GFLOP per image" in proc.stdout and "of peak" in proc.stdout
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name, params_m, paper_gflops", [("crossvit_tiny_240", 7.0, 1.6),
                                                          ("crossvit_15_240", 27.4, 5.8)])
def test_model_flops_agree_with_the_paper(name, params_m, paper_gflops):
    """The paper counts multiply-adds as FLOPs; ours counts 2 per multiply-add (matmuls, convolutions
    and the attention matmuls that PyTorch's counter misses on the CPU)."""
    from crossvit.benchmarks.limits import model_gflops
    from crossvit.model import create_model

    model = create_model(name)
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - params_m) / params_m < 0.02
    macs = model_gflops(model) / 2
    assert 0.97 < macs / paper_gflops < 1.05, macs


@pytest.mark.parametrize("config", [
    {},  # timm's defaults: 224 px, cross depth 1
    {"img_size": 64, "img_scale": (1.0, 0.75), "patch_size": (8, 16), "embed_dim": (24, 48),
     "depth": ((1, 2, 0), (2, 1, 2)), "num_heads": (2, 4), "mlp_ratio": (3.0, 2.5), "num_classes": 7},
    {"img_size": (192, 96), "img_scale": (1.0, 0.5), "patch_size": (12, 16), "embed_dim": (16, 32),
     "depth": ((1, 1, 1),), "num_heads": (2, 2), "mlp_ratio": (2.0, 4.0), "multi_conv": True, "crop_scale": True},
    {"img_size": 56, "img_scale": (1.0, 1.0), "patch_size": (8, 14), "embed_dim": (20, 40), "depth": ((2, 1, 1),),
     "num_heads": (2, 4), "multi_conv": False, "num_classes": 3},
])
def test_flops_from_the_config_equal_pytorchs_count(config):
    """The analytic count (which `bench` uses) against torch.utils.flop_counter on small configs:
    resize, dagger stems, centre crop, uneven depths, cross depth 0 and 2, unequal MLP ratios."""
    import torch

    from crossvit.benchmarks.flops import count_flops, official_flops
    from crossvit.model.official import OfficialConfig, OfficialCrossViT

    model = OfficialCrossViT.from_config(OfficialConfig(**config)).eval()
    c, h, w = model.input_shape
    analytic = official_flops(model.config)
    assert analytic["total"] == count_flops(model, torch.zeros(1, c, h, w))
    assert analytic["attention"] > 0 and analytic["linear"] > analytic["attention"] / 10


def test_bench_refuses_bad_arguments_in_one_line(tmp_path, cli, one_line_error):
    one_line_error(cli("bench", "--batch-sizes", "0,2"), "--batch-sizes", code=2)
    one_line_error(cli("bench", "--batch-sizes", "1,99999999999999999999", "--no-accuracy", tmp_path / "missing.onnx"),
                   "over the limit of 4096", code=2)  # before any file is read or array allocated
    one_line_error(cli("bench", tmp_path / "missing.onnx"), "no such file")
    (tmp_path / "d").mkdir()
    one_line_error(cli("bench", "--json", tmp_path / "d"), "is a directory")
    one_line_error(cli("bench", "--precisions", "fp32,fp9"), "expected comma-separated precisions", code=2)
    one_line_error(cli("bench", "--max-seconds", "-1"), "a number > 0", code=2)
    one_line_error(cli("bench", "--backends", "onnxruntime,trt"), "expected comma-separated rows", code=2)
    one_line_error(cli("bench", tmp_path / "d", "--no-accuracy"), "is a directory")
    for name in ("b.txt", "b.pgf"):  # pgf needs LaTeX: it would fail after the run
        one_line_error(cli("bench", "--plot", tmp_path / name), "a plot is written as .png, .svg, .pdf", code=2)
        assert not (tmp_path / name).exists()
    # --json and --csv on one file: the CSV replaced the JSON, and both were said written
    one_line_error(cli("bench", "--json", tmp_path / "same", "--csv", tmp_path / "same"),
                   "--json and --csv name the same file", code=2)
    # two files of one name gave one row (rows are named by the file), before any file is read
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "m.fp32.onnx").write_text("not read")
    one_line_error(cli("bench", tmp_path / "a" / "m.fp32.onnx", tmp_path / "b" / "m.fp32.onnx"), "have the same name")
    # an output file the final rename cannot replace is said before the run, not after it
    locked = tmp_path / "locked.json"
    locked.write_text("{}")
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode == 0:
        try:
            one_line_error(cli("bench", "--json", locked), "immutable or append-only")
        finally:
            subprocess.run(["chattr", "-i", str(locked)])


def test_gpu_acceptance_refuses_bad_arguments_in_one_line_before_any_step(tmp_path, capsys):
    from crossvit.benchmarks.gpu_acceptance import main

    (tmp_path / "file").write_text("x")
    assert main(["--out", str(tmp_path / "file")]) == 1
    assert "not a folder" in capsys.readouterr().err
    assert main(["--bench-models", "crossvit_15_240,nosuch", "--out", str(tmp_path / "o")]) == 1
    assert "unknown model name 'nosuch'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--budget-seconds", "nan"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--budget-seconds" in err and err.count("\n") == 1, err


def test_bench_refuses_a_baseline_of_another_input_size(small_artifacts, tmp_path, cli, one_line_error):
    """It timed crossvit_tiny_240 as the baseline of a 32-px file, skipped the file with a note and
    exited 0."""
    ckpt, onnx_path = small_artifacts
    one_line_error(cli("bench", onnx_path, "--model", "crossvit_tiny_240", "--batch-sizes", "1", "--no-accuracy",
                       "--json", tmp_path / "b.json"), "takes 3x32x32 inputs, the PyTorch baseline crossvit_tiny_240 takes 3x240x240")
    assert not (tmp_path / "b.json").exists()


@pytest.mark.slow  # exports and times the embedded model
def test_bench_rows_say_what_was_dropped_and_how_a_batch_outside_the_files_range_ran(tmp_path, cli):
    """What a run could not time is in the result's notes (JSON), not only on stderr; a batch the
    file cannot take at once is labelled with how it ran; a batch size given twice is timed once."""
    assert cli("export", "-o", tmp_path / "d1.onnx", "--batch", "1:1").returncode == 0
    proc = cli("bench", tmp_path / "d1.onnx", "--batch-sizes", "1,2,2", "--runs", "3", "--max-seconds", "2",
               "--no-accuracy", "--json", tmp_path / "b.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "b.json").read_text())
    ort = [r for r in data["rows"] if r["backend"].startswith("onnxruntime")]
    assert [r["batch"] for r in ort] == [1, 2]
    assert "runs as 2 calls" in ort[1]["note"] and "runs as" not in ort[0]["note"]
    assert "python" in data["command"] or "crossvit" in data["command"]
    # a file --backends leaves out, or an int8-ov file where OpenVINO is left out, is a note, not silence
    assert cli("export", "-o", tmp_path / "d1.int8-ov.onnx", "--precision", "int8-ov", "--batch", "1:2").returncode in (0, 3)
    given = [tmp_path / "d1.onnx", *([tmp_path / "d1.int8-ov.onnx"] if (tmp_path / "d1.int8-ov.onnx").exists() else [])]
    proc = cli("bench", *given, "--backends", "tensorrt", "--batch-sizes", "1", "--runs", "3", "--max-seconds", "1",
               "--no-accuracy", "--json", tmp_path / "t.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    notes = json.loads((tmp_path / "t.json").read_text())["notes"]
    assert "no row for d1.onnx: --backends tensorrt leaves out onnxruntime and openvino" in notes, notes
    if len(given) == 2:
        proc = cli("bench", *given, "--backends", "onnxruntime", "--batch-sizes", "1", "--runs", "3",
                   "--max-seconds", "1", "--no-accuracy", "--json", tmp_path / "o.json")
        assert proc.returncode == 0, proc.stderr[-2000:]
        notes = json.loads((tmp_path / "o.json").read_text())["notes"]
        assert ("no row for d1.int8-ov.onnx: an int8-ov file runs in OpenVINO, and --backends onnxruntime leaves "
                "out openvino") in notes, notes
    proc = cli("bench", "--precisions", "fp32,bf16", "--batch-sizes", "1", "--runs", "3", "--max-seconds", "2",
               "--no-accuracy", "--json", tmp_path / "c.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "c.json").read_text())
    # ONNX Runtime's CPU provider has no bf16 MatMul (deploy's test says the same): a note, no row
    assert any(n.startswith("batch 1: skipped crossvit_digits.bf16.onnx") for n in data["notes"])
    assert not any(r["precision"] == "bf16" and r["backend"].startswith("onnxruntime") for r in data["rows"])


def test_bench_on_cuda_without_a_gpu_says_so_in_one_line(cli, one_line_error):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    one_line_error(cli("bench", "--device", "cuda", "--no-accuracy"), "no CUDA device", code=3)


def test_the_table_says_which_rows_each_timer_read():
    from crossvit.benchmarks.report import Result, Row

    def row(backend, timer):
        return Row(backend, "fp32", 1, 1.0, 1.0, 1.0, 1000.0, 1.0, 1.0, None, 0.0, timer=timer)

    on_gpu = Result("m", 1.0, rows=[row("torch eager (cuda)", "cuda-events"), row("onnxruntime (m.fp32)", "wall"),
                                    row("torch eager (cuda)", "cuda-events")])
    assert ("timed by CUDA events: torch eager (cuda); the host clock: onnxruntime (m.fp32)"
            in on_gpu.table().splitlines())
    assert "timed by" not in Result("m", 1.0, rows=[row("torch eager (cpu)", "wall")]).table()


def test_accuracy_lines_round_floats_and_keep_verdicts():
    from crossvit.benchmarks.report import Result

    result = Result("m", 1.0, accuracy={"m.int8-cpu.onnx": {"verdict": "pass", "rel_l2": 0.0041289001738311635,
                                                             "accuracy": 99.44444444444444}})
    assert "accuracy m.int8-cpu.onnx: verdict pass, rel_l2 0.0041289, accuracy 99.4444" in result.table().splitlines()


@pytest.mark.gpu
def test_pytorch_rows_on_a_gpu_are_timed_by_cuda_events(tmp_path, cli):
    """On a GPU, PyTorch's rows are read by CUDA events (the device's time from the first launch
    to the last) and the rows whose calls return host arrays by the host's clock; each row says
    which. The events' reading of a long matmul is close to, and not above, the host's."""
    import statistics

    import torch

    from crossvit.benchmarks.cuda_timer import CudaEvents
    from crossvit.runtime.timing import WallClock

    a = torch.randn(4096, 4096, device="cuda")
    events, wall = CudaEvents(), WallClock(torch.cuda.synchronize)
    for _ in range(20):  # the clocks settle
        a @ a
        events.sync()
    readings = [(events.time(lambda: a @ a), wall.time(lambda: a @ a)) for _ in range(15)]  # alternately
    by_events, by_wall = (statistics.median(r) for r in zip(*readings))
    assert 0.5 * by_wall < by_events <= by_wall * 1.05 + 0.02, (by_events, by_wall)

    proc = cli("bench", "--device", "cuda", "--backends", "autocast,cuda-graph,onnxruntime", "--precisions", "fp32",
               "--batch-sizes", "1", "--runs", "6", "--max-seconds", "2", "--no-accuracy", "--json", tmp_path / "g.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "g.json").read_text())["rows"]
    assert {r["timer"] for r in rows if r["backend"].startswith("torch")} == {"cuda-events"}
    # session rows exist only with onnxruntime-gpu (absent on the lent machines); the table test
    # above covers the host-clock side on a CPU
    assert all(r["timer"] == "wall" for r in rows if not r["backend"].startswith("torch"))
    assert all(r["p50_ms"] > 0 and r["runs"] >= 6 for r in rows)
    assert "timed by CUDA events: torch eager (cuda)" in proc.stdout


def test_gpu_acceptance_says_plainly_when_there_is_no_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: run the script itself")
    proc = subprocess.run([sys.executable, "-m", "crossvit.benchmarks.gpu_acceptance"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and "Traceback" not in proc.stderr


def test_gpu_acceptance_logic_on_the_cpu(tmp_path):
    """The parts of the GPU benchmark step that need no GPU: a model that does not fit the budget is
    skipped and said so (CUDA is never touched), and a row that disagrees with eager fp32, NaN
    included, is named."""
    from crossvit.benchmarks.gpu_acceptance import bench_step, disagreeing

    assert bench_step(["crossvit_digits", "crossvit_15_240"], tmp_path, budget=0.0) == [
        ("bench crossvit_digits (cuda)", None, "skipped: 0 s of the budget left"),
        ("bench crossvit_15_240 (cuda)", None, "skipped: 0 s of the budget left")]
    rows = {"torch autocast (cuda) fp16": {"cosine": 0.99999}, "torch CUDA graph (cuda) fp16": {"cosine": float("nan")},
            "torch autocast (cuda) bf16": {"cosine": 0.98}}
    assert [w.split(" (cosine")[0] for w in disagreeing(rows)] == ["torch CUDA graph (cuda) fp16",
                                                                    "torch autocast (cuda) bf16"]


def test_compiled_rows_at_every_batch_agree_with_eager_and_a_compiler_failure_costs_only_its_row(monkeypatch):
    """torch.compile for real on the CPU (the embedded model): one compiled model serves every
    batch size, its row at each size agrees with eager fp32, and saving after each batch size sees
    the rows so far. Then a compiler that fails: the row is gone, the reason said, the rest runs."""
    import torch

    from crossvit.benchmarks.limits import has_bf16
    from crossvit.benchmarks.suite import run
    from crossvit.model import load_model

    model = load_model(name="crossvit_digits").model
    said, saved = [], []
    result = run(model, "digits", [], batch_sizes=[1, 3], runs=3, max_seconds=0.5, compile=True,
                 progress=said.append, on_batch=lambda r: saved.append(len(r.rows)))
    compiled = [r for r in result.rows if r.backend == "torch.compile (cpu)"]
    assert [r.batch for r in compiled] == [1, 3]
    for b in (1, 3):
        agree = result.accuracy[f"torch.compile (cpu) fp32 b{b}"]
        assert agree["cosine"] > 0.99999 and agree["top1_agreement"] == 1.0
    per_batch = len(result.rows) // 2
    assert saved == [per_batch, 2 * per_batch]
    assert any("torch.compile (cpu): first call at batch 1" in m for m in said)
    if has_bf16():  # the bf16 model compiled with inductor's freezing: a peer of our CPU paths
        frozen = [r for r in result.rows if r.backend == "torch.compile bf16 freezing (cpu)"]
        assert [(r.batch, r.precision) for r in frozen] == [(1, "bf16"), (3, "bf16")]
        for b in (1, 3):
            agree = result.accuracy[f"torch.compile bf16 freezing (cpu) bf16 b{b}"]
            assert agree["rel_l2"] < 2e-2 and agree["top1_agreement"] == 1.0

    def broken(module, **kw):
        def call(*a):
            raise RuntimeError("inductor: no C compiler\nlong details")
        return call
    monkeypatch.setattr(torch, "compile", broken)
    said.clear()
    result = run(model, "digits", [], batch_sizes=[1, 2], runs=3, max_seconds=0.3, compile=True, progress=said.append)
    assert not [r for r in result.rows if "compile" in r.backend]
    assert {r.batch for r in result.rows if r.backend == "torch eager (cpu)"} == {1, 2}
    assert [m for m in said if m.startswith("no torch.compile (cpu) rows")] == [
        "no torch.compile (cpu) rows: RuntimeError: inductor: no C compiler"]  # once, not at every batch


def test_a_deadline_skips_what_would_not_fit_and_says_so():
    """`fits`: the next batch size is judged by the previous one (20 % margin); the torch.compile
    row goes first (twice the longest compile so far), then the batch sizes, each with a reason.
    And `run` with a deadline already past times the first batch size only, noting the rest."""
    from crossvit.benchmarks.suite import fits, run
    from crossvit.model import load_model

    assert fits(100.0, 30.0, [20.0], True, [64, 256]) == (True, True, "")
    go, keep, why = fits(60.0, 30.0, [20.0], True, [64, 256])
    assert (go, keep) == (True, False) and why.startswith("torch.compile rows dropped from batch 64: 60 s left")
    go, keep, why = fits(30.0, 30.0, [], False, [64, 256])
    assert (go, keep) == (False, False) and why.startswith("batch sizes 64, 256 skipped: 30 s left")
    assert fits(40.0, 30.0, [], False, [64]) == (True, False, "")
    # after two shapes compiled (batch 1, then the dynamic-batch graph at 8), batch 64 reuses it:
    # compiles of 60 and 70 s do not drop its row from 80 s left (twice the longest did, on an H100)
    assert fits(80.0, 10.0, [60.0, 70.0], True, [64, 256]) == (True, True, "")
    assert fits(30.0, 10.0, [60.0, 70.0, 3.0], True, [256]) == (True, True, "")
    assert fits(30.0, 10.0, [60.0, 70.0, 40.0], True, [256])[:2] == (True, False)  # that reuse recompiled
    assert fits(30.0, 10.0, [60.0, 70.0, 3.0], True, [1])[:2] == (True, False)  # batch 1 is its own graph

    result = run(load_model(name="crossvit_digits").model, "digits", [], batch_sizes=[1, 2, 4], runs=3, max_seconds=0.3, deadline=0.0)
    assert {r.batch for r in result.rows} == {1}
    skips = [n for n in result.notes  # these two notes depend on the box's load
             if not n.startswith("the machine was busy") and "row(s) noisy" not in n]
    assert len(skips) == 1 and skips[0].startswith("batch sizes 2, 4 skipped: 0 s left")
    assert "note: batch sizes 2, 4 skipped" in result.table() and result.to_dict()["notes"] == result.notes


def test_fusion_benchmark_refuses_bad_arguments_in_one_line_before_the_run(tmp_path, capsys, monkeypatch):
    from crossvit.benchmarks.fusion import main
    from crossvit.install import pip_install

    (tmp_path / "file").write_text("x")
    assert main(["--out", str(tmp_path / "file"), "--tokens", "64"]) == 1
    assert "exists and is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--tokens", "a"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--tokens" in err and err.count("\n") == 1, err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the bench extra were not installed
    assert main(["--out", str(tmp_path / "out"), "--tokens", "64"]) == 3
    err = capsys.readouterr().err
    assert pip_install("bench") in err and err.count("\n") == 1 and not (tmp_path / "out" / "fusion.json").exists()


def test_cls_cross_attention_fusion_is_linear_and_all_attention_quadratic_in_flops():
    """The paper's claim, in FLOPs: doubling the tokens doubles cross-attention's cost (the one
    CLS query) but grows all-attention fusion's faster, towards 4x (every token attends to all)."""
    from crossvit.benchmarks.fusion import all_fusion, blocks, cross_fusion, flops, fusion_inputs

    cross, full = blocks(64, 4)
    cost = {}
    for n in (256, 512, 1024):
        cls, patches = fusion_inputs(n, 64)
        cost[n] = (flops(cross_fusion, cross, cls, patches), flops(all_fusion, full, cls, patches))
    for small, big in ((256, 512), (512, 1024)):
        assert 1.8 < cost[big][0] / cost[small][0] < 2.1  # linear
        assert cost[big][1] / cost[small][1] > 2.5  # quadratic term dominating
    assert cost[1024][1] > 10 * cost[1024][0]


def test_interleaved_turns_report_their_spread_and_deploy_flags_noisy_rows(monkeypatch):
    """A backend whose speed changes between turns (as another tenant would make it) is flagged
    noisy, in the timing result and in deploy's table; a steady one is not.
    Each backend here returns the call times of one turn, so the test needs no clock."""
    from crossvit.benchmarks import latency
    from crossvit.model import load_model
    from crossvit.pipeline import latency_stage
    from crossvit.runtime import timing

    monkeypatch.setattr(timing, "_timed", lambda fn, **kw: fn())
    turns = {"n": 0}

    def drifting():  # 1 ms a call in the first turn, 6 ms in the later ones
        turns["n"] += 1
        return [1.0, 1.1, 0.9] if turns["n"] == 1 else [6.0, 6.1, 5.9]

    lat = timing.measure_interleaved({"steady": lambda: [2.0, 2.1, 1.9], "drifting": drifting}, batch=1, runs=9)
    assert lat["drifting"].noisy and lat["drifting"].spread == 5.0 and lat["drifting"].runs == 9
    assert lat["drifting"].turns_ms == (1.0, 6.0, 6.0) and lat["steady"].turns_ms == (2.0, 2.0, 2.0)
    assert not lat["steady"].noisy and lat["steady"].to_dict()["spread"] == 0.0

    def time_cpu_backends(model, artifacts, **kw):  # the PyTorch row drifts, as on a busy machine
        turns["n"] = 0
        return timing.measure_interleaved({latency.BASELINE: drifting}, batch=1, runs=9), {}

    monkeypatch.setattr(latency, "time_cpu_backends", time_cpu_backends)
    rows = latency_stage(load_model(name="crossvit_digits"), {}, {}, "d", batch=1, runs=9, max_seconds=5)
    assert rows[0].note.startswith("noisy: turns disagree (500% at batch 1)") and rows[0].latency["spread"] == 5.0
    assert rows[0].speedup == 1.0  # the baseline against itself


def test_bench_backends_pick_the_rows_and_min_time_sets_the_timed_time(tmp_path, cli):
    """--backends keeps only the rows named (eager fp32, the baseline, always), builds no ONNX
    when no ONNX row is wanted; --min-time makes each backend's recorded call times add up to at
    least that (`timed_s`; once asserted as runs x p50, which a busy machine's skewed times broke)."""
    proc = cli("bench", "--backends", "autocast", "--batch-sizes", "1", "--runs", "3", "--min-time", "0.6",
               "--max-seconds", "600", "--json", tmp_path / "a.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "a.json").read_text())
    backends = {r["backend"] for r in data["rows"]}
    assert backends <= {"torch eager (cpu)", "torch autocast (cpu)"} and "torch eager (cpu)" in backends
    assert "exporting" not in proc.stderr and not any(k.endswith(".onnx") for k in data["accuracy"])
    eager = next(r for r in data["rows"] if r["backend"] == "torch eager (cpu)")
    assert eager["images_per_s"] > 0 and eager["timed_s"] >= 0.6 and "--min-time" not in eager["note"]


def test_a_busy_machine_is_said_and_a_quiet_one_is_not():
    from crossvit.benchmarks.machine import busy_machine

    assert "load average 1.60 on 2 cores" in busy_machine({"load_average": [1.6, 1.0, 0.9], "cores": 2})
    assert busy_machine({"load_average": [0.6, 1.0, 0.9], "cores": 2}) is None  # a run's own export
    assert busy_machine({"load_average": [6.0, 1.0, 0.9], "cores": 16}) is None  # 6 of 16 cores


def test_bench_asks_for_the_baseline_of_an_unregistered_models_artifact(small_artifacts, cli, one_line_error):
    """It once timed the embedded model as the baseline of any such file (same input size, another model)."""
    ckpt, onnx_path = small_artifacts
    one_line_error(cli("bench", onnx_path, "--batch-sizes", "1", "--no-accuracy"), "names no registered model")


def test_bench_of_a_checkpoint_is_named_by_it(small_artifacts, tmp_path, cli):
    """`bench --checkpoint P` times that model under its own name (it was labelled as the embedded
    model), and given the checkpoint, an unregistered model's artifact is benched against it."""
    ckpt, onnx_path = small_artifacts
    proc = cli("bench", "--checkpoint", ckpt, "--precisions", "fp32", "--batch-sizes", "1", "--runs", "3",
               "--max-seconds", "1", "--no-accuracy", "--json", tmp_path / "c.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["model"] == "small" and any(r["backend"] == "onnxruntime (small.fp32)" for r in data["rows"])
    proc = cli("bench", onnx_path, "--checkpoint", ckpt, "--batch-sizes", "1", "--runs", "3", "--max-seconds", "1",
               "--json", tmp_path / "d.json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "d.json").read_text())["accuracy"]["small.onnx"]["verdict"] == "pass"


def test_a_gemm_rate_is_kept_only_when_its_product_runs():
    """The GPU's int8/fp8 rates are probed once: a product this build or device lacks is no rate."""
    from crossvit.benchmarks.limits import _add_if_it_runs, _int8_matmul

    def missing():
        raise RuntimeError("no kernel")
    fns = {}
    _add_if_it_runs(fns, "torch fp8", missing)
    _add_if_it_runs(fns, "torch int8", _int8_matmul(64, "cpu"))
    assert list(fns) == ["torch int8"] and fns["torch int8"]().dtype.is_floating_point is False


def _latency(p50: float, spread: float | None, batch: int = 1, turns: tuple | None = None):
    from crossvit.runtime.timing import Latency

    return Latency(batch=batch, runs=9, p50_ms=p50, p90_ms=p50, p99_ms=p50, mean_ms=p50, spread=spread, timed_s=0.1,
                   turns_ms=turns)


def test_ratios_are_taken_turn_by_turn():
    """This host slows a process 1.7x for stretches of seconds. Two backends timed in the same
    turns see the same stretch: the ratio of each turn holds where the pooled medians mix a slow
    stretch of one with a fast one of the other. The ratio is the median of the turns' ratios,
    given where those agree (interquartile range within 10 % of the median; range within 25 %
    with fewer than four turns)."""
    from crossvit.benchmarks.latency import ratio

    slow = (1.0, 1.7, 1.7, 1.0, 1.0, 1.7)  # the host's stretches, turn by turn
    base = _latency(90.0, 0.7, turns=tuple(90.0 * s for s in slow))
    this = _latency(30.0, 0.7, turns=tuple(30.0 * s for s in slow))
    assert base.noisy and this.noisy  # the pooled rule gave no ratio here
    assert ratio(base, this) == (pytest.approx(3.0), "")
    one_off = _latency(30.0, 0.7, turns=(30.0, 51.0, 51.0, 30.0, 30.0, 30.0))  # the baseline slowed alone in turn 6
    assert ratio(base, one_off)[0] == pytest.approx(3.0)  # one turn out of six moves no median
    apart = _latency(30.0, 0.7, turns=(51.0, 30.0, 51.0, 30.0, 51.0, 30.0))  # stretches that miss the baseline's
    value, why = ratio(base, apart)
    # base 90 / 153 / 153 / 90 / 90 / 153 over 51 / 30 / 51 / 30 / 51 / 30: 1.76x to 5.10x, said with the rule it broke
    assert value is None and why.startswith("its ratio to the baseline moved from turn to turn (1.76-5.10x; "
                                            "interquartile range"), why
    three = _latency(30.0, 0.3, turns=(30.0, 33.0, 40.0))  # three turns: the range rule, 33 % over 25 %
    value, why = ratio(_latency(90.0, 0.0, turns=(90.0, 90.0, 90.0)), three)
    assert value is None and "(2.25-3.00x; range 33% of it, over 25%)" in why
    assert ratio(_latency(90.0, 0.0, turns=(90.0, 90.0, 90.0)), _latency(30.0, 0.1, turns=(30.0, 31.0, 32.0)))[0] \
        == pytest.approx(90.0 / 31.0)
    assert ratio(base, _latency(30.0, 0.0, turns=(30.0, 30.0, 30.0)))[0] is None  # not timed in the same turns:
    # the pooled rule, and the baseline's turns disagree


def test_bench_prints_no_ratio_for_a_row_whose_turns_or_baselines_disagree():
    """Issue 24: eager went from 1.2 to 498 ms under load and the table said 452x. A row whose
    turns disagree (or whose baseline's do) gets no ratio: `-` in the table, null and why in JSON."""
    from crossvit.benchmarks.report import Result
    from crossvit.benchmarks.suite import add_rows

    base, ort = ("torch eager (cpu)", "fp32"), ("onnxruntime (m.fp32)", "fp32")
    quiet = Result("m", 1.0)
    add_rows(quiet, {base: _latency(2.0, 0.1), ort: _latency(0.5, 0.05)}, 1, base)
    assert [r.vs_eager for r in quiet.rows] == [1.0, 4.0] and "4.00x" in quiet.table()
    capped = Result("m", 1.0)  # timed_s 0.1 s each: --min-time 0.6 was cut short by --max-seconds
    add_rows(capped, {base: _latency(2.0, 0.1)}, 1, base, min_seconds=0.6)
    assert capped.rows[0].note == "timed 0.10 s of --min-time 0.6 s (--max-seconds stopped it)"
    noisy_ort = Result("m", 1.0)
    add_rows(noisy_ort, {base: _latency(2.0, 0.1), ort: _latency(0.5, 1.5)}, 1, base)
    row = noisy_ort.rows[1]
    assert row.vs_eager is None and row.no_ratio.startswith("its turns disagree by 150%")
    assert row.note.startswith("noisy: turns disagree (150%), no ratio")
    line = next(l for l in noisy_ort.table().splitlines() if l.startswith("onnxruntime"))
    assert "x " not in line and line.split()[10] == "-"  # the vs eager column
    noisy_eager = Result("m", 1.0)
    add_rows(noisy_eager, {base: _latency(498.0, 400.0), ort: _latency(0.5, 0.05)}, 1, base)
    eager, ort_row = noisy_eager.rows
    assert eager.vs_eager == 1.0 and ort_row.vs_eager is None
    data = noisy_eager.to_dict()["rows"][1]
    assert data["vs_eager"] is None and data["no_ratio"].startswith("the baseline's turns disagree by 40000%")
    assert "452" not in noisy_eager.table() and "996.00x" not in noisy_eager.table()


def test_the_noisy_rows_note_names_the_load_seen():
    from crossvit.benchmarks.latency import noisy_rows_note

    note = noisy_rows_note(2, cores=2)
    assert note.startswith("2 row(s) noisy") and "no ratio" in note
    assert "load average " in note
    assert "(1 / 5 / 15 min) on 2 cores after timing" in note


def test_deploy_gives_no_ratio_from_noisy_turns_and_its_cpu_choice_says_so(tmp_path):
    """Deploy's rows: no ratio where the row's or the baseline's turns disagree, no dangling "; "
    after the noisy note; the CPU choice stands on the medians and says when they were noisy."""
    from crossvit.benchmarks.latency import BASELINE
    from crossvit.pipeline import DeployResult, Row, choice_line, fill_latency, noisy_choice, pick_cpu_path
    from crossvit.runtime.cpu_choice import Candidate

    torch_row, quiet, noisy = Row("m.safetensors", "torch (cpu)", "fp32"), Row("a", "onnxruntime", "fp32"), \
        Row("b", "onnxruntime", "int8-cpu")
    keys = {id(torch_row): BASELINE, id(quiet): "a", id(noisy): "b"}
    lat = {BASELINE: _latency(8.0, 0.1, 8), "a": _latency(4.0, 0.1, 8), "b": _latency(2.0, 2.0, 8)}
    lat1 = {BASELINE: _latency(2.0, 0.1), "a": _latency(1.0, 0.1), "b": _latency(0.5, 0.1)}
    fill_latency([torch_row, quiet, noisy], keys, lat, lat1, {}, batch=8)
    assert (torch_row.speedup, quiet.speedup, quiet.speedup_b1) == (1.0, 2.0, 2.0)
    assert noisy.speedup is None and noisy.speedup_b1 == 4.0 and noisy.no_ratio.startswith("batch 8: its turns")
    assert noisy.note == "noisy: turns disagree (200% at batch 8), no ratio"  # nothing dangling
    table = DeployResult(out_dir=tmp_path, rows=[torch_row, quiet, noisy]).table()
    assert not any(l.rstrip().endswith(";") for l in table.splitlines())
    # steady turns on each side, but ratios that move from turn to turn: no ratio, and the note says why
    apart = Row("c", "onnxruntime", "fp32")
    moving = {BASELINE: _latency(8.8, 0.2, 8, turns=(8.0, 9.6) * 3), "c": _latency(4.4, 0.2, 8, turns=(4.8, 4.0) * 3)}
    fill_latency([apart], {id(apart): "c"}, moving, {}, {}, batch=8)
    assert apart.speedup is None and apart.note.startswith("no ratio (batch 8: its ratio to the baseline moved")
    # what was measured is still said where a choice names it: the turns' ratios, lowest to highest
    assert apart.ratio_range.keys() == {"8"} and [round(v, 3) for v in apart.ratio_range["8"]] == [1.667, 2.4]
    assert noisy.ratio_range == {} and torch_row.ratio_range == {}  # no turns to pair / a ratio given
    apart.candidate, apart.speedup_b1 = Candidate("m.fp32.onnx", "onnxruntime", "fp32"), 1.5
    assert ("1.50x PyTorch eager at batch 1 and 1.67-2.40x PyTorch eager at batch 8 turn by turn (noisy turns: "
            "no single ratio)") in choice_line(tmp_path / "m.fp32.onnx", apart, 8, "this CPU", "m.cpu.json")

    # the choice: the noisy candidate is fastest by its medians; it is chosen, and that is said
    for row, c in ((quiet, Candidate("m.fp32.onnx", "onnxruntime", "fp32")),
                   (noisy, Candidate("m.int8-cpu.onnx", "onnxruntime", "int8-cpu"))):
        row.candidate = c
    best, said = pick_cpu_path([quiet, noisy])
    assert best is noisy and said == [noisy.candidate.label]
    assert pick_cpu_path([quiet]) == (quiet, [])
    # with every ratio given (turn by turn), the highest product of the two ratios wins, unsure of none
    steady = Row("c", "openvino", "int8-ov")
    steady.candidate = Candidate("m.int8-ov.onnx", "openvino", "int8-ov")
    steady.latency, steady.latency_b1, steady.speedup, steady.speedup_b1 = quiet.latency, quiet.latency_b1, 3.0, 2.5
    quiet.speedup, quiet.speedup_b1 = 2.0, 2.0
    assert pick_cpu_path([quiet, steady]) == (steady, [])
    line = choice_line(tmp_path / "m.fp32.onnx", best, 8, "this CPU", "m.cpu.json")
    assert "4.00x PyTorch eager at batch 1 and no ratio to PyTorch eager at batch 8 (noisy turns)" in line
    assert "--retune -o" in noisy_choice(said, tmp_path) and noisy.candidate.label in noisy_choice(said, tmp_path)
