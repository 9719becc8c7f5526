"""OpenVINO as the CPU path, measured against what we ship (a trial for issue 12; not a dependency).

    pip install openvino nncf
    python scripts/openvino_trial.py OUT.json [MODEL] [--batch-sizes 1,8]

In one process, on MODEL (default crossvit_15_240, random weights): PyTorch eager fp32 (the
baseline), ONNX Runtime fp32 and int8-cpu (what `crossvit deploy` builds), and OpenVINO on the
same fp32 export: fp32, bf16 (its inference-precision hint) and int8 (NNCF post-training
quantization, transformer mode, calibrated on 32 held-out images). Each is timed in interleaved
turns (`measure_interleaved`) at each batch size, and compared with the PyTorch model on 48
other held-out images (rel L2, cosine, through `export.parity.compare`).
"""

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from crossvit.assets import heldout_images
from crossvit.benchmarks.latency import machine_description
from crossvit.contract import to_json
from crossvit.export.onnx import BatchRange, export_onnx
from crossvit.export.parity import compare
from crossvit.export.precision import convert_precision
from crossvit.model import load_model
from crossvit.runtime.images import list_images, load_image_set
from crossvit.runtime.session import open_session
from crossvit.runtime.timing import measure_interleaved


def openvino_runners(fp32: Path, calibration: np.ndarray) -> tuple[dict, str]:
    import nncf
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(fp32))
    int8 = nncf.quantize(model, nncf.Dataset([x[None] for x in calibration]), model_type=nncf.ModelType.TRANSFORMER,
                         subset_size=len(calibration))
    runners = {}
    for name, m, precision in (("OpenVINO fp32", model, "f32"), ("OpenVINO bf16", model, "bf16"),
                               ("OpenVINO int8 (NNCF)", int8, "f32")):
        compiled = core.compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"})
        request = compiled.create_infer_request()
        runners[name] = (lambda r: lambda x: r.infer({0: x})[0].copy())(request)
    return runners, ov.__version__


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("model", nargs="?", default="crossvit_15_240")
    p.add_argument("--batch-sizes", default="1,8")
    args = p.parse_args(argv)
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError as e:
        print(f"error: this trial needs {e.name}: pip install openvino nncf", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(logging.ERROR)
    machine = machine_description()  # before timing: the load average says how quiet it was
    loaded = load_model(name=args.model)
    torch_model = loaded.model.eval()

    def eager(x):
        with torch.inference_mode():
            return torch_model(torch.from_numpy(x)).numpy()

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(loaded, Path(tmp) / f"{args.model}.fp32.onnx", batch=BatchRange(1, 8)).path
        int8_cpu = convert_precision(fp32, Path(tmp) / f"{args.model}.int8-cpu.onnx", "int8-cpu", None)
        ort_fp32, ort_int8 = open_session(fp32, exact=True), open_session(int8_cpu, exact=True)
        held_out, _, _ = load_image_set(list_images(heldout_images()), ort_fp32.preprocessor)
        images, calibration = held_out[:48], held_out[48:80]  # compared on 48, calibrated on 32 others
        ov_runners, ov_version = openvino_runners(fp32, calibration)
        runners = {"PyTorch eager fp32": eager, "ONNX Runtime fp32": ort_fp32.infer,
                   "ONNX Runtime int8-cpu": ort_int8.infer, **ov_runners}
        reference = np.concatenate([eager(images[i:i + 8]) for i in range(0, len(images), 8)])
        accuracy = {}
        for name, run in runners.items():
            out = np.concatenate([run(images[i:i + 8]) for i in range(0, len(images), 8)])
            accuracy[name] = {k: v for k, v in compare(reference, out).items() if k in ("rel_l2", "cosine",
                                                                                          "top1_agreement")}
        timings = {}
        for b in (int(s) for s in args.batch_sizes.split(",")):
            x = np.random.default_rng(0).standard_normal((b, *ort_fp32.info.input_shape), dtype=np.float32)
            lat = measure_interleaved({name: (lambda run: lambda: run(x))(run) for name, run in runners.items()},
                                      batch=b, runs=30 if b == 1 else 12, rounds=3, max_seconds=40)
            base = lat["PyTorch eager fp32"].p50_ms
            timings[b] = {name: {**l.to_dict(), "speedup_vs_eager": base / l.p50_ms} for name, l in lat.items()}
            for name, l in lat.items():
                print(f"batch {b:3d}  {name:24s} p50 {l.p50_ms:8.2f} ms  p99 {l.p99_ms:8.2f} ms  "
                      f"{base / l.p50_ms:5.2f}x  rel_l2 {accuracy[name]['rel_l2']:.4f}  "
                      f"cosine {accuracy[name]['cosine']:.5f}", flush=True)
        ort_fp32.close()
        ort_int8.close()
    result = {"machine": machine, "command": " ".join(sys.argv), "model": args.model,
              "openvino": ov_version, "accuracy_against": "the PyTorch model, held-out images 0-47 (OpenVINO int8 calibrated on 48-79)",
              "accuracy": accuracy, "timings": timings}
    args.out.write_text(to_json(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
