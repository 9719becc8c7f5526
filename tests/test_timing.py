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
    assert 3 <= lat.runs < 20
    assert time.perf_counter() - start < 2.0


def test_sync_runs_before_each_clock_read():
    calls = []
    measure(lambda: None, batch=1, warmup=1, runs=5, sync=lambda: calls.append(1))
    assert len(calls) == 6  # after warm-up, then after each timed run


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
