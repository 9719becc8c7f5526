"""The REST front end (Starlette on uvicorn): Triton's HTTP/REST routes for one model.

Every answer to a model route is JSON `{"error": ...}` on failure: anything unforeseen while
reading a request is a 400 (`request_error`), anything after it a 500, never Starlette's bare
"Internal Server Error".
"""

from __future__ import annotations

import logging

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .protocol import (BAD_REQUEST, HEADER_LENGTH, INTERNAL, METHOD_NOT_ALLOWED, NOT_FOUND, TOO_LARGE,
                       ProtocolError, decompress, http_response, parse_http_request, request_error)
from .service import ModelService

log = logging.getLogger("crossvit.serve")
MAX_BODY = 64 * 1024 * 1024  # bytes, after decompression too


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _health(ok: bool) -> Response:
    return Response(status_code=200 if ok else 400)


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` (never buffered beyond)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ProtocolError(TOO_LARGE, f"request body of {declared} bytes is over the {limit} byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ProtocolError(TOO_LARGE, f"request body is over the {limit} byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(service: ModelService, *, max_body: int = MAX_BODY) -> Starlette:
    def model_route(handler):
        async def endpoint(request: Request) -> Response:
            p = request.path_params
            try:
                service.check_model(p["model"], p.get("version"))
                return await handler(request)
            except ProtocolError as e:
                return _error(e.status, e.message)
            except Exception as e:  # a fault of ours, after the request was read: 500, in JSON
                log.warning("%s %s failed", request.method, request.url.path, exc_info=True)
                return _error(INTERNAL, f"internal error: {type(e).__name__}: {str(e)[:200]}")
        return endpoint

    async def live(request: Request) -> Response:
        return _health(True)

    async def ready(request: Request) -> Response:
        return _health(service.ready)

    async def server_metadata(request: Request) -> Response:
        return JSONResponse(service.server_metadata())

    async def model_metadata(request: Request) -> Response:
        return JSONResponse(service.view.metadata())

    async def model_config(request: Request) -> Response:
        return JSONResponse(service.model_config())

    async def stats(request: Request) -> Response:  # one model: the server's and the model's are the same
        return JSONResponse(service.stats.triton())

    async def infer(request: Request) -> Response:
        try:
            try:
                body = decompress(await _body(request, max_body), request.headers.get("content-encoding"), max_body)
                parsed = parse_http_request(body, request.headers.get(HEADER_LENGTH))
            except ProtocolError:
                raise
            except Exception as e:  # the last line of defence: reading a request never ends in a 500
                log.debug("unforeseen error reading a request", exc_info=True)
                raise request_error(e) from None
        except ProtocolError as e:
            service.stats.request("http", 0, ok=False, reason="bad_request" if e.status == BAD_REQUEST
                                  else "too_large")
            raise
        logits = await service.infer(parsed, "http")
        body, headers = http_response(parsed, logits, service.view)
        return Response(body, headers=headers)

    async def metrics(request: Request) -> Response:
        return Response(service.stats.prometheus(), media_type="text/plain; version=0.0.4")

    async def not_found(request: Request, exc) -> Response:
        return _error(NOT_FOUND, f"no route {request.url.path}")

    async def not_allowed(request: Request, exc) -> Response:
        return _error(METHOD_NOT_ALLOWED, f"{request.method} is not allowed on {request.url.path}")

    m = "/v2/models/{model}"
    v = "/v2/models/{model}/versions/{version}"
    routes = [
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/models/stats", stats, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    for prefix in (m, v):
        routes += [
            Route(prefix, model_route(model_metadata), methods=["GET"]),
            Route(prefix + "/ready", model_route(ready), methods=["GET"]),
            Route(prefix + "/config", model_route(model_config), methods=["GET"]),
            Route(prefix + "/stats", model_route(stats), methods=["GET"]),
            Route(prefix + "/infer", model_route(infer), methods=["POST"]),
        ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_allowed})
