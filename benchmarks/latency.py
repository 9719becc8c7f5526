"""The latency stage of `crossvit deploy`, and the ratios every benchmark prints.

`time_cpu_backends` times PyTorch eager fp32 (the baseline every ratio is against) and each
ONNX artifact in our tuned ONNX Runtime session, in interleaved turns on one random batch;
`time_engines` times TensorRT engines; `ratio` refuses a ratio from turns that disagree. What
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


def ratio(base: Latency, this: Latency) -> tuple[float | None, str]:
    """`base` p50 / `this` p50 (how many times faster than the baseline), or None and why not:
    when the turns of either disagree (`Latency.noisy`), other work on the machine set the
    figure, and a ratio of it (once 452x, eager at 498 ms under load against 1.2 ms quiet) is no
    measurement."""
    noisy = [f"its turns disagree by {this.spread:.0%}"] if this.noisy else []
    if base.noisy and base is not this:
        noisy.append(f"the baseline's turns disagree by {base.spread:.0%}")
    if noisy:
        return None, " and ".join(noisy) + f" (over {SPREAD_WARNING:.0%})"
    return (base.p50_ms / this.p50_ms if this.p50_ms > 0 else None), ""


def noisy_rows_note(count: int, cores: int | None = None) -> str:
    """What a run with `count` noisy rows says once, naming the load it saw (os.getloadavg() now,
    just after timing, beside the one taken before it)."""
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    return (f"{count} row(s) noisy: their turns' medians differ by over {SPREAD_WARNING:.0%}, so no ratio is given "
            f"for them; load average {load} (1 / 5 / 15 min) on {cores or os.cpu_count()} cores after timing: "
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
        return measure_interleaved(fns, batch=batch, runs=runs, max_seconds=max_seconds), failed


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
