"""Latency of every available backend on one model, side by side, in one process.

    python -m crossvit.benchmarks.latency [--model NAME | --checkpoint PATH] [--batch 1,8]
        [--runs 50] [--out results/DIR]

Backends measured (what this machine has): PyTorch eager fp32 (the baseline every ratio is
against), ONNX Runtime with a default `InferenceSession` (no options), and our tuned
`OnnxRuntimeSession` (all optimizations, threads fitted to the machine, cached optimized
graph), and the same tuned session on the int8-cpu variant (ONNX Runtime dynamic
quantization); with CUDA: PyTorch fp16/bf16 eager, torch.compile, and CUDA graphs. Prints a table
and writes results.json and results.csv (machine description, backend, precision, batch,
p50/p90/p99, throughput, ratio to the baseline). The CPU backends are timed in three
interleaved turns (`measure_interleaved`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from crossvit.export.deploy import machine_description
from crossvit.export.onnx import BatchRange, export_onnx
from crossvit.export.precision import convert_precision
from crossvit.model import DEFAULT_MODEL, load_model
from crossvit.runtime.artifact import read_artifact
from crossvit.runtime.session import OnnxRuntimeSession
from crossvit.runtime.timing import measure, measure_interleaved


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


def run(args) -> list[dict]:
    import onnxruntime as ort

    loaded = load_model(args.checkpoint, name=args.model)
    model = loaded.model.eval()
    batches = [int(b) for b in args.batch.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="crossvit-bench-"))
    onnx_path = export_onnx(loaded, tmp / "model.onnx", batch=BatchRange(1, max(max(batches), 2))).path
    info = read_artifact(onnx_path)
    int8_path = convert_precision(onnx_path, tmp / "model.int8-cpu.onnx", "int8-cpu", None)
    int8_info = read_artifact(int8_path)
    rows = []
    for b in batches:
        x = np.random.default_rng(0).standard_normal((b, *model.input_shape), dtype=np.float32)
        xt = torch.from_numpy(x)
        plain = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        with OnnxRuntimeSession(info, device="cpu", cache_dir=tmp / "cache") as tuned, \
                OnnxRuntimeSession(int8_info, device="cpu", cache_dir=tmp / "cache") as int8, torch.inference_mode():
            # in turns, so drift on a shared machine is shared by all backends
            lat = measure_interleaved({
                ("torch eager (cpu)", "fp32"): lambda: model(xt),
                ("onnxruntime default", "fp32"): lambda: plain.run(None, {"input": x}),
                ("onnxruntime tuned", "fp32"): lambda: tuned.infer(x),
                ("onnxruntime tuned", "int8-cpu"): lambda: int8.infer(x),
            }, batch=b, runs=args.runs)
        results = [(backend, precision, l) for (backend, precision), l in lat.items()]
        results += torch_cuda_variants(model, x, args.runs)
        base = results[0][2].p50_ms
        for backend, precision, lat in results:
            rows.append({"model": loaded.info.name, "backend": backend, "precision": precision, **lat.to_dict(),
                         "ratio_vs_torch_cpu": base / lat.p50_ms})
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
        (args.out / "results.json").write_text(json.dumps({"machine": machine_description(), "rows": rows},
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
