"""int8-cpu accuracy on random-weight models, against the PyTorch model each file was made from.

    python scripts/cpu_path_accuracy.py OUT.json IMAGES_DIR crossvit_tiny_240 crossvit_15_240 ...

A random-weight model is new on every load, so the reference, the fp32 export and its int8
variants must come from one process. For each model: export fp32, the int8-cpu variant
(attention fused, `convert_precision`) and the previous recipe without the fusion ("unfused":
`quantize_dynamic` on the export as written), then the parity gate of each against the model on
IMAGES_DIR. Wrote benchmarks/results/cpu_epyc_2core/cpu_path/accuracy_random_weights.json (first 48 held-out
images).
"""

import json
import logging
import sys
import tempfile
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic

from crossvit.contract import METADATA_KEY, to_json, write_onnx_metadata
from crossvit.export.onnx import BatchRange, export_onnx
from crossvit.export.parity import check_parity
from crossvit.export.precision import convert_precision
from crossvit.model import load_model


def unfused(fp32: Path, fused: Path, out: Path) -> Path:
    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                     per_channel=False)
    proto = onnx.load(str(out))
    meta = json.loads(next(p.value for p in onnx.load(str(fused), load_external_data=False).metadata_props
                           if p.key == METADATA_KEY))
    write_onnx_metadata(proto, {**meta, "precision_tool": {**meta["precision_tool"], "attention": "decomposed"}},
                        others=[])
    onnx.save(proto, str(out))
    return out


def main(out_json: str, images: str, *names: str) -> None:
    logging.getLogger().setLevel(logging.ERROR)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            loaded = load_model(name=name)
            fp32 = export_onnx(loaded, Path(tmp) / f"{name}.fp32.onnx", batch=BatchRange(1, 8)).path
            fused = convert_precision(fp32, Path(tmp) / f"{name}.int8-cpu.onnx", "int8-cpu", None)
            for path in (fp32, unfused(fp32, fused, Path(tmp) / f"{name}.int8-cpu-unfused.onnx"), fused):
                r = check_parity(path, loaded, images=images, batch_sizes=[1, 4], seed=0)
                keys = ("source", "batch_size", "n", "max_abs", "rel_l2", "cosine", "top1_agreement", "top5_agreement")
                results[path.name] = {"verdict": r.verdict,
                                      "cases": [{k: getattr(c, k) for k in keys} for c in r.cases]}
                img = next(c for c in r.cases if c.source == "images")
                print(f"{path.name:45s} {r.verdict:5s} images: rel_l2 {img.rel_l2:.4f} cosine {img.cosine:.5f} "
                      f"top1 {img.top1_agreement:.3f}", flush=True)
    Path(out_json).write_text(to_json({"images": images, "against": "the PyTorch model each file was exported "
                                       "from, same process", "results": results}, indent=2) + "\n")


def cli(argv=None) -> int:
    import argparse

    from crossvit.errors import CrossViTError
    from crossvit.files import check_output_path
    from crossvit.runtime.images import list_images
    from crossvit.model import get_spec

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_json", metavar="OUT.json")
    p.add_argument("images", metavar="IMAGES_DIR")
    p.add_argument("names", metavar="MODEL", nargs="+", help="registered model names")
    args = p.parse_args(argv)
    try:  # everything that can be wrong with the arguments, before any model is exported
        check_output_path(args.out_json)
        list_images(args.images)
        for name in args.names:
            get_spec(name)
        main(args.out_json, args.images, *args.names)
    except CrossViTError as e:
        print(f"cpu_path_accuracy: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
