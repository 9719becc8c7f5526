"""Latency of every available backend on one model, side by side, in one process.

    python -m crossvit.benchmarks.latency [--model NAME | --checkpoint PATH] [--batch 1,8]
        [--runs 50] [--out results/DIR]

Backends measured (what this machine has): PyTorch eager fp32 (the baseline every ratio is
against), ONNX Runtime with a default `InferenceSession` (no options), and our tuned
`OnnxRuntimeSession` (all optimizations, threads fitted to the machine), and the same tuned
session on the int8-cpu variant (ONNX Runtime dynamic quantization); with CUDA: PyTorch
fp16/bf16 eager, torch.compile, and CUDA graphs. Prints a table and writes results.json and
results.csv (machine description, backend, precision, batch, p50/p90/p99, throughput, ratio to
the baseline). The CPU backends are timed in three interleaved turns (`time_cpu_backends`,
which `crossvit deploy` uses too).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import platform
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from crossvit.contract import first_line, temporary_folder, to_json
from crossvit.errors import CrossViTError
from crossvit.export.onnx import BatchRange, export_onnx
from crossvit.export.precision import convert_precision
from crossvit.model import DEFAULT_MODEL, load_model
from crossvit.runtime.artifact import read_artifact
from crossvit.runtime.session import OnnxRuntimeSession
from crossvit.runtime.timing import Latency, measure, measure_interleaved

BASELINE = "torch eager (cpu)"


def machine_description() -> dict:
    """What every result carries: the machine and the library versions it was measured with."""
    import onnxruntime

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "onnxruntime": onnxruntime.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def time_cpu_backends(model: torch.nn.Module, artifacts: dict[str, Path], *, batch: int, runs: int = 30,
                      max_seconds: float | None = None, extra: dict[str, Callable[[np.ndarray], object]] | None = None
                      ) -> tuple[dict[str, Latency], dict[str, str]]:
    """PyTorch eager fp32 (key BASELINE) and each artifact in ONNX Runtime on the CPU, timed in
    interleaved turns on one random batch (`measure_interleaved`).

    Returns (latencies by key, reasons by key for artifacts ONNX Runtime could not open).
    `extra` adds more backends as functions of the input batch.
    """
    x = np.random.default_rng(0).standard_normal((batch, *model.input_shape), dtype=np.float32)
    xt = torch.from_numpy(x)
    model = model.eval()
    fns: dict[str, Callable[[], object]] = {BASELINE: lambda: model(xt)}
    for key, fn in (extra or {}).items():
        fns[key] = (lambda f: lambda: f(x))(fn)
    failed: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        for key, path in artifacts.items():
            try:
                session = stack.enter_context(OnnxRuntimeSession(read_artifact(path), device="cpu"))
                session.infer(x)  # a graph ORT loads but cannot run (bf16 on CPU) fails here
            except CrossViTError as e:
                failed[key] = str(e)
                continue
            except Exception as e:
                failed[key] = f"ONNX Runtime (CPU) cannot run it: {first_line(e)}"
                continue
            fns[key] = (lambda s: lambda: s.infer(x))(session)
        return measure_interleaved(fns, batch=batch, runs=runs, max_seconds=max_seconds), failed


def torch_cuda_variants(model, x, runs):
    """fp16/bf16 eager, torch.compile and CUDA graphs on the GPU (skipped without one)."""
    out = []
    if not torch.cuda.is_available():
        return out
    sync = torch.cuda.synchronize
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        m = model.to("cuda", dtype).eval()
        xt = torch.from_numpy(x).to("cuda", dtype)
        with torch.inference_mode():
            out.append(("torch eager (cuda)", name, measure(lambda: m(xt), batch=len(x), runs=runs, sync=sync)))
    m = model.to("cuda", torch.float16).eval()
    xt = torch.from_numpy(x).to("cuda", torch.float16)
    compiled = torch.compile(m, mode="max-autotune-no-cudagraphs")
    with torch.inference_mode():
        out.append(("torch.compile (cuda)", "fp16", measure(lambda: compiled(xt), batch=len(x), runs=runs,
                                                             warmup=10, sync=sync)))
        static_x = xt.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                m(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            m(static_x)
        out.append(("CUDA graph (cuda)", "fp16", measure(graph.replay, batch=len(x), runs=runs, sync=sync)))
    model.to("cpu", torch.float32)
    return out


def time_engines(plans: list[Path], *, batch: int, runs: int = 30, max_seconds: float | None = None
                 ) -> dict[Path, Latency]:
    """Each TensorRT engine through its session (which synchronizes the stream every call)."""
    from crossvit.runtime.session import open_session

    out = {}
    for plan in plans:
        with open_session(plan, backend="tensorrt") as s:
            c, h, w = s.info.input_shape
            x = np.random.default_rng(0).standard_normal((batch, c, h, w), dtype=np.float32)
            out[plan] = measure(lambda: s.infer(x), batch=batch, runs=runs, max_seconds=max_seconds)
    return out


def run(args) -> list[dict]:
    import onnxruntime as ort

    loaded = load_model(args.checkpoint, name=args.model)
    model = loaded.model.eval()
    batches = [int(b) for b in args.batch.split(",")]
    rows = []
    with temporary_folder() as tmp:
        onnx_path = export_onnx(loaded, tmp / "model.onnx", batch=BatchRange(1, max(max(batches), 2))).path
        int8_path = convert_precision(onnx_path, tmp / "model.int8-cpu.onnx", "int8-cpu", None)
        plain = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        artifacts = {("onnxruntime tuned", "fp32"): onnx_path, ("onnxruntime tuned", "int8-cpu"): int8_path}
        for b in batches:
            lat, failed = time_cpu_backends(
                model, artifacts, batch=b, runs=args.runs,
                extra={("onnxruntime default", "fp32"): lambda x: plain.run(None, {"input": x})})
            results = [(BASELINE, "fp32", lat.pop(BASELINE))]
            results += [(backend, precision, l) for (backend, precision), l in lat.items()]
            x = np.random.default_rng(0).standard_normal((b, *model.input_shape), dtype=np.float32)
            results += torch_cuda_variants(model, x, args.runs)
            base = results[0][2].p50_ms
            for backend, precision, l in results:
                rows.append({"model": loaded.info.name, "backend": backend, "precision": precision, **l.to_dict(),
                             "ratio_vs_torch_cpu": base / l.p50_ms})
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'backend':<22} {'prec':<8} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} "
             f"{'img/s':>9} {'vs torch':>9}"]
    for r in rows:
        lines.append(f"{r['backend']:<22} {r['precision']:<8} {r['batch']:>5} {r['p50_ms']:9.3f} {r['p90_ms']:9.3f} "
                     f"{r['p99_ms']:9.3f} {r['throughput_ips']:9.1f} {r['ratio_vs_torch_cpu']:8.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help=f"registered name (default {DEFAULT_MODEL})")
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--batch", default="1,8")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--out", type=Path, default=None, help="folder for results.json and results.csv")
    args = p.parse_args(argv)
    if args.checkpoint is None and args.model is None:
        args.model = DEFAULT_MODEL
    rows = run(args)
    print(f"machine: {json.dumps(machine_description())}")
    print(table(rows))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(to_json({"machine": machine_description(), "rows": rows},
                                                       indent=2) + "\n")
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        (args.out / "results.csv").write_text(buf.getvalue())
        print(f"wrote {args.out}/results.json and results.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
