"""HTTP and gRPC on one event loop; SIGINT/SIGTERM drain in-flight requests, then exit 0."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from crossvit.errors import ArtifactError, BackendUnavailable, BatchSizeRefused, ConfigError
from crossvit.install import pip_install

log = logging.getLogger("crossvit.serve")
DEFAULT_MAX_BATCH = 32  # rows per session call, where the artifact's batch range allows it


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    model_name: str | None = None
    max_batch: int | None = None  # None: DEFAULT_MAX_BATCH, or the artifact's batch max where smaller
    max_delay_ms: float = 2.0
    max_queue: int = 256
    backend: str = "auto"
    device: str = "auto"
    exact: bool = False  # serve the file given, not its gated CPU variant (open_session)
    max_body: int = 64 * 1024 * 1024
    drain_seconds: float = 30.0
    # HTTP read limits (http11.py): request line + headers, and how long headers and body may take
    max_header_bytes: int = 32 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0

    def check(self) -> None:
        for name in ("http_port", "grpc_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ConfigError(f"--{name.replace('_', '-')} must be 0..65535, got {port}")
        if self.http_port and self.http_port == self.grpc_port:
            raise ConfigError("--http-port and --grpc-port must differ")
        if (self.max_batch is not None and self.max_batch < 1) or self.max_queue < 1:
            raise ConfigError("--max-batch and --max-queue must be >= 1")
        if self.max_header_bytes < 1024:
            raise ConfigError(f"max_header_bytes must be >= 1024, got {self.max_header_bytes}")
        if not (self.header_timeout_s > 0 and self.body_timeout_s > 0):
            raise ConfigError("the header and body timeouts must be > 0 seconds")
        if not 0 <= self.max_delay_ms <= 10_000:
            raise ConfigError(f"--max-delay-ms must be in 0..10000, got {self.max_delay_ms}")
        if self.model_name is not None and not self.model_name.replace("_", "").replace("-", "").replace(".", "") \
                .isalnum():
            raise ConfigError(f"--model-name may hold letters, digits, '_', '-' and '.', got {self.model_name!r}")


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def _import_serving():
    try:
        import grpc  # noqa: F401
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
        import tritonclient.grpc.service_pb2_grpc  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(f"serving needs {e.name or 'its libraries'}: {pip_install('serve')}") from None


def server_session_options(artifact: str | Path) -> dict:
    """How the server opens its session: ONNX Runtime's threads must not spin between calls,
    because the event loop needs that CPU (on 2 cores spinning took half the server's CPU)."""
    from crossvit.runtime.session import artifact_kind

    return {"spin": False} if artifact_kind(Path(artifact)) == "onnx" else {}


class Server:
    """A running server: `await start()`, then `await stop()` (or `run()` until a signal)."""

    def __init__(self, artifact: str | Path, options: ServeOptions = ServeOptions(), *,
                 say: Callable[[str], None] | None = None):
        options.check()
        _import_serving()
        from crossvit.runtime.session import open_session

        from .protocol import IMAGES_INPUT
        from .service import ModelService

        self.options = options
        self.say = say or (lambda m: None)
        self.session = open_session(artifact, backend=options.backend, device=options.device, exact=options.exact,
                                    **server_session_options(artifact))
        info = self.session.info
        if info.input_name == IMAGES_INPUT:  # one name for two inputs: a request could not say which it sends
            self.session.close()
            raise ArtifactError(f"{Path(artifact).name}: its input is named {IMAGES_INPUT!r}, the name serve gives "
                                "its BYTES input of encoded images; export the model with the input named 'input'")
        if options.max_batch is not None and options.max_batch > info.batch_max:  # as triton-repo refuses it
            self.session.close()
            what = "plan's profile" if info.kind == "engine" else "ONNX's batch range"  # triton-repo's words
            raise ConfigError(f"--max-batch {options.max_batch} is outside the {what} "
                              f"{info.batch_min}..{info.batch_max}")
        max_batch = options.max_batch or min(DEFAULT_MAX_BATCH, info.batch_max)
        if self.session.chosen:  # said once the options are known to fit the file
            self.say(f"running {self.session.chosen} (--exact serves the file given)")
        elif self.session.passed_over:  # other CPU paths lie beside the file: why none of them runs
            self.say(f"running {self.session.passed_over}")
        try:
            prepared = self.session.prepare(max_batch)  # within the file's range (checked above)
        except BatchSizeRefused as e:  # the CPU path chosen for this machine: the file given still serves
            self.session.close()
            if not self.session.chosen:
                raise
            raise BatchSizeRefused(f"{e}; `--exact` serves {Path(artifact).name} as it is") from None
        except BaseException:
            self.session.close()
            raise
        if prepared:
            self.say(prepared)
        name = options.model_name or info.model_name
        self.service = ModelService(self.session, name=name, max_batch=max_batch,
                                    max_delay_ms=options.max_delay_ms, max_queue=options.max_queue)
        self.http_port = self.grpc_port = None
        self._uvicorn = self._grpc = self._http_task = None

    async def start(self) -> None:
        import uvicorn

        from .grpc_service import create_server
        from .http11 import QuietCancel, protocol_class
        from .rest import create_app

        o = self.options
        try:  # bound here, so a taken port is one clear line (uvicorn would exit the process)
            sock = socket.create_server((o.host, o.http_port))
            # inherited by accepted connections: without it a response's header and body writes
            # wait on the client's delayed ACK (measured: 48 ms per request instead of 1.7)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:
            raise ConfigError(f"cannot listen on {o.host}:{o.http_port} ({e.strerror or e})") from None
        self.http_port = sock.getsockname()[1]
        try:
            self._grpc, self.grpc_port = create_server(self.service, f"{o.host}:{o.grpc_port}", o.max_body)
        except (OSError, RuntimeError) as e:
            sock.close()
            raise ConfigError(f"cannot listen on {o.host}:{o.grpc_port} for gRPC ({e})") from None
        await self.service.start()
        await self._grpc.start()
        # h11, not httptools (uvicorn's pick when installed): h11 has the header size limit
        http = protocol_class(header_timeout=o.header_timeout_s, body_timeout=o.body_timeout_s,
                              max_header_bytes=o.max_header_bytes)
        config = uvicorn.Config(QuietCancel(create_app(self.service, max_body=o.max_body),
                                            stopping=lambda: self._uvicorn.should_exit), log_level="warning",
                                lifespan="off", access_log=False, http=http, ws="none",  # no WebSocket routes
                                h11_max_incomplete_event_size=o.max_header_bytes,
                                # a client that stalls mid-body must not hold the exit off for ever
                                timeout_graceful_shutdown=max(o.drain_seconds, 1.0))
        self._uvicorn = uvicorn.Server(config)
        self._uvicorn.install_signal_handlers = lambda: None  # ours drain first
        self._http_task = asyncio.get_running_loop().create_task(self._uvicorn.serve(sockets=[sock]))
        while not self._uvicorn.started:
            if self._http_task.done():
                self._http_task.result()
                raise ConfigError(f"the HTTP server on {o.host}:{self.http_port} did not start")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Refuse new requests (503), answer the accepted ones, then close both servers."""
        await self.service.shutdown(self.options.drain_seconds)
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
            with contextlib.suppress(Exception):
                await self._http_task
        self.session.close()

    async def run(self) -> None:
        """Serve until SIGINT or SIGTERM, then drain and return."""
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        self.say(f"serving {self.service.view.name!r} ({self.session.describe()}) on "
                 f"http://{self.options.host}:{self.http_port} and grpc {self.options.host}:{self.grpc_port}; "
                 f"dynamic batching up to {self.service.max_batch} rows, {self.options.max_delay_ms:g} ms")
        await stop.wait()
        self.say("stopping: answering the requests in flight")
        await self.stop()
        st = self.service.stats
        self.say(f"stopped (inference requests answered: {st.success[0]}, failed or refused: {st.fail[0]})")
