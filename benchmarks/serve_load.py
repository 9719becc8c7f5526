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

`--rates 100,200,400` adds the open-loop measurement (MLPerf server scenario): requests arrive at
exponential intervals at each given rate regardless of answers, against our server or any Open
Inference Protocol server (`--url host:port`, e.g. Triton); for each rate the achieved
throughput, p50/p90/p99 and errors, and the knee: the highest rate whose p99 stays under
`--p99-bound-ms`. Loopback only; each rate is bounded by `--seconds` and `--max-requests`.
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


async def open_loop(address: str, model: str, x: np.ndarray, rate: float, seconds: float,
                    max_requests: int, seed: int = 0) -> dict:
    """Poisson arrivals at `rate` requests/s for `seconds` (at most `max_requests`), each answered or
    failed on its own; latency is measured from the planned arrival time (no coordinated omission)."""
    import tritonclient.http.aio as ahttp

    rng = np.random.default_rng(seed)
    client = ahttp.InferenceServerClient(address, conn_limit=256)
    latencies: list[float] = []
    errors = 0

    async def one(planned: float) -> None:
        nonlocal errors
        try:
            await client.infer(model, [_aio_input(ahttp, x)])
            latencies.append((time.perf_counter() - planned) * 1000)
        except Exception:
            errors += 1

    tasks = []
    try:
        start = time.perf_counter()
        at = start
        while len(tasks) < max_requests:
            at += rng.exponential(1.0 / rate)
            if at - start > seconds:
                break
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            tasks.append(asyncio.ensure_future(one(at)))
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=seconds + 30)
        elapsed = time.perf_counter() - start
    finally:
        await client.close()
    lat = np.asarray(latencies) if latencies else np.asarray([np.nan])
    return {"rate": rate, "sent": len(tasks), "answered": len(latencies), "errors": errors,
            "throughput": len(latencies) / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p90_ms": float(np.percentile(lat, 90)), "p99_ms": float(np.percentile(lat, 99))}


def knee(rows: list[dict], p99_bound_ms: float) -> float | None:
    """The highest offered rate whose p99 stayed under the bound with no errors."""
    ok = [r["rate"] for r in rows if r["errors"] == 0 and r["p99_ms"] < p99_bound_ms]
    return max(ok) if ok else None


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
    from crossvit.contract import temporary_folder
    from crossvit.export.onnx import BatchRange, export_onnx
    from crossvit.model import DEFAULT_MODEL, load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--rates", default=None, metavar="100,200,400",
                   help="open-loop Poisson arrival rates (requests/s) to offer, one after another")
    p.add_argument("--url", default=None, metavar="HOST:PORT",
                   help="an already running Open Inference Protocol HTTP server (default: start ours)")
    p.add_argument("--p99-bound-ms", type=float, default=50.0, help="the latency bound that defines the knee")
    p.add_argument("--max-requests", type=int, default=20_000, help="per rate")
    args = p.parse_args(argv)
    if args.url and args.url.rsplit(":", 1)[0] not in ("127.0.0.1", "localhost", "[::1]"):
        p.error("--url must be a loopback address")
    loaded = load_model(name=args.model)
    x = np.random.default_rng(0).standard_normal((1, *loaded.model.input_shape), dtype=np.float32)
    name = loaded.info.name
    if args.rates:
        rates = [float(r) for r in args.rates.split(",")]
        with temporary_folder() as tmp, contextlib.ExitStack() as stack:
            address = args.url
            if address is None:
                onnx_path = export_onnx(loaded, tmp / "model.onnx", batch=BatchRange(1, 64)).path
                address, _ = stack.enter_context(_serve(onnx_path, "--max-batch", "32", "--max-delay-ms", "2"))
            rows = [asyncio.run(open_loop(address, name, x, r, args.seconds, args.max_requests)) for r in rates]
        result = {"machine": machine_description(), "command": " ".join(sys.argv), "model": name,
                  "open_loop": rows, "p99_bound_ms": args.p99_bound_ms, "knee_rate": knee(rows, args.p99_bound_ms)}
        print(f"{'rate/s':>8} {'sent':>6} {'answered':>8} {'errors':>6} {'img/s':>8} {'p50 ms':>8} {'p90 ms':>8} "
              f"{'p99 ms':>8}")
        for r in rows:
            print(f"{r['rate']:8.0f} {r['sent']:6d} {r['answered']:8d} {r['errors']:6d} {r['throughput']:8.1f} "
                  f"{r['p50_ms']:8.2f} {r['p90_ms']:8.2f} {r['p99_ms']:8.2f}")
        print(f"knee (p99 < {args.p99_bound_ms:g} ms, no errors): {result['knee_rate']} requests/s")
        _save(result, args.out, "serve_open_loop.json")
        return 0
    with temporary_folder() as tmp:
        onnx_path = export_onnx(loaded, tmp / "model.onnx", batch=BatchRange(1, 64)).path
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
    _save(result, args.out, "serve.json")
    return 0


def _save(result: dict, out: Path | None, name: str) -> None:
    from crossvit.contract import atomic_write, to_json

    if out is None:
        return
    text = to_json(result, indent=2) + "\n"
    atomic_write(out / name, lambda tmp: tmp.write_text(text))
    print(f"wrote {out / name}")


if __name__ == "__main__":
    sys.exit(main())
