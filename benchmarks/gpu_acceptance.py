"""GPU acceptance: the CUDA paths of our own code, on a machine with an NVIDIA GPU.

    python -m crossvit.benchmarks.gpu_acceptance [--model NAME] [--out DIR]

Checks, each printed as PASS/FAIL/SKIP, exit code 1 if any fails:
1. the torch backend on CUDA gives the CPU's logits (fp32, TF32 off) within 1e-4;
2. the ONNX Runtime session with the CUDA execution provider (needs onnxruntime-gpu instead of
   onnxruntime) gives the CPU session's logits within 1e-4, or reports why it fell back;
3. the latency benchmark with the CUDA baselines (torch fp32/fp16/bf16 eager, torch.compile,
   CUDA graphs), written to DIR as JSON + CSV;
4. where TensorRT is installed: fp32/fp16/int8 engines of the model and of crossvit_15_240
   (`crossvit build`'s code), each gated against PyTorch and timed at batch 1, 8 and 64,
   written to DIR/tensorrt.json. Without TensorRT this step is reported as SKIP with the reason.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    import torch

    from crossvit.export.onnx import BatchRange, export_onnx
    from crossvit.model import DEFAULT_MODEL, load_model
    from crossvit.runtime.session import open_session

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--out", type=Path, default=Path("gpu-acceptance"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_acceptance: no CUDA device (torch.cuda.is_available() is False); install a CUDA "
              "build of torch on a GPU machine", file=sys.stderr)
        return 2
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results = []
    loaded = load_model(name=args.model)
    c, h, w = loaded.model.input_shape
    x = np.random.default_rng(0).standard_normal((8, c, h, w), dtype=np.float32)
    tmp = Path(tempfile.mkdtemp(prefix="crossvit-gpu-"))
    ckpt = loaded.source
    with open_session(ckpt, backend="torch", device="cpu", name=args.model) as cpu, \
            open_session(ckpt, backend="torch", device="cuda", name=args.model) as gpu:
        diff = float(np.abs(cpu.infer(x) - gpu.infer(x)).max())
    results.append(("torch backend cuda vs cpu", diff <= 1e-4, f"max abs {diff:.2e}"))

    onnx_path = export_onnx(loaded, tmp / "model.onnx", batch=BatchRange(1, 64)).path
    with open_session(onnx_path, device="cpu") as cpu, open_session(onnx_path, device="cuda") as gpu:
        if gpu.device != "cuda":
            results.append(("onnxruntime CUDA provider", None, f"not available (providers {gpu.providers}); "
                            "pip uninstall onnxruntime && pip install onnxruntime-gpu"))
        else:
            diff = float(np.abs(cpu.infer(x) - gpu.infer(x)).max())
            results.append(("onnxruntime CUDA provider vs cpu", diff <= 1e-4, f"max abs {diff:.2e}"))

    from crossvit.benchmarks import latency

    code = latency.main(["--model", args.model, "--batch", "1,8,64", "--runs", "100", "--out", str(args.out)])
    results.append(("latency benchmark with CUDA baselines", code == 0, f"results in {args.out}"))
    results += tensorrt_step(args.model, tmp, args.out)
    failed = 0
    for name, ok, detail in results:
        word = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
        failed += ok is False
        print(f"{word:<5} {name}: {detail}")
    return 1 if failed else 0


def tensorrt_step(model_name: str, tmp: Path, out: Path) -> list[tuple]:
    """Engines of two models in three precisions: gate and time each (SKIP without TensorRT)."""
    from crossvit.assets import heldout_images
    from crossvit.benchmarks.latency import time_engines
    from crossvit.contract import to_json
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
    if reason:
        return [("TensorRT engines", None, reason)]
    results, rows = [], []
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
    (out / "tensorrt.json").write_text(to_json({"rows": rows}, indent=2) + "\n")
    return results


if __name__ == "__main__":
    sys.exit(main())
