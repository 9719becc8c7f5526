"""Latency measurement shared by `crossvit deploy` and benchmarks/: warm up, repeat, percentiles."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Latency:
    """Per-call latency in milliseconds over `runs` timed calls of one batch."""

    batch: int
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float

    @property
    def throughput(self) -> float:
        """Images per second at the median latency."""
        return self.batch * 1000.0 / self.p50_ms if self.p50_ms > 0 else float("inf")

    def to_dict(self) -> dict:
        return {**asdict(self), "throughput_ips": self.throughput}


def measure(fn: Callable[[], object], *, batch: int, warmup: int = 5, runs: int = 50,
            min_seconds: float = 0.0, max_seconds: float | None = None, min_runs: int = 5,
            sync: Callable[[], None] | None = None) -> Latency:
    """Time `fn()`; `sync` (e.g. torch.cuda.synchronize) runs before each clock read.

    Runs `runs` times (and for at least `min_seconds`), unless `max_seconds` runs out first,
    after `min_runs` at least; the result says how many runs it is made of.
    """
    sync = sync or (lambda: None)
    t0 = time.perf_counter()
    for i in range(warmup):
        fn()
        if max_seconds is not None and i >= 1 and time.perf_counter() - t0 > max_seconds / 4:
            break  # slow calls: a couple of warm-up runs are enough
    sync()
    times = []
    start = time.perf_counter()
    while len(times) < runs or time.perf_counter() - start < min_seconds:
        if max_seconds is not None and len(times) >= min_runs and time.perf_counter() - start > max_seconds:
            break
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1000.0)
    a = np.asarray(times)
    return Latency(batch=batch, runs=len(a), p50_ms=float(np.percentile(a, 50)),
                   p90_ms=float(np.percentile(a, 90)), p99_ms=float(np.percentile(a, 99)),
                   mean_ms=float(a.mean()))
