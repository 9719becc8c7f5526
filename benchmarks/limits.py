"""The machine's own limits, against which `crossvit bench` reads its rows: square GEMM rates per
library and precision (PyTorch, ONNX Runtime; fp32, bf16, int8, and fp16/tf32/fp8 on a GPU), sized
so a slow path costs seconds, not minutes; the model's GFLOP per image; whether the CPU has bf16."""

from __future__ import annotations

import platform
import time
from typing import Callable

import numpy as np
import torch

from crossvit.benchmarks.cuda_timer import CudaEvents
from crossvit.runtime.cpu_choice import cpu_flags
from crossvit.runtime.timing import measure_interleaved


PRECISION_CLASS = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "int8": "int8", "fp8": "fp8",
                   "int8-cpu": "int8", "int8-ov": "int8"}


def has_bf16() -> bool:
    """bf16 instructions: AVX512-BF16 or AMX on x86, BF16 on Linux Arm (its "Features"), Apple silicon."""
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & cpu_flags()) or platform.machine() == "arm64"


def model_gflops(model: torch.nn.Module) -> float:
    """GFLOP of one image (2 per multiply-add of matmuls, convolutions and attention): from the
    config for the official family (`flops.official_flops`, which the tests check against
    PyTorch's counter), else counted by running it once (`flops.count_flops`)."""
    from crossvit.benchmarks.flops import count_flops, official_flops
    from crossvit.model.official import OfficialConfig

    if isinstance(getattr(model, "config", None), OfficialConfig):
        return official_flops(model.config)["total"] / 1e9
    c, h, w = model.input_shape
    return count_flops(model.eval(), torch.zeros(1, c, h, w)) / 1e9


def gemm_rates(n: int = 2048, seconds: float = 1.0, device: str = "cpu") -> dict[str, float]:
    """Square n x n GEMM rates through each library and precision, in GFLOP/s (best of turns).

    A product this machine runs slowly (torch int8 without VNNI: ~1 GFLOP/s, 13 s a call at n = 2048)
    is measured at the largest size up to n whose call takes at most GEMM_CALL_S (`_fit_size`): a slow
    path is no limit worth minutes. On a GPU: PyTorch's fp32 (TF32 off), tf32, fp16 and bf16 matmuls
    at n = 8192."""
    if device != "cpu":
        return _gpu_gemm_rates(device, seconds)
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)

    def torch_mm(dtype):
        def build(m: int):
            a, b = (torch.from_numpy(rng.standard_normal((m, m), dtype=np.float32)).to(dtype) for _ in range(2))
            return lambda: a @ b
        return build

    def session(op: str, dtype, b_dtype=None):
        def build(m: int):
            graph = helper.make_graph([helper.make_node(op, ["a", "b"], ["y"])], "gemm",
                                      [helper.make_tensor_value_info("a", dtype, [m, m]),
                                       helper.make_tensor_value_info("b", b_dtype or dtype, [m, m])],
                                      [helper.make_tensor_value_info("y", TensorProto.FLOAT if op == "MatMul"
                                                                     else TensorProto.INT32, [m, m])])
            proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
            s = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
            if op == "MatMul":
                inputs = {k: rng.standard_normal((m, m), dtype=np.float32) for k in "ab"}
            else:  # uint8 activations x int8 weights: what int8-cpu's MatMulInteger runs (VNNI's u8 x s8
                # product; u8 x u8 takes a path half as fast on AVX-512 VNNI)
                inputs = {"a": rng.integers(0, 255, (m, m), dtype=np.uint8),
                          "b": rng.integers(-127, 127, (m, m), dtype=np.int8)}
            return lambda: s.run(None, inputs)
        return build

    builders = {"torch fp32": torch_mm(torch.float32)}
    if has_bf16():
        builders["torch bf16"] = torch_mm(torch.bfloat16)
    builders["torch int8"] = lambda m: _int8_matmul(m, "cpu")
    builders["onnxruntime fp32"] = session("MatMul", TensorProto.FLOAT)
    builders["onnxruntime int8"] = session("MatMulInteger", TensorProto.UINT8, TensorProto.INT8)
    fns, sizes = {}, {}
    for key, build in builders.items():
        fitted = _fit_size(build, n)
        if fitted is not None:  # None: no kernel for it here
            fns[key], sizes[key] = fitted
    lat = measure_interleaved(fns, batch=1, runs=10, max_seconds=seconds * 3)
    return {k: 2 * sizes[k] ** 3 / (l.p50_ms / 1000) / 1e9 for k, l in lat.items()}


GEMM_CALL_S = 0.5  # the longest one GEMM call of the CPU rate probes may take


def _fit_size(build: Callable[[int], Callable], n: int, smallest: int = 256) -> tuple[Callable, int] | None:
    """(the product at the largest size m <= n, doubling from `smallest`, whose call is expected to take
    at most GEMM_CALL_S, m), from one timed call at `smallest` (after one untimed call); None when the
    product fails here (a private API, a build without that kernel)."""
    try:
        fn = build(smallest)
        fn()
        start = time.perf_counter()
        fn()
        t = time.perf_counter() - start
    except Exception:
        return None
    m = smallest
    while m * 2 <= n and t * (m * 2 / smallest) ** 3 <= GEMM_CALL_S:
        m *= 2
    return (fn if m == smallest else build(m)), m


def _gpu_gemm_rates(device: str, seconds: float, n: int = 8192) -> dict[str, float]:
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    half, bf = (a.half(), b.half()), (a.bfloat16(), b.bfloat16())

    def tf32(on: bool):
        def f():
            torch.backends.cuda.matmul.allow_tf32 = on
            try:
                return a @ b
            finally:
                torch.backends.cuda.matmul.allow_tf32 = False
        return f

    fns = {"torch fp32": tf32(False), "torch tf32": tf32(True), "torch fp16": lambda: half[0] @ half[1],
           "torch bf16": lambda: bf[0] @ bf[1]}
    _add_if_it_runs(fns, "torch int8", _int8_matmul(n, device), sync=torch.cuda.synchronize)
    _add_if_it_runs(fns, "torch fp8", _fp8_matmul(n, device), sync=torch.cuda.synchronize)
    lat = measure_interleaved(fns, batch=1, runs=20, max_seconds=seconds * 3, sync=torch.cuda.synchronize,
                              clocks={k: CudaEvents() for k in fns})
    return {k: 2 * n**3 / (l.p50_ms / 1000) / 1e9 for k, l in lat.items()}


def _int8_matmul(n: int, device: str) -> Callable[[], torch.Tensor]:
    """PyTorch's int8 x int8 -> int32 matrix product (`torch._int_mm`: oneDNN/VNNI on x86, cuBLASLt
    on a GPU), what a PyTorch int8 backend would run."""
    a = torch.randint(-128, 127, (n, n), dtype=torch.int8, device=device)
    b = torch.randint(-128, 127, (n, n), dtype=torch.int8, device=device)
    return lambda: torch._int_mm(a, b)


def _fp8_matmul(n: int, device: str) -> Callable[[], torch.Tensor]:
    """PyTorch's fp8 (e4m3) matrix product with bf16 output (`torch._scaled_mm`, compute
    capability 8.9+); its second operand column-major, as cuBLASLt wants. With fast accumulation
    (cuBLASLt's faster, less precise fp8 mode), since this rate is the ceiling fp8 rows are held to."""
    def make():
        a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()
        one = torch.ones((), device=device)
        return lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                        use_fast_accum=True)
    try:
        return make()
    except Exception as e:  # no float8 dtype in this torch: the probe in _add_if_it_runs says no
        why = f"no fp8 matmul here: {type(e).__name__}"

        def unavailable():
            raise RuntimeError(why)
        return unavailable


def _add_if_it_runs(fns: dict, key: str, fn: Callable, sync: Callable[[], None] | None = None) -> None:
    """`fns[key] = fn` when one call succeeds: a product this build or device lacks is no rate."""
    try:
        fn()
        if sync is not None:
            sync()
    except Exception:  # no kernel for it here (a private API, hardware without int8 tensor cores)
        return
    fns[key] = fn


def peak_for(precision: str, gemm: dict[str, float]) -> float | None:
    cls = PRECISION_CLASS.get(precision, precision)
    rates = [v for k, v in gemm.items() if k.endswith(" " + cls)]
    return max(rates) if rates else None
