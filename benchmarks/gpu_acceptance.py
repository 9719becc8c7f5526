"""GPU acceptance: the CUDA paths of our own code, on a machine with an NVIDIA GPU.

    python -m crossvit.benchmarks.gpu_acceptance [--model NAME] [--out DIR] [--budget-seconds S]

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
   written to DIR/tensorrt.json. Without TensorRT this step is reported as SKIP with the reason.
"""

from __future__ import annotations

import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

BENCH_MODELS = ("crossvit_15_240", "crossvit_18_dagger_408")
BENCH_BATCHES = [1, 8, 64, 256]


class Verdicts(list):
    """(name, ok, detail) results, each printed as a PASS/FAIL/SKIP line when it is added: a run
    cut short by its time limit still shows what it found."""

    def append(self, item: tuple) -> None:
        super().append(item)
        name, ok, detail = item
        print(f"{'SKIP' if ok is None else ('PASS' if ok else 'FAIL'):<5} {name}: {detail}", flush=True)


def main(argv=None) -> int:
    import torch

    from crossvit.cli import _Parser, _positive_number
    from crossvit.contract import check_output_dir
    from crossvit.errors import CrossViTError
    from crossvit.model import DEFAULT_MODEL, get_spec

    p = _Parser(prog="python -m crossvit.benchmarks.gpu_acceptance", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--out", type=Path, default=Path("gpu-acceptance"))
    p.add_argument("--budget-seconds", type=_positive_number, default=480.0,
                   help="time for the benchmark step; what would not fit is skipped (default 480)")
    p.add_argument("--bench-models", type=lambda t: [m for m in t.split(",") if m], default=None,
                   metavar="A,B", help=f"models for the benchmark step (default: --model, {', '.join(BENCH_MODELS)})")
    p.add_argument("--no-compile", action="store_true", help="no torch.compile rows (compiling takes minutes)")
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
        tensorrt_step(args.model, Path(tmp), args.out, results)
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

    from crossvit.benchmarks.suite import run, write_csv, write_plot
    from crossvit.contract import atomic_write, to_json
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
        best = max(result.rows, key=lambda r: r.vs_eager)
        results.append((f"bench {name} (cuda)", True, f"{len(result.rows)} rows in {spent[-1]:.0f} s"
                        f"{'' if with_compile else ' (no torch.compile rows)'}; fastest {best.backend} "
                        f"{best.precision} b{best.batch} {best.vs_eager:.1f}x eager"))
    return results


def tensorrt_step(model_name: str, tmp: Path, out: Path, results: Verdicts | None = None) -> Verdicts:
    """Engines of two models in three precisions: gate and time each (SKIP without TensorRT)."""
    from crossvit.assets import heldout_images
    from crossvit.benchmarks.latency import command_line, machine_description, time_engines
    from crossvit.contract import atomic_write, to_json
    from crossvit.errors import CrossViTError
    from crossvit.export.calibration import calibration_batch
    from crossvit.export.engine import BuildOptions, build_engine
    from crossvit.export.onnx import BatchRange, export_onnx
    from crossvit.export.parity import check_parity
    from crossvit.export.precision import convert_precision
    from crossvit.model import load_model
    from crossvit.runtime.artifact import read_artifact
    from crossvit.runtime.gpu import tensorrt_unavailable

    reason = tensorrt_unavailable()
    results, rows = Verdicts() if results is None else results, []
    if reason:
        results.append(("TensorRT engines", None, reason))
        return results
    for name in dict.fromkeys([model_name, "crossvit_15_240"]):
        loaded = load_model(name=name)
        fp32 = export_onnx(loaded, tmp / f"{name}.fp32.onnx", batch=BatchRange(1, 64)).path
        calib = calibration_batch(read_artifact(fp32).raw, heldout_images())
        for precision in ("fp32", "fp16", "int8"):
            try:
                src = fp32 if precision == "fp32" else convert_precision(
                    fp32, tmp / f"{name}.{precision}.onnx", precision, calib)
                plan = tmp / f"{name}.{precision}.plan"
                build_engine(src, plan, BuildOptions(batch="1:8:64"))
                gate = check_parity(plan, loaded, batch_sizes=[1, 8, 64])
                lat = {b: time_engines([plan], batch=b, runs=100)[plan] for b in (1, 8, 64)}
            except CrossViTError as e:
                results.append((f"TensorRT {name} {precision}", False, str(e)))
                continue
            # random weights give near-tied logits: only fp32/fp16 agreement is meaningful there
            ok = gate.verdict == "pass" or (loaded.info.random_weights and precision == "int8")
            results.append((f"TensorRT {name} {precision}", ok, f"parity {gate.verdict}; p50 ms " +
                            ", ".join(f"b{b} {l.p50_ms:.3f}" for b, l in lat.items())))
            rows += [{"model": name, "precision": precision, "parity": gate.verdict, **l.to_dict()}
                     for l in lat.values()]
    out.mkdir(parents=True, exist_ok=True)
    text = to_json({"machine": machine_description(), "command": command_line(), "rows": rows}, indent=2) + "\n"
    atomic_write(out / "tensorrt.json", lambda tmp: tmp.write_text(text))
    return results


if __name__ == "__main__":
    sys.exit(main())
