"""What clients under continuous load see when `crossvit serve` gets SIGTERM.

    python scripts/serve_sigterm_trial.py MODEL.onnx [--protocol grpc|http] [--clients 48]
        [--seconds 3] [--runs 5]

Starts `crossvit serve` on free loopback ports, runs `--clients` tritonclient asyncio clients
(gRPC or HTTP) that call it back to back (10 ms pause after an UNAVAILABLE or 503), sends
SIGTERM after `--seconds`, and counts each call's outcome until the server has exited. Prints,
per run, the counts by status, when the CANCELLED calls (gRPC) or broken connections (HTTP:
reset, or closed without an answer) came relative to the signal, when the server exited, and
the server's own count of the requests it answered: equal to the clients' "answered" when no
call that failed was one the server had run. An HTTP client whose connection is refused (the
server has stopped listening) stops; those are counted as "refused".
Needs the serve extra.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import signal
import socket
import subprocess
import sys
import time

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def trial(artifact: str, clients: int, seconds: float, protocol: str = "grpc") -> dict:
    import aiohttp
    import tritonclient.grpc.aio as grpcclient
    import tritonclient.http.aio as httpclient
    from tritonclient.utils import InferenceServerException

    from crossvit.runtime.artifact import read_artifact

    info = read_artifact(artifact)
    gp = _free_port()
    hp = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "crossvit", "serve", artifact, "--http-port", str(hp),
                             "--grpc-port", str(gp)], stderr=subprocess.PIPE, text=True)
    try:  # the server never outlives this script, however it ends
        line, said = "", []
        while "serving" not in line:
            line = proc.stderr.readline()
            said += [line.strip()] if line.strip() else []
            if not line:
                raise SystemExit(f"serve_sigterm_trial: the server exited ({proc.wait()}) before serving"
                                 + (f": {said[-1]}" if said else ""))
        name = line.split("'")[1]
        x = np.random.default_rng(0).standard_normal((1, *info.input_shape), dtype=np.float32)
        outcomes: collections.Counter = collections.Counter()
        broken_at: list[float] = []  # CANCELLED (gRPC), a reset or closed connection (HTTP)
        stop = False

        async def grpc_client() -> None:
            c = grpcclient.InferenceServerClient(f"127.0.0.1:{gp}")
            try:
                while not stop:
                    inp = grpcclient.InferInput(info.input_name, list(x.shape), "FP32")
                    inp.set_data_from_numpy(x)
                    try:
                        await c.infer(name, [inp])
                        outcomes["answered"] += 1
                    except InferenceServerException as e:
                        status = str(e.status()).replace("StatusCode.", "")
                        outcomes[status] += 1
                        if status == "CANCELLED":
                            broken_at.append(time.monotonic())
                        if status == "UNAVAILABLE":
                            await asyncio.sleep(0.01)
            finally:
                await c.close()

        async def http_client() -> None:
            c = httpclient.InferenceServerClient(f"127.0.0.1:{hp}")
            try:
                while not stop:
                    inp = httpclient.InferInput(info.input_name, list(x.shape), "FP32")
                    inp.set_data_from_numpy(x, binary_data=True)
                    try:
                        await c.infer(name, [inp])
                        outcomes["answered"] += 1
                    except InferenceServerException as e:
                        code = str(e.status() or "no status")
                        outcomes[f"HTTP {code}"] += 1
                        await asyncio.sleep(0.01)
                    except aiohttp.ClientConnectorError:
                        outcomes["refused"] += 1  # not listening any more: the server has stopped
                        return
                    except (aiohttp.ClientError, OSError) as e:
                        outcomes[f"broken ({type(e).__name__}: {str(e)[:60]})"] += 1
                        broken_at.append(time.monotonic())
            finally:
                await c.close()

        client = grpc_client if protocol == "grpc" else http_client
        tasks = [asyncio.create_task(client()) for _ in range(clients)]
        await asyncio.sleep(seconds)
        before = outcomes["answered"]
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        while proc.poll() is None and time.monotonic() - sent < 60:
            await asyncio.sleep(0.005)
        exited = time.monotonic()
        await asyncio.sleep(0.5)
        stop = True
        await asyncio.wait(tasks, timeout=10)
        rel = sorted(t - sent for t in broken_at)
        stopped = next((l.strip() for l in proc.stderr.read().splitlines() if "stopped (" in l), "")
        return {"exit_code": proc.returncode, "answered_before_signal": before, **outcomes, "server_said": stopped,
                "failed_s_after_signal": [round(rel[0], 3), round(rel[-1], 3)] if rel else None,
                "exit_s_after_signal": round(exited - sent, 3)}
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _terminated(*_) -> None:
    raise KeyboardInterrupt("terminated")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--clients", type=int, default=48)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args(argv)
    if args.clients < 1 or args.runs < 1 or not args.seconds > 0:
        p.error("--clients and --runs must be at least 1, --seconds above 0")
    try:
        import tritonclient.grpc.aio  # noqa: F401
        import tritonclient.http.aio  # noqa: F401

        from crossvit.runtime.artifact import read_artifact

        read_artifact(args.artifact)  # a missing or broken file: one line, before any server starts
    except ImportError as e:
        print(f"serve_sigterm_trial: error: needs the serve extra ({e})", file=sys.stderr)
        return 1
    except Exception as e:  # ArtifactError and the like
        print(f"serve_sigterm_trial: error: {e}", file=sys.stderr)
        return 1
    # SIGTERM unwinds like Ctrl-C, so the trial's `finally` stops its server
    signal.signal(signal.SIGTERM, _terminated)
    try:
        for i in range(args.runs):
            print(f"run {i + 1}:", asyncio.run(trial(args.artifact, args.clients, args.seconds, args.protocol)),
                  flush=True)
    except KeyboardInterrupt as e:
        print(f"serve_sigterm_trial: {e or 'interrupted'}; its server was stopped", file=sys.stderr)
        return 143 if str(e) == "terminated" else 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
