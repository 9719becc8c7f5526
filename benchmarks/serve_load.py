"""What serving costs and what dynamic batching buys, measured with the real tritonclient.

    python -m crossvit.benchmarks.serve_load [--model NAME] [--clients 16] [--seconds 10] [--out DIR]

Two measurements, each against a server started in this process on loopback ports:
1. throughput of `--clients` closed-loop clients (each sends one image, waits, repeats) with
   dynamic batching (max batch 32) and with `--max-batch 1`, and the ratio of the two;
2. the latency the server adds at batch 1: one client in turns with a direct `session.infer`
   call on the same input, over HTTP (binary) and gRPC; p50/p99 of each and the p50 difference.
Every phase is bounded by `--seconds`. Results go to DIR/serve.json with the machine description.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from pathlib import Path

import numpy as np


def _start(onnx_path: Path, **options):
    from crossvit.runtime.serving.server import ServeOptions, Server

    server = Server(onnx_path, ServeOptions(http_port=0, grpc_port=0, **options))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(60)

    def stop():
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

    return server, stop


def _client(kind: str, address: str):
    if kind == "http":
        import tritonclient.http as client
    else:
        import tritonclient.grpc as client
    return client, client.InferenceServerClient(address)


def _infer(mod, client, model: str, x: np.ndarray):
    inp = mod.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp])


def throughput(onnx_path: Path, model: str, x: np.ndarray, clients: int, seconds: float, max_batch: int) -> dict:
    server, stop = _start(onnx_path, max_batch=max_batch, max_delay_ms=2.0)
    counts, latencies = [0] * clients, []
    end = time.perf_counter() + seconds

    def loop(i):
        mod, client = _client("http", f"127.0.0.1:{server.http_port}")
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            _infer(mod, client, model, x)
            latencies.append((time.perf_counter() - t0) * 1000)
            counts[i] += 1

    try:
        threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 60)
        elapsed = time.perf_counter() - start
        stats = server.service.stats.triton()["model_stats"][0]
    finally:
        stop()
    lat = np.asarray(latencies)
    return {"max_batch": max_batch, "clients": clients, "requests": sum(counts), "seconds": elapsed,
            "images_per_s": sum(counts) * len(x) / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)),
            "mean_batch": stats["inference_count"] / max(stats["execution_count"], 1)}


def overhead(onnx_path: Path, model: str, x: np.ndarray, seconds: float) -> dict:
    from crossvit.runtime.timing import measure_interleaved

    server, stop = _start(onnx_path, max_batch=1, max_delay_ms=0.0)
    try:
        hmod, hclient = _client("http", f"127.0.0.1:{server.http_port}")
        gmod, gclient = _client("grpc", f"127.0.0.1:{server.grpc_port}")
        session = server.session
        lat = measure_interleaved({
            "session.infer (direct)": lambda: session.infer(x),
            "HTTP binary": lambda: _infer(hmod, hclient, model, x),
            "gRPC": lambda: _infer(gmod, gclient, model, x),
        }, batch=len(x), runs=200, max_seconds=seconds)
    finally:
        stop()
    base = lat["session.infer (direct)"].p50_ms
    return {name: {**l.to_dict(), "added_p50_ms": l.p50_ms - base} for name, l in lat.items()}


def main(argv=None) -> int:
    from crossvit.benchmarks.latency import machine_description
    from crossvit.contract import atomic_write, temporary_folder, to_json
    from crossvit.export.onnx import BatchRange, export_onnx
    from crossvit.model import DEFAULT_MODEL, load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    loaded = load_model(name=args.model)
    x = np.random.default_rng(0).standard_normal((1, *loaded.model.input_shape), dtype=np.float32)
    with temporary_folder() as tmp:
        onnx_path = export_onnx(loaded, tmp / "model.onnx", batch=BatchRange(1, 64)).path
        name = loaded.info.name
        batched = throughput(onnx_path, name, x, args.clients, args.seconds, max_batch=32)
        single = throughput(onnx_path, name, x, args.clients, args.seconds, max_batch=1)
        added = overhead(onnx_path, name, x, args.seconds)
    result = {"machine": machine_description(), "command": " ".join(sys.argv), "model": name,
              "throughput": {"dynamic_batching": batched, "max_batch_1": single,
                             "ratio": batched["images_per_s"] / single["images_per_s"]},
              "overhead_batch_1": added}
    for label, r in (("dynamic batching (max 32)", batched), ("max batch 1", single)):
        print(f"{label:<26} {r['images_per_s']:8.1f} img/s  p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  "
              f"mean batch {r['mean_batch']:.1f}  ({args.clients} clients, {r['requests']} requests)")
    print(f"throughput ratio (batching / max batch 1): {result['throughput']['ratio']:.2f}x")
    for label, r in added.items():
        print(f"{label:<24} p50 {r['p50_ms']:7.3f} ms  p99 {r['p99_ms']:7.3f} ms  added p50 {r['added_p50_ms']:6.3f} ms")
    if args.out:
        text = to_json(result, indent=2) + "\n"
        atomic_write(args.out / "serve.json", lambda tmp: tmp.write_text(text))
        print(f"wrote {args.out / 'serve.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
