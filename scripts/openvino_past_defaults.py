"""How far past OpenVINO's defaults our model goes on this CPU (issue 22, item 6).

    python scripts/openvino_past_defaults.py OUT.json [MODEL] [--batch-sizes 1,8]

Exports MODEL (default crossvit_15_240, random weights) to fp32 ONNX and its int8-ov variant
(NNCF, calibrated on 32 held-out images), then times, in one process and interleaved turns with
PyTorch eager fp32 as the baseline, what `crossvit deploy` runs (OpenVINO's LATENCY hint, one
dynamic-batch model) beside what else could be set:
- int8-ov with the bf16 hint for the layers left in float (CPUs with bf16);
- the THROUGHPUT hint (several streams), and no hint at all;
- a model reshaped to this batch size (static shapes) instead of a dynamic batch;
- the fp32 file with int8 weight-only compression (NNCF `compress_weights`) and the bf16 hint.
Each is compared with the PyTorch model on 48 other held-out images and on 16 random inputs
(rel L2, cosine; the random-weights gate judges both).
"""

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from crossvit.arguments import int_at_least
from crossvit.assets import heldout_images
from crossvit.benchmarks.machine import machine_description
from crossvit.errors import CrossViTError
from crossvit.export.onnx import BatchRange, export_onnx
from crossvit.export.parity import compare
from crossvit.export.precision import convert_precision
from crossvit.files import check_output_path
from crossvit.model import get_spec, load_model
from crossvit.runtime.images import list_images, load_image_set
from crossvit.runtime.session import open_session
from crossvit.runtime.timing import measure_interleaved


MAX_BATCH = 16  # the batch range the trial exports


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not sizes or not all(1 <= b <= MAX_BATCH for b in sizes):
        raise argparse.ArgumentTypeError(f"each batch size must be 1..{MAX_BATCH}, got {text!r}")
    return sizes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("model", nargs="?", default="crossvit_15_240")
    p.add_argument("--batch-sizes", type=_sizes, default=[1, 8], metavar="1,8",
                   help=f"batch sizes to time, each 1..{MAX_BATCH} (the file's batch range)")
    p.add_argument("--runs", type=int_at_least(1), default=24)
    args = p.parse_args(argv)
    try:  # what can be wrong with the arguments, before the export and NNCF's minutes
        check_output_path(args.out)
        get_spec(args.model)
    except CrossViTError as e:
        print(f"openvino_past_defaults: error: {e}", file=sys.stderr)
        return 1
    try:
        import nncf
        import openvino as ov
    except ImportError as e:
        print(f"openvino_past_defaults: error: this trial needs OpenVINO and NNCF ({e}): pip install openvino nncf",
              file=sys.stderr)
        return 2
    logging.getLogger().setLevel(logging.ERROR)
    loaded = load_model(name=args.model)
    model = loaded.model.eval()
    core = ov.Core()
    bf16 = "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(loaded, Path(tmp) / f"{args.model}.fp32.onnx", batch=BatchRange(1, MAX_BATCH)).path
        with open_session(fp32, exact=True) as s:
            held, _, _ = load_image_set(list_images(heldout_images()), s.preprocessor)
        images, calibration = held[:48], held[48:80]
        q = convert_precision(fp32, Path(tmp) / f"{args.model}.int8-ov.onnx", "int8-ov", calibration)
        base, quantized = core.read_model(str(fp32)), core.read_model(str(q))
        compressed = nncf.compress_weights(base.clone(), mode=nncf.CompressWeightsMode.INT8_ASYM)
    machine = machine_description()  # before timing: the load average says how quiet it was

    def compiled(m, config, shape=None):
        if shape is not None:
            m = m.clone()
            m.reshape({0: shape})
        request = core.compile_model(m, "CPU", config).create_infer_request()
        return lambda x: request.infer({0: x}, share_inputs=True)[0].copy()

    latency = {"PERFORMANCE_HINT": "LATENCY"}
    tries = {"OpenVINO int8-ov (what deploy runs: LATENCY hint, dynamic batch)":
             (quantized, {**latency, "INFERENCE_PRECISION_HINT": "f32"}),
             "int8-ov, THROUGHPUT hint": (quantized, {"PERFORMANCE_HINT": "THROUGHPUT",
                                                      "INFERENCE_PRECISION_HINT": "f32"}),
             "int8-ov, no performance hint": (quantized, {"INFERENCE_PRECISION_HINT": "f32"}),
             "fp32 file, fp32": (base, {**latency, "INFERENCE_PRECISION_HINT": "f32"})}
    if bf16:
        tries.update({"int8-ov, bf16 for the layers left in float": (quantized, {**latency,
                                                                             "INFERENCE_PRECISION_HINT": "bf16"}),
                      "fp32 file, bf16 hint (what deploy runs)": (base, {**latency, "INFERENCE_PRECISION_HINT": "bf16"}),
                      "fp32 file + int8 weight compression, bf16 hint": (compressed, {
                          **latency, "INFERENCE_PRECISION_HINT": "bf16"})})

    def eager(x):
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    reference = eager(images)
    noise = np.random.default_rng(0).standard_normal((16, *images.shape[1:]), dtype=np.float32)
    reference_noise = eager(noise)
    out = {"model": args.model, "machine": machine, "openvino": ov.__version__, "nncf": nncf.__version__,
           "command": " ".join(sys.argv), "accuracy_against": "the PyTorch model, 48 held-out images and 16 random inputs",
           "accuracy": {}, "timings": {}}
    for b in args.batch_sizes:
        fns = {"PyTorch eager fp32": eager}
        for key, (m, config) in tries.items():
            fns[key] = compiled(m, config)
            if key.startswith("OpenVINO int8-ov"):
                fns[f"int8-ov, model reshaped to batch {b}"] = compiled(m, config, [b, *images.shape[1:]])
        if not out["accuracy"]:
            for key, fn in fns.items():
                if key.startswith(("PyTorch", "int8-ov, model reshaped")):
                    continue
                acc = compare(reference, np.concatenate([fn(images[i:i + 8]) for i in range(0, 48, 8)]))
                rnd = compare(reference_noise, np.concatenate([fn(noise[i:i + 8]) for i in range(0, 16, 8)]))
                out["accuracy"][key] = {**{k: acc[k] for k in ("rel_l2", "cosine", "top1_agreement")},
                                        "random_inputs": {k: rnd[k] for k in ("rel_l2", "cosine")}}
                print(f"{key:66s} images: rel L2 {acc['rel_l2']:.4f} cosine {acc['cosine']:.5f}; random inputs: "
                      f"rel L2 {rnd['rel_l2']:.4f} cosine {rnd['cosine']:.5f}", flush=True)
        x = images[:b].copy()
        res = measure_interleaved({k: (lambda f: lambda: f(x))(f) for k, f in fns.items()}, batch=b,
                                  runs=args.runs, rounds=3)
        e = res["PyTorch eager fp32"].p50_ms
        out["timings"][str(b)] = {k: {**l.to_dict(), "vs_eager": e / l.p50_ms} for k, l in res.items()}
        for k, l in res.items():
            print(f"batch {b} {k:66s} p50 {l.p50_ms:8.2f} p99 {l.p99_ms:8.2f} ms  {e / l.p50_ms:5.2f}x"
                  f"  spread {l.spread:.0%}", flush=True)
    args.out.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
