"""What serving costs and what dynamic batching buys, measured with the real tritonclient.

    python -m crossvit.benchmarks.serve_load [--model NAME | --artifact PATH] [--clients 16]
        [--seconds 10] [--rounds 3] [--out DIR]

Two measurements, each against `crossvit serve` started as its own process on loopback ports
(so the clients in this process do not share its interpreter):
1. throughput of `--clients` closed-loop clients (tritonclient's asyncio HTTP client: each sends
   one image, waits, repeats) with dynamic batching (max batch 32, or the artifact's batch max where smaller) and with
   `--max-batch 1`:
   both servers run side by side and take `--rounds` turns, so the machine's noise hits both;
   the ratio of the two, pooled and per round;
2. the latency the server adds at batch 1: one client in turns with direct `session.infer`
   calls on the same input in this process, over HTTP (binary) and gRPC; p50/p99 of each, the
   p50 difference, and the server's own split of a request into queue and compute time.
Every phase is bounded by `--seconds`. Results go to DIR/serve.json with the machine description.
By default the model is exported to fp32 ONNX in a temporary folder; `--artifact` serves a file
you have, e.g. the output of `crossvit deploy`, whose recorded CPU path for this machine the server
runs (the server's `running ...` line names it).

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
import math
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
def _serve(artifact: Path, *args: str, start_timeout: float = 120.0):
    """`crossvit serve` in its own process; yields (http address, grpc address).

    Its stderr is read by a thread until the "serving ..." line (lines before it, such as which
    variant it runs, are kept for the error message) and drained after, so a chatty server never
    blocks on a full pipe. A server that exits or stays silent past `start_timeout` is an error."""
    import collections
    import queue
    import threading

    http_port, grpc_port = _free_port(), _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "crossvit", "serve", str(artifact), "--http-port", str(http_port),
                             "--grpc-port", str(grpc_port), *args], stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str | None] = queue.Queue()
    tail: collections.deque[str] = collections.deque(maxlen=40)

    def read() -> None:
        for line in proc.stderr:
            tail.append(line)
            lines.put(line)
        lines.put(None)  # end of file: the process has exited

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"crossvit serve printed no 'serving' line in {start_timeout:g} s: "
                                   f"{''.join(tail)[-2000:]}") from None
            if line is None:
                proc.wait()
                raise RuntimeError(f"crossvit serve did not start (exit {proc.returncode}): {''.join(tail)[-2000:]}")
            if line.lstrip(" .").startswith("serving "):  # the CLI says "  .. serving ..."
                break
        yield f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


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


async def _closed_loop(address: str, model: str, x: np.ndarray, clients: int,
                       seconds: float) -> tuple[int, float, list]:
    """`clients` tritonclient asyncio clients, each sending `x`, waiting, repeating, for `seconds`."""
    import tritonclient.http.aio as ahttp

    client = ahttp.InferenceServerClient(address, conn_limit=clients)
    latencies: list[float] = []
    end = time.perf_counter() + seconds

    async def one() -> int:
        n = 0
        while time.perf_counter() < end:
            inp = _aio_input(ahttp, x)
            t0 = time.perf_counter()
            await client.infer(model, [inp])
            latencies.append((time.perf_counter() - t0) * 1000)
            n += 1
        return n

    try:
        await client.infer(model, [_aio_input(ahttp, x)])  # warm up the connection and the session
        start = time.perf_counter()
        counts = await asyncio.gather(*(one() for _ in range(clients)))
        return sum(counts), time.perf_counter() - start, latencies
    finally:
        await client.close()


async def _batch_sizes(address: str, model: str) -> float:
    import tritonclient.http.aio as ahttp

    client = ahttp.InferenceServerClient(address)
    try:
        stats = (await client.get_inference_statistics(model))["model_stats"][0]
    finally:
        await client.close()
    return stats["inference_count"] / max(stats["execution_count"], 1)


def _dynamic_max_batch(artifact: Path) -> int:
    """The dynamic-batching configuration's max batch: serve's default (32, or the artifact's batch
    max where that is smaller; serve refuses a --max-batch beyond the artifact's range)."""
    from crossvit.runtime.artifact import read_artifact
    from crossvit.runtime.serving.server import DEFAULT_MAX_BATCH

    return min(DEFAULT_MAX_BATCH, read_artifact(artifact).batch_max)


def throughput(artifact: Path, model: str, x: np.ndarray, clients: int, seconds: float, rounds: int = 3) -> dict:
    """Closed-loop throughput with dynamic batching (serve's default max batch) and with `--max-batch 1`, in turns.

    Both servers run side by side (an idle one does not spin) and the two configurations take
    turns, `rounds` phases each of `seconds / rounds`, so a burst of load from other tenants hits
    both alike; the ratio is reported per round and pooled."""
    largest = _dynamic_max_batch(artifact)
    modes = {"dynamic_batching": ("--max-batch", str(largest), "--max-delay-ms", "2"),
             "max_batch_1": ("--max-batch", "1")}
    with contextlib.ExitStack() as stack:
        addresses = {mode: stack.enter_context(_serve(artifact, *args))[0] for mode, args in modes.items()}
        done = {mode: {"requests": 0, "seconds": 0.0, "latencies": [], "rounds": []} for mode in modes}
        for _ in range(rounds):
            for mode, address in addresses.items():
                n, elapsed, lat = asyncio.run(_closed_loop(address, model, x, clients, seconds / rounds))
                d = done[mode]
                d["requests"] += n
                d["seconds"] += elapsed
                d["latencies"] += lat
                d["rounds"].append(n * len(x) / elapsed)
        mean_batch = {mode: asyncio.run(_batch_sizes(address, model)) for mode, address in addresses.items()}
    result = {}
    for mode, d in done.items():
        lat = np.asarray(d["latencies"])
        result[mode] = {"clients": clients, "requests": d["requests"], "seconds": d["seconds"],
                        "images_per_s": d["requests"] * len(x) / d["seconds"],
                        "images_per_s_by_round": d["rounds"], "p50_ms": float(np.percentile(lat, 50)),
                        "p99_ms": float(np.percentile(lat, 99)), "mean_batch": mean_batch[mode],
                        "max_batch": int(modes[mode][1])}
    by_round = [a / b for a, b in zip(done["dynamic_batching"]["rounds"], done["max_batch_1"]["rounds"])]
    result["ratio"] = result["dynamic_batching"]["images_per_s"] / result["max_batch_1"]["images_per_s"]
    result["ratio_by_round"] = by_round
    return result


def _aio_input(ahttp, x):
    inp = ahttp.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


async def open_loop(address: str, model: str, x: np.ndarray, rate: float, seconds: float,
                    max_requests: int, seed: int = 0, grace_seconds: float = 30.0) -> dict:
    """Poisson arrivals at `rate` requests/s for `seconds` (at most `max_requests`), each answered or
    failed on its own; latency is measured from the planned arrival time (no coordinated omission).
    Requests still out `grace_seconds` after the last one was sent are cancelled and counted as
    unanswered."""
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
        except asyncio.CancelledError:
            raise
        except Exception:
            errors += 1

    tasks, capped = [], False
    try:
        start = time.perf_counter()
        at = start
        while True:
            at += rng.exponential(1.0 / rate)
            if at - start > seconds:
                break
            if len(tasks) >= max_requests:
                capped = True
                break
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            tasks.append(asyncio.ensure_future(one(at)))
        sending = time.perf_counter() - start
        # a server that stops answering must not hang the run: what is still out after the grace
        # time is counted as unanswered, and the run goes on to the next rate
        _, pending = await asyncio.wait(tasks, timeout=grace_seconds) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
        elapsed = time.perf_counter() - start
    finally:
        with contextlib.suppress(Exception):
            await client.close()
    lat = np.asarray(latencies) if latencies else np.asarray([np.nan])
    return {"rate": rate, "sent": len(tasks), "answered": len(latencies), "errors": errors,
            "unanswered": len(pending), "sending_seconds": round(sending, 3), "seconds": round(elapsed, 3),
            "capped_by_max_requests": capped,
            "throughput": len(latencies) / elapsed, "p50_ms": float(np.percentile(lat, 50)),
            "p90_ms": float(np.percentile(lat, 90)), "p99_ms": float(np.percentile(lat, 99))}


def knee(rows: list[dict], p99_bound_ms: float) -> float | None:
    """The highest offered rate whose p99 stayed under the bound with every request answered."""
    ok = [r["rate"] for r in rows if r["errors"] == 0 and not r.get("unanswered") and r["p99_ms"] < p99_bound_ms]
    return max(ok) if ok else None


def overhead(artifact: Path, model: str, x: np.ndarray, seconds: float) -> dict:
    """What the server adds at batch 1: HTTP binary and gRPC in turns with direct session calls.

    Two direct rows: the session opened as the server opens it (`server_session_options`: ONNX
    Runtime does not spin between calls, which costs a little latency and leaves the CPU to the
    event loop), the baseline for "added"; and the session with its default settings, which is
    what a caller in their own process gets. The server's own statistics split its side into
    queue and compute time."""
    from crossvit.runtime.serving.server import server_session_options
    from crossvit.runtime.session import open_session
    from crossvit.runtime.timing import measure_interleaved

    with _serve(artifact, "--max-batch", "1", "--max-delay-ms", "0") as (http_address, grpc_address), \
            open_session(artifact, **server_session_options(artifact)) as as_served, \
            open_session(artifact) as default:
        hmod, hclient = _client("http", http_address)
        gmod, gclient = _client("grpc", grpc_address)
        lat = measure_interleaved({
            "session.infer (as the server runs it)": lambda: as_served.infer(x),
            "session.infer (default settings)": lambda: default.infer(x),
            "HTTP binary": lambda: _infer(hmod, hclient, model, x),
            "gRPC": lambda: _infer(gmod, gclient, model, x),
        }, batch=len(x), runs=200, max_seconds=seconds)
        stats = hclient.get_inference_statistics(model)["model_stats"][0]
    base = lat["session.infer (as the server runs it)"].p50_ms
    rows = {name: {**l.to_dict(), "added_p50_ms": l.p50_ms - base} for name, l in lat.items()}
    n = max(stats["inference_stats"]["success"]["count"], 1)
    rows["server side, mean per request"] = {
        what: stats["inference_stats"][key]["ns"] / n / 1e6
        for what, key in (("request_ms", "success"), ("queue_ms", "queue"), ("compute_ms", "compute_infer"))}
    return rows


def main(argv=None) -> int:
    from crossvit.arguments import Parser, int_at_least, positive_number
    from crossvit.errors import CrossViTError
    from crossvit.model import DEFAULT_MODEL

    p = Parser(prog="python -m crossvit.benchmarks.serve_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--clients", type=int_at_least(1), default=16)
    p.add_argument("--artifact", type=Path, default=None,
                   help="serve this .onnx or .plan (e.g. from `crossvit deploy`, whose recorded CPU path for this "
                        "machine the server then runs, as users get it) instead of exporting --model to fp32 ONNX")
    p.add_argument("--seconds", type=positive_number, default=10.0,
                   help="seconds per batching configuration (split into --rounds turns), for the latency "
                        "phase, and per offered rate")
    p.add_argument("--rounds", type=int_at_least(1), default=3, help="turns of the two batching configurations")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--rates", type=_rates, default=None, metavar="100,200,400",
                   help="open-loop Poisson arrival rates (requests/s) to offer, one after another")
    p.add_argument("--url", default=None, metavar="HOST:PORT",
                   help="with --rates: an already running Open Inference Protocol HTTP server, loopback only "
                        "(default: start ours)")
    p.add_argument("--p99-bound-ms", type=positive_number, default=50.0,
                   help="the latency bound that defines the knee")
    p.add_argument("--max-requests", type=int_at_least(1), default=20_000, help="per rate")
    args = p.parse_args(argv)
    try:
        import tritonclient.grpc  # noqa: F401
        import tritonclient.http  # noqa: F401
    except (ImportError, RuntimeError):  # tritonclient without its http part raises RuntimeError
        from crossvit.install import pip_install

        print(f"{p.prog}: error: it needs the server and its client: {pip_install('serve')}", file=sys.stderr)
        return 3
    if args.url and not args.rates:
        p.error("--url is for the open-loop measurement: give --rates too")
    if args.url:
        host, _, port = args.url.rpartition(":")
        if host not in ("127.0.0.1", "localhost", "[::1]"):
            p.error(f"--url must be a loopback HOST:PORT (127.0.0.1, localhost or [::1]), got {args.url!r}")
        if not (port.isdigit() and 0 < int(port) < 65536):
            p.error(f"--url: the port must be a number in 1..65535, got {port!r}")
    try:
        return _main(args)
    except CrossViTError as e:  # a bad --model, --artifact, --out or --url: one line, before any load
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return e.exit_code


def _rates(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated request rates such as 100,200, got {text!r}") from None
    if not all(r > 0 and math.isfinite(r) for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be positive numbers (requests/s), got {text!r}")
    return rates


def check_server(address: str, model: str, shape: tuple) -> None:
    """The server at `address` answers, has `model` ready (Triton's whole-server readiness says no when any
    other model failed to load, so the model's is asked) and takes inputs of `shape`; or one line saying what
    is wrong, before any load is offered."""
    from crossvit.errors import UsageError
    from crossvit.files import first_line

    client = _client("http", address)[1]
    try:
        try:
            ready = client.is_model_ready(model)
        except Exception as e:
            raise UsageError(f"--url {address}: no Open Inference Protocol HTTP server answers there "
                             f"({first_line(e)})") from None
        if not ready:
            raise UsageError(f"--url {address}: the server has no model {model!r} ready (serve_load names it by "
                             "--model's registered name, or by the --artifact's model)")
        meta = client.get_model_metadata(model)
        dims = [list(map(int, i["shape"])) for i in meta.get("inputs", []) if i.get("name") == "input"]
        if not dims or not takes(dims[0], shape):
            raise UsageError(f"--url {address}: {model!r} takes inputs {dims[0] if dims else 'not named input'}, "
                             f"not [-1, {', '.join(map(str, shape))}]")
    finally:
        client.close()


def takes(dims: list[int], shape: tuple) -> bool:
    """Whether a served input of `dims` (-1: any size; the batch dimension first) takes a batch of `shape`."""
    return len(dims) == len(shape) + 1 and all(d in (-1, s) for d, s in zip(dims[1:], shape))


def _main(args) -> int:
    from crossvit.benchmarks.machine import busy_machine, command_line, machine_description
    from crossvit.export.onnx import BatchRange, export_onnx
    from crossvit.files import check_output_dir, check_output_path, temporary_folder
    from crossvit.model import load_model

    if args.out is not None:  # before the run, not after it
        check_output_dir(args.out)
        check_output_path(args.out / ("serve_open_loop.json" if args.rates else "serve.json"))
    with temporary_folder() as tmp:
        if args.artifact is not None:
            from crossvit.runtime.session import open_session

            artifact = args.artifact
            with open_session(artifact) as session:
                shape, name = session.info.input_shape, session.info.model_name
        else:
            loaded = load_model(name=args.model)
            shape, name = loaded.model.input_shape, loaded.info.name
        if args.url:
            check_server(args.url, name, shape)
        machine = machine_description()  # before our server starts: the load average says how quiet it was
        busy = busy_machine(machine)
        if busy:
            print(f"warning: {busy}", file=sys.stderr)
            machine["warning"] = busy
        if args.artifact is None:
            # another server (--url) serves its own copy: nothing to export then
            artifact = None if args.rates and args.url else export_onnx(loaded, tmp / "model.onnx",
                                                                           batch=BatchRange(1, 64)).path
        x = np.random.default_rng(0).standard_normal((1, *shape), dtype=np.float32)
        if args.rates:
            return _open_loop_main(args, artifact, name, x, machine)
        served = throughput(artifact, name, x, args.clients, args.seconds, args.rounds)
        added = overhead(artifact, name, x, args.seconds)
    result = {"machine": machine, "command": command_line(), "model": name,
              "artifact": str(args.artifact) if args.artifact else "fp32 ONNX exported in this run",
              "throughput": served, "overhead_batch_1": added}
    dynamic = f"dynamic batching (max {served['dynamic_batching']['max_batch']})"
    for label, key in ((dynamic, "dynamic_batching"), ("max batch 1", "max_batch_1")):
        r = served[key]
        print(f"{label:<26} {r['images_per_s']:8.1f} img/s  p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  "
              f"mean batch {r['mean_batch']:.1f}  ({args.clients} clients, {r['requests']} requests)")
    print(f"throughput ratio (batching / max batch 1): {served['ratio']:.2f}x "
          f"(by round: {', '.join(f'{r:.2f}' for r in served['ratio_by_round'])})")
    for label, r in added.items():
        if "added_p50_ms" in r:
            print(f"{label:<38} p50 {r['p50_ms']:7.3f} ms  p99 {r['p99_ms']:7.3f} ms  "
                  f"added p50 {r['added_p50_ms']:6.3f} ms")
    side = added["server side, mean per request"]
    print(f"server side, mean per request: {side['request_ms']:.3f} ms, of which queue {side['queue_ms']:.3f} ms and "
          f"compute {side['compute_ms']:.3f} ms")
    _save(result, args.out, "serve.json")
    return 0


def _open_loop_main(args, artifact: Path | None, name: str, x: np.ndarray, machine: dict) -> int:
    from crossvit.benchmarks.machine import command_line

    rows: list[dict] = []
    result = {"machine": machine, "command": command_line(), "model": name, "open_loop": rows,
              "p99_bound_ms": args.p99_bound_ms, "knee_rate": None}
    print(f"{'rate/s':>8} {'sent':>6} {'answered':>8} {'errors':>6} {'no answer':>9} {'img/s':>8} {'p50 ms':>8} "
          f"{'p90 ms':>8} {'p99 ms':>8}", flush=True)
    with contextlib.ExitStack() as stack:
        address = args.url
        if address is None:
            address, _ = stack.enter_context(_serve(artifact, "--max-batch", str(_dynamic_max_batch(artifact)),
                                                    "--max-delay-ms", "2"))
        for rate in args.rates:
            r = asyncio.run(open_loop(address, name, x, rate, args.seconds, args.max_requests))
            rows.append(r)
            result["knee_rate"] = knee(rows, args.p99_bound_ms)
            print(f"{r['rate']:8.0f} {r['sent']:6d} {r['answered']:8d} {r['errors']:6d} {r['unanswered']:9d} "
                  f"{r['throughput']:8.1f} {r['p50_ms']:8.2f} {r['p90_ms']:8.2f} {r['p99_ms']:8.2f}"
                  f"{'  (capped by --max-requests)' if r['capped_by_max_requests'] else ''}", flush=True)
            _save(result, args.out, "serve_open_loop.json", quiet=True)  # each rate kept, whatever comes next
    print(f"knee (p99 < {args.p99_bound_ms:g} ms, every request answered): {result['knee_rate']} requests/s")
    if args.out is not None:
        print(f"wrote {args.out / 'serve_open_loop.json'}")
    return 0


def _save(result: dict, out: Path | None, name: str, quiet: bool = False) -> None:
    from crossvit.contract import to_json
    from crossvit.files import atomic_write

    if out is None:
        return
    text = to_json(result, indent=2) + "\n"
    atomic_write(out / name, lambda tmp: tmp.write_text(text))
    if not quiet:
        print(f"wrote {out / name}")


if __name__ == "__main__":
    sys.exit(main())
