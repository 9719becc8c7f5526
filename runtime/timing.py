"""Latency measurement shared by `crossvit deploy` and benchmarks/: warm up, repeat, percentiles."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Protocol

import numpy as np

# Per-turn medians of one backend further apart than this (relative to the lowest) make its row
# "noisy": on a shared machine the other tenants, not the backend, set such a figure.
SPREAD_WARNING = 0.25
NOISY = "noisy: turns disagree"


@dataclass(frozen=True)
class Latency:
    """Per-call latency in milliseconds over `runs` timed calls of one batch."""

    batch: int
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    spread: float | None = None  # (max - min) / min of the per-turn medians, when timed in turns
    timed_s: float = 0.0  # the recorded call times summed: what `min_seconds` (--min-time) counts
    turns_ms: tuple[float, ...] | None = None  # the median of each turn, in order, when timed in turns
    turns_at_s: tuple[float, ...] | None = None  # when each turn ran: its midpoint, seconds into the timing

    @property
    def noisy(self) -> bool:
        return self.spread is not None and self.spread > SPREAD_WARNING

    @property
    def throughput(self) -> float:
        """Images per second at the median latency."""
        return self.batch * 1000.0 / self.p50_ms if self.p50_ms > 0 else float("inf")

    def to_dict(self) -> dict:
        return {**asdict(self), "throughput_ips": self.throughput}


class Clock(Protocol):
    """How one call is timed: `time(fn)` calls `fn` once and returns milliseconds; `sync()`
    waits for the device to finish what was queued (after each warm-up call). `name` goes into
    results."""

    name: str

    def time(self, fn: Callable[[], object]) -> float: ...

    def sync(self) -> None: ...


class WallClock:
    """Host time around each call (time.perf_counter), read after `sync` (e.g.
    torch.cuda.synchronize) has waited for the device: what a caller waits, launches included.
    The device is idle when each call starts (the previous one was waited for)."""

    name = "wall"

    def __init__(self, sync: Callable[[], None] | None = None):
        self._sync = sync

    def sync(self) -> None:
        if self._sync is not None:
            self._sync()

    def time(self, fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        self.sync()
        return (time.perf_counter() - t0) * 1000.0


def _latency(batch: int, times_ms: np.ndarray) -> Latency:
    return Latency(batch=batch, runs=len(times_ms), p50_ms=float(np.percentile(times_ms, 50)),
                   p90_ms=float(np.percentile(times_ms, 90)), p99_ms=float(np.percentile(times_ms, 99)),
                   mean_ms=float(times_ms.mean()), timed_s=float(times_ms.sum()) / 1000.0)


def _timed(fn: Callable[[], object], *, runs: int, warmup: int = 5, warmup_seconds: float = 0.5,
           min_seconds: float = 0.0, max_seconds: float | None = None, min_runs: int = 5,
           sync: Callable[[], None] | None = None, clock: Clock | None = None) -> list[float]:
    """Warm up, then the per-call times in milliseconds, each read by `clock` (default: a
    `WallClock` that runs `sync` before each read). `min_seconds` counts the recorded times (the
    timed time a result reports as `timed_s`), not the host's clock: on a busy machine the time
    between calls, and the median times the count, can be far from it. `max_seconds` and the
    warm-up are kept on the host's clock (they bound how long the caller waits)."""
    clock = clock or WallClock(sync)
    if max_seconds is not None:
        warmup_seconds = min(warmup_seconds, max_seconds / 4)
    t0 = time.perf_counter()
    done = 0
    while done < warmup or time.perf_counter() - t0 < warmup_seconds:
        fn()
        clock.sync()  # as the timed calls do: on a GPU, launches queued unwaited for would all be paid later
        done += 1
        if max_seconds is not None and done >= 2 and time.perf_counter() - t0 > max_seconds / 4:
            break  # slow calls: a couple of warm-up runs are enough
    times = []
    timed_ms = 0.0
    start = time.perf_counter()
    while len(times) < runs or timed_ms < min_seconds * 1000.0:
        if max_seconds is not None and len(times) >= min(min_runs, runs) and time.perf_counter() - start > max_seconds:
            break
        times.append(clock.time(fn))
        timed_ms += times[-1]
    return times


def measure(fn: Callable[[], object], *, batch: int, warmup: int = 5, warmup_seconds: float = 0.5,
            runs: int = 50, min_seconds: float = 0.0, max_seconds: float | None = None, min_runs: int = 5,
            sync: Callable[[], None] | None = None) -> Latency:
    """Time `fn()`; `sync` (e.g. torch.cuda.synchronize) runs after every call, warm-up included,
    so each timed call starts on an idle device and ends when it has finished.

    Warms up for `warmup` calls and at least `warmup_seconds` (thread pools, allocator arenas
    and clock frequency settle; a few milliseconds of warm-up made whichever backend ran
    first look up to 2x slower here). Then runs `runs` times (and until the recorded call times
    add up to `min_seconds`), unless `max_seconds` runs out first, after `min_runs` at least; the
    result says how many runs it is made of and their summed time (`timed_s`).
    """
    times = _timed(fn, runs=runs, warmup=warmup, warmup_seconds=warmup_seconds, min_seconds=min_seconds,
                      max_seconds=max_seconds, min_runs=min_runs, sync=sync)
    return _latency(batch, np.asarray(times))


def measure_interleaved(fns: dict, *, batch: int, runs: int = 30, rounds: int = 3,
                        max_seconds: float | None = None, sync: Callable[[], None] | None = None,
                        min_seconds: float = 0.0, clocks: dict | None = None,
                        progress: Callable[[int, int, object], None] | None = None,
                        rewarm_seconds: float = 0.1, rewarm_calls: int = 1) -> dict:
    """Time several backends in turns (A B C, A B C, ...) and pool each one's runs.

    On a shared machine the clock speed and the other tenants drift during a measurement, and
    whichever backend runs right after another (e.g. after torch's OpenMP pool) pays for it;
    turns spread that over all of them. `max_seconds` bounds each backend's total time (host
    clock), `min_seconds` sets its least timed time, the sum of its recorded call times, which
    each result reports as `timed_s` (both split over the rounds). Each
    result's `spread` says how far apart its per-turn medians were (`noisy` past SPREAD_WARNING):
    the drift is made visible, not averaged away, and `turns_ms` holds those medians (and
    `turns_at_s` when each turn ran), so that two backends can be compared turn by turn
    (`benchmarks.latency.ratio`). Percentiles are those of
    all runs pooled.

    `clocks` names the clock of some backends (e.g. CUDA events for PyTorch on a GPU); the
    others get a `WallClock(sync)`. `progress(done, total, name)` is called before each turn
    and once at the end (name None). The first round warms each backend up for 0.5 s and 5 calls,
    later ones for `rewarm_seconds` and `rewarm_calls`: one call is enough to take over the
    machine from the backend before (its pool threads, the caches), and a slow call's time is
    better spent timed (crossvit_15_240 at batch 8 on a 2-core AVX2 EPYC: 0.8 s a call, and
    two warm-up calls a turn took 1.6 s of each backend's 1.7 s budget).
    """
    per_round = max(1, -(-runs // rounds))  # at least `runs` in all
    budget = None if max_seconds is None else max_seconds / rounds
    samples: dict = {name: [] for name in fns}  # keyed as `fns` (names, or (backend, precision))
    medians: dict = {name: [] for name in fns}
    at: dict = {name: [] for name in fns}
    clocks = clocks or {}
    wall = WallClock(sync)
    total = rounds * len(fns)
    t0 = time.perf_counter()
    for r in range(rounds):  # the first round warms up longer
        for i, (name, fn) in enumerate(fns.items()):
            if progress is not None:
                progress(r * len(fns) + i, total, name)
            times = _timed(fn, runs=per_round, warmup=5 if r == 0 else rewarm_calls,
                           warmup_seconds=0.5 if r == 0 else rewarm_seconds,
                           min_seconds=min_seconds / rounds, max_seconds=budget, clock=clocks.get(name, wall))
            end = time.perf_counter()
            samples[name].extend(times)
            medians[name].append(float(np.median(times)))
            at[name].append((end - sum(times) / 2000.0) - t0)  # the middle of its timed calls
    if progress is not None:
        progress(total, total, None)
    out = {}
    for name, t in samples.items():
        low = min(medians[name])
        spread = (max(medians[name]) - low) / low if rounds > 1 and low > 0 else None
        out[name] = replace(_latency(batch, np.asarray(t)), spread=spread, turns_ms=tuple(medians[name]),
                            turns_at_s=tuple(round(v, 3) for v in at[name]))
    return out
