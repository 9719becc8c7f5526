"""The latency stage of `crossvit deploy`, and the ratios every benchmark prints.

`time_cpu_backends` times PyTorch eager fp32 (the baseline every ratio is against) and each
ONNX artifact in our tuned ONNX Runtime session, in interleaved turns on one random batch;
`time_engines` times TensorRT engines; `ratio` compares two backends turn by turn and refuses
a ratio from turns that disagree. What
every result carries about the machine is benchmarks/machine.py.
The side-by-side benchmark of every backend, CPU and GPU, is `crossvit bench`
(`benchmarks/suite.py`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from crossvit.errors import CrossViTError
from crossvit.files import first_line
from crossvit.runtime.artifact import read_artifact
from crossvit.runtime.session import OnnxRuntimeSession
from crossvit.runtime.timing import SPREAD_WARNING, Latency, measure, measure_interleaved

BASELINE = "torch eager (cpu)"


# Turn-by-turn ratios further apart than this make a ratio "noisy" (no ratio is given): with four
# turns or more, the interquartile range of the turns' ratios over their median; with fewer, the
# range over the lowest (SPREAD_WARNING).
PAIRED_WARNING = 0.10
# Turns of deploy's timing: enough for the interquartile rule above; the runs are shared out among them.
TURNS = 6
# Deploy's timed runs per backend and batch (10 a turn, within its time cap): a turn's median of 5
# calls moved too much for the rule above on a noisy host (crossvit_15_240 at batch 1, a 2-core
# AVX2 EPYC, three runs each: 4 of 12 rows got a ratio with 30 runs, 10 of 12 with 60;
# benchmarks/results/cpu_epyc_avx2_2core/cpu_choice/turn_calls/).
RUNS = 60


def turn_ratios(base: Latency, this: Latency) -> np.ndarray | None:
    """`base`'s median over `this`'s in each turn (the two timed side by side in the same turns of
    one `measure_interleaved` run), or None where they were not."""
    if not base.turns_ms or not this.turns_ms or len(base.turns_ms) != len(this.turns_ms) or len(base.turns_ms) < 2:
        return None
    b, t = np.asarray(base.turns_ms), np.asarray(this.turns_ms)
    return b / t if (t > 0).all() else None


def ratio(base: Latency, this: Latency) -> tuple[float | None, str]:
    """How many times faster than the baseline `this` is, or None and why not.

    Timed in the same turns (`turns_ms`), the ratio is the median of the two's ratio in each
    turn: this host slows everything that runs for stretches of seconds (other tenants of the
    virtual machine's host; one process alone went from 31 to 52 ms a call and back), and two
    backends timed one after the other in a turn see the same stretch, so a turn's ratio holds
    where the pooled medians mix a slow stretch of one with a fast one of the other. No ratio when
    the turns' ratios themselves disagree (`PAIRED_WARNING`). Without turns, the pooled medians'
    ratio, none when the turns of either disagree (`Latency.noisy`): other work on the machine set
    the figure, and a ratio of it (once 452x, eager at 498 ms under load against 1.2 ms quiet) is
    no measurement."""
    if base is this:
        return 1.0, ""
    q = turn_ratios(base, this)
    if q is not None:
        middle = float(np.median(q))
        if len(q) >= 4:
            lo, hi = np.percentile(q, [25, 75])
            moved, limit, how = (hi - lo) / middle, PAIRED_WARNING, "interquartile range"
        else:
            moved, limit, how = (q.max() - q.min()) / q.min(), SPREAD_WARNING, "range"
        if moved > limit:
            return None, (f"its ratio to the baseline moved from turn to turn ({q.min():.2f}-{q.max():.2f}x; "
                          f"{how} {moved:.0%} of it, over {limit:.0%})")
        return middle, ""
    noisy = [f"its turns disagree by {this.spread:.0%}"] if this.noisy else []
    if base.noisy:
        noisy.append(f"the baseline's turns disagree by {base.spread:.0%}")
    if noisy:
        return None, " and ".join(noisy) + f" (over {SPREAD_WARNING:.0%})"
    return (base.p50_ms / this.p50_ms if this.p50_ms > 0 else None), ""


def noisy_rows_note(count: int, cores: int | None = None, unrated: int | None = None) -> str:
    """What a run with `count` noisy rows, `unrated` of them without a ratio (default: all), says
    once, naming the load it saw (os.getloadavg() now, just after timing, beside the one taken
    before it)."""
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    unrated = count if unrated is None else unrated
    if unrated >= count:
        rated = "so no ratio is given for them"
    else:
        rated = ("their ratios are the median of their turn-by-turn ratios to the baseline, which agree"
                 + (f" ({unrated} row(s) got no ratio: theirs did not)" if unrated else ""))
    return (f"{count} row(s) noisy: their turns' medians differ by over {SPREAD_WARNING:.0%}, {rated}; "
            f"load average {load} (1 / 5 / 15 min) on {cores or os.cpu_count()} cores after timing: "
            "other work moved them (this run's own threads count in it; other tenants of a virtual "
            "machine's host do not: on a 2-core CI VM they slowed one process 1.7x for 30 s at a time); time again "
            "on a quiet machine")


def time_cpu_backends(model: torch.nn.Module, artifacts: dict[str, Path | tuple[Path, str, dict]], *, batch: int,
                      runs: int = 30, max_seconds: float | None = None,
                      extra: dict[str, Callable[[np.ndarray], object]] | None = None
                      ) -> tuple[dict[str, Latency], dict[str, str]]:
    """PyTorch eager fp32 (key BASELINE) and each artifact on the CPU, timed in interleaved turns
    on one random batch (`measure_interleaved`).

    An artifact is a path (run in our tuned ONNX Runtime session) or (path, backend, session
    options), e.g. (fp32, "openvino", {"hint": "bf16"}). Returns (latencies by key, reasons by
    key for artifacts that could not be opened or run). `extra` adds more backends as functions
    of the input batch.
    """
    from crossvit.runtime.session import open_session

    x = np.random.default_rng(0).standard_normal((batch, *model.input_shape), dtype=np.float32)
    xt = torch.from_numpy(x)
    model = model.eval()
    fns: dict[str, Callable[[], object]] = {BASELINE: lambda: model(xt)}
    for key, fn in (extra or {}).items():
        fns[key] = (lambda f: lambda: f(x))(fn)
    failed: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        for key, spec in artifacts.items():
            path, backend, options = (spec, "onnxruntime", {}) if isinstance(spec, Path) else spec
            try:
                if backend == "onnxruntime":
                    session = OnnxRuntimeSession(read_artifact(path), device="cpu", **options)
                else:
                    session = open_session(path, backend=backend, device="cpu", **options)
                stack.enter_context(session)
                session.infer(x)  # a graph a backend loads but cannot run (bf16 in ORT on a CPU) fails here
            except CrossViTError as e:
                failed[key] = str(e)
                continue
            except Exception as e:
                failed[key] = f"{backend} (CPU) cannot run it: {first_line(e)}"
                continue
            fns[key] = (lambda s: lambda: s.infer(x))(session)
        return measure_interleaved(fns, batch=batch, runs=runs, rounds=TURNS, max_seconds=max_seconds), failed


def time_engines(plans: list[Path], *, batch: int, runs: int = 30, max_seconds: float | None = None
                 ) -> dict[Path, Latency]:
    """Each TensorRT engine through its session (which synchronizes the stream every call)."""
    from crossvit.runtime.session import open_session

    out = {}
    for plan in plans:
        with open_session(plan, backend="tensorrt") as s:
            c, h, w = s.info.input_shape
            x = np.random.default_rng(0).standard_normal((batch, c, h, w), dtype=np.float32)
            out[plan] = measure(lambda: s.infer(x), batch=batch, runs=runs, max_seconds=max_seconds)
    return out
