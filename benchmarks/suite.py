"""`crossvit bench`: every backend side by side, against this machine's own limits.

For each batch size, all backends run in one process on the same input, timed in interleaved
turns (`measure_interleaved`: A B C, A B C, ...). Each row reports p50/p90/p99, images/s,
achieved model GFLOP/s, the ratio to PyTorch eager fp32 of the same run (taken turn by turn,
`latency.ratio`), and the fraction of the best GEMM rate measured for its precision on this
machine in the same process. When the per-turn medians of a backend disagree by more than
`SPREAD_WARNING`, the row says so: on a shared machine that is noise, not a result.

Backends on a CPU (`--device cpu`): PyTorch eager fp32 (the baseline), PyTorch bf16 autocast
(on CPUs with bf16 instructions), `torch.compile` (opt-in: compiling takes minutes; fp32, and the
bf16 model with inductor's freezing on CPUs with bf16), ONNX Runtime for each `.onnx` given or
built, and OpenVINO (where installed) for each fp32 `.onnx` (fp32 and its bf16 hint) and int8-ov
one (as it is, and with its bf16 hint where the CPU has bf16). On a GPU (`--device cuda`): PyTorch
eager fp32 with TF32 off (the baseline), fp16 and bf16 autocast, the fp16 model replayed as a CUDA graph,
`torch.compile` of the fp16 model (opt-in), TensorRT for each `.plan`, ONNX Runtime for each
`.onnx` where onnxruntime-gpu is installed. With `--served`, the first `.onnx` also through
`crossvit serve` (its own process, loopback) and the real tritonclient, over HTTP (binary
tensors) and gRPC: the cost of the protocol on top of the session. PyTorch rows take their input
already on the device; sessions and clients take host arrays (their copies are in their times). On a GPU,
PyTorch rows are timed by CUDA events around each call and synchronized after it (`CudaEvents`); the
sessions' and clients' rows, which return host arrays, by the host's clock after a synchronize. Each row
names its `timer`. Model FLOPs are counted once with
`torch.utils.flop_counter` plus the attention matmuls it misses (benchmarks/flops.py). Each
PyTorch row other than the baseline also reports its agreement with the baseline's logits
(`export.parity.compare`), the ONNX/TensorRT rows their parity gate.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from crossvit.benchmarks.cuda_timer import CudaEvents
from crossvit.benchmarks.latency import BASELINE, noisy_rows_note, ratio
from crossvit.benchmarks.limits import gemm_rates, has_bf16, model_gflops, peak_for
from crossvit.benchmarks.machine import busy_machine, command_line, machine_description
from crossvit.benchmarks.report import Result, Row, _pyplot, _shape, plot_format, write_csv, write_plot
from crossvit.runtime.timing import NOISY, SPREAD_WARNING, Latency, measure_interleaved

TORCH_ROWS = frozenset({"autocast", "cuda-graph"})  # PyTorch's optional rows, on by default
DEVICES = ("cpu", "cuda")


def baseline(device: str) -> tuple[str, str]:
    """The row every ratio of a run on `device` is against: PyTorch eager fp32 there."""
    return (BASELINE, "fp32") if device == "cpu" else (f"torch eager ({device})", "fp32")


# -- the machine's limits ----------------------------------------------------------------------


# -- the backends ------------------------------------------------------------------------------

def torch_backends(model: torch.nn.Module, x: torch.Tensor, *, compile: bool, device: str = "cpu",
                   say: Callable[[str], None] = lambda m: None, cache: dict | None = None,
                   rows: frozenset = TORCH_ROWS) -> dict[tuple[str, str], Callable]:
    """PyTorch's ways to run `model` on `x` (both already on `device`), keyed (backend, precision).

    `cache` (one dict per run) keeps the fp16 copy and the compiled model across batch sizes, so
    torch.compile behaves as it does for a user calling one compiled model with several batch
    sizes: a graph for the first size, then one dynamic-batch graph (PyTorch's automatic dynamic
    shapes) that later sizes reuse. The compiled row's first call is made here, timed (its note
    says how long compiling took) and guarded: a compiler failure costs that row, not the run.
    `rows` picks the optional rows ("autocast", "cuda-graph"); eager fp32 is always there."""
    cache = {} if cache is None else cache
    model = model.eval()
    fns = {baseline(device): lambda: model(x)}
    if device == "cpu":
        if has_bf16() and "autocast" in rows:
            def bf16():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return model(x)
            fns[("torch autocast (cpu)", "bf16")] = bf16
        if compile:
            _add_compiled(fns, ("torch.compile (cpu)", "fp32"), model, x, cache, say)
            if has_bf16():  # the peer issue 22 measured: the bf16 model, weights frozen into the graph
                if "bf16_model" not in cache:
                    cache["bf16_model"] = copy.deepcopy(model).to(torch.bfloat16).eval()
                _add_compiled(fns, ("torch.compile bf16 freezing (cpu)", "bf16"), cache["bf16_model"],
                              x.to(torch.bfloat16), cache, say, slot="compiled_bf16", freezing=True)
        return fns
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)) if "autocast" in rows else ():
        def autocast(dtype=dtype):
            with torch.autocast("cuda", dtype=dtype):
                return model(x)
        fns[(f"torch autocast ({device})", name)] = autocast
    if "half" not in cache:
        cache["half"] = copy.deepcopy(model).half()
    half, xh = cache["half"], x.half()
    try:
        if "cuda-graph" in rows:
            fns[(f"torch CUDA graph ({device})", "fp16")] = _cuda_graph(half, xh)
    except RuntimeError as e:  # a forward pass that syncs with the host cannot be captured
        _dropped(cache, say, f"no CUDA graph row: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    if compile:
        _add_compiled(fns, (f"torch.compile ({device})", "fp16"), half, xh, cache, say)
    return fns


def _dropped(cache: dict, say: Callable[[str], None], text: str) -> None:
    """A row the run could not make: said now, and kept in `cache["notes"]` for the result's notes."""
    cache.setdefault("notes", []).append(text)
    say(text)


def _add_compiled(fns: dict, key: tuple[str, str], model: torch.nn.Module, x: torch.Tensor, cache: dict,
                  say: Callable[[str], None], slot: str = "compiled", freezing: bool = False) -> None:
    """`torch.compile(model)` (made once per run, in `cache[slot]`) as the row `key`, after a first
    call on `x` that compiles for this shape if it must: timed, synchronized, and caught.
    `freezing`: inductor's freezing (weights folded into the graph as constants; inference only),
    on for this row's compiles and calls only."""
    from torch._inductor import config as inductor_config

    if cache.get(f"{slot}_failed"):
        return
    if slot not in cache:
        cache[slot] = torch.compile(model)
    compiled = cache[slot]
    patch = (lambda: inductor_config.patch(freezing=True)) if freezing else contextlib.nullcontext
    say(f"{key[0]}: first call at batch {x.shape[0]} (a new shape compiles, which can take minutes)")
    t0 = time.perf_counter()
    try:
        with patch():
            compiled(x)
        if x.is_cuda:
            torch.cuda.synchronize()
    except Exception as e:  # inductor/triton/C compiler trouble: the other rows still run
        cache[f"{slot}_failed"] = True
        line = str(e).strip().splitlines()
        _dropped(cache, say, f"no {key[0]} rows: {type(e).__name__}: {line[0] if line else ''}")
        return
    first = time.perf_counter() - t0
    cache.setdefault("compile_s", []).append(first)

    def fn() -> torch.Tensor:
        with patch():
            return compiled(x)
    if first > 1.0:
        fn.note = f"first call {first:.0f} s (compiling)"
    fns[key] = fn


def _cuda_graph(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Capture one forward pass on a static input; calling the result replays it."""
    static = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up outside capture (cuBLAS handles, workspace)
            model(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model(static)

    def replay(keep=(model, static)) -> torch.Tensor:  # the graph reads their memory: keep them alive
        graph.replay()
        return out
    return replay


def _agreement(fns: dict, key: tuple[str, str], batch: int) -> dict:
    """Each PyTorch row's logits against the baseline's, through the parity code's measures, keyed
    "backend precision bBATCH" (every batch size: a CUDA graph or a dynamic-batch compiled graph
    is a different program at each size)."""
    from crossvit.export.parity import compare

    with torch.inference_mode():
        ref = fns[key]().float().cpu().numpy()
        out = {}
        for k, fn in fns.items():
            if k != key:
                m = compare(ref, fn().float().cpu().numpy())
                out[f"{k[0]} {k[1]} b{batch}"] = {"rel_l2": m["rel_l2"], "cosine": m["cosine"],
                                         "top1_agreement": m["top1_agreement"]}
    return out


def _served(stack: contextlib.ExitStack, onnx: Path, max_batch: int, say: Callable[[str], None]) -> dict:
    """`crossvit serve ONNX` in its own process on loopback ports, and the real tritonclient
    HTTP (binary) and gRPC clients: {(backend, precision): fn(x)} for the suite's rows, or {} with
    the reason said when the serving extras are missing."""
    from crossvit.benchmarks.serve_load import _client, _infer, _serve
    from crossvit.runtime.artifact import read_artifact

    try:
        import tritonclient.grpc  # noqa: F401
        import tritonclient.http  # noqa: F401
    except (ImportError, RuntimeError):  # tritonclient without its http part raises RuntimeError
        from crossvit.install import pip_install

        say(f"no served rows: they need the server and its client ({pip_install('serve')})")
        return {}
    try:
        http, grpc = stack.enter_context(_serve(onnx, "--max-batch", str(max_batch), "--max-delay-ms", "0",
                                                "--model-name", "bench", "--exact"))
    except RuntimeError as e:  # the server's own one-line reason, e.g. a batch range it cannot serve
        from crossvit.errors import BackendUnavailable

        lines = [line for line in str(e).splitlines() if "error" in line] or str(e).splitlines() or [""]
        raise BackendUnavailable(f"--served: {lines[-1].strip()}") from None
    precision = read_artifact(onnx).precision
    fns = {}
    for kind, address in (("HTTP", http), ("gRPC", grpc)):
        mod, client = _client(kind.lower(), address)
        stack.callback(client.close)
        fns[(f"served {kind} ({onnx.stem})", precision)] = (
            lambda mod, client, kind: lambda x: _served_call(_infer, mod, client, kind, x))(mod, client, kind)
    return fns


def _served_call(infer, mod, client, kind: str, x: np.ndarray):
    """One timed request (`serve_load._infer`, nothing imported here: this is the timed call); a server
    that failed it or stopped answering (killed, crashed) is one line, not a client's traceback."""
    try:
        return infer(mod, client, "bench", x)
    except Exception as e:
        from crossvit.errors import CrossViTError
        from crossvit.files import first_line

        raise CrossViTError(f"--served: a request over {kind} failed while timing; did the server stop? "
                            f"({type(e).__name__}: {first_line(e) or 'no detail'})") from None


def run(model: torch.nn.Module, name: str, artifacts: list[Path], *, batch_sizes: list[int], runs: int,
        max_seconds: float, compile: bool = False, device: str = "cpu", served: Path | None = None,
        progress: Callable[[str], None] | None = None, on_batch: Callable[[Result], None] | None = None,
        deadline: float | None = None, torch_rows: frozenset = TORCH_ROWS, min_seconds: float = 0.0,
        openvino: bool = True) -> Result:
    """Every backend at every batch size (see the module docstring); `served`: also that ONNX file
    through `crossvit serve` and the real tritonclient, over HTTP and gRPC. `on_batch(result)` is
    called after each batch size (to save what is done so far). With `deadline` (a
    `time.monotonic()` value), a batch size that would not fit in the time left, judged by the
    previous one, is skipped, and the torch.compile rows are dropped first; both are said and
    recorded in `result.notes`. `torch_rows`: PyTorch's optional rows (`torch_backends`);
    `min_seconds`: timed seconds per backend and batch at least (over the three turns)."""
    say = progress or (lambda m: None)
    cuda = device != "cpu"
    if cuda:  # the fp32 baseline is fp32: no TF32 (a run's setting, recorded with the machine)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    result = Result(model=name, gflops_per_image=model_gflops(model), machine=machine_description(),
                    command=command_line())
    result.machine["bench_device"] = device
    if cuda:
        result.machine["tf32"] = False
    busy = busy_machine(result.machine)
    if busy:
        _note(result, say, busy)
    say(f"measuring GEMM rates on {device} (the machine's own limits)")
    result.gemm = gemm_rates(device=device)
    on_device = copy.deepcopy(model).to(device).eval() if cuda else model.eval()
    cache: dict = {"compile_s": []}  # the fp16 copy and the compiled model, kept across batch sizes
    last = None  # seconds the previous batch size took, without compiling
    with contextlib.ExitStack() as stack:
        served_fns = (_served(stack, served, max(batch_sizes), lambda m: _note(result, say, m))
                      if served is not None else {})
        for i, b in enumerate(batch_sizes, 1):
            if deadline is not None and last is not None:
                go, keep_compile, why = fits(deadline - time.monotonic(), last, cache["compile_s"], compile,
                                             batch_sizes[i - 1:])
                if why:
                    _note(result, say, why)
                if not go:
                    break
                compile = keep_compile
            t0, compiling = time.monotonic(), sum(cache["compile_s"])
            _one_batch(result, f"[{i}/{len(batch_sizes)}]", b, model, on_device, artifacts, served_fns, runs=runs,
                       max_seconds=max_seconds, compile=compile, device=device, say=say, cache=cache,
                       torch_rows=torch_rows, min_seconds=min_seconds, openvino=openvino)
            last = time.monotonic() - t0 - (sum(cache["compile_s"]) - compiling)
            if on_batch is not None:
                on_batch(result)
    noisy = [r for r in result.rows if r.spread > SPREAD_WARNING]
    if noisy:
        _note(result, say, noisy_rows_note(len(noisy), result.machine.get("cores"),
                                           unrated=sum(r.vs_eager is None for r in noisy)))
    return result


def fits(left: float, last: float, compile_s: list[float], compile: bool, batches: list[int]
         ) -> tuple[bool, bool, str]:
    """Whether the next batch size (`batches[0]`) fits in `left` seconds, judged by the `last` one
    (without its compiling) with a 20 % margin, and whether its torch.compile row does too:
    (go, compile, why not). `compile_s` holds the first call's time at each batch size so far.
    PyTorch compiles the first shape as is and the second with a dynamic batch size, which later
    shapes reuse (batch 1 excepted: it always gets a graph of its own): until two have compiled,
    allow twice the longest compile; then a quarter of the last one (a reuse is a few seconds),
    and once a reuse was timed, what it took."""
    if left < 1.2 * last:
        return False, False, (f"batch sizes {', '.join(map(str, batches))} skipped: {max(left, 0):.0f} s left, "
                              f"the previous one took {last:.0f} s")
    if compile and compile_s:
        expect = (2 * max(compile_s) if len(compile_s) < 2 or batches[0] == 1 else  # 1 is always its own graph
                  compile_s[-1] / 4 if len(compile_s) == 2 else compile_s[-1])
        if left < 1.2 * last + expect:
            return True, False, (f"torch.compile rows dropped from batch {batches[0]}: {left:.0f} s left, "
                                 f"its first call would take about {expect:.1f} s more")
    return True, compile, ""


def _note(result: Result, say: Callable[[str], None], text: str) -> None:
    result.notes.append(text)
    say(text)


def _one_batch(result: Result, step: str, b: int, model: torch.nn.Module, on_device: torch.nn.Module,
               artifacts: list[Path], served_fns: dict, *, runs: int, max_seconds: float, compile: bool, device: str,
               say: Callable[[str], None], cache: dict | None = None, torch_rows: frozenset = TORCH_ROWS,
               min_seconds: float = 0.0, openvino: bool = True) -> None:
    """Every backend on one random batch of `b`, in interleaved turns; appends the rows."""
    from crossvit.runtime.artifact import read_artifact
    from crossvit.runtime.session import open_session

    cuda = device != "cpu"
    cache = {} if cache is None else cache
    base_key = baseline(device)
    say(f"{step} batch {b}: PyTorch, {len(artifacts)} artifact(s), {len(served_fns)} served, in interleaved turns")
    x = np.random.default_rng(b).standard_normal((b, *model.input_shape), dtype=np.float32)
    xt = torch.from_numpy(x).to(device)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        fns = torch_backends(on_device, xt, compile=compile, device=device, say=say, cache=cache, rows=torch_rows)
        torch_keys = list(fns)
        result.notes.extend(f"batch {b}: {n}" for n in cache.pop("notes", []))
        result.accuracy.update(_agreement(fns, base_key, b))  # each PyTorch row against the baseline
        for path, kind, options in session_rows(artifacts, device, openvino):
            info = read_artifact(path)
            try:
                s = stack.enter_context(open_session(path, backend=kind, device=device if kind == "onnxruntime"
                                                     else "auto", **options))
                if kind == "onnxruntime" and s.device != device:
                    raise RuntimeError(f"ONNX Runtime runs it on {s.device}, not {device} (providers "
                                       f"{s.providers}); on a GPU it needs onnxruntime-gpu")
                s.infer(x)
            except Exception as e:  # e.g. bf16 on ORT's CPU provider: no kernels
                _note(result, say, f"batch {b}: skipped {path.name}{' in ' + kind if kind != 'onnxruntime' else ''}"
                                   f"{' (' + options['hint'] + ' hint)' if options else ''}: "
                                   f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")
                continue
            fn = (lambda s: lambda: s.infer(x))(s)
            if not info.batch_min <= b <= info.batch_max:  # the session splits or pads: say so on the row
                fn.note = (f"file's batch range {info.batch_min}..{info.batch_max}: "
                           + (f"runs as {-(-b // info.batch_max)} calls" if b > info.batch_max
                              else f"padded to {info.batch_min}"))
            elif not s.batch_invariant and b > 1:
                fn.note = "one row at a time (dynamic int8: a row's answer would depend on its batch-mates)"
            precision = getattr(s, "precision", info.precision)
            hint = options.get("hint")  # int8-ov's bf16 hint: a row of its own beside the file as it is
            fns[(f"{s.backend} ({path.stem}{', ' + hint + ' hint' if hint and hint != precision else ''})",
                 precision)] = fn
        for key, fn in served_fns.items():
            fns[key] = (lambda fn: lambda: fn(x))(fn)
        # PyTorch's rows on a GPU are timed by CUDA events; the others by the host's clock (see CudaEvents)
        clocks = {key: CudaEvents() for key in torch_keys} if cuda else {}
        lat = _timed(fns, b, runs, max_seconds, sync=torch.cuda.synchronize if cuda else None,
                     min_seconds=min_seconds, clocks=clocks)
    add_rows(result, lat, b, base_key, notes={k: getattr(fn, "note", "") for k, fn in fns.items()},
             timers={k: c.name for k, c in clocks.items()}, min_seconds=min_seconds)
    if cuda:
        torch.cuda.empty_cache()


def add_rows(result: Result, lat: dict[tuple[str, str], Latency], b: int, base_key: tuple[str, str], *,
             notes: dict | None = None, timers: dict | None = None, min_seconds: float = 0.0) -> None:
    """One row per timed backend of batch `b` (`lat`, keyed (backend, precision)). The ratio to
    the baseline is the median of the two's ratio in each turn, given only where those agree
    (`latency.ratio`); a noisy row says so, and a row without a ratio says why in its note and in
    `no_ratio`. A row whose --min-time was cut
    short by --max-seconds says so too."""
    base = lat[base_key]
    for key, l in lat.items():
        gflops = result.gflops_per_image * b / (l.p50_ms / 1000)
        peak = peak_for(key[1], result.gemm)
        vs, why = ratio(base, l)
        short = (f"timed {l.timed_s:.2f} s of --min-time {min_seconds:g} s (--max-seconds stopped it)"
                 if l.timed_s < min_seconds else "")
        said = (f"{NOISY} ({l.spread:.0%}), " + ("no ratio" if why else "ratio turn by turn") if l.noisy else
                f"no ratio: {why}" if why else "")
        note = "; ".join(n for n in (said, short, (notes or {}).get(key, "")) if n)
        result.rows.append(Row(backend=key[0], precision=key[1], batch=b, p50_ms=l.p50_ms, p90_ms=l.p90_ms,
                               p99_ms=l.p99_ms, images_per_s=l.throughput, gflops=gflops,
                               vs_eager=vs, of_peak=gflops / peak if peak else None,
                               spread=l.spread or 0.0, runs=l.runs, timed_s=l.timed_s, no_ratio=why,
                               timer=(timers or {}).get(key, "wall"), note=note, turns_ms=list(l.turns_ms or ())))


def _same_file(a, b) -> bool:
    a, b = Path(a), Path(b)
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _openvino_only(info) -> bool:
    """An ONNX file only OpenVINO runs (int8-ov), from its `read_artifact` description."""
    from crossvit.contract import PRECISION_TABLE

    spec = PRECISION_TABLE.get(info.precision)
    return info.kind == "onnx" and spec is not None and spec.runtime == "openvino"


def _openvino_missing(device: str, chosen: set | None) -> str:
    """Why OpenVINO rows are not timed in this run, or "" where they are."""
    from crossvit.errors import BackendUnavailable
    from crossvit.runtime.openvino import core

    if chosen is not None and "openvino" not in chosen:
        return f"--backends {','.join(sorted(chosen))} leaves out openvino"
    if device != "cpu":
        return f"OpenVINO runs on the CPU, not {device}"
    try:
        core()
    except BackendUnavailable as e:
        return str(e)
    return ""


def session_rows(artifacts: list[Path], device: str, openvino: bool = True) -> list[tuple[Path, str, dict]]:
    """(file, backend, session options) for each row the artifacts give: a .plan in TensorRT, an
    .onnx in the backend its precision is made for (int8-ov: OpenVINO; the rest ONNX Runtime) and,
    on a CPU with OpenVINO installed (`openvino`), each fp32 .onnx also in OpenVINO, fp32 and
    with its bf16 hint (on CPUs with bf16 arithmetic), and there each int8-ov .onnx also with its
    float layers in bf16 (the bf16 hint: OpenVINO's own default on such a CPU)."""
    from crossvit.contract import PRECISION_TABLE
    from crossvit.runtime.artifact import read_artifact
    from crossvit.runtime.cpu_choice import cpu_flags
    from crossvit.runtime.openvino import openvino_version

    openvino = openvino and device == "cpu" and openvino_version() is not None
    rows = []
    for path in artifacts:
        info = read_artifact(path)
        if info.kind != "onnx":
            rows.append((path, "tensorrt", {}))
            continue
        spec = PRECISION_TABLE.get(info.precision)
        runtime = spec.runtime if spec else "onnxruntime"
        if runtime == "openvino" and not openvino:
            continue
        rows.append((path, runtime, {}))
        bf16 = openvino and bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
        if info.precision == "fp32" and openvino:
            rows.append((path, "openvino", {"hint": "fp32"}))
            if bf16:
                rows.append((path, "openvino", {"hint": "bf16"}))
        elif info.precision == "int8-ov" and bf16:  # OpenVINO's own default on such a CPU
            rows.append((path, "openvino", {"hint": "bf16"}))
    return rows


def _timed(fns: dict, batch: int, runs: int, max_seconds: float, sync: Callable[[], None] | None = None,
           min_seconds: float = 0.0, clocks: dict | None = None) -> dict:
    """Three turns of every backend (A B C, A B C, A B C) with a progress bar on a terminal
    (`measure_interleaved`: each result's percentiles over all its runs, and its spread). Each
    turn warms its backend up for 0.5 s (the one before it may have left caches, thread pools and
    clocks elsewhere) and has at least 3 runs, so that its median is not one call."""
    return measure_interleaved(
        fns, batch=batch, runs=3 * max(-(-runs // 3), 3), rounds=3, max_seconds=max_seconds,
        min_seconds=min_seconds, sync=sync, clocks=clocks, rewarm_seconds=0.5,
        progress=lambda done, total, key: _bar(
            done, total, f"batch {batch}, turn {done // max(len(fns), 1) + 1}/3: {key[0]}" if key else ""))


def _bar(done: int, total: int, label: str, width: int = 24) -> None:
    """A one-line progress bar on stderr, redrawn in place; only on a terminal (logs get the
    "[i/n] batch" lines), and wiped when `done == total`."""
    err = sys.stderr
    if not (hasattr(err, "isatty") and err.isatty()):
        return
    if done >= total:
        err.write("\r\033[K")
    else:
        fill = width * done // max(total, 1)
        err.write(f"\r\033[K  [{'#' * fill}{'.' * (width - fill)}] {done}/{total} {label[:60]}")
    err.flush()


# -- output ------------------------------------------------------------------------------------


# -- the command -------------------------------------------------------------------------------

def autocast_accuracy(loaded, device: str, say: Callable[[str], None]) -> dict:
    """Each PyTorch autocast precision of the run (bf16 on a CPU with bf16 instructions; fp16 and
    bf16 on a GPU) on the shipped held-out images against eager fp32, through the parity gate's
    real-image case: top-1 agreement, relative L2, cosine and, the images being labelled, top-1
    accuracy of both. (The compiled and CUDA-graph rows run the fp32/fp16 model itself, checked
    at every batch size against eager on the timed batch.)"""
    from crossvit.export.parity import real_image_case
    from crossvit.runtime.preprocess import Preprocessor

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16} if device != "cpu" else (
        {"bf16": torch.bfloat16} if has_bf16() else {})
    if not dtypes:
        return {}
    model = copy.deepcopy(loaded.model).to(device).eval() if device != "cpu" else loaded.model.eval()
    preprocessor = Preprocessor.from_dict(loaded.info.preprocessing)
    out = {}
    for name, dtype in dtypes.items():
        def run(x: np.ndarray, dtype=dtype) -> np.ndarray:
            with torch.inference_mode(), torch.autocast(device, dtype=dtype):
                return model(torch.from_numpy(x).to(device)).float().cpu().numpy()
        say(f"accuracy of torch autocast ({device}) {name} on the held-out images")
        case, _ = real_image_case(loaded.model.eval(), run, preprocessor, loaded.info.labels, batch=32)
        out[f"torch autocast ({device}) {name} images"] = {
            "top1_agreement_images": case.top1_agreement, "rel_l2_images": case.rel_l2,
            "cosine_images": case.cosine, "accuracy": case.accuracy_artifact,
            "accuracy_reference": case.accuracy_reference}
    return out


def resolve_device(device: str) -> str:
    """"auto" is the GPU where PyTorch sees one; asking for "cuda" without one is a clear error."""
    from crossvit.errors import BackendUnavailable

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("--device cuda: PyTorch sees no CUDA device (a CPU build of torch, or no GPU)")
    return device


def _builds_onnx(device: str, say: Callable[[str], None]) -> bool:
    """Without artifacts, ONNX variants are built where ONNX Runtime can run them on `device`."""
    import onnxruntime as ort

    if device == "cpu" or "CUDAExecutionProvider" in ort.get_available_providers():
        return True
    say("no ONNX rows: this onnxruntime has no CUDA provider (pip install onnxruntime-gpu), and the GPU rows "
        "would time the CPU; give .plan files for TensorRT rows")
    return False


def _variant(fp32: Path, out: Path, precision: str, calibration: Path | None, say: Callable[[str], None],
             drop: Callable[[str], None]) -> Path | None:
    """The variant for the bench, or None (said) where it needs what this install or run lacks
    (NNCF for int8-ov; calibration images for a model other than the embedded one)."""
    from crossvit.contract import get_precision
    from crossvit.errors import BackendUnavailable, ExportError
    from crossvit.export.calibration import calibration_batch
    from crossvit.export.precision import convert_precision
    from crossvit.runtime.artifact import read_artifact

    try:
        images = calibration_batch(read_artifact(fp32).raw, calibration,
                                   need=get_precision(precision).calibration == "required")
        return convert_precision(fp32, out, precision, images, progress=say)
    except (BackendUnavailable, ExportError) as e:
        if get_precision(precision).target != "cpu" or precision == "int8-cpu":
            raise
        drop(f"no {precision} row: {e}")
        return None


def _runs_on(precision: str, device: str) -> bool:
    from crossvit.contract import get_precision

    return device == "cpu" or get_precision(precision).target != "cpu"  # int8-cpu is no GPU graph


def main(args, say: Callable[[str], None]) -> int:
    """`crossvit bench`: see the module docstring."""
    from crossvit.arguments import printable
    from crossvit.contract import to_json
    from crossvit.errors import ConfigError, UsageError
    from crossvit.export.onnx import BatchRange, export_onnx
    from crossvit.export.parity import check_parity
    from crossvit.files import atomic_write, check_output_path, temporary_folder
    from crossvit.model import DEFAULT_MODEL, load_model
    from crossvit.runtime.artifact import read_artifact

    device = resolve_device(args.device)
    if args.plot is not None:
        _pyplot()  # a missing matplotlib or an unknown image format is said now, not after the run
        plot_format(args.plot)
    outputs = {}
    for flag, out in (("--json", args.json), ("--csv", args.csv), ("--plot", args.plot)):
        if out is not None:
            check_output_path(out, inputs=(*args.artifacts, args.checkpoint))
            same = next((f for f, o in outputs.items() if _same_file(o, out)), None)
            if same:
                raise UsageError(f"{same} and {flag} name the same file ({printable(str(out))}): give each its own")
            outputs[flag] = out
    artifacts = [Path(a) for a in args.artifacts]
    stems = {}
    for a in artifacts:  # a row is named by its file's stem
        if a.stem in stems and not _same_file(stems[a.stem], a):
            raise ConfigError(f"{printable(str(stems[a.stem]))} and {printable(str(a))} have the same name: their "
                              f"rows would be one; copy one to another name")
        stems.setdefault(a.stem, a)
    described: dict[Path, object] = {}

    def info_of(a: Path):  # read_artifact parses the whole ONNX (0.2-0.5 s for crossvit_15_240): once a file
        if a not in described:
            described[a] = read_artifact(a)
        return described[a]

    infos = [info_of(a) for a in artifacts]
    if args.checkpoint is None and infos and not args.model and not infos[0].model.get("name"):
        raise ConfigError(f"{artifacts[0].name} names no registered model: give --model NAME or --checkpoint "
                          "for the PyTorch baseline")
    if args.checkpoint is not None:  # the checkpoint names its model (a foreign one needs --model)
        loaded = load_model(args.checkpoint, name=args.model)
        name = args.model or loaded.info.name or Path(args.checkpoint).name.split(".")[0]
    else:
        name = args.model or (infos[0].model.get("name") if infos else None) or DEFAULT_MODEL
        loaded = load_model(None, name=name)
    for path, info in zip(artifacts, infos):  # a baseline of another shape would time something else
        if tuple(info.input_shape) != tuple(loaded.model.input_shape):
            raise ConfigError(f"{path.name} takes {_shape(info.input_shape)} inputs, the PyTorch baseline {name} "
                              f"takes {_shape(loaded.model.input_shape)}: give the --model or --checkpoint it "
                              "was exported from")
    batch_sizes = args.batch_sizes
    chosen = set(args.backends) if args.backends else None  # None: every row that applies
    compile = args.compile or (chosen is not None and "compile" in chosen)
    want_served = args.served or (chosen is not None and "served" in chosen)
    torch_rows = TORCH_ROWS if chosen is None else frozenset(chosen & TORCH_ROWS)
    kinds = {"onnx": ("onnxruntime", "openvino"), "engine": ("tensorrt",)}
    dropped: list[str] = []  # for the result's notes

    def drop(text: str) -> None:
        dropped.append(text)
        say(text)
    with temporary_folder() as tmp:
        builds = chosen is None or bool({"onnxruntime", "openvino"} & chosen) or want_served
        if not artifacts and builds and _builds_onnx(device, drop):  # build the ONNX variants of the model here
            fp32 = export_onnx(loaded, tmp / f"{name}.fp32.onnx", batch=BatchRange(1, max(max(batch_sizes), 2)),
                               progress=say).path
            for p in args.precisions:
                if p != "fp32" and not _runs_on(p, device):
                    drop(f"no {p} row: an ONNX Runtime CPU graph, not timed on {device}")
            artifacts = [fp32]
            for p in args.precisions:
                if p != "fp32" and _runs_on(p, device):
                    built = _variant(fp32, tmp / f"{name}.{p}.onnx", p, args.calibration, say, drop)
                    artifacts += [built] if built else []
        served = None
        if want_served:  # the first .onnx (the fp32 one when bench built them): what `serve` would get
            served = next((a for a in artifacts if a.suffix == ".onnx"), None)
            if served is None:
                raise ConfigError("--served needs an .onnx artifact (or none, to build one)")
        timed = [a for a in artifacts if chosen is None or set(kinds.get(info_of(a).kind, ())) & chosen]
        for a in artifacts:
            if a not in timed:
                drop(f"no row for {a.name}: --backends {','.join(args.backends)} leaves out "
                     f"{' and '.join(kinds.get(info_of(a).kind, ('its backend',)))}")
        for a in timed:  # a file only OpenVINO runs (int8-ov), where OpenVINO does not run
            if _openvino_only(info_of(a)):
                why = _openvino_missing(device, chosen)
                if why:
                    drop(f"no row for {a.name}: an {info_of(a).precision} file runs in OpenVINO, and {why}")
        result = run(loaded.model, name, timed, batch_sizes=batch_sizes, runs=args.runs,
                     max_seconds=args.max_seconds, compile=compile, device=device, served=served, progress=say,
                     torch_rows=torch_rows, min_seconds=args.min_time,
                     openvino=chosen is None or "openvino" in chosen)
        result.notes[:0] = dropped
        accuracy = not args.no_accuracy
        if accuracy and args.artifacts and loaded.info.random_weights:
            # a fresh random model is not the one the given files were exported from
            _note(result, say, "no accuracy column: the PyTorch reference has random weights, not those of the "
                               "given files; give --checkpoint with the weights they were exported from")
            accuracy = False
        if accuracy:
            for path, kind, options in session_rows(timed, device, chosen is None or "openvino" in chosen):
                report = check_parity(path, loaded, batch_sizes=[min(batch_sizes)], backend=kind, **options)
                ref, art = report.accuracy
                images = next((c for c in report.cases if c.source == "images"), None)
                hint = options.get("hint")
                key = path.name if not options else f"{path.name} in openvino ({report.precision}" + \
                    (f", {hint} hint)" if hint != report.precision else ")")
                result.accuracy[key] = {"verdict": report.verdict, **({"gate": report.gate} if report.gate else {}),
                                              "top1_agreement_images": images and images.top1_agreement,
                                              "rel_l2_images": images and images.rel_l2,
                                              "cosine_images": images and images.cosine,
                                              "accuracy": art, "accuracy_reference": ref}
            if "autocast" in torch_rows:
                result.accuracy.update(autocast_accuracy(loaded, device, say))
    print(result.table())
    if args.json:
        text = to_json(result.to_dict(), indent=2) + "\n"
        atomic_write(args.json, lambda tmp: tmp.write_text(text))
        print(f"wrote {printable(str(args.json))}")
    if args.csv:
        write_csv(result, args.csv)
        print(f"wrote {printable(str(args.csv))}")
    if args.plot:
        write_plot(result, args.plot)
        print(f"wrote {printable(str(args.plot))}")
    return 0
