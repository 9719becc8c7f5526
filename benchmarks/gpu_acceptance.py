"""GPU acceptance: the CUDA paths of our own code, on a machine with an NVIDIA GPU.

    python -m crossvit.benchmarks.gpu_acceptance [--model NAME] [--out DIR]

Checks, each printed as PASS/FAIL/SKIP, exit code 1 if any fails:
1. the torch backend on CUDA gives the CPU's logits (fp32, TF32 off) within 1e-4;
2. the ONNX Runtime session with the CUDA execution provider (needs onnxruntime-gpu instead of
   onnxruntime) gives the CPU session's logits within 1e-4, or reports why it fell back;
3. the latency benchmark with the CUDA baselines (torch fp32/fp16/bf16 eager, torch.compile,
   CUDA graphs), written to DIR as JSON + CSV.
TensorRT engines are not built by this version; nothing here needs TensorRT.
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
    failed = 0
    for name, ok, detail in results:
        word = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
        failed += ok is False
        print(f"{word:<5} {name}: {detail}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
