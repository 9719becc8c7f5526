"""`crossvit deploy`: the whole path in one command.

export fp32 -> precision variants -> parity gate on real images -> TensorRT engines (when a
CUDA GPU and TensorRT are present) -> latency of the available backends -> a summary table
and DIR/summary.json.
"""

from __future__ import annotations

import contextlib
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from crossvit import __version__
from crossvit.errors import BackendUnavailable, CrossViTError
from crossvit.model.checkpoint import LoadedModel, atomic_write
from crossvit.runtime.artifact import read_artifact
from crossvit.runtime.session import OnnxRuntimeSession
from crossvit.runtime.timing import measure_interleaved

from .onnx import BatchRange, export_onnx
from .parity import check_parity

VARIANTS = ("fp16", "bf16", "int8", "fp8", "int8-cpu")  # the first four for TensorRT


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
    note: str = ""


@dataclass
class DeployResult:
    out_dir: Path
    rows: list[Row] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    reports: dict = field(default_factory=dict)
    seconds: float = 0.0

    def table(self) -> str:
        head = (f"{'artifact':<30} {'backend':<12} {'prec':<8} {'size MB':>8} {'parity':<8} {'acc %':>6} "
                f"{'p50 ms':>8} {'p99 ms':>8} {'vs torch':>8}  note")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lat = r.latency or {}
            fmt = lambda v, f: format(v, f) if v is not None else "-"
            lines.append(f"{r.artifact:<30} {r.backend:<12} {r.precision:<8} {fmt(r.size_mb, '8.2f'):>8} "
                         f"{r.parity:<8} {fmt(r.accuracy, '6.2f'):>6} {fmt(lat.get('p50_ms'), '8.3f'):>8} "
                         f"{fmt(lat.get('p99_ms'), '8.3f'):>8} {fmt(r.speedup, '7.2f') + 'x' if r.speedup else '-':>8}"
                         f"  {r.note}")
        for s in self.skipped:
            lines.append(f"skipped: {s}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"out_dir": str(self.out_dir), "rows": [asdict(r) for r in self.rows],
                "skipped": self.skipped, "parity_reports": self.reports, "seconds": self.seconds,
                "machine": machine_description(), "crossvit_version": __version__}


def machine_description() -> dict:
    import onnxruntime

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "onnxruntime": onnxruntime.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _tensorrt_status() -> str | None:
    """None when engines can be built here, else the reason they cannot."""
    if not torch.cuda.is_available():
        return "TensorRT engines: no CUDA GPU on this machine (torch.cuda.is_available() is False)"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT engines: TensorRT is not installed (pip install crossvit[gpu] from NVIDIA's index)"
    return "TensorRT engines: engine building is not implemented in this version yet"


def deploy(loaded: LoadedModel, out_dir: str | Path, *, variants: tuple[str, ...] = VARIANTS,
           calibration: str | Path | None = None, images: str | Path | None = None,
           batch: BatchRange = BatchRange(1, 64), bench_batch: int = 8, bench_runs: int = 30, bench_seconds: float = 10.0,
           progress: Callable[[str], None] | None = None) -> DeployResult:
    say = progress or (lambda m: None)
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = loaded.info.name or (loaded.source.stem if loaded.source else "model")
    result = DeployResult(out_dir=out)

    say(f"[1/5] export {name} to ONNX (fp32)")
    fp32 = export_onnx(loaded, out / f"{name}.fp32.onnx", batch=batch, progress=say).path
    artifacts = [fp32]

    say(f"[2/5] precision variants: {', '.join(variants) or 'none'}")
    for precision in variants:
        try:
            from .calibration import calibration_batch
            from .precision import convert_precision

            calib = calibration_batch(read_artifact(fp32).raw, calibration,
                                      need=precision in ("int8", "fp8"))
            dst = out / f"{name}.{precision}.onnx"
            convert_precision(fp32, dst, precision, calib, progress=say)
            artifacts.append(dst)
        except (BackendUnavailable, CrossViTError) as e:
            result.skipped.append(f"{precision} variant: {e}")
            say(f"skipped {precision}: {e}")

    say("[3/5] parity gate on random inputs and real images")
    verdicts = {}
    for path in artifacts:
        report = check_parity(path, loaded, images=images, batch_sizes=[1, 7, batch.max], progress=None)
        report.save(out / f"{path.stem}.parity.json")
        result.reports[path.name] = report.to_dict()
        verdicts[path] = report
        say(f"{path.name}: {report.verdict}")

    tensorrt_reason = _tensorrt_status()
    say("[4/5] " + (tensorrt_reason or "TensorRT engines"))
    if tensorrt_reason:
        result.skipped.append(tensorrt_reason)

    say(f"[5/5] latency at batch {bench_batch} ({bench_runs} runs each in 3 turns, "
        f"at most ~{bench_seconds:.0f} s a backend)")
    x = np.random.default_rng(0).standard_normal((bench_batch, *loaded.model.input_shape), dtype=np.float32)
    xt = torch.from_numpy(x)
    model = loaded.model.eval()
    acc_ref = next((r.accuracy[0] for r in verdicts.values() if r.accuracy[0] is not None), None)
    src_size = loaded.source.stat().st_size / 1e6 if loaded.source else None
    torch_row = Row(artifact=loaded.source.name if loaded.source else name, backend="torch (cpu)",
                    precision="fp32", size_mb=src_size, parity="ref", accuracy=acc_ref,
                    note="PyTorch eager, reference")
    rows = [torch_row]
    fns = {id(torch_row): lambda: model(xt)}
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        for path, report in verdicts.items():
            row = Row(artifact=path.name, backend="onnxruntime", precision=report.precision,
                      size_mb=path.stat().st_size / 1e6, parity=report.verdict, accuracy=report.accuracy[1])
            rows.append(row)
            if report.not_run:
                row.note = "ONNX Runtime (CPU) has no kernels for it; meant for TensorRT"
                continue
            if report.precision == "int8-cpu":
                row.note = "ONNX Runtime dynamic int8 for CPUs; not for TensorRT"
            elif report.precision != "fp32":
                row.note = "TensorRT-oriented graph; CPU speed is not its purpose"
            try:
                session = stack.enter_context(OnnxRuntimeSession(read_artifact(path), device="cpu"))
            except CrossViTError as e:
                row.note = str(e)
                continue
            fns[id(row)] = (lambda s: lambda: s.infer(x))(session)
        # all backends in turns, so drift and neighbours' leftovers are shared fairly
        lat = measure_interleaved(fns, batch=bench_batch, runs=bench_runs, max_seconds=bench_seconds)
    for row in rows:
        if id(row) in lat:
            row.latency = lat[id(row)].to_dict()
            row.speedup = lat[id(torch_row)].p50_ms / lat[id(row)].p50_ms
    result.rows.extend(rows)
    result.seconds = time.perf_counter() - start
    text = json.dumps(result.to_dict(), indent=2, default=float)
    atomic_write(out / "summary.json", lambda tmp: tmp.write_text(text + "\n"))
    return result
