"""The HTTP/1.1 connection the REST front end runs on: uvicorn's h11 protocol, with limits.

uvicorn picks httptools when it is installed; httptools has no limit on the size of a request's
headers (a 400 MB header was read in full, for minutes). h11 has one, uvicorn's
`h11_max_incomplete_event_size`, so the server runs h11 with it set (`MAX_HEADER_BYTES`):
headers over it get 431. h11 applies it to what it buffers of an incomplete event, so a request
head is handed to it in slices (`HEAD_SLICE`) and the limit holds within a slice even when the
whole head arrives in one socket read. Measured against httptools on 2 CPU cores: about
+0.09 ms on a health check (0.29 vs 0.21 ms p50), within noise on an inference (1.24-1.29 vs
1.15-1.25 ms p50). Neither protocol bounds how long a request may take to arrive
(`timeout_keep_alive` covers only the idle time after a response), so this subclass adds two
deadlines, followed from h11's own state of the client's side of the connection:

- headers: from the connection's start (or the end of the previous response) until the request
  line and headers are in (h11 state IDLE), at most `header_timeout` seconds, however slowly
  they trickle;
- body: from the headers until the body is in (SEND_BODY), at most `body_timeout` seconds.

When one passes, the client gets 408 with a JSON error and the connection is closed (a
connection that never sent a byte is closed without an answer). A request still waiting for its
body when the shutdown drain runs out is answered 503 by `QuietCancel` instead of uvicorn's
"500 Internal Server Error" and traceback.

At shutdown uvicorn closes every idle kept-alive connection at once, and a client that has just
sent its next request on one sees the connection reset instead of an answer (under continuous
load, 0-39 of 48 clients a run). Here an idle connection is left open for `SHUTDOWN_IDLE_S`
more: a request that comes on it is answered (503: the service has stopped) with
`connection: close` (`QuietCancel(stopping=...)`), and a connection silent that long is closed.
New connections are refused from the start of uvicorn's shutdown (it stops listening).
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

MAX_HEADER_BYTES = 32 * 1024  # request line + headers; Triton's clients send a few hundred bytes
HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 60.0  # a 64 MB body (the default body limit) needs ~1.1 MB/s
HEAD_SLICE = 1024  # bytes of a request head given to h11 at a time (a usual head fits in one)
SHUTDOWN_IDLE_S = 0.5  # at shutdown, how long an idle kept-alive connection may still bring a request


def _json_response(status: int, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.1 {status} {STATUS_PHRASES[status].decode()}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


def protocol_class(*, header_timeout: float = HEADER_TIMEOUT_S, body_timeout: float = BODY_TIMEOUT_S,
                   max_header_bytes: int = MAX_HEADER_BYTES) -> type[H11Protocol]:
    """The protocol for `uvicorn.Config(http=...)` with these limits (pass the same
    `max_header_bytes` as `h11_max_incomplete_event_size`)."""
    return type("LimitedH11Protocol", (LimitedH11Protocol,),
                {"header_timeout": header_timeout, "body_timeout": body_timeout, "max_header_bytes": max_header_bytes})


class LimitedH11Protocol(H11Protocol):
    header_timeout = HEADER_TIMEOUT_S
    body_timeout = BODY_TIMEOUT_S
    max_header_bytes = MAX_HEADER_BYTES
    _deadline: asyncio.TimerHandle | None = None
    _phase: object = None  # h11.IDLE (reading headers), h11.SEND_BODY (reading the body) or None

    # the deadlines follow h11's state of the client's side after every step that can change it
    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._follow()

    def data_received(self, data: bytes) -> None:
        # h11's limit is on what it buffers of an *incomplete* event: a whole request head in one
        # socket read (asyncio reads up to 256 KiB) would pass it. Fed in slices while it reads a
        # head, h11 sees the head grow and the limit holds to within a slice.
        view = memoryview(data)
        while len(view) > HEAD_SLICE and self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            super().data_received(view[:HEAD_SLICE])
            view = view[HEAD_SLICE:]
        if len(view) and not self.transport.is_closing():
            super().data_received(view)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown of this connection: a response in progress is the last one
        (uvicorn's own rule); an idle connection gets `SHUTDOWN_IDLE_S` to bring one more request
        (answered, and then closed) instead of being closed under a request that may be on its way."""
        if self.cycle is None or self.cycle.response_complete:
            self.loop.call_later(SHUTDOWN_IDLE_S, self._close_if_idle)
        else:
            self.cycle.keep_alive = False

    def _close_if_idle(self) -> None:
        if self.transport.is_closing():
            return
        if self.conn.trailing_data[0]:  # part of a request head is in: wait for the rest
            self.loop.call_later(SHUTDOWN_IDLE_S, self._close_if_idle)
        elif self.cycle is None or self.cycle.response_complete:
            self._cancel()
            self.conn.send(h11.ConnectionClosed())
            self.transport.close()
        else:  # a request came meanwhile: its answer says close, and closes the connection
            self.cycle.keep_alive = False

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _follow(self) -> None:
        state = self.conn.their_state
        phase = state if state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing() else None
        if phase is self._phase:
            return
        self._cancel()
        self._phase = phase
        if phase is h11.IDLE:
            self._deadline = self.loop.call_later(self.header_timeout, self._expired)
        elif phase is h11.SEND_BODY:
            self._deadline = self.loop.call_later(self.body_timeout, self._expired)

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._phase is h11.IDLE:
            if self.conn.trailing_data[0]:  # part of a request came: say why it is dropped
                self.transport.write(_json_response(408, f"the request headers did not arrive within "
                                                         f"{self.header_timeout:g} s"))
        elif self.cycle is not None and not self.cycle.response_started:
            self.transport.write(_json_response(408, f"the request body did not arrive within "
                                                     f"{self.body_timeout:g} s"))
        self.transport.close()  # the app, if it waits for the body, gets a disconnect

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to what h11 cannot parse, as JSON; 431 for headers over the limit."""
        if len(self.conn.trailing_data[0]) > self.max_header_bytes:
            status, message = 431, f"request headers over the {self.max_header_bytes} byte limit"
        else:
            status, message = 400, "malformed HTTP request"
        self._cancel()
        self.transport.write(_json_response(status, message))
        self.transport.close()


class QuietCancel:
    """ASGI wrapper for the end of a shutdown:

    - once `stopping()` is true (uvicorn is closing its connections), every response says
      `connection: close`, so the client does not send another request on a connection the
      server is closing;
    - a request cancelled by uvicorn when the shutdown drain runs out (one still waiting for its
      body) is answered 503 in JSON, not 500 text with a traceback in the log; uvicorn's own line
      ("Cancel N running task(s) ...") is the one log line."""

    def __init__(self, app, stopping=lambda: False):
        self.app = app
        self.stopping = stopping

    async def __call__(self, scope, receive, send) -> None:
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if self.stopping():
                    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            if scope["type"] != "http":
                raise
            if not started:
                body = json.dumps({"error": "the server stopped before this request arrived in full"}).encode()
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
