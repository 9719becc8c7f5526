"""What serving costs and what dynamic batching buys, measured with the real tritonclient.

    python -m crossvit.benchmarks.serve_load [--model NAME] [--clients 16] [--seconds 10] [--out DIR]

Two measurements, each against `crossvit serve` started as its own process on loopback ports
(so the clients in this process do not share its interpreter):
1. throughput of `--clients` closed-loop clients (tritonclient's asyncio HTTP client: each sends
   one image, waits, repeats) with dynamic batching (max batch 32) and with `--max-batch 1`, and
   the ratio of the two;
2. the latency the server adds at batch 1: one client in turns with a direct `session.infer`
   call on the same input in this process, over HTTP (binary) and gRPC; p50/p99 of each and
   the p50 difference.
Every phase is bounded by `--seconds`. Results go to DIR/serve.json with the machine description.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _serve(onnx_path: Path, *args: str):
    """`crossvit serve` in its own process; yields (http address, grpc address)."""
    http_port, grpc_port = _free_port(), _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "crossvit", "serve", str(onnx_path), "--http-port", str(http_port),
                             "--grpc-port", str(grpc_port), *args], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        if "serving" not in line:
            raise RuntimeError(f"crossvit serve did not start: {line}{proc.stderr.read()[-2000:]}")
        yield f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


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
    import tritonclient.http.aio as ahttp

    latencies: list[float] = []

    async def run(address: str) -> tuple[int, float, dict]:
        client = ahttp.InferenceServerClient(address, conn_limit=clients)
        end = time.perf_counter() + seconds

        async def one() -> int:
            n = 0
            while time.perf_counter() < end:
                inp = ahttp.InferInput("input", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                t0 = time.perf_counter()
                await client.infer(model, [inp])
                latencies.append((time.perf_counter() - t0) * 1000)
                n += 1
            return n

        try:
            await client.infer(model, [_aio_input(ahttp, x)])  # warm up the connection and the session
            start = time.perf_counter()
            counts = await asyncio.gather(*(one() for _ in range(clients)))
            elapsed = time.perf_counter() - start
            stats = (await client.get_inference_statistics(model))["model_stats"][0]
        finally:
            await client.close()
        return sum(counts), elapsed, stats

    with _serve(onnx_path, "--max-batch", str(max_batch), "--max-delay-ms", "2") as (address, _):
        requests, elapsed, stats = asyncio.run(run(address))
    lat = np.asarray(latencies)
    return {"max_batch": max_batch, "clients": clients, "requests": requests, "seconds": elapsed,
            "images_per_s": requests * len(x) / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)),
            "mean_batch": stats["inference_count"] / max(stats["execution_count"], 1)}


def _aio_input(ahttp, x):
    inp = ahttp.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def overhead(onnx_path: Path, model: str, x: np.ndarray, seconds: float) -> dict:
    from crossvit.runtime.timing import measure_interleaved

    from crossvit.runtime.session import open_session

    with _serve(onnx_path, "--max-batch", "1", "--max-delay-ms", "0") as (http_address, grpc_address), \
            open_session(onnx_path) as session:
        hmod, hclient = _client("http", http_address)
        gmod, gclient = _client("grpc", grpc_address)
        lat = measure_interleaved({
            "session.infer (direct)": lambda: session.infer(x),
            "HTTP binary": lambda: _infer(hmod, hclient, model, x),
            "gRPC": lambda: _infer(gmod, gclient, model, x),
        }, batch=len(x), runs=200, max_seconds=seconds)
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
