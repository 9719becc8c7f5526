"""The gRPC front end: Triton's GRPCInferenceService (grpcio's asyncio API), for one model.

The servicer is the one generated into `tritonclient.grpc.service_pb2_grpc`, so Triton's own
clients talk to it unchanged. Inputs arrive as raw contents (what tritonclient sends) or typed
contents; outputs go back as raw contents. Anything unforeseen while reading a request is
INVALID_ARGUMENT, anything after it INTERNAL: never UNKNOWN.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile

import grpc
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from .protocol import (BAD_REQUEST, GRPC_CODES, INTERNAL, InferRequest, InputTensor, OutputRequest, ProtocolError,
                       outputs_for, request_error)
from .service import ModelService

log = logging.getLogger("crossvit.serve")


def _request(msg: service_pb2.ModelInferRequest) -> InferRequest:
    if msg.raw_input_contents and len(msg.raw_input_contents) != len(msg.inputs):
        raise ProtocolError(BAD_REQUEST, f"{len(msg.raw_input_contents)} raw input contents for "
                                         f"{len(msg.inputs)} inputs")
    if not msg.inputs:
        raise ProtocolError(BAD_REQUEST, "the request has no inputs")
    inputs = []
    for i, t in enumerate(msg.inputs):
        tensor = InputTensor(name=t.name, datatype=t.datatype, shape=[int(d) for d in t.shape])
        if any(d < 0 for d in tensor.shape):
            raise ProtocolError(BAD_REQUEST, f"input {t.name!r}: negative dimension in {tensor.shape}")
        if msg.raw_input_contents:
            tensor.raw = msg.raw_input_contents[i]
        elif t.datatype == "FP32":
            tensor.data = list(t.contents.fp32_contents)
        elif t.datatype == "BYTES":
            tensor.data = [b.decode("latin-1") for b in t.contents.bytes_contents]
        else:
            raise ProtocolError(BAD_REQUEST, f"input {t.name!r}: datatype {t.datatype} is not supported")
        inputs.append(tensor)
    outputs = []
    for o in msg.outputs:
        k = None
        if "classification" in o.parameters:
            param = o.parameters["classification"]
            kind = param.WhichOneof("parameter_choice")
            if kind not in ("int64_param", "uint64_param"):  # a string "3" would read as 0
                raise ProtocolError(BAD_REQUEST, f"output {o.name!r}: classification must be an integer, "
                                                 f"got a {kind or 'missing value'}")
            k = getattr(param, kind)
        if k is not None and k < 1:
            raise ProtocolError(BAD_REQUEST, f"output {o.name!r}: classification must be >= 1, got {k}")
        outputs.append(OutputRequest(name=o.name, binary=True, classification=k))
    return InferRequest(id=msg.id or None, inputs=inputs, outputs=outputs, binary_output=True)


class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, service: ModelService):
        self.service = service

    async def _fail(self, context, e: ProtocolError):
        await context.abort(getattr(grpc.StatusCode, GRPC_CODES.get(e.status, "INTERNAL")), e.message)

    async def _check(self, context, name: str, version: str) -> None:
        """Abort the call with NOT_FOUND unless it names this model (and its version)."""
        try:
            self.service.check_model(name, version)
        except ProtocolError as e:
            await self._fail(context, e)

    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self.service.ready)

    async def ModelReady(self, request, context):
        await self._check(context, request.name, request.version)
        return service_pb2.ModelReadyResponse(ready=self.service.ready)

    async def ServerMetadata(self, request, context):
        return json_format.ParseDict(self.service.server_metadata(), service_pb2.ServerMetadataResponse())

    async def ModelMetadata(self, request, context):
        await self._check(context, request.name, request.version)
        return json_format.ParseDict(self.service.view.metadata(), service_pb2.ModelMetadataResponse())

    async def ModelConfig(self, request, context):
        await self._check(context, request.name, request.version)
        config = json_format.ParseDict(self.service.model_config(), model_config_pb2.ModelConfig())
        return service_pb2.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request, context):
        if request.name:
            await self._check(context, request.name, request.version)
        return json_format.ParseDict(self.service.stats.triton(), service_pb2.ModelStatisticsResponse())

    async def ModelInfer(self, request, context):
        try:
            self.service.check_model(request.model_name, request.model_version)
            try:
                try:
                    parsed = _request(request)
                except ProtocolError:
                    raise
                except Exception as e:  # the last line of defence: reading a request never ends in UNKNOWN
                    log.debug("unforeseen error reading a request", exc_info=True)
                    raise request_error(e) from None
            except ProtocolError:
                self.service.stats.request("grpc", 0, ok=False, reason="bad_request")
                raise
            logits = await self.service.infer(parsed, "grpc")
            view = self.service.view
            response = service_pb2.ModelInferResponse(model_name=view.name, model_version=view.version,
                                                      id=request.id)
            for t, _ in outputs_for(parsed, logits, view):
                response.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
                response.raw_output_contents.append(t.raw())
        except ProtocolError as e:
            await self._fail(context, e)
        except Exception as e:  # a fault of ours, after the request was read
            log.warning("ModelInfer failed", exc_info=True)
            await self._fail(context, ProtocolError(INTERNAL, f"internal error: {type(e).__name__}: {str(e)[:200]}"))
        return response


class _Undecodable:
    """What a request's bytes became when they are not the method's protobuf message."""

    def __init__(self, what: str):
        self.what = what


def _tolerant(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler` whose request deserializer never raises: grpcio would answer UNKNOWN with the
    exception's class name (DecodeError) and log it; bytes that do not parse get INVALID_ARGUMENT
    with a plain message instead. Streaming handlers are kept as they are (none is implemented)."""
    if handler.request_streaming or handler.response_streaming or handler.unary_unary is None:
        return handler
    deserialize, behaviour = handler.request_deserializer, handler.unary_unary

    def parse(data: bytes):
        try:
            return deserialize(data)
        except Exception:  # DecodeError, and whatever else a parser raises on garbage
            return _Undecodable(method)

    async def call(request, context):
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request is not a valid {request.what} message (it does not parse as protobuf)")
        return await behaviour(request, context)

    return grpc.unary_unary_rpc_method_handler(call, request_deserializer=parse,
                                               response_serializer=handler.response_serializer)


class _Handlers:
    """Stands in for the server while the generated `add_..._to_server` registers the servicer's
    method handlers, so they can be wrapped (`_tolerant`) before the real server gets them."""

    def __init__(self):
        self.service = None
        self.methods: dict[str, grpc.RpcMethodHandler] = {}
        self.generic: tuple = ()

    def add_registered_method_handlers(self, service: str, methods: dict) -> None:
        self.service, self.methods = service, dict(methods)

    def add_generic_rpc_handlers(self, handlers) -> None:
        self.generic = tuple(handlers)  # the same handlers as add_registered_method_handlers gets


def _add_servicer(server: grpc.aio.Server, servicer: "Servicer") -> None:
    handlers = _Handlers()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, handlers)
    if handlers.service is None:  # generated code older than grpcio 1.63 gives only the generic handler
        server.add_generic_rpc_handlers(handlers.generic)
        return
    methods = {name: _tolerant(f"{name}Request", h)
               for name, h in handlers.methods.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(handlers.service, methods),))
    server.add_registered_method_handlers(handlers.service, methods)


def create_server(service: ModelService, address: str, max_message: int) -> tuple[grpc.aio.Server, int]:
    """The gRPC server (not started) and the port it is bound to; OSError (one line, the
    system's reason) when the address cannot be bound, a port already in use included."""
    # grpc sets SO_REUSEPORT by default: a second server on a taken port would bind it too and
    # silently take a share of its connections
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message),
                                      ("grpc.max_send_message_length", max_message),
                                      ("grpc.so_reuseport", 0)])
    _add_servicer(server, Servicer(service))
    port, said = _add_port_quietly(server, address)
    if not port:
        found = re.search(r"Error in bind for address '[^']*': ([^)\n]+)", said)
        raise OSError(found.group(1).strip() if found else "grpc could not bind it")
    return server, port


def _add_port_quietly(server: grpc.aio.Server, address: str) -> tuple[int, str]:
    """`add_insecure_port`, with what grpc's core logs on stderr meanwhile (on a failed bind, a
    multi-line E-level message) caught: (port, 0 when it failed; that text). Text written while
    the port was added successfully goes on to stderr."""
    try:
        caught = tempfile.TemporaryFile()
    except OSError:  # nowhere to put it: grpc's lines go to stderr as they are
        try:
            return server.add_insecure_port(address), ""
        except RuntimeError as e:
            return 0, str(e)
    with caught:
        saved = os.dup(2)
        os.dup2(caught.fileno(), 2)
        try:
            port = server.add_insecure_port(address)
        except RuntimeError:  # grpcio >= 1.5x raises where older versions returned 0
            port = 0
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        caught.seek(0)
        said = caught.read().decode(errors="replace")
    if port and said:
        os.write(2, said.encode())
    return port, said
