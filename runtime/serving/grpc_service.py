"""The gRPC front end: Triton's GRPCInferenceService (grpcio's asyncio API), for one model.

The servicer is the one generated into `tritonclient.grpc.service_pb2_grpc`, so Triton's own
clients talk to it unchanged. Inputs arrive as raw contents (what tritonclient sends) or typed
contents; outputs go back as raw contents.
"""

from __future__ import annotations

import grpc
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from .protocol import BAD_REQUEST, GRPC_CODES, InferRequest, InputTensor, OutputRequest, ProtocolError, outputs_for
from .service import ModelService


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
        k = o.parameters["classification"].int64_param if "classification" in o.parameters else None
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
                parsed = _request(request)
            except ProtocolError:
                self.service.stats.request("grpc", 0, ok=False, reason="bad_request")
                raise
            logits = await self.service.infer(parsed, "grpc")
        except ProtocolError as e:
            await self._fail(context, e)
        view = self.service.view
        response = service_pb2.ModelInferResponse(model_name=view.name, model_version=view.version,
                                                  id=request.id)
        for t, _ in outputs_for(parsed, logits, view):
            response.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
            response.raw_output_contents.append(t.raw())
        return response


def create_server(service: ModelService, address: str, max_message: int) -> tuple[grpc.aio.Server, int]:
    """The gRPC server (not started) and the port it is bound to."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message),
                                      ("grpc.max_send_message_length", max_message)])
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Servicer(service), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return server, port
