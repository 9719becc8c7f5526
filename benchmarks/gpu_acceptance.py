"""GPU acceptance: the CUDA paths of our own code, on a machine with an NVIDIA GPU.

    python -m crossvit.benchmarks.gpu_acceptance [--model NAME] [--out DIR] [--budget-seconds S] [--skip-rtx]

Checks, each printed as PASS/FAIL/SKIP, exit code 1 if any fails:
1. the torch backend on CUDA gives the CPU's logits (fp32, TF32 off) within 1e-4;
2. the ONNX Runtime session with the CUDA execution provider (needs onnxruntime-gpu instead of
   onnxruntime) gives the CPU session's logits within 1e-4, or reports why it fell back;
3. `crossvit bench`'s GPU rows (`benchmarks/suite.py`, the same code): PyTorch eager fp32 (TF32
   off), fp16/bf16 autocast, a CUDA graph of the fp16 model and `torch.compile` at batch 1, 8,
   64 and 256, for the model, crossvit_15_240 and crossvit_18_dagger_408, written to DIR as
   bench_cuda.json, bench_cuda.csv and one PNG per model. Results are saved after each batch
   size, and models, batch sizes or torch.compile rows that would not fit in what is left of
   --budget-seconds are skipped and said so (in the output and the result's notes);
4. where TensorRT is installed: fp32/fp16/int8 engines of the model and of crossvit_15_240
   (`crossvit build`'s code), each gated against PyTorch and timed at batch 1, 8 and 64,
   written to DIR/tensorrt.json. Without TensorRT this step is reported as SKIP with the reason;
5. where TensorRT-RTX is installed (the `rtx` extra): the same engines built with
   `--library tensorrt-rtx`, and what this GPU does with them, written to DIR/tensorrt_rtx.json.
   On a GPU the plans target (Ampere/Ada/Blackwell RTX, A100: a compute capability in the
   manifest's tensorrt.target_compute_capabilities) each is opened with the tensorrt backend,
   gated and timed as in 4. On any other GPU (H100/H200: 9.0) the expected answer is a one-line
   ArtifactError from `open_session(plan, backend="tensorrt")` (manifest_mismatch's reason) and
   `open_session(plan)` falling back to the ONNX beside the plan on ONNX Runtime: a row passes
   when both happen, and the refusal's text is kept in the JSON. A build for compute capability
   9.0 must be refused in one line too. It runs in a process of its own (Polygraphy drives one
   TensorRT library per process); without a GPU or TensorRT-RTX it is a SKIP with the reason,
   and --skip-rtx leaves it out.

Every engine row (model x precision) catches any Exception, ours or not: it becomes that row's
FAIL line (`Type: first line of the message`) and the next row runs.
"""

from __future__ import annotations

import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np

BENCH_MODELS = ("crossvit_15_240", "crossvit_18_dagger_408")
BENCH_BATCHES = [1, 8, 64, 256]
ENGINE_MODELS = ("crossvit_15_240",)  # besides --model
ENGINE_PRECISIONS = ("fp32", "fp16", "int8")
ENGINE_BATCHES = (1, 8, 64)
ENGINE_PROFILE = "1:8:64"
NOT_AN_RTX_TARGET = ((9, 0),)  # Hopper (H100/H200): TensorRT-RTX must refuse to build for it


class Verdicts(list):
    """(name, ok, detail) results, each printed as a PASS/FAIL/SKIP line when it is added: a run
    cut short by its time limit still shows what it found."""

    def append(self, item: tuple) -> None:
        super().append(item)
        name, ok, detail = item
        print(f"{'SKIP' if ok is None else ('PASS' if ok else 'FAIL'):<5} {name}: {detail}", flush=True)


def main(argv=None) -> int:
    import torch

    from crossvit.arguments import Parser, positive_number
    from crossvit.errors import CrossViTError
    from crossvit.files import check_output_dir
    from crossvit.model import DEFAULT_MODEL, get_spec

    p = Parser(prog="python -m crossvit.benchmarks.gpu_acceptance", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--out", type=Path, default=Path("gpu-acceptance"))
    p.add_argument("--budget-seconds", type=positive_number, default=480.0,
                   help="time for the benchmark step; what would not fit is skipped (default 480)")
    p.add_argument("--bench-models", type=lambda t: [m for m in t.split(",") if m], default=None,
                   metavar="A,B", help=f"models for the benchmark step (default: --model, {', '.join(BENCH_MODELS)})")
    p.add_argument("--no-compile", action="store_true", help="no torch.compile rows (compiling takes minutes)")
    p.add_argument("--skip-rtx", action="store_true",
                   help="no TensorRT-RTX step (DIR/tensorrt_rtx.json); it is reported as SKIP")
    args = p.parse_args(argv)
    try:  # a bad name or --out: one line now, not a traceback after the parity step
        check_output_dir(args.out)
        for name in [args.model, *(args.bench_models or [])]:
            get_spec(name)
    except CrossViTError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    if not torch.cuda.is_available():
        print("gpu_acceptance: no CUDA device (torch.cuda.is_available() is False); install a CUDA "
              "build of torch on a GPU machine", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results = Verdicts()  # every step adds to it: each line is printed as it is made, and counted
    try:
        parity_step(args.model, results)
    except Exception as e:  # a failure here must not cost the benchmark its turn: report it and go on
        results.append(("torch/ONNX Runtime on cuda", False, f"{type(e).__name__}: {e}"))
    bench_step(args.bench_models or [args.model, *BENCH_MODELS], args.out, args.budget_seconds,
               compile=not args.no_compile, results=results)
    with tempfile.TemporaryDirectory(prefix="crossvit-gpu-") as tmp:
        try:
            tensorrt_step(args.model, Path(tmp), args.out, results)
        except Exception as e:  # rows catch their own errors; this is the step's setup failing
            row_failed(results, "TensorRT engines", e)
    if args.skip_rtx:
        results.append(("TensorRT-RTX engines", None, "skipped (--skip-rtx)"))
    else:
        from crossvit.benchmarks import gpu_acceptance as this  # by its module name, not __main__: spawn pickles it
        from crossvit.benchmarks.machine import command_line

        with tempfile.TemporaryDirectory(prefix="crossvit-gpu-rtx-") as tmp:
            try:
                this.in_own_process(results, this.tensorrt_rtx_step, args.model, Path(tmp), args.out,
                                    command=command_line())
            except Exception as e:  # the step's setup, or its process dying
                row_failed(results, "TensorRT-RTX engines", e)
    failed = [name for name, ok, _ in results if ok is False]
    print(f"gpu_acceptance: {sum(ok is True for _, ok, _ in results)} passed, {len(failed)} failed"
          f"{' (' + '; '.join(failed) + ')' if failed else ''}, {sum(ok is None for _, ok, _ in results)} skipped")
    return 1 if failed else 0


def parity_step(model_name: str, results: Verdicts | None = None) -> Verdicts:
    """The torch backend and ONNX Runtime's CUDA provider against their CPU selves."""
    from crossvit.export.onnx import BatchRange, export_onnx
    from crossvit.model import load_model
    from crossvit.runtime.session import open_session

    results = Verdicts() if results is None else results
    loaded = load_model(name=model_name)
    c, h, w = loaded.model.input_shape
    x = np.random.default_rng().standard_normal((8, c, h, w), dtype=np.float32)
    ckpt = loaded.source
    with open_session(ckpt, backend="torch", device="cpu", name=model_name) as cpu, \
            open_session(ckpt, backend="torch", device="cuda", name=model_name) as gpu:
        diff = float(np.abs(cpu.infer(x) - gpu.infer(x)).max())
    results.append(("torch backend cuda vs cpu", diff <= 1e-4, f"max abs {diff:.2e}"))
    with tempfile.TemporaryDirectory(prefix="crossvit-gpu-") as tmp:
        onnx_path = export_onnx(loaded, Path(tmp) / "model.onnx", batch=BatchRange(1, 64)).path
        with open_session(onnx_path, device="cpu") as cpu, open_session(onnx_path, device="cuda") as gpu:
            if gpu.device != "cuda":
                results.append(("onnxruntime CUDA provider", None,
                                f"not available (providers {gpu.providers}); "
                                "pip uninstall onnxruntime && pip install onnxruntime-gpu"))
            else:
                diff = float(np.abs(cpu.infer(x) - gpu.infer(x)).max())
                results.append(("onnxruntime CUDA provider vs cpu", diff <= 1e-4, f"max abs {diff:.2e}"))
    return results


def disagreeing(accuracy: dict, min_cosine: float = 0.999) -> list[str]:
    """The PyTorch rows whose logits are not those of eager fp32 (`suite._agreement`'s entries): a
    fast row that computes something else is a failure (a CUDA graph replaying freed weights gave
    NaN here once), and NaN never passes."""
    return [f"{k} (cosine {a['cosine']:.4f})" for k, a in accuracy.items() if not a["cosine"] >= min_cosine]


def bench_step(models: list[str], out: Path, budget: float, compile: bool = True,
               results: Verdicts | None = None) -> Verdicts:
    """`crossvit bench --device cuda` for each model, saved after each one."""
    import torch

    from crossvit.benchmarks.report import write_csv, write_plot
    from crossvit.benchmarks.suite import run
    from crossvit.contract import to_json
    from crossvit.files import atomic_write
    from crossvit.model import load_model

    out.mkdir(parents=True, exist_ok=True)
    start, spent, done = time.monotonic(), [], []
    results = Verdicts() if results is None else results

    def save(results_so_far: list) -> None:  # after every batch size: a timeout loses one batch at most
        text = to_json({"results": [r.to_dict() for r in results_so_far]}, indent=2) + "\n"
        atomic_write(out / "bench_cuda.json", lambda tmp: tmp.write_text(text))
        write_csv(results_so_far, out / "bench_cuda.csv")

    for name in dict.fromkeys(models):
        left = budget - (time.monotonic() - start)
        guess = max(spent, default=60.0)  # the next model costs about what the costliest one did
        if left < guess:
            results.append((f"bench {name} (cuda)", None, f"skipped: {max(left, 0):.0f} s of the budget left"))
            continue
        with_compile = compile and left > 2.5 * guess  # compiling costs about a model's timing again
        t0 = time.monotonic()
        try:
            model = load_model(name=name).model
            result = run(model, name, [], batch_sizes=BENCH_BATCHES, runs=30, max_seconds=4.0, compile=with_compile,
                         device="cuda", progress=lambda m, name=name: print(f"  {name}: {m}", flush=True),
                         on_batch=lambda partial: save(done + [partial]), deadline=start + budget)
        except Exception as e:  # one model's failure is a FAIL line; the others still run
            traceback.print_exc()
            results.append((f"bench {name} (cuda)", False, f"{type(e).__name__}: {e}"))
            continue
        finally:
            torch.cuda.empty_cache()
        spent.append(time.monotonic() - t0)
        done.append(result)
        print(result.table(), flush=True)
        save(done)
        try:
            write_plot(result, out / f"bench_cuda_{name}.png")
        except Exception as e:  # matplotlib missing: the JSON and CSV are the results
            print(f"  no plot: {e}")
        wrong = disagreeing(result.accuracy)
        if wrong:
            results.append((f"bench {name} (cuda) agreement with fp32", False, "; ".join(wrong)))
        best = max(result.rows, key=lambda r: r.vs_eager or 0.0)  # a noisy row has no ratio (None)
        results.append((f"bench {name} (cuda)", True, f"{len(result.rows)} rows in {spent[-1]:.0f} s"
                        f"{'' if with_compile else ' (no torch.compile rows)'}; fastest {best.backend} "
                        f"{best.precision} b{best.batch} "
                        + (f"{best.vs_eager:.1f}x eager" if best.vs_eager else "(no ratio: noisy turns)")))
    return results


def first_line(text: str | None) -> str:
    text = str(text or "").strip()
    return text.splitlines()[0] if text else "(no message)"


def failure(e: BaseException) -> str:
    """A row's error as one line: `Type: first line of its message`."""
    return f"{type(e).__name__}: {first_line(str(e))}"


def row_failed(results: Verdicts, name: str, e: Exception) -> str:
    """Record `e` as the FAIL line of row `name` and return its text. Errors that are not ours
    (`CrossViTError` messages are one line by design) also leave their traceback in the log."""
    from crossvit.errors import CrossViTError

    if not isinstance(e, CrossViTError):
        traceback.print_exc()
    text = failure(e)
    results.append((name, False, text))
    return text


def run_row(results: Verdicts, name: str, row: Callable[[], tuple]) -> tuple[bool, str, bool]:
    """One row of a step: `row()` returns (ok, detail), which is printed and counted. Any Exception
    it raises, ours or not, is the row's FAIL line instead, and the caller goes on to its next row
    (not BaseException: Ctrl-C still ends the run). Returns (ok, detail, raised)."""
    try:
        ok, detail = row()
    except Exception as e:
        return False, row_failed(results, name, e), True
    results.append((name, ok, detail))
    return ok, detail, False


def in_own_process(results: Verdicts, step: Callable, *args, **kwargs) -> Verdicts:
    """`step(*args, **kwargs)` in a fresh (spawned) Python process, its verdicts added to `results`.

    Polygraphy drives one TensorRT library per process (`trt_library.use_polygraphy`), and the
    standard TensorRT step may already have taken this one. The child prints its lines as they
    come; a child that dies (a crash inside a TensorRT library) is a FAIL line here."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        rows = pool.submit(_verdicts_of, step, *args, **kwargs).result()
    list.extend(results, rows)  # printed by the child already: counted here, not printed twice
    return results


def _verdicts_of(step: Callable, *args, **kwargs) -> list:
    return list(step(*args, **kwargs))


def _prepare_model(name: str, tmp: Path):
    """The model, its fp32 ONNX (batch 1..64) in `tmp` and its int8 calibration batch."""
    from crossvit.assets import heldout_images
    from crossvit.export.calibration import calibration_batch
    from crossvit.export.onnx import BatchRange, export_onnx
    from crossvit.model import load_model
    from crossvit.runtime.artifact import read_artifact

    loaded = load_model(name=name)
    fp32 = export_onnx(loaded, tmp / f"{name}.fp32.onnx", batch=BatchRange(1, 64)).path
    return loaded, fp32, calibration_batch(read_artifact(fp32).raw, heldout_images())


def _variant(fp32: Path, tmp: Path, name: str, precision: str, calib) -> Path:
    """The ONNX an engine of `precision` is built from, in the folder its plan will be in (the
    runtime's fallback looks for it beside the plan)."""
    from crossvit.export.precision import convert_precision

    return fp32 if precision == "fp32" else convert_precision(fp32, tmp / f"{name}.{precision}.onnx", precision, calib)


def _gate_ok(gate, loaded, precision: str) -> bool:
    # random weights give near-tied logits: only fp32/fp16 agreement is meaningful there
    return gate.verdict == "pass" or (loaded.info.random_weights and precision == "int8")


def _p50s(lat: dict) -> str:
    return "p50 ms " + ", ".join(f"b{b} {l.p50_ms:.3f}" for b, l in lat.items())


def tensorrt_step(model_name: str, tmp: Path, out: Path, results: Verdicts | None = None) -> Verdicts:
    """Standard TensorRT engines of two models in three precisions: gate and time each (SKIP
    without TensorRT). A row's failure, whatever it is, is its FAIL line; the next row runs."""
    from crossvit.benchmarks.latency import time_engines
    from crossvit.benchmarks.machine import command_line, machine_description
    from crossvit.contract import to_json
    from crossvit.export.engine import BuildOptions, build_engine
    from crossvit.export.parity import check_parity
    from crossvit.files import atomic_write
    from crossvit.runtime.gpu import tensorrt_unavailable

    reason = tensorrt_unavailable("tensorrt")
    results, rows, failed = Verdicts() if results is None else results, [], []
    if reason:
        results.append(("TensorRT engines", None, reason))
        return results
    doc = {"machine": machine_description(), "command": command_line(), "rows": rows, "failed": failed}

    def save() -> None:  # after every row: a run cut short keeps the rows done
        out.mkdir(parents=True, exist_ok=True)
        text = to_json(doc, indent=2) + "\n"
        atomic_write(out / "tensorrt.json", lambda tmp: tmp.write_text(text))

    for name in dict.fromkeys([model_name, *ENGINE_MODELS]):
        try:
            loaded, fp32, calib = _prepare_model(name, tmp)
        except Exception as e:
            failed.append({"model": name, "precision": None, "error": row_failed(results, f"TensorRT {name}", e)})
            save()
            continue
        for precision in ENGINE_PRECISIONS:
            def row(name=name, precision=precision, loaded=loaded, fp32=fp32, calib=calib):
                plan = tmp / f"{name}.{precision}.plan"
                build_engine(_variant(fp32, tmp, name, precision, calib), plan,
                             BuildOptions(batch=ENGINE_PROFILE, library="tensorrt"))
                gate = check_parity(plan, loaded, batch_sizes=list(ENGINE_BATCHES))
                lat = {b: time_engines([plan], batch=b, runs=100)[plan] for b in ENGINE_BATCHES}
                rows.extend({"model": name, "precision": precision, "parity": gate.verdict, **l.to_dict()}
                            for l in lat.values())
                return _gate_ok(gate, loaded, precision), f"parity {gate.verdict}; {_p50s(lat)}"

            ok, detail, _ = run_row(results, f"TensorRT {name} {precision}", row)
            if not ok:
                failed.append({"model": name, "precision": precision, "error": detail})
            save()
    return results


def tensorrt_rtx_step(model_name: str, tmp: Path, out: Path, results: Verdicts | None = None, *,
                      command: str | None = None) -> Verdicts:
    """TensorRT-RTX engines of the models and precisions of `tensorrt_step`, and what this GPU does
    with them, in DIR/tensorrt_rtx.json (SKIP without a GPU or TensorRT-RTX).

    Each row (model x precision) builds with `BuildOptions(library="tensorrt-rtx")` for the default
    targets, then takes one of two routes, named in its JSON entry's "route":
    - "run": this GPU's compute capability is one of the plan's targets: opened with the tensorrt
      backend (the first open compiles the kernels: "first_run_s"), gated and timed;
    - "refusal+fallback": it is not (H100/H200): `open_session(plan, backend="tensorrt")` must
      refuse with a one-line ArtifactError holding manifest_mismatch's reason ("refusal": its
      exact text), and `open_session(plan)` must run the ONNX beside the plan on ONNX Runtime
      ("fallback"). The row passes when both hold.
    Then a build for compute capability 9.0 must be refused with a one-line ExportError
    ("compute_capability_refusal"). `command` is the command line to record (this step runs in a
    child process, whose own is not the user's)."""
    from crossvit.benchmarks.latency import time_engines
    from crossvit.benchmarks.machine import command_line, machine_description
    from crossvit.contract import to_json
    from crossvit.errors import ArtifactError, ExportError
    from crossvit.export.engine import BuildOptions, build_engine
    from crossvit.export.parity import check_parity
    from crossvit.files import atomic_write
    from crossvit.runtime.gpu import cuda_device, tensorrt_unavailable
    from crossvit.runtime.session import open_session
    from crossvit.runtime.tensorrt import manifest_mismatch
    from crossvit.runtime.trt_library import TENSORRT_RTX, cc_text

    reason = tensorrt_unavailable("tensorrt-rtx")
    results = Verdicts() if results is None else results
    if reason:
        results.append(("TensorRT-RTX engines", None, reason))
        return results
    gpu, trt = cuda_device(), TENSORRT_RTX.module()
    here = f"{gpu.name} (compute capability {cc_text(gpu.compute_capability)})"
    rows: list[dict] = []
    doc = {"machine": machine_description(), "command": command or command_line(),
           "library": {"name": TENSORRT_RTX.name, "version": trt.__version__}, "gpu": gpu.to_dict(),
           "rtx_targets_known": [list(cc) for cc in TENSORRT_RTX.known_targets(trt)],
           "rows": rows, "compute_capability_refusal": None}

    def save() -> None:
        out.mkdir(parents=True, exist_ok=True)
        text = to_json(doc, indent=2) + "\n"
        atomic_write(out / "tensorrt_rtx.json", lambda tmp: tmp.write_text(text))

    def run_here(entry: dict, plan: Path, loaded, precision: str) -> tuple[bool, str]:
        t0 = time.perf_counter()
        with open_session(plan, backend="tensorrt") as s:  # no runtime cache yet: compiles the kernels
            c, h, w = s.info.input_shape
            s.infer(np.zeros((1, c, h, w), dtype=np.float32))
            entry["session"] = s.describe()
        entry["first_run_s"] = round(time.perf_counter() - t0, 2)
        gate = check_parity(plan, loaded, batch_sizes=list(ENGINE_BATCHES), backend="tensorrt")
        entry["parity"] = gate.verdict
        if gate.not_run:
            entry["parity_not_run"] = gate.not_run
        lat = {b: time_engines([plan], batch=b, runs=100)[plan] for b in ENGINE_BATCHES}
        entry["latency"] = [l.to_dict() for l in lat.values()]
        return _gate_ok(gate, loaded, precision), (f"{entry['session']} on {here}, first run {entry['first_run_s']} s; "
                                                   f"parity {gate.verdict}; {_p50s(lat)}")

    def refuse_and_fall_back(entry: dict, plan: Path, manifest: dict) -> tuple[bool, str]:
        expected = manifest_mismatch(manifest, gpu, TENSORRT_RTX, trt.__version__)
        refusal = entry["refusal"] = {"call": "open_session(plan, backend='tensorrt')", "expected_reason": expected}
        try:
            with open_session(plan, backend="tensorrt") as s:
                refusal.update(type=None, message=None, opened=s.describe())
        except Exception as e:  # the answer expected here: recorded, not raised
            message = str(e)
            refusal.update(type=type(e).__name__, message=message, one_line="\n" not in message.strip(),
                           names_reason=bool(expected) and expected in message)
        refused = (refusal["type"] == ArtifactError.__name__ and refusal["one_line"] and refusal["names_reason"])
        refusal["verdict"] = "pass" if refused else "fail"
        fallback = entry["fallback"] = {"call": "open_session(plan)"}
        save()  # the refusal is kept even if the fallback raises
        with open_session(plan) as s:
            c, h, w = s.info.input_shape
            y = s.infer(np.random.default_rng(0).standard_normal((8, c, h, w), dtype=np.float32))
            fallback.update(backend=s.backend, session=s.describe(), file=s.info.path.name, chosen=s.chosen,
                            output_shape=list(y.shape), finite=bool(np.isfinite(y).all()))
        fell_back = (fallback["backend"] == "onnxruntime" and fallback["output_shape"] == [8, s.info.num_classes]
                     and fallback["finite"])
        fallback["verdict"] = "pass" if fell_back else "fail"
        if refusal["type"] is None:
            said = f"open_session(backend='tensorrt') opened it ({refusal['opened']}) on a GPU it does not target"
        elif not refused:
            said = (f"open_session(backend='tensorrt') raised {refusal['type']}: {first_line(refusal['message'])} "
                    "(expected a one-line ArtifactError with manifest_mismatch's reason)")
        else:
            said = f"open_session(backend='tensorrt') refused in one line: {refusal['message']}"
        return refused and fell_back, (f"{here} is not a target; {said}; open_session() fell back to "
                                       f"{fallback['file']} on {fallback['session']}")

    first_fp32 = None
    for name in dict.fromkeys([model_name, *ENGINE_MODELS]):
        try:
            loaded, fp32, calib = _prepare_model(name, tmp)
        except Exception as e:
            rows.append({"model": name, "precision": None, "verdict": "fail",
                         "error": row_failed(results, f"TensorRT-RTX {name}", e)})
            save()
            continue
        first_fp32 = first_fp32 or fp32
        for precision in ENGINE_PRECISIONS:
            entry = {"model": name, "precision": precision}
            rows.append(entry)

            def row(entry=entry, name=name, precision=precision, loaded=loaded, fp32=fp32, calib=calib):
                plan = tmp / f"{name}.{precision}.rtx.plan"
                manifest = build_engine(_variant(fp32, tmp, name, precision, calib), plan,
                                        BuildOptions(batch=ENGINE_PROFILE, library="tensorrt-rtx"))
                targets = [tuple(cc) for cc in manifest["tensorrt"]["target_compute_capabilities"]]
                entry["targets"] = [list(cc) for cc in targets]
                if gpu.compute_capability in targets:
                    entry["route"] = "run"
                    return run_here(entry, plan, loaded, precision)
                entry["route"] = "refusal+fallback"
                return refuse_and_fall_back(entry, plan, manifest)

            ok, detail, raised = run_row(results, f"TensorRT-RTX {name} {precision}", row)
            entry.update(verdict="pass" if ok else "fail", detail=detail)
            if raised:
                entry["error"] = detail
            save()

    def cc_refusal() -> tuple[bool, str]:
        wanted = ", ".join(cc_text(cc) for cc in NOT_AN_RTX_TARGET)
        entry = doc["compute_capability_refusal"] = {"requested": [list(cc) for cc in NOT_AN_RTX_TARGET]}
        if first_fp32 is None:
            raise RuntimeError("no ONNX was exported to build from")
        try:
            build_engine(first_fp32, tmp / "not-a-target.rtx.plan",
                         BuildOptions(batch=ENGINE_PROFILE, library="tensorrt-rtx",
                                      compute_capabilities=NOT_AN_RTX_TARGET))
        except Exception as e:
            message = str(e)
            entry.update(type=type(e).__name__, message=message, one_line="\n" not in message.strip())
        else:
            entry.update(type=None, message=None, one_line=None)
        ok = entry["type"] == ExportError.__name__ and entry["one_line"] and wanted in entry["message"]
        entry["verdict"] = "pass" if ok else "fail"
        if entry["type"] is None:
            return False, f"built a plan for compute capability {wanted}, which TensorRT-RTX has no target for"
        return ok, f"{entry['type']}: {entry['message']}"

    ok, detail, raised = run_row(results, f"TensorRT-RTX build for compute capability "
                                          f"{', '.join(cc_text(cc) for cc in NOT_AN_RTX_TARGET)} refused", cc_refusal)
    if raised:
        doc["compute_capability_refusal"] = {**(doc["compute_capability_refusal"] or {}), "verdict": "fail",
                                             "error": detail}
    save()
    return results


if __name__ == "__main__":
    sys.exit(main())
