"""The model behind both front ends: one session, its batcher, its numbers, its readiness.

The hooks, as LitServe or Triton's Python backend would name them: `decode` (protocol request
-> float32 batch), `predict` (the batcher), `encode` (in each front end). No model code here.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from crossvit import __version__

from .batcher import BackendFailed, Batcher, QueueFull, TooManyRows
from .protocol import (BAD_REQUEST, INTERNAL, NOT_FOUND, UNAVAILABLE, InferRequest, ModelView, ProtocolError,
                       request_error, to_batch)
from .stats import Stats

EXTENSIONS = ["classification", "binary_tensor_data", "statistics", "model_configuration"]
SERVER_NAME = "crossvit"
log = logging.getLogger("crossvit.serve")


class ModelService:
    def __init__(self, session, *, name: str, max_batch: int, max_delay_ms: float, max_queue: int,
                 version: str = "1"):
        info = session.info
        self.session = session
        self.view = ModelView(name=name, version=version, input_name=info.input_name,
                              input_shape=info.input_shape, output_name=info.output_name, labels=info.labels,
                              platform=f"crossvit_{session.backend}")
        self.max_batch = min(max_batch, info.batch_max) if info.kind == "engine" else max_batch
        self.stats = Stats(name, version)
        self.batcher = Batcher(session, max_batch=self.max_batch, max_delay_s=max_delay_ms / 1000,
                               max_queue=max_queue, stats=self.stats)
        self.ready = False
        self._accepted = 0  # requests past the ready check and not yet answered (decoding or queued)

    async def start(self) -> None:
        self.batcher.start()
        self.ready = True

    # -- lookups ---------------------------------------------------------------------------------
    def check_model(self, name: str, version: str | None) -> None:
        if name != self.view.name:
            raise ProtocolError(NOT_FOUND, f"unknown model {name!r}; this server serves {self.view.name!r}")
        if version not in (None, "", self.view.version):
            raise ProtocolError(NOT_FOUND, f"unknown version {version!r} of model {name!r}; "
                                           f"it has version {self.view.version}")

    def server_metadata(self) -> dict:
        return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}

    def model_config(self) -> dict:
        """The subset of Triton's model configuration a client needs to build requests. A request
        sends one of the two inputs, so both are `optional` (Triton: not required in a request)."""
        c, h, w = self.view.input_shape
        return {"name": self.view.name, "platform": self.view.platform, "max_batch_size": self.max_batch,
                "input": [{"name": self.view.input_name, "data_type": "TYPE_FP32", "dims": [c, h, w],
                           "optional": True},
                          {"name": self.view.images_name, "data_type": "TYPE_STRING", "dims": [1],
                           "optional": True}],
                "output": [{"name": self.view.output_name, "data_type": "TYPE_FP32",
                            "dims": [len(self.view.labels)]}],
                "dynamic_batching": {"max_queue_delay_microseconds": int(self.batcher.max_delay_s * 1e6)}}

    # -- inference -------------------------------------------------------------------------------
    async def infer(self, request: InferRequest, protocol: str) -> np.ndarray:
        """Logits for a parsed request; ProtocolError with Triton's status on failure."""
        start = time.perf_counter_ns()
        reason = None
        try:
            if not self.ready:
                raise ProtocolError(UNAVAILABLE, "the server is not ready (starting or shutting down)")
            self._accepted += 1  # accepted: shutdown waits for it, decoding included, before it stops the batcher
            try:
                x = await self.decode(request)
                logits = await self.batcher.infer(x)
            except QueueFull as e:
                raise ProtocolError(UNAVAILABLE, str(e)) from None
            except TooManyRows as e:
                raise ProtocolError(BAD_REQUEST, str(e)) from None
            except BackendFailed as e:
                raise ProtocolError(INTERNAL, str(e)) from None
            finally:
                self._accepted -= 1
            if not np.isfinite(logits).all():
                raise ProtocolError(INTERNAL, "the model gave non-finite logits (NaN or infinity)")
            return logits
        except ProtocolError as e:
            reason = {BAD_REQUEST: "bad_request", UNAVAILABLE: "unavailable", INTERNAL: "backend",
                      NOT_FOUND: "not_found"}.get(e.status, str(e.status))
            raise
        except Exception:  # a fault of ours: the front end answers 500 / INTERNAL
            reason = "internal"
            raise
        finally:
            self.stats.request(protocol, time.perf_counter_ns() - start, ok=reason is None, reason=reason)

    async def decode(self, request: InferRequest) -> np.ndarray:
        """The request's float32 batch (at most the batcher's max_rows rows, checked before any
        decoding); anything unforeseen while reading the request is a 400, never a 500."""
        try:
            first = request.inputs[0] if request.inputs else None
            if first and first.name == self.view.images_name and first.datatype == "BYTES":  # decoding is CPU work
                return await asyncio.get_running_loop().run_in_executor(
                    None, to_batch, request, self.view, self.session.preprocessor, self.batcher.max_rows)
            return to_batch(request, self.view, self.session.preprocessor, self.batcher.max_rows)
        except ProtocolError:
            raise
        except Exception as e:
            log.debug("unforeseen error reading a request", exc_info=True)
            raise request_error(e) from None

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking requests, answer the ones accepted, stop the worker."""
        self.ready = False
        end = time.monotonic() + timeout
        while self._accepted and time.monotonic() < end:  # a request still decoding has not reached the queue
            await asyncio.sleep(0.01)
        await self.batcher.drain(max(end - time.monotonic(), 0.0))
        await self.batcher.close()
