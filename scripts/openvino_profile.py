"""Where OpenVINO spends a call of one of our ONNX files on this CPU (its per-node counters).

    python scripts/openvino_profile.py MODEL.onnx [--batch 1] [--hint f32|bf16] [--dynamic] [--calls 20] [--top 20]

Compiles the file as `crossvit deploy` runs it (LATENCY hint, this process's threads, a model
compiled for the batch size; `--dynamic`: one dynamic-batch model, as sessions did before) with
`PERF_COUNT` on, runs `--calls` calls on one random batch after ten warm-up calls, and prints the
mean time per call of each (node type, kernel) pair, largest first, with its share and count;
then, for the fully connected layers, the GFLOP/s their matrix products ran at (from the shapes
OpenVINO reports). Needs OpenVINO.
"""

from __future__ import annotations

import argparse
import collections
import sys

import numpy as np

from crossvit.arguments import int_at_least
from crossvit.errors import CrossViTError
from crossvit.runtime.artifact import read_artifact


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("onnx")
    p.add_argument("--batch", type=int_at_least(1), default=1)
    p.add_argument("--hint", choices=("f32", "bf16"), default="f32")
    p.add_argument("--dynamic", action="store_true", help="compile a dynamic-batch model, not one for --batch")
    p.add_argument("--calls", type=int_at_least(1), default=20)
    p.add_argument("--top", type=int_at_least(1), default=20)
    args = p.parse_args(argv)
    try:
        info = read_artifact(args.onnx)  # a missing, corrupt or foreign file in one line, before OpenVINO reads it
        if not info.batch_min <= args.batch <= info.batch_max:
            raise CrossViTError(f"--batch {args.batch} is outside the file's batch range "
                                f"{info.batch_min}..{info.batch_max}")
    except CrossViTError as e:
        print(f"openvino_profile: error: {e}", file=sys.stderr)
        return 1
    try:
        import openvino as ov
    except ImportError:
        print("openvino_profile: error: needs OpenVINO (pip install openvino)", file=sys.stderr)
        return 1
    from crossvit.runtime.base import intra_op_threads

    core = ov.Core()
    try:
        model = core.read_model(args.onnx)
    except Exception as e:
        print(f"openvino_profile: error: {args.onnx}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": args.hint, "PERF_COUNT": True}
    if intra_op_threads():
        config["INFERENCE_NUM_THREADS"] = intra_op_threads()
    shape = [args.batch, *[d.get_length() for d in model.input(0).get_partial_shape()[1:]]]
    static = model.clone()
    static.reshape({0: shape})
    compiled = core.compile_model(model if args.dynamic else static, "CPU", config)
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    request = compiled.create_infer_request()
    for _ in range(10):
        request.infer({0: x})
    per_kind: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    per_node: collections.Counter = collections.Counter()
    for _ in range(args.calls):
        request.infer({0: x})
        for n in request.profiling_info:
            us = n.real_time.total_seconds() * 1e6 / args.calls
            per_kind[(n.node_type, n.exec_type)] += us
            count[(n.node_type, n.exec_type)] += 1 / args.calls
            per_node[(n.node_name, n.node_type)] += us
    total = sum(per_kind.values())
    print(f"{args.onnx}, batch {args.batch} ({'dynamic batch' if args.dynamic else 'static shapes'}), {args.hint} hint, "
          f"{compiled.get_property('INFERENCE_NUM_THREADS')} threads: "
          f"{total / 1000:.2f} ms per call (sum of the node counters, mean of {args.calls} calls)")
    for (kind, kernel), us in per_kind.most_common(args.top):
        print(f"{us / 1000:8.2f} ms {100 * us / total:5.1f}%  {round(count[(kind, kernel)]):4d} x {kind} ({kernel})")
    # the linear layers: MatMuls by a 2-D weight, 2 * rows * in * out FLOP a call, counted on the
    # model reshaped to this batch
    flops = 0.0
    for op in static.get_ops():
        if op.get_type_name() == "MatMul" and len(op.input(1).get_partial_shape()) == 2:
            a, w = op.input(0).get_partial_shape(), op.input(1).get_partial_shape()
            outputs = (w[0] if op.get_transpose_b() else w[1]).get_length()  # A is [..., in], W [in, out]
            flops += 2 * int(np.prod([d.get_length() for d in a])) * outputs  # or [out, in] transposed
    fc_us = sum(us for (kind, _), us in per_kind.items() if kind.startswith("FullyConnected"))
    if fc_us and flops:
        print(f"fully connected layers: {fc_us / 1000:.2f} ms for {flops / 1e9:.2f} GFLOP, {flops / fc_us / 1e3:.0f} GFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
