"""OpenVINO on the CPU: our ONNX files read directly by OpenVINO's runtime (no conversion step).

Two kinds of file run here:
- the fp32 reference, with OpenVINO's inference-precision hint `fp32` or `bf16` (bf16 only on a
  CPU with bf16 arithmetic: AVX512-BF16 or AMX). The bf16 hint is a different computation from
  the file's, so a session opened with it reports precision "bf16" and is gated as bf16;
- the int8-ov variant: NNCF post-training quantization of the fp32 file (static scales,
  calibrated on real images), which OpenVINO runs with its int8 kernels (VNNI / AMX), with the
  `fp32` hint for the layers NNCF left in float, or the `bf16` hint (OpenVINO's own default on a
  CPU with bf16 arithmetic): int8 where NNCF quantized, bf16 elsewhere. That one is still an
  int8-ov computation and gated as int8-ov, from a report of its own.

`openvino` is optional and imported here only; nothing else in `runtime/` imports it.
"""

from __future__ import annotations

import base64
import threading

import numpy as np

from crossvit.errors import ArtifactError, BackendUnavailable, BatchSizeRefused
from crossvit.files import first_line
from crossvit.install import pip_install

from .artifact import ArtifactInfo
from .base import Session, intra_op_threads

# file precision -> the inference-precision hints that may run it
HINTS = {"fp32": ("fp32", "bf16"), "int8-ov": ("fp32", "bf16")}
_OV_HINT = {"fp32": "f32", "bf16": "bf16"}

# Every static model a session compiles after its first answers two probe rows (seeded normal
# draws, alternating through the batch) as the first one did, to ROW_TOLERANCE (issue 22's batch
# invariance: relative L2 1e-4 a row); one that does not is compiled again, COMPILE_TRIES times in all.
# The first model is held to the answer the gate's own first model gave (`probe_record`, kept in its
# report) where that was computed the same way: same OpenVINO, CPU fingerprint, hint, threads, batch.
PROBE_SEED = 22
PROBE_ROWS = 2
ROW_TOLERANCE = 1e-4
COMPILE_TRIES = 2
PROBE_FORMAT = 1


def import_openvino():
    try:
        import openvino
    except ImportError:
        raise BackendUnavailable(f"the openvino backend needs OpenVINO: {pip_install('openvino')}") from None
    except Exception as e:  # an install that breaks on import: OpenVINO is not usable here, not a crash
        raise BackendUnavailable(f"OpenVINO is installed but cannot be imported ({type(e).__name__}: "
                                 f"{first_line(e)})") from None
    if not isinstance(getattr(openvino, "__version__", None), str) or not hasattr(openvino, "Core"):
        raise BackendUnavailable(f"the openvino module at {getattr(openvino, '__file__', None)} is not OpenVINO "
                                 f"(no __version__ or Core)")
    return openvino


def openvino_version() -> str | None:
    """The installed OpenVINO's version, or None where none can be used."""
    try:
        return import_openvino().__version__
    except BackendUnavailable:
        return None


_CORE = None
_CORE_LOCK = threading.Lock()


def core():
    """One `openvino.Core` per process (it holds the CPU plugin and its thread pools)."""
    global _CORE
    with _CORE_LOCK:
        if _CORE is None:
            ov = import_openvino()
            try:
                _CORE = ov.Core()
            except Exception as e:
                raise BackendUnavailable(f"OpenVINO cannot start ({type(e).__name__}: {first_line(e)})") from None
        return _CORE


def cpu_capabilities() -> tuple[str, ...]:
    """OpenVINO's own word on what this CPU computes natively (e.g. FP32, BF16, INT8)."""
    try:
        return tuple(core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except BackendUnavailable:
        return ()
    except Exception as e:  # no CPU plugin: OpenVINO runs nothing here
        raise BackendUnavailable(f"OpenVINO has no usable CPU plugin ({type(e).__name__}: {first_line(e)})") from None


def effective_precision(file_precision: str, hint: str | None) -> str:
    """What a session computes in, and is gated as: the bf16 hint on an fp32 file is bf16; on an
    int8-ov file it only moves the layers NNCF left in float to bf16, so that stays int8-ov (whose
    thresholds are the looser ones); otherwise the file's."""
    return "bf16" if hint == "bf16" and file_precision == "fp32" else file_precision


class OpenVinoSession(Session):
    """An ONNX file compiled by OpenVINO for this CPU.

    - `hint`: "fp32" (default) or "bf16" (where the CPU has it: the fp32 file computed in bf16, or
      int8-ov's float layers);
    - the LATENCY performance hint and one stream (below), with all the threads this process may
      use: the same `intra_op_threads` rule as ONNX Runtime;
    - static shapes: a model compiled for each batch size in `static_batch_sizes` (the file's
      minimum, doubled up to its maximum, and the maximum), each on first use, and a batch of
      another size run as chunks of those sizes (7 = 4 + 2 + 1). Static shapes let OpenVINO fuse
      the element-wise operations and quantizers between the matrix products into its own kernels
      (its "Subgraph" nodes), which it does not do for a dynamic batch: on crossvit_15_240's
      int8-ov (2-core AVX-512 VNNI EPYC) 206 fused subgraphs and no free-standing FakeQuantize
      against 25 and 52, 4.6-4.9 % faster at batch 1 (median per-turn ratios over 16 and 30 turns)
      and no different at batch 8; 5.7-7.5 % at batch 1 with the bf16 hint. Every size computed a
      row to the same bits on crossvit_15_240 and crossvit_digits (1, 2, 4, 8 and 16), so a row's
      answer did not depend on its batch-mates or on how a batch was split; not on crossvit_tiny_240
      with the bf16 hint (batch 1 against 2-16: 0.014 fp32 file, 0.052 int8-ov), hence the check below;
    - `static_shapes=False` compiles one dynamic-batch model instead, for fp32 arithmetic only (an
      fp32 file with the fp32 hint: the static function to 2.5e-7; with the bf16 hint 1.8e-2 apart,
      each 1.5e-2 from fp32, so refused as ungated too). OpenVINO 2026.4.1 compiles an int8-ov file
      as one dynamic-batch model into another int8 function than the static shapes the gate
      measured (crossvit_tiny_240: relative L2 0.064 from the static answer unfolded, 0.19 with the
      official family's folded cross-attention, where static is 0.055 from fp32; crossvit_15_240
      folded: 0.26), so an int8-ov file with it is refused (cpu_path/dynamic_int8/);
    - every static model compiled after the first is checked before use: two probe rows must get the
      first model's answers (relative L2 1e-4 a row) in every position of its batch, or it is
      compiled again, and after COMPILE_TRIES the session refuses the batch size (BatchSizeRefused).
      OpenVINO 2026.4.1 has compiled int8-ov into wrong answers at random (two streams: 16 of 48
      compiles, relative L2 0.2-0.9; one stream, what runs here: 0 of 34; cpu_path/streams/), and
      the gate ran in another process, so what a session serves is checked where it is compiled.
      The first model is held to `yardstick`, the gate's own first model's answer (`probe_record`,
      kept in its report; `session.open_session` finds it beside the file), where that was computed
      the same way (OpenVINO version, CPU fingerprint, hint, threads, batch size: a fresh process
      gave the gate's bits in every case tried, other threads another function); otherwise to itself,
      and `self.yardstick` says why. So a session that only ever compiles one size is checked too
      (cpu_path/batch_probe/);
    - one infer request per compiled model, used under a lock (a request is not thread-safe; the
      server calls from one batching thread anyway).
    """

    backend = "openvino"

    def __init__(self, info: ArtifactInfo, device: str = "auto", *, hint: str | None = None,
                 threads: int | None = None, spin: bool = True, static_shapes: bool = True,
                 yardstick: dict | None = None):
        super().__init__(info)
        if device not in ("auto", "cpu"):
            raise BackendUnavailable(f"the openvino backend runs on the CPU here, not on {device!r}")
        hint = hint or "fp32"
        allowed = HINTS.get(info.precision)
        if allowed is None:
            raise ArtifactError(f"{info.path.name}: the openvino backend runs fp32 and int8-ov files, "
                                f"not {info.precision} (that one is for "
                                f"{'ONNX Runtime' if info.precision == 'int8-cpu' else 'TensorRT'})")
        if not static_shapes and info.precision != "fp32":
            raise ArtifactError(f"{info.path.name}: a {info.precision} file runs with static shapes only "
                                "(OpenVINO compiles it as one dynamic-batch model into another int8 "
                                "function than the one the gate measured)")
        if not static_shapes and hint != "fp32":
            raise ArtifactError(f"{info.path.name}: the {hint} hint runs with static shapes only (the gate "
                                "measured those; one dynamic-batch model rounds differently)")
        if hint not in allowed:
            raise ArtifactError(f"{info.path.name}: a {info.precision} file runs with the "
                                f"{' or '.join(allowed)} hint, not {hint}")
        if hint == "bf16":
            core()  # no usable OpenVINO is said as such, not as a CPU without bf16
        if hint == "bf16" and "BF16" not in cpu_capabilities():
            raise BackendUnavailable("this CPU has no bf16 arithmetic (OpenVINO lists "
                                     f"{', '.join(cpu_capabilities()) or 'nothing'}): the bf16 hint needs "
                                     "AVX512-BF16 or AMX")
        # One stream, said outright rather than left to the LATENCY hint: OpenVINO 2026.4.1 compiles
        # crossvit_15_240's int8-ov with two streams into a model that answers wrongly in about a
        # third of compiles (relative L2 0.21-0.88 from the one-stream answer; 2-core AVX-512 EPYC,
        # benchmarks/results/cpu_epyc_2core/cpu_path/streams/), where one stream never did.
        config = {"INFERENCE_PRECISION_HINT": _OV_HINT[hint], "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        threads = threads or intra_op_threads()
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self._config = config
        self._sizes = static_batch_sizes(info.batch_min, info.batch_max) if static_shapes else ()
        self._requests: dict | None = {}  # batch size (None: dynamic) -> its infer request
        self._probe_answer: np.ndarray | None = None  # the first static model's answer to the probe rows
        self._probe_key: dict | None = None  # how that answer was computed (probe_record)
        self._yardstick = yardstick if static_shapes else None  # the gate's probe_record, checked at the first compile
        self.yardstick: str | None = None  # what the first model was held to: the gate's answer, or why not
        self.hint = hint
        self._lock = threading.Lock()
        try:
            self._model = core().read_model(str(info.path))
        except BackendUnavailable:
            raise
        except Exception as e:
            raise ArtifactError(f"{info.path}: OpenVINO cannot read it ({first_line(e)})") from None
        self._request_for(self._sizes[0] if self._sizes else None)  # a file that cannot compile fails here
        self.precision = effective_precision(info.precision, hint)

    def describe(self) -> str:
        hint = f", {self.hint} hint" if self.info.precision == "fp32" or self.hint != "fp32" else ""
        shapes = "static shapes" if self._sizes else "dynamic batch"
        return f"openvino (cpu, {self.info.precision} file{hint}, {shapes})"

    @property
    def compiled_batch_sizes(self) -> tuple:
        """The batch sizes compiled so far (None: the dynamic-batch model)."""
        with self._lock:
            return tuple(sorted(self._requests or {}, key=lambda n: -1 if n is None else n))

    def prepare(self, max_batch: int) -> str | None:
        """Compile the model of every static batch size a batch of up to `max_batch` rows is split
        into (crossvit_15_240's int8-ov: 1.2-2 s each), so that no request waits for one."""
        if not self._sizes:
            return None
        import time

        start = time.perf_counter()
        with self._lock:
            if self._requests is None:
                raise ArtifactError(f"session for {self.info.path.name} is closed")
            sizes = [n for n in self._sizes if n <= max_batch] or [self._sizes[0]]
            for n in sizes:
                self._request_for(n)
        return (f"OpenVINO models compiled for batch sizes {', '.join(map(str, sizes))} "
                f"({time.perf_counter() - start:.1f} s)")

    def _request_for(self, size: int | None):
        """The infer request of the model compiled for `size` rows (None: a dynamic batch), compiled
        on first use. Called with the lock held, or before the session is shared."""
        request = self._requests.get(size)
        if request is None:
            model = self._model
            if size is not None:
                model = model.clone()
                model.reshape({0: [size, *self.info.input_shape]})
            for _ in range(COMPILE_TRIES):
                try:
                    request = core().compile_model(model, "CPU", self._config).create_infer_request()
                except Exception as e:
                    rows = f" for batch {size}" if size is not None else ""
                    raise ArtifactError(f"{self.info.path}: OpenVINO cannot compile it{rows} "
                                        f"({first_line(e)})") from None
                if size is None:
                    break
                if self._probe_answer is None and self._yardstick is not None:
                    self._hold_to_gate(request, size)
                worst, answer = self._probe_check(request, size)
                if worst <= ROW_TOLERANCE:
                    if self._probe_answer is None:
                        self._probe_key = self._key(request, size)
                    self._probe_answer = answer
                    break
            else:
                first = [n for n in self._requests if n is not None]
                than = (f"batch {first[0]}'s" if first else
                        "the answer its gate recorded" if self.yardstick == GATE_ANSWER else "its other rows'")
                raise BatchSizeRefused(f"{self.info.path.name}: OpenVINO compiled it for batch {size} into a "
                                       f"model that answers a row differently from {than} (relative L2 "
                                       f"{worst:.2g}, over {ROW_TOLERANCE:g}), {COMPILE_TRIES} times: refused")
            self._requests[size] = request
        return request

    def _key(self, request, size: int) -> dict:
        """How a probe answer of the `size`-row model is computed: what must match for two to agree."""
        from .cpu_choice import cpu_fingerprint

        threads = int(request.get_compiled_model().get_property("INFERENCE_NUM_THREADS"))
        return {"format": PROBE_FORMAT, "seed": PROBE_SEED, "rows": PROBE_ROWS, "batch": size, "hint": self.hint,
                "threads": threads, "openvino": openvino_version(), "cpu": cpu_fingerprint()}

    def _hold_to_gate(self, request, size: int) -> None:
        """Take the gate's probe answer as the yardstick of the first model when it was computed the
        same way as this one; otherwise say why not in `self.yardstick` (the first model is then its own)."""
        why = probe_problem(self._yardstick, self._key(request, size))
        answer = decode_answer(self._yardstick) if why is None else None
        if answer is not None and answer.shape != (PROBE_ROWS, len(self.info.labels)):
            why = f"its probe answer is not {PROBE_ROWS} rows of {len(self.info.labels)} logits"
        if why is None:
            self._probe_answer = answer
            self.yardstick = GATE_ANSWER
        else:
            self.yardstick = f"the gate's answer was not used: {why}"

    def probe_record(self) -> dict | None:
        """The first static model's answer to the probe rows and how it was computed, for the gate's
        report (None for a dynamic batch): a later session on this machine holds its first model to it."""
        with self._lock:
            sizes = [n for n in (self._requests or {}) if n is not None]
            if not sizes or self._probe_answer is None:
                return None
            key = self._probe_key or self._key(self._requests[sizes[0]], sizes[0])
            answer = np.ascontiguousarray(self._probe_answer, dtype="<f4")
            return {**key, "shape": list(answer.shape), "answer": base64.b64encode(answer.tobytes()).decode("ascii")}

    def _probe_check(self, request, size: int) -> tuple[float, np.ndarray]:
        """The worst relative L2 of a probe row, in any position of the `size`-row model's batch, from
        the first model's answer (or, for the first model, from its own answer in the first
        positions), and that yardstick answer."""
        probe = np.random.default_rng(PROBE_SEED).standard_normal((PROBE_ROWS, *self.info.input_shape),
                                                                  dtype=np.float32)
        rows = np.arange(max(size, PROBE_ROWS)) % PROBE_ROWS  # which probe row sits in each position
        x = probe[rows]
        out = np.concatenate([np.array(request.infer({0: x[i:i + size]})[0], dtype=np.float32, copy=True)
                              for i in range(0, len(x), size)])
        answer = out[:PROBE_ROWS] if self._probe_answer is None else self._probe_answer
        want = answer[rows]
        err = np.linalg.norm(out - want, axis=1) / np.maximum(np.linalg.norm(want, axis=1), 1e-12)
        return (float(err.max()) if np.isfinite(err).all() else float("inf")), answer

    def _run(self, x: np.ndarray) -> np.ndarray:
        with self._lock:
            if self._requests is None:
                raise ArtifactError(f"session for {self.info.path.name} is closed")
            if not self._sizes:
                out = self._request_for(None).infer({0: x}, share_inputs=True)
                return np.array(out[0], dtype=np.float32, copy=True)
            outs, start = [], 0
            for size in split_batch(len(x), self._sizes):
                chunk = x[start:start + size]
                k = len(chunk)
                if k < size:  # only the last chunk, under the file's minimum: pad it, drop the padding
                    chunk = np.concatenate([chunk, np.zeros((size - k, *chunk.shape[1:]), np.float32)])
                out = self._request_for(size).infer({0: np.ascontiguousarray(chunk)}, share_inputs=True)
                outs.append(np.array(out[0][:k], dtype=np.float32, copy=True))
                start += k
            return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def close(self) -> None:
        with getattr(self, "_lock", threading.Lock()):
            self._requests = self._model = None
        super().close()


GATE_ANSWER = "the answer its gate recorded"


def probe_problem(record, key: dict) -> str | None:
    """None when a gate's `probe_record` was computed as a session's first model computes (`key`);
    otherwise how they differ, in a few words."""
    if not isinstance(record, dict) or record.get("format") != PROBE_FORMAT:
        return "its gate report has no probe answer (gated before crossvit recorded one)"
    said = {"openvino": "OpenVINO", "cpu": "CPU", "threads": "threads", "hint": "hint", "batch": "first batch size",
            "seed": "probe seed", "rows": "probe rows"}
    differ = [f"{said[k]} {_short(record.get(k))} there, {_short(v)} here" for k, v in key.items()
              if k in said and record.get(k) != v]
    if differ:
        return "computed another way (" + "; ".join(differ) + ")"
    try:
        answer = decode_answer(record)
    except ValueError as e:
        return f"its probe answer cannot be read ({e})"
    if not np.isfinite(answer).all():
        return "its probe answer is not finite"
    return None


def _short(v) -> str:
    if isinstance(v, dict):  # a CPU fingerprint
        from .cpu_choice import describe_fingerprint

        return describe_fingerprint(v)
    return str(v)[:80]


def decode_answer(record: dict) -> np.ndarray:
    """A `probe_record`'s answer as float32 rows; ValueError when it is not one."""
    try:
        shape = tuple(int(n) for n in record["shape"])
        answer = np.frombuffer(base64.b64decode(record["answer"], validate=True), dtype="<f4")
        return answer.reshape(shape).astype(np.float32)
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"not a probe answer: {type(e).__name__}") from None


def static_batch_sizes(lo: int, hi: int) -> tuple[int, ...]:
    """The batch sizes a session compiles static models for: `lo`, doubled while within `hi`, and `hi`
    (1..16 -> 1, 2, 4, 8, 16; 1..12 -> 1, 2, 4, 8, 12)."""
    sizes, n = [], lo
    while n < hi:
        sizes.append(n)
        n *= 2
    return (*sizes, hi)


def split_batch(n: int, sizes: tuple[int, ...]) -> list[int]:
    """`n` rows as chunks of `sizes`, largest first (7 with 1, 2, 4, 8 -> 4, 2, 1); a rest under the
    smallest size is one chunk of that size, padded by the caller."""
    chunks = []
    while n > 0:
        size = next((s for s in reversed(sizes) if s <= n), sizes[0])
        chunks.append(size)
        n -= size
    return chunks
