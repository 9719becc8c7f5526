"""`crossvit deploy`: the stages in order, one function each.

    export fp32 -> precision variants -> parity gate on random inputs and real images ->
    TensorRT engines (standard TensorRT on a GPU; TensorRT-RTX on any machine, run where a GPU
    is one of its targets) -> latency of the available
    backends (the benchmark code) -> a summary table and DIR/summary.json.

This module sits above export/, runtime/ and benchmarks/ and only calls them.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from crossvit import __version__
from crossvit.contract import VARIANT_NAMES, get_precision, to_json
from crossvit.errors import CrossViTError
from crossvit.files import atomic_write, check_output_dir
from crossvit.runtime.timing import NOISY, SPREAD_WARNING

Progress = Callable[[str], None]
STAGES = 6


@dataclass
class Row:
    artifact: str
    backend: str
    precision: str
    size_mb: float | None = None
    parity: str = "-"
    accuracy: float | None = None  # percent on the labelled images
    latency: dict | None = None  # Latency.to_dict()
    speedup: float | None = None  # vs PyTorch eager, same batch, same process
    latency_b1: dict | None = None  # CPU paths: also timed at batch 1 (the choice weighs both)
    speedup_b1: float | None = None
    no_ratio: str = ""  # why a speedup is None although it was timed: noisy turns (its or the baseline's)
    # where a speedup is None but the row was timed in eager's turns: the lowest and highest of its
    # turn-by-turn ratios, by batch ("1", "8"): what was measured, though no single ratio holds
    ratio_range: dict = field(default_factory=dict)
    build_seconds: float | None = None  # engines: how long the TensorRT build took
    note: str = ""
    candidate: object = None  # CPU paths: the runtime.cpu_choice.Candidate this row timed


@dataclass
class DeployResult:
    out_dir: Path
    rows: list[Row] = field(default_factory=list)
    engines: list[Row] = field(default_factory=list)  # engines built but not run here (no target GPU)
    skipped: list[str] = field(default_factory=list)
    reports: dict = field(default_factory=dict)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    cpu_path: str = ""  # the one line naming the chosen CPU path and its measured ratios

    def table(self) -> str:
        head = (f"{'artifact':<30} {'backend':<12} {'prec':<8} {'size MB':>8} {'parity':<8} {'acc %':>6} "
                f"{'b1 p50':>8} {'b1 vs':>7} {'p50 ms':>8} {'p99 ms':>8} {'vs torch':>8}  note")
        lines = [head, "-" * len(head)]
        fmt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
        ratio = lambda v, w: fmt(v, f"{w - 1}.2f") + "x" if v else "-"  # noqa: E731
        for r in self.rows:
            lat, lat1 = r.latency or {}, r.latency_b1 or {}
            lines.append(f"{r.artifact:<30} {r.backend:<12} {r.precision:<8} {fmt(r.size_mb, '8.2f'):>8} "
                         f"{r.parity:<8} {fmt(r.accuracy, '6.2f'):>6} {fmt(lat1.get('p50_ms'), '8.3f'):>8} "
                         f"{ratio(r.speedup_b1, 7):>7} {fmt(lat.get('p50_ms'), '8.3f'):>8} "
                         f"{fmt(lat.get('p99_ms'), '8.3f'):>8} {ratio(r.speedup, 8):>8}  {r.note}".rstrip())
        for r in self.engines:
            lines.append(f"{r.artifact:<30} {r.backend:<12} {r.precision:<8} {fmt(r.size_mb, '8.2f'):>8} "
                         f"{'built':<8} {'-':>6} {'-':>8} {'-':>7} {'-':>8} {'-':>8} {'-':>8}  "
                         f"built in {r.build_seconds} s; {r.note}")
        lines += [f"skipped: {s}" for s in self.skipped]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        from crossvit.benchmarks.machine import command_line, machine_description

        return {"out_dir": str(self.out_dir), "rows": [asdict(r) for r in self.rows],
                "engines_not_run": [asdict(r) for r in self.engines],
                "skipped": self.skipped, "warnings": self.warnings, "parity_reports": self.reports,
                "cpu_path": self.cpu_path,
                "seconds": self.seconds, "machine": machine_description(), "command": command_line(),
                "crossvit_version": __version__}


# -- the stages ------------------------------------------------------------------------------

def export_stage(loaded, out: Path, name: str, batch, say: Progress) -> Path:
    from crossvit.export.onnx import export_onnx

    return export_onnx(loaded, out / f"{name}.fp32.onnx", batch=batch, progress=say).path


def variants_stage(fp32: Path, out: Path, name: str, variants: tuple[str, ...], calibration,
                   result: DeployResult, say: Progress) -> list[Path]:
    """Each variant, or the reason it was skipped (no ModelOpt, no calibration images)."""
    from crossvit.export.calibration import calibration_batch
    from crossvit.export.precision import convert_precision
    from crossvit.runtime.artifact import read_artifact

    written: list[Path] = []
    why: dict[str, list[str]] = {}  # reason -> the precisions it skipped, said once each
    for precision in variants:
        try:
            calib = calibration_batch(read_artifact(fp32).raw, calibration,
                                      need=get_precision(precision).calibration == "required")
            written.append(convert_precision(fp32, out / f"{name}.{precision}.onnx", precision, calib,
                                             progress=say))
        except CrossViTError as e:
            if str(e) not in why:
                say(f"skipped {precision}: {e}")
            else:
                say(f"skipped {precision}: the same reason")
            why.setdefault(str(e), []).append(precision)
    for reason, precisions in why.items():
        result.skipped.append(f"{', '.join(precisions)} variant{'s' if len(precisions) > 1 else ''}: {reason}")
    return written


def parity_stage(artifacts: list[Path], loaded, images, batch, out: Path, result: DeployResult,
                 say: Progress) -> dict:
    """The gate on every artifact; each report is saved beside it."""
    from crossvit.export.parity import check_parity

    reports = {}
    for path in artifacts:
        report = check_parity(path, loaded, images=images, batch_sizes=[1, 7, batch.max], progress=None)
        report.save(out / f"{path.stem}.parity.json")
        result.reports[path.name] = report.to_dict()
        reports[path] = report
        say(f"{path.name}: {report.verdict}")
    return reports


def cpu_gates_stage(fp32: Path, loaded, images, batch, out: Path, result: DeployResult, say: Progress) -> dict:
    """The files as OpenVINO runs them with a hint (the fp32 file in fp32, and in bf16 gated as bf16;
    int8-ov with its float layers in bf16, gated as int8-ov), each gated like a file, its report
    beside it (`cpu_choice.gate_report_path`). None without OpenVINO: then the candidates that
    exist are the ones measured."""
    from crossvit.export.parity import check_parity
    from crossvit.install import pip_install
    from crossvit.runtime.cpu_choice import candidates_for, gate_report_path
    from crossvit.runtime.openvino import openvino_version

    if openvino_version() is None:
        install = pip_install("openvino")
        if any(install in reason for reason in result.skipped):  # int8-ov's line already names it
            install = "the openvino extra, as above"
        result.skipped.append(f"OpenVINO CPU paths: OpenVINO is not installed ({install})")
        say(f"OpenVINO is not installed: its CPU paths are left out ({install})")
        return {}
    gates = {}
    for c in candidates_for(fp32):
        if c.hint is None:
            continue
        report = check_parity(fp32.parent / c.file, loaded, images=images, batch_sizes=[1, 7, batch.max],
                              backend=c.backend, hint=c.hint)
        path = report.save(gate_report_path(out, c))
        result.reports[path.name[:-len(".parity.json")]] = report.to_dict()
        gates[c] = report
        said = c.precision if c.hint == c.precision else f"{c.precision}, {c.hint} hint"
        say(f"{c.file} in OpenVINO ({said}): {report.verdict}" + (f" ({report.not_run})" if report.not_run else ""))
    return gates


def engines_stage(reports: dict, loaded, images, batch, out: Path, result: DeployResult, say: Progress,
                  library: str = "auto") -> dict:
    """An engine for each artifact meant for TensorRT, with the TensorRT library that can build
    here (`trt_library.choose_library`). Standard TensorRT builds on this GPU and each engine is
    gated like its ONNX. TensorRT-RTX builds on any machine: where this GPU is one of the plan's
    targets it is gated too; elsewhere (no GPU, or a Hopper/Blackwell data-centre GPU) its build
    seconds and size are recorded and it is said plainly that it was not run here."""
    from crossvit.export.engine import BuildOptions, build_engine
    from crossvit.export.parity import check_parity
    from crossvit.runtime.gpu import cuda_device
    from crossvit.runtime.trt_library import choose_library

    try:
        lib = choose_library(library)
    except CrossViTError as e:
        say(f"[4/{STAGES}] TensorRT engines: skipped ({e})")
        result.skipped.append(f"TensorRT engines: {e}")
        return {}
    try:
        gpu = cuda_device()
    except CrossViTError:
        gpu = None
    say(f"[4/{STAGES}] {lib.title} engines" + (f" on {gpu.name}" if gpu else " (no GPU here: built, not run)"))
    engines = {}
    for onnx_path, report in reports.items():
        if get_precision(report.precision).target == "cpu":
            continue
        plan = onnx_path.with_suffix(".plan")
        try:
            manifest = build_engine(onnx_path, plan, BuildOptions(library=lib.name), progress=say)
        except CrossViTError as e:
            result.skipped.append(f"{plan.name}: {e}")
            say(f"skipped {plan.name}: {e}")
            continue
        targets = [tuple(t) for t in manifest["tensorrt"]["target_compute_capabilities"]]
        built = Row(artifact=plan.name, backend=lib.name, precision=report.precision,
                    size_mb=plan.stat().st_size / 1e6, build_seconds=manifest["builder"]["seconds"])
        if gpu is None or (lib.is_rtx and gpu.compute_capability not in targets):
            cc = ", ".join(".".join(map(str, t)) for t in targets)
            built.note = (f"built for RTX/Ampere+ GPUs (compute capability {cc}), not run here: "
                          + ("no GPU on this machine" if gpu is None else f"{gpu.name} is not one of them"))
            result.engines.append(built)
            say(f"{plan.name}: {built.note}")
            continue
        gate = check_parity(plan, loaded, images=images, batch_sizes=[1, 7, batch.max])
        gate.save(out / f"{plan.stem}.plan.parity.json")
        result.reports[plan.name] = gate.to_dict()
        engines[plan] = gate
        say(f"{plan.name}: {gate.verdict}")
    return engines


def _candidate_rows(fp32: Path, reports: dict, cpu_gates: dict) -> list[tuple]:
    """(candidate, its gate report) for every CPU path of `fp32` that was gated in this run."""
    from crossvit.runtime.cpu_choice import candidates_for

    by_name = {path.name: report for path, report in reports.items()}
    out = []
    for c in candidates_for(fp32):
        report = cpu_gates.get(c) if c.hint else by_name.get(c.file)
        if report is not None:
            out.append((c, report))
    return out


CPU_NOTES = {("onnxruntime", "fp32", None): "the reference file in ONNX Runtime",
             ("openvino", "fp32", "fp32"): "the reference file in OpenVINO",
             ("openvino", "bf16", "bf16"): "the fp32 file computed in bf16 (OpenVINO's hint)",
             ("onnxruntime", "int8-cpu", None): "dynamic int8, one row at a time (its scales depend on batch-mates)",
             ("openvino", "int8-ov", None): "static int8 (NNCF) in OpenVINO",
             ("openvino", "int8-ov", "bf16"): "static int8 (NNCF) in OpenVINO with the bf16 hint: the layers NNCF "
                                              "left in float in bf16 (OpenVINO's default on this CPU)"}


def latency_stage(loaded, reports: dict, engines: dict, name: str, *, batch: int, runs: int | None,
                  max_seconds: float, cpu_gates: dict | None = None) -> list[Row]:
    """PyTorch eager; every CPU path (`cpu_choice.candidates_for`) at batch 1 and `batch`; the
    TensorRT-oriented files in ONNX Runtime at `batch`; every engine — timed by the benchmark code."""
    from crossvit.benchmarks.latency import BASELINE, RUNS, time_cpu_backends, time_engines

    runs = runs or RUNS
    acc_ref = next((r.accuracy[0] for r in reports.values() if r.accuracy[0] is not None), None)
    torch_row = Row(artifact=loaded.source.name if loaded.source else name, backend="torch (cpu)",
                    precision="fp32", size_mb=loaded.source.stat().st_size / 1e6 if loaded.source else None,
                    parity="ref", accuracy=acc_ref, note="PyTorch eager, reference")
    rows, timed, timed_b1 = [torch_row], {}, {}
    fp32 = next((path for path, r in reports.items() if r.precision == "fp32"), None)
    keys: dict[int, str] = {}  # id(row) -> its timing key
    for c, report in _candidate_rows(fp32, reports, cpu_gates or {}) if fp32 else ():
        path = fp32.parent / c.file
        row = Row(artifact=c.file, backend=c.backend, precision=c.precision, size_mb=path.stat().st_size / 1e6,
                  parity=report.verdict, accuracy=report.accuracy[1], note=CPU_NOTES.get(c.key, ""))
        row.candidate = c
        rows.append(row)
        if report.not_run:
            row.note = report.not_run
            continue
        key = f"{c.backend} {c.precision} {c.hint} {c.file}"
        keys[id(row)] = key
        timed[key] = timed_b1[key] = (path, c.backend, c.options)
    for path, report in reports.items():
        if get_precision(report.precision).target != "tensorrt":
            continue
        row = Row(artifact=path.name, backend="onnxruntime", precision=report.precision,
                  size_mb=path.stat().st_size / 1e6, parity=report.verdict, accuracy=report.accuracy[1])
        rows.append(row)
        if report.not_run:
            row.note = "ONNX Runtime (CPU) has no kernels for it; meant for TensorRT"
            continue
        row.note = "TensorRT-oriented graph; CPU speed is not its purpose"
        keys[id(row)] = path.name
        timed[path.name] = path
    lat, failed = time_cpu_backends(loaded.model, timed, batch=batch, runs=runs, max_seconds=max_seconds)
    lat1, failed1 = (lat, failed) if batch == 1 else \
        time_cpu_backends(loaded.model, timed_b1, batch=1, runs=runs, max_seconds=max_seconds)
    engine_lat = time_engines(list(engines), batch=batch, runs=runs, max_seconds=max_seconds) if engines else {}
    for plan, gate in engines.items():
        row = Row(artifact=plan.name, backend="tensorrt", precision=gate.precision,
                  size_mb=plan.stat().st_size / 1e6, parity=gate.verdict, accuracy=gate.accuracy[1],
                  note="TensorRT engine on the GPU; ratio against PyTorch eager on the CPU")
        rows.append(row)
        keys[id(row)] = plan.name
        lat[plan.name] = engine_lat[plan]
    fill_latency(rows, {id(torch_row): BASELINE, **keys}, lat, lat1, {**failed1, **failed}, batch=batch)
    return rows


def fill_latency(rows: list[Row], keys: dict[int, str], lat: dict, lat1: dict, failed: dict[str, str], *,
                 batch: int) -> None:
    """Each row's latency at `batch` (`lat`) and batch 1 (`lat1`, the same dict when `batch` is 1) and its
    ratios to PyTorch eager (`latency.ratio`, keyed by `BASELINE`: turn by turn, none where the
    turns' ratios disagree), and the row says so, and why, in its note and `no_ratio`; a row whose
    turns disagreed (noisy) says that too. `keys` maps id(row) to its timing key; `failed` holds why a key could not run."""
    from crossvit.benchmarks.latency import BASELINE, ratio, turn_ratios

    def spanned(b: int, base_lat, this) -> None:  # no single ratio: keep the turns' range
        q = turn_ratios(base_lat, this)
        if q is not None:
            row.ratio_range[str(b)] = [float(q.min()), float(q.max())]

    base, base1 = lat[BASELINE], lat1.get(BASELINE)
    for row in rows:
        key = keys.get(id(row))
        why = []
        if key in lat:
            row.latency = lat[key].to_dict()
            row.speedup, no = ratio(base, lat[key])
            why += [f"batch {batch}: {no}"] if no else []
            if row.speedup is None:
                spanned(batch, base, lat[key])
        elif key in failed:
            row.note = failed[key]
        if key in lat1 and base1:
            row.latency_b1 = lat1[key].to_dict()
            row.speedup_b1, no = ratio(base1, lat1[key])
            why += [f"batch 1: {no}"] if no else []
            if row.speedup_b1 is None:
                spanned(1, base1, lat1[key])
        row.no_ratio = "; ".join(dict.fromkeys(why))
        noisy = dict.fromkeys(f"{t.spread:.0%} at batch {b}" for b, t in ((1, lat1.get(key)), (batch, lat.get(key)))
                              if t is not None and t.noisy)
        if noisy:
            said = f"{NOISY} ({', '.join(noisy)}), " + ("no ratio" if why else "ratio turn by turn")
        else:
            said = f"no ratio ({row.no_ratio})" if why else ""
        if said:  # the machine, not the backend, set this figure
            row.note = "; ".join(n for n in (said, row.note) if n)


def pick_cpu_path(gated: list[Row]) -> tuple[Row, list[str]]:
    """The fastest of the gated, timed CPU-path rows, and the labels of those among them the
    choice is unsure of: a choice made over them is one the machine's other work may have made.

    Where every row has its ratios to PyTorch eager at batch 1 and at the bench batch (turn by
    turn, `latency.ratio`), the fastest is the highest product of the two (the best geometric
    mean), and none is unsure. Otherwise it is the lowest product of the pooled medians, and the
    rows whose turns disagreed (noisy) are the unsure ones."""
    if all(r.speedup and r.speedup_b1 for r in gated):
        return max(gated, key=lambda r: r.speedup * r.speedup_b1), []
    best = min(gated, key=lambda r: r.latency["p50_ms"] * r.latency_b1["p50_ms"])
    noisy = [r.candidate.label for r in gated
             if max(r.latency.get("spread") or 0, r.latency_b1.get("spread") or 0) > SPREAD_WARNING]
    return best, noisy


def noisy_choice(noisy: list[str], folder: Path) -> str:
    return (f"the CPU choice was decided on noisy timings (the turns of {', '.join(noisy)} disagreed by over "
            f"{SPREAD_WARNING:.0%}): run `crossvit deploy --retune -o {folder}` on a quiet machine")


def said_ratio(value: float | None, span: list | None, batch: int) -> str:
    """A CPU path's ratio to PyTorch eager at `batch` in words: the ratio turn by turn; where its
    turns' ratios disagreed, their range (what was measured; no single figure holds)."""
    if value:
        return f"{value:.2f}x PyTorch eager at batch {batch}"
    if span:
        return (f"{span[0]:.2f}-{span[1]:.2f}x PyTorch eager at batch {batch} turn by turn (noisy turns: "
                "no single ratio)")
    return f"no ratio to PyTorch eager at batch {batch} (noisy turns)"


def choice_line(fp32: Path, best: Row, batch: int, cpu: str, record: str) -> str:
    ratios = " and ".join(said_ratio(v, best.ratio_range.get(str(b)), b)
                          for b, v in ((1, best.speedup_b1), (batch, best.speedup)))
    return f"CPU path for {fp32.name}: {best.candidate.label}, {ratios} on {cpu} (recorded in {record})"


def choice_stage(fp32: Path, rows: list[Row], batch: int, result: DeployResult, say: Progress):
    """The fastest gated CPU path (`pick_cpu_path`: the highest product of its two ratios to PyTorch
    eager where every gated path has them turn by turn, else the lowest product of its median
    latencies at batch 1 and `batch`), measured here side by side, recorded beside the files with this CPU's
    fingerprint (`NAME.cpu.json`) for `open_session` to run. Where a gated candidate's turns
    disagreed (noisy), the choice still stands on what was measured but says so: in its line, a
    warning, and the record's `noisy`. Returns the record, or None."""
    from crossvit.benchmarks.machine import machine_description
    from crossvit.files import sha256_file
    from crossvit.runtime.cpu_choice import (CHOICE_FORMAT, choice_path, cpu_fingerprint, describe_fingerprint,
                                             gate_passed)

    measured = [r for r in rows if getattr(r, "candidate", None) is not None and r.latency and r.latency_b1]
    gated = [r for r in measured if r.parity == "pass" and gate_passed(fp32, r.candidate)]
    path = choice_path(fp32)
    if not gated:
        say("no CPU path passed its gate and was timed: predict/serve run the fp32 file in ONNX Runtime")
        if path.is_file() or path.is_symlink():
            path.unlink()  # an old choice is about other measurements
        elif path.exists():
            result.warnings.append(f"{path} is not a file, so no choice was recorded: move it away")
        return None
    best, noisy = pick_cpu_path(gated)
    by_ratios = all(r.speedup and r.speedup_b1 for r in gated)  # pick_cpu_path's rule: say which it used
    best.note = "; ".join(n for n in ("CHOSEN for this CPU", best.note) if n)
    fingerprint = cpu_fingerprint()
    record = {
        "format": CHOICE_FORMAT, "source": {"onnx": fp32.name, "sha256": sha256_file(fp32)},
        "fingerprint": fingerprint, "chosen": best.candidate.to_dict(),
        "speedup": {"1": best.speedup_b1, str(batch): best.speedup},
        **({"speedup_range": best.ratio_range} if best.ratio_range else {}),
        "how": (f"the gated CPU path with the highest product of its ratios to PyTorch eager at batch 1 and {batch}, "
                "turn by turn (every gated path had both)" if by_ratios else
                f"the gated CPU path with the lowest product of its median latencies at batch 1 and {batch} (not "
                "every gated path had both ratios to PyTorch eager turn by turn)")
               + ", all timed side by side in interleaved turns in one process",
        **({"noisy": noisy} if noisy else {}),
        "candidates": [{**r.candidate.to_dict(), "gate": r.parity,
                        "latency": {"1": r.latency_b1, str(batch): r.latency},
                        "speedup": {"1": r.speedup_b1, str(batch): r.speedup},
                        **({"speedup_range": r.ratio_range} if r.ratio_range else {})}
                       for r in rows if getattr(r, "candidate", None) is not None],
        "machine": machine_description()}
    text = to_json(record, indent=2)
    atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))
    line = choice_line(fp32, best, batch, describe_fingerprint(fingerprint), path.name)
    if noisy:
        why = noisy_choice(noisy, fp32.parent)
        line += f"; {why}"
        result.warnings.append(why)
    result.cpu_path = line
    say(line)
    return record


def retune(loaded, out_dir: str | Path, *, bench_batch: int = 8, bench_runs: int | None = None, bench_seconds: float = 10.0,
           images=None, progress: Progress | None = None) -> DeployResult:
    """`crossvit deploy --retune`: the CPU paths of an earlier deploy in `out_dir`, timed again on
    this machine, and the choice recorded for this CPU. Nothing is exported again and the reports
    beside the files are read (the choice still checks each one against its file), except an
    OpenVINO path's whose gate ran with another OpenVINO, on another CPU, or before gates recorded
    their probe answer (`regate_stage`): OpenVINO's kernels, and with them the function it computes,
    depend on both, so that path is gated again here first."""
    import json

    from crossvit.errors import InputError
    from crossvit.export.parity import ParityReport
    from crossvit.files import check_input_file, check_output_path
    from crossvit.runtime.cpu_choice import MAX_JSON_BYTES, candidates_for, choice_path, gate_report_path

    say = progress or (lambda m: None)
    start = time.perf_counter()
    out = Path(out_dir)
    name = loaded.info.name or (loaded.source.stem if loaded.source else "model")
    fp32 = out / f"{name}.fp32.onnx"
    if not fp32.is_file():
        raise InputError(f"--retune: {fp32} is missing: run `crossvit deploy -o {out}` for this model first")
    check_output_path(choice_path(fp32))  # before minutes of timing, not after
    result = DeployResult(out_dir=out)
    reports, cpu_gates = {}, {}
    for c in candidates_for(fp32):
        path = gate_report_path(out, c)
        try:
            check_input_file(path, InputError)  # a FIFO would hang the read
            if path.stat().st_size > MAX_JSON_BYTES:
                raise ValueError("too large")
            report = ParityReport.from_dict(json.loads(path.read_text()))
        except (CrossViTError, OSError, ValueError, RecursionError) as e:
            why = "missing" if not path.exists() and not path.is_symlink() else \
                str(e).replace(f"{path}: ", "").splitlines()[0][:160]
            say(f"{c.label}: left out ({path.name}: {why})")
            continue
        if c.hint:
            cpu_gates[c] = report
        else:
            reports[out / c.file] = report
    if fp32 not in reports:
        raise InputError(f"--retune: {gate_report_path(out, candidates_for(fp32)[0]).name} is missing or unreadable: "
                         f"run `crossvit deploy -o {out}` again")
    as_files = {c: reports[out / c.file] for c in candidates_for(fp32) if not c.hint and out / c.file in reports}
    for c, report in regate_stage(fp32, loaded, images, {**as_files, **cpu_gates}, result, say).items():
        if c.hint:
            cpu_gates[c] = report
        else:
            reports[out / c.file] = report
    say(f"[1/2] latency of {len(reports) + len(cpu_gates)} CPU paths at batch 1 and {bench_batch}")
    result.rows = latency_stage(loaded, reports, {}, name, batch=bench_batch, runs=bench_runs,
                                max_seconds=bench_seconds, cpu_gates=cpu_gates)
    say("[2/2] the CPU path for this machine")
    choice_stage(fp32, result.rows, bench_batch, result, say)
    _warn_noisy(result)
    result.seconds = time.perf_counter() - start
    return result


def regate_stage(fp32: Path, loaded, images, gates: dict, result: DeployResult, say: Progress) -> dict:
    """The OpenVINO candidates among `gates` (candidate -> its report) whose gate does not hold for
    this machine (its report's `environment` names another OpenVINO or CPU, or none: made before
    reports named them; or it passed without a probe answer), gated again here, each new report
    saved over the old one; a candidate that cannot run here keeps its report (the choice leaves it
    out anyway). Returns the new reports. Nothing is gated when `loaded` is not the model the fp32 file was exported from."""
    from crossvit.export.parity import check_parity, environment, reference_problem
    from crossvit.files import first_line
    from crossvit.runtime.artifact import read_artifact
    from crossvit.runtime.cpu_choice import _unavailable, cpu_flags, describe_fingerprint, gate_report_path

    here = environment()
    flags = cpu_flags()
    stale = {}
    for c, report in gates.items():
        if c.backend != "openvino" or _unavailable(c, flags):
            continue
        there = report.environment if isinstance(report.environment, dict) else {}
        if "cpu" not in there:
            stale[c] = "gated before reports named their CPU and OpenVINO"
        elif there.get("openvino") != here["openvino"]:
            stale[c] = f"gated with OpenVINO {there.get('openvino')}, this is {here['openvino']}"
        elif there.get("cpu") != here["cpu"]:
            cpu = there["cpu"] if isinstance(there["cpu"], dict) else {}
            stale[c] = f"gated on another CPU: {describe_fingerprint(cpu)}"
        elif report.verdict == "pass" and not isinstance(report.probe, dict):
            stale[c] = "its report kept no probe answer"
    if not stale:
        return {}
    wrong = reference_problem(fp32, loaded)
    if wrong:
        for c, why in stale.items():
            line = (f"{c.label}: its gate does not hold here ({why}) and is not run again: the model given is not "
                    f"the one {fp32.name} was exported from ({wrong}); give its checkpoint")
            result.warnings.append(line)
            say(line)
        return {}
    batch_max = read_artifact(fp32).batch_max
    out = {}
    for c, why in stale.items():
        say(f"{c.label}: gated again on this machine ({why})")
        try:
            report = check_parity(fp32.parent / c.file, loaded, images=images, batch_sizes=[1, 7, batch_max],
                                  backend=c.backend, hint=c.hint)
        except CrossViTError as e:  # its file cannot be read or run: its old report stays, the choice leaves it out
            line = f"{c.label}: not gated again: {first_line(e)}"
            result.warnings.append(line)
            say(line)
            continue
        path = report.save(gate_report_path(fp32.parent, c))
        result.reports[path.name[:-len(".parity.json")]] = report.to_dict()
        out[c] = report
        say(f"{c.label}: {report.verdict}" + (f" ({report.not_run})" if report.not_run else ""))
    return out


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    """The files in `folder` with (inode, mtime in ns): a file this run writes (atomically, by a
    rename) changes both."""
    out = {}
    for p in folder.iterdir():
        try:
            st = p.stat()
        except OSError:
            continue
        if p.is_file():
            out[p.name] = (st.st_ino, st.st_mtime_ns)
    return out


def _warn_noisy(result: DeployResult) -> None:
    """One warning for the noisy latency rows, naming the load average seen after timing."""
    from crossvit.benchmarks.latency import noisy_rows_note

    noisy = [r for r in result.rows if r.note.startswith(NOISY)]
    if noisy:
        result.warnings.append(noisy_rows_note(len(noisy), unrated=sum(bool(r.no_ratio) for r in noisy))
                               + " (`crossvit bench` shows the spread of every row)")


# -- the whole path --------------------------------------------------------------------------

def _check_folders(**folders) -> None:
    """Image folders the user gave must be folders of images; a wrong one is an error now, not a
    variant skipped or a run that stops at the parity stage."""
    from crossvit.errors import InputError
    from crossvit.runtime.images import list_images

    for option, folder in folders.items():
        if folder is not None:
            try:
                list_images(folder)
            except InputError as e:
                raise InputError(f"--{option}: {e}") from None


def deploy(loaded, out_dir: str | Path, *, variants: tuple[str, ...] = VARIANT_NAMES,
           calibration: str | Path | None = None, images: str | Path | None = None, batch=None,
           bench_batch: int = 8, bench_runs: int | None = None, bench_seconds: float = 10.0, library: str = "auto",
           progress: Progress | None = None) -> DeployResult:
    from crossvit.export.onnx import BatchRange
    from crossvit.model import RANDOM_WEIGHTS_NOTE

    say = progress or (lambda m: None)
    batch = batch or BatchRange(1, 64)
    start = time.perf_counter()
    out = check_output_dir(out_dir)
    _check_folders(calibration=calibration, images=images)  # before anything is written, not at stage 2 or 3
    out.mkdir(parents=True, exist_ok=True)
    before = _files(out)
    name = loaded.info.name or (loaded.source.stem if loaded.source else "model")
    result = DeployResult(out_dir=out)
    if loaded.info.random_weights:
        result.warnings.append(f"{name}: {RANDOM_WEIGHTS_NOTE}")
        say(f"WARNING: {name}: {RANDOM_WEIGHTS_NOTE}")

    say(f"[1/{STAGES}] export {name} to ONNX (fp32)")
    fp32 = export_stage(loaded, out, name, batch, say)
    say(f"[2/{STAGES}] precision variants: {', '.join(variants) or 'none'}")
    artifacts = [fp32, *variants_stage(fp32, out, name, variants, calibration, result, say)]
    say(f"[3/{STAGES}] parity gate on random inputs and real images")
    reports = parity_stage(artifacts, loaded, images, batch, out, result, say)
    cpu_gates = cpu_gates_stage(fp32, loaded, images, batch, out, result, say)
    engines = engines_stage(reports, loaded, images, batch, out, result, say, library)
    from crossvit.benchmarks.latency import RUNS, TURNS

    say(f"[5/{STAGES}] latency at batch 1 (CPU paths) and {bench_batch} ({bench_runs or RUNS} runs each in {TURNS} turns, "
        f"at most ~{bench_seconds:.0f} s a backend and batch, or 5 runs a turn)")
    result.rows = latency_stage(loaded, reports, engines, name, batch=bench_batch, runs=bench_runs,
                                max_seconds=bench_seconds, cpu_gates=cpu_gates)
    say(f"[6/{STAGES}] the CPU path for this machine")
    choice_stage(fp32, result.rows, bench_batch, result, say)
    _warn_noisy(result)
    stale = sorted(n for n, stamp in _files(out).items() if before.get(n) == stamp and n != "summary.json")
    if stale:
        shown = ", ".join(stale[:6]) + (f" and {len(stale) - 6} more" if len(stale) > 6 else "")
        line = (f"{out} holds {len(stale)} file(s) this run did not write (an earlier run's?): {shown}; they are "
                "not part of this run's results: remove them or deploy into an empty folder")
        result.warnings.append(line)
        say(f"WARNING: {line}")
    result.seconds = time.perf_counter() - start
    text = to_json(result.to_dict(), indent=2)
    atomic_write(out / "summary.json", lambda tmp: tmp.write_text(text + "\n"))
    return result
