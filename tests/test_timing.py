"""Latency measurement: percentiles over repeated runs, bounded in time when asked."""

import time

from crossvit.runtime.timing import measure


def test_measure_reports_ordered_percentiles_and_throughput():
    lat = measure(lambda: time.sleep(0.001), batch=4, warmup=2, runs=20)
    assert lat.runs == 20 and lat.batch == 4
    assert 0.9 <= lat.p50_ms <= lat.p90_ms <= lat.p99_ms
    assert abs(lat.throughput - 4000 / lat.p50_ms) < 1e-9


def test_measure_stops_at_its_time_budget_after_the_minimum_runs():
    start = time.perf_counter()
    lat = measure(lambda: time.sleep(0.05), batch=1, warmup=5, runs=1000, max_seconds=0.3, min_runs=3)
    assert 3 <= lat.runs < 20  # ~6 runs fit the budget; a slower machine makes fewer, never more
    assert time.perf_counter() - start < 6.0  # ~0.6 s quiet (warm-up and the 0.3 s budget): 10x


def test_sync_follows_every_call_warm_up_included():
    """On a GPU, warm-up calls not waited for queued ~1000 matmuls per turn, whose 20 s the first
    timed call's wait then paid (and the run's budget with it): every call is waited for."""
    events = []
    lat = measure(lambda: events.append("call"), batch=1, warmup=3, warmup_seconds=0.0, runs=5,
                  sync=lambda: events.append("sync"))
    assert lat.runs == 5 and events == ["call", "sync"] * 8


def test_interleaved_measurement_pools_every_round_per_backend():
    from crossvit.runtime.timing import measure_interleaved

    order = []
    fns = {"fast": lambda: order.append("fast"), "slow": lambda: (order.append("slow"), time.sleep(0.002))}
    lat = measure_interleaved(fns, batch=2, runs=12, rounds=3)
    assert lat["fast"].runs == lat["slow"].runs == 12
    assert lat["slow"].p50_ms > lat["fast"].p50_ms
    # turns: the backends alternate, not one after the other
    switches = sum(1 for a, b in zip(order, order[1:]) if a != b)
    assert switches >= 5


def test_each_backend_is_read_by_its_own_clock():
    """`clocks` gives one backend another clock (CUDA events for PyTorch on a GPU); the others keep
    the host's. Here the other clock is the thread's CPU time, which a sleep does not advance."""
    from crossvit.runtime.timing import WallClock, measure_interleaved

    class ThreadTime:
        name = "thread-time"

        def sync(self):
            pass

        def time(self, fn):
            t0 = time.thread_time()
            fn()
            return (time.thread_time() - t0) * 1000.0

    def sleep():
        time.sleep(0.005)

    lat = measure_interleaved({"wall": sleep, "cpu": sleep}, batch=1, runs=6, clocks={"cpu": ThreadTime()})
    assert lat["wall"].p50_ms >= 5.0 > 4 * lat["cpu"].p50_ms
    assert WallClock().name == "wall"


def test_interleaved_percentiles_are_over_all_runs_and_progress_is_reported(monkeypatch):
    """One slow call in one turn moves p99, not p90: percentiles are those of every run pooled
    (they were once the worst turn's, which made one turn's outlier everyone's p90)."""
    import numpy as np

    from crossvit.runtime import timing

    monkeypatch.setattr(timing, "_timed", lambda fn, **kw: fn())  # each backend returns one turn's times
    from crossvit.benchmarks import suite

    def one_backend():
        turns = iter([[1.0] * 9 + [50.0], [1.0] * 10, [1.0] * 10])
        return {("a", "fp32"): lambda: next(turns)}

    pooled = [1.0] * 29 + [50.0]
    lat = suite._timed(one_backend(), 1, 30, 10.0)[("a", "fp32")]  # what `crossvit bench` rows are made of
    assert lat.runs == 30 and lat.p90_ms == 1.0
    assert lat.p99_ms == float(np.percentile(pooled, 99)) and lat.spread == 0.0
    seen = []
    timing.measure_interleaved(one_backend(), batch=1, runs=30,
                               progress=lambda done, total, name: seen.append((done, total, name)))
    assert seen == [(0, 3, ("a", "fp32")), (1, 3, ("a", "fp32")), (2, 3, ("a", "fp32")), (3, 3, None)]


def test_min_seconds_counts_the_recorded_call_times_not_the_hosts_clock():
    """Issue 24: under load `bench --min-time 0.6` gave 17 runs of p50 1.55 ms; the loop had kept
    the host's clock, which counts the time between calls too. --min-time promises timed time:
    here each call takes at least 2 ms of the host's clock but its clock records 1 ms, so only
    counting the records gives 100 ms of them (the old loop stopped after 100 ms of host time,
    at most 50 records). No assumption on how fast this machine is."""
    from crossvit.runtime.timing import measure_interleaved

    class OneMillisecond:
        name = "fixed"

        def sync(self):
            pass

        def time(self, fn):
            fn()
            return 1.0

    lat = measure_interleaved({"a": lambda: time.sleep(0.002)}, batch=1, runs=3, rounds=3, min_seconds=0.1,
                              clocks={"a": OneMillisecond()})["a"]
    assert lat.timed_s >= 0.1 and lat.runs >= 100
    assert lat.timed_s == lat.runs * 1.0 / 1000 and lat.to_dict()["timed_s"] == lat.timed_s


def test_later_turns_warm_up_with_one_call_when_a_call_outlasts_the_rewarm_time():
    """A slow call (0.8 s at batch 8 on a 2-core AVX2 EPYC) is better timed than spent warming up:
    after the first turn (5 warm-up calls and 0.5 s) each turn warms a backend up with one call
    when that call alone outlasts `rewarm_seconds`, then times its share of the runs."""
    from crossvit.runtime.timing import measure_interleaved

    calls = {"a": 0, "b": 0}
    per_turn = []

    def fn(name):
        def call():
            calls[name] += 1
            time.sleep(0.03)
        return call

    def progress(done, total, name):
        per_turn.append(dict(calls))

    lat = measure_interleaved({"a": fn("a"), "b": fn("b")}, batch=1, runs=6, rounds=3, rewarm_seconds=0.01,
                              progress=progress)
    assert lat["a"].runs == lat["b"].runs == 6
    # before each backend's turn: [a, b] in turn 0, 1, 2, then the end
    a_calls = [per_turn[i + 2]["a"] - per_turn[i]["a"] for i in (0, 2, 4)]
    assert a_calls[0] >= 5 + 2  # the first turn: at least 5 warm-up calls (and 0.5 s), then 2 timed
    assert a_calls[1:] == [1 + 2, 1 + 2]  # later turns: one warm-up call, then 2 timed
