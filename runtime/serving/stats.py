"""Server numbers, kept once and shown twice: Prometheus text at /metrics, and Triton's
statistics extension JSON (which the gRPC ModelStatistics answer is built from)."""

from __future__ import annotations

import threading
import time
from collections import defaultdict


class Stats:
    def __init__(self, model: str, version: str):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.model, self.version = model, version
        self._lock = threading.Lock()
        self.success = [0, 0]  # count, ns (request arrival to answer)
        self.fail = [0, 0]
        self.queue = [0, 0]
        self.compute = [0, 0]
        self.executions = 0
        self.inferences = 0  # rows
        self.last_inference_ms = 0
        self.batches: dict[int, list[int]] = defaultdict(lambda: [0, 0])  # batch size -> count, ns
        self.registry = CollectorRegistry()
        self._requests = Counter("crossvit_requests", "Inference requests by protocol and outcome",
                                 ["protocol", "outcome"], registry=self.registry)
        self._failures = Counter("crossvit_request_failures", "Failed inference requests by reason",
                                 ["reason"], registry=self.registry)
        self._batch = Histogram("crossvit_batch_size", "Rows per session call (dynamic batching)",
                                buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self._queue_s = Histogram("crossvit_queue_seconds", "Time a request waited for its batch",
                                  registry=self.registry)
        self._compute_s = Histogram("crossvit_compute_seconds", "Time of one session call", registry=self.registry)

    def request(self, protocol: str, ns: int, ok: bool, reason: str | None = None) -> None:
        with self._lock:
            target = self.success if ok else self.fail
            target[0] += 1
            target[1] += ns
        self._requests.labels(protocol, "success" if ok else "failure").inc()
        if not ok:
            self._failures.labels(reason or "other").inc()

    def queued(self, ns: int) -> None:
        with self._lock:
            self.queue[0] += 1
            self.queue[1] += ns
        self._queue_s.observe(ns / 1e9)

    def batch(self, rows: int, ns: int, ok: bool) -> None:
        with self._lock:
            self.compute[0] += 1
            self.compute[1] += ns
            if ok:
                self.executions += 1
                self.inferences += rows
                self.last_inference_ms = int(time.time() * 1000)
                self.batches[rows][0] += 1
                self.batches[rows][1] += ns
        self._batch.observe(rows)
        self._compute_s.observe(ns / 1e9)

    def prometheus(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def triton(self) -> dict:
        """Triton's statistics extension: {"model_stats": [...]} for this one model."""
        d = lambda c: {"count": c[0], "ns": c[1]}  # noqa: E731
        zero = {"count": 0, "ns": 0}
        with self._lock:
            stats = {
                "name": self.model, "version": self.version, "last_inference": self.last_inference_ms,
                "inference_count": self.inferences, "execution_count": self.executions,
                "inference_stats": {"success": d(self.success), "fail": d(self.fail), "queue": d(self.queue),
                                    "compute_input": zero, "compute_infer": d(self.compute),
                                    "compute_output": zero},
                "batch_stats": [{"batch_size": size, "compute_input": {"count": c[0], "ns": 0},
                                 "compute_infer": d(c), "compute_output": {"count": c[0], "ns": 0}}
                                for size, c in sorted(self.batches.items())],
            }
        return {"model_stats": [stats]}
