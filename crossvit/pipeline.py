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
from crossvit.contract import VARIANT_NAMES, atomic_write, check_output_dir, get_precision, to_json
from crossvit.errors import CrossViTError
from crossvit.runtime.timing import NOISY, SPREAD_WARNING

Progress = Callable[[str], None]
STAGES = 5


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
    build_seconds: float | None = None  # engines: how long the TensorRT build took
    note: str = ""


@dataclass
class DeployResult:
    out_dir: Path
    rows: list[Row] = field(default_factory=list)
    engines: list[Row] = field(default_factory=list)  # engines built but not run here (no target GPU)
    skipped: list[str] = field(default_factory=list)
    reports: dict = field(default_factory=dict)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def table(self) -> str:
        head = (f"{'artifact':<30} {'backend':<12} {'prec':<8} {'size MB':>8} {'parity':<8} {'acc %':>6} "
                f"{'p50 ms':>8} {'p99 ms':>8} {'vs torch':>8}  note")
        lines = [head, "-" * len(head)]
        fmt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
        for r in self.rows:
            lat = r.latency or {}
            lines.append(f"{r.artifact:<30} {r.backend:<12} {r.precision:<8} {fmt(r.size_mb, '8.2f'):>8} "
                         f"{r.parity:<8} {fmt(r.accuracy, '6.2f'):>6} {fmt(lat.get('p50_ms'), '8.3f'):>8} "
                         f"{fmt(lat.get('p99_ms'), '8.3f'):>8} {fmt(r.speedup, '7.2f') + 'x' if r.speedup else '-':>8}"
                         f"  {r.note}")
        for r in self.engines:
            lines.append(f"{r.artifact:<30} {r.backend:<12} {r.precision:<8} {fmt(r.size_mb, '8.2f'):>8} "
                         f"{'built':<8} {'-':>6} {'-':>8} {'-':>8} {'-':>8}  built in {r.build_seconds} s; {r.note}")
        lines += [f"skipped: {s}" for s in self.skipped]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        from crossvit.benchmarks.latency import command_line, machine_description

        return {"out_dir": str(self.out_dir), "rows": [asdict(r) for r in self.rows],
                "engines_not_run": [asdict(r) for r in self.engines],
                "skipped": self.skipped, "warnings": self.warnings, "parity_reports": self.reports,
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


def latency_stage(loaded, reports: dict, engines: dict, name: str, *, batch: int, runs: int,
                  max_seconds: float) -> list[Row]:
    """PyTorch eager, every artifact ONNX Runtime can run and every engine, timed by the benchmark code."""
    from crossvit.benchmarks.latency import BASELINE, time_cpu_backends, time_engines

    acc_ref = next((r.accuracy[0] for r in reports.values() if r.accuracy[0] is not None), None)
    torch_row = Row(artifact=loaded.source.name if loaded.source else name, backend="torch (cpu)",
                    precision="fp32", size_mb=loaded.source.stat().st_size / 1e6 if loaded.source else None,
                    parity="ref", accuracy=acc_ref, note="PyTorch eager, reference")
    rows, timed = [torch_row], {}
    for path, report in reports.items():
        row = Row(artifact=path.name, backend="onnxruntime", precision=report.precision,
                  size_mb=path.stat().st_size / 1e6, parity=report.verdict, accuracy=report.accuracy[1])
        rows.append(row)
        target = get_precision(report.precision).target
        if report.not_run:
            row.note = "ONNX Runtime (CPU) has no kernels for it; meant for TensorRT"
            continue
        if target == "cpu":
            row.note = "ONNX Runtime int8 for CPUs; not for TensorRT"
        elif target == "tensorrt":
            row.note = "TensorRT-oriented graph; CPU speed is not its purpose"
        timed[path.name] = path
    lat, failed = time_cpu_backends(loaded.model, timed, batch=batch, runs=runs, max_seconds=max_seconds)
    base = lat[BASELINE]
    torch_row.latency, torch_row.speedup = base.to_dict(), 1.0
    engine_lat = time_engines(list(engines), batch=batch, runs=runs, max_seconds=max_seconds) if engines else {}
    for plan, gate in engines.items():
        rows.append(Row(artifact=plan.name, backend="tensorrt", precision=gate.precision,
                        size_mb=plan.stat().st_size / 1e6, parity=gate.verdict, accuracy=gate.accuracy[1],
                        note="TensorRT engine on the GPU; ratio against PyTorch eager on the CPU"))
        lat[plan.name] = engine_lat[plan]
    for row in rows[1:]:
        if row.artifact in lat:
            row.latency = lat[row.artifact].to_dict()
            row.speedup = base.p50_ms / lat[row.artifact].p50_ms
        elif row.artifact in failed:
            row.note = failed[row.artifact]
    for row, latency in [(torch_row, base)] + [(r, lat[r.artifact]) for r in rows[1:] if r.artifact in lat]:
        if latency.noisy:  # the machine, not the backend, set this figure
            row.note = f"{NOISY} ({latency.spread:.0%}); {row.note}"
    return rows


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
           bench_batch: int = 8, bench_runs: int = 30, bench_seconds: float = 10.0, library: str = "auto",
           progress: Progress | None = None) -> DeployResult:
    from crossvit.export.onnx import BatchRange
    from crossvit.model import RANDOM_WEIGHTS_NOTE

    say = progress or (lambda m: None)
    batch = batch or BatchRange(1, 64)
    start = time.perf_counter()
    out = check_output_dir(out_dir)
    _check_folders(calibration=calibration, images=images)  # before anything is written, not at stage 2 or 3
    out.mkdir(parents=True, exist_ok=True)
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
    engines = engines_stage(reports, loaded, images, batch, out, result, say, library)
    say(f"[5/{STAGES}] latency at batch {bench_batch} ({bench_runs} runs each in 3 turns, "
        f"at most ~{bench_seconds:.0f} s a backend)")
    result.rows = latency_stage(loaded, reports, engines, name, batch=bench_batch, runs=bench_runs,
                                max_seconds=bench_seconds)
    noisy = [r.artifact for r in result.rows if r.note.startswith(NOISY)]
    if noisy:
        result.warnings.append(f"{len(noisy)} latency row(s) are noisy: their 3 turns' medians differ by over "
                               f"{SPREAD_WARNING:.0%}, so other work on this machine moved them; time again on "
                               "a quiet machine (`crossvit bench` shows the spread of every row)")
    result.seconds = time.perf_counter() - start
    text = to_json(result.to_dict(), indent=2)
    atomic_write(out / "summary.json", lambda tmp: tmp.write_text(text + "\n"))
    return result
