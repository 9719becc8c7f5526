"""The parity gate: does an artifact compute the same function as its PyTorch reference?

Each artifact runs through `crossvit.runtime`'s own session (the code that will serve it)
on fresh random inputs for several batch sizes and on real images, next to the fp32 PyTorch
reference. Thresholds depend on the precision; flags may tighten them, never loosen them.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from crossvit.assets import heldout_images
from crossvit.contract import Thresholds, get_precision, to_json
from crossvit.errors import BatchSizeRefused, ConfigError, CrossViTError, ParityFailure
from crossvit.files import atomic_write, first_line, sha256_file
from crossvit.model.checkpoint import LoadedModel
from crossvit.runtime.artifact import read_artifact
from crossvit.runtime.images import ImageSet, iter_image_set, list_images
from crossvit.runtime.openvino import effective_precision
from crossvit.runtime.session import AUTO_BACKEND, artifact_kind, open_session


@dataclass
class CaseResult:
    source: str  # "random" or "images"
    batch_size: int
    n: int
    max_abs: float
    max_rel: float
    rel_l2: float
    cosine: float
    top1_agreement: float
    top5_agreement: float
    accuracy_reference: float | None = None  # percent, labelled images only
    accuracy_artifact: float | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass
class ParityReport:
    artifact: str
    reference: str
    precision: str
    backend: str
    thresholds: dict
    cases: list[CaseResult] = field(default_factory=list)
    not_run: str | None = None  # why the backend could not run the artifact at all
    image_errors: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    artifact_sha256: str = ""  # the file judged: a report is about these bytes only
    gate: str = ""  # which gate judged it, when not the precision's usual one
    environment: dict = field(default_factory=lambda: environment())  # what computed both sides
    probe: dict | None = None  # OpenVINO: its first model's answer to the probe rows (a later session's yardstick)

    @property
    def verdict(self) -> str:
        if self.not_run:
            return "not run"
        return "pass" if self.cases and all(c.passed for c in self.cases) else "fail"

    def __bool__(self) -> bool:
        return self.verdict == "pass"

    @property
    def accuracy(self) -> tuple[float | None, float | None]:
        """(reference, artifact) top-1 accuracy on the labelled images, percent."""
        for c in self.cases:
            if c.accuracy_reference is not None:
                return c.accuracy_reference, c.accuracy_artifact
        return None, None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["verdict"] = self.verdict
        for c, case in zip(d["cases"], self.cases):
            c["passed"] = case.passed
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ParityReport":
        """A saved report (`save`), read back; a report that is not one of ours (a field missing, or of
        another type than `save` writes) is a ValueError."""
        try:
            names = {f.name for f in dataclasses.fields(CaseResult)}
            cases = [CaseResult(**{k: v for k, v in c.items() if k in names}) for c in d.get("cases") or []]
            fields = {f.name for f in dataclasses.fields(cls)} - {"cases"}
            report = cls(**{k: v for k, v in d.items() if k in fields}, cases=cases)
        except (TypeError, AttributeError) as e:
            raise ValueError(f"not a parity report: {e}") from None
        wrong = report._wrong_field()
        if wrong:
            raise ValueError(f"not a parity report: {wrong}")
        return report

    def _wrong_field(self) -> str | None:
        """The first field whose type is not what `save` writes, in a few words; None when all are."""
        def kind(value, *types) -> bool:
            if value is None:
                return None in types
            return isinstance(value, tuple(t for t in types if t is not None)) and not isinstance(value, bool)

        checks = [(k, kind(getattr(self, k), str)) for k in ("artifact", "reference", "precision", "backend",
                                                               "artifact_sha256", "gate")]
        checks += [("not_run", kind(self.not_run, str, None)), ("thresholds", kind(self.thresholds, dict)),
                   ("environment", kind(self.environment, dict)), ("probe", kind(self.probe, dict, None)),
                   ("seconds", kind(self.seconds, int, float)), ("image_errors", kind(self.image_errors, list))]
        for i, c in enumerate(self.cases):
            checks += [(f"cases[{i}].source", kind(c.source, str)), (f"cases[{i}].failures", kind(c.failures, list)
                                                                     and all(isinstance(f, str) for f in c.failures))]
            checks += [(f"cases[{i}].{k}", kind(getattr(c, k), int)) for k in ("batch_size", "n")]
            checks += [(f"cases[{i}].{k}", kind(getattr(c, k), int, float, None)) for k in
                       ("max_abs", "max_rel", "rel_l2", "cosine", "top1_agreement", "top5_agreement",
                        "accuracy_reference", "accuracy_artifact")]
        return next((f"{name} is not what crossvit writes" for name, ok in checks if not ok), None)

    def save(self, path: str | Path) -> Path:
        text = to_json(self.to_dict(), indent=2)
        return atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))

    def table(self) -> str:
        head = f"{'source':<8} {'batch':>5} {'n':>4} {'max abs':>9} {'max rel':>9} {'rel L2':>9} " \
               f"{'cosine':>9} {'top1':>7} {'top5':>7} {'acc ref':>8} {'acc art':>8}  result"
        lines = [f"parity: {self.artifact} ({self.precision}, {self.backend}) vs {self.reference}"
                 + (f" ({self.gate})" if self.gate else ""), head]
        for c in self.cases:
            acc = lambda v: f"{v:7.2f}%" if v is not None else f"{'-':>8}"
            lines.append(
                f"{c.source:<8} {c.batch_size:>5} {c.n:>4} {c.max_abs:9.2e} {c.max_rel:9.2e} {c.rel_l2:9.2e} "
                f"{c.cosine:9.6f} {c.top1_agreement:7.2%} {c.top5_agreement:7.2%} {acc(c.accuracy_reference)} "
                f"{acc(c.accuracy_artifact)}  {'ok' if c.passed else 'FAIL: ' + '; '.join(c.failures)}")
        if self.not_run:
            lines.append(f"NOT RUN: {self.not_run}")
        for f, e in self.image_errors[:5]:
            lines.append(f"skipped image: {e}")
        lines.append(f"verdict: {self.verdict.upper()}")
        return "\n".join(lines)


def compare(ref: np.ndarray, out: np.ndarray, k: int = 5) -> dict:
    """Error and agreement measures of `out` against `ref` (both N x classes)."""
    ref = ref.astype(np.float64)
    out = out.astype(np.float64)
    diff = np.abs(out - ref)
    k = min(k, ref.shape[1])
    top_ref = np.argsort(-ref, axis=1, kind="stable")[:, :k]
    top_out = np.argsort(-out, axis=1, kind="stable")[:, :k]
    overlap = [len(set(a) & set(b)) / k for a, b in zip(top_ref, top_out)]
    denom = np.linalg.norm(ref) * np.linalg.norm(out)
    return {
        "max_abs": float(diff.max()),
        "max_rel": float((diff / np.maximum(np.abs(ref), 1e-12)).max()),  # Polygraphy's definition
        "rel_l2": float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-12)),
        "cosine": float((ref * out).sum() / denom) if denom > 0 else float("nan"),
        "top1_agreement": float((top_ref[:, 0] == top_out[:, 0]).mean()),
        "top5_agreement": float(np.mean(overlap)),  # mean overlap of the two top-k sets
    }


def _gate(case: CaseResult, t: Thresholds) -> None:
    if not all(math.isfinite(v) for v in (case.max_abs, case.rel_l2)):
        case.failures.append("non-finite outputs")
        return
    if t.max_abs is not None and case.max_abs > t.max_abs:
        case.failures.append(f"max abs {case.max_abs:.2e} > {t.max_abs:.0e}")
    if t.rel_l2 is not None and case.rel_l2 > t.rel_l2:
        case.failures.append(f"rel L2 {case.rel_l2:.2e} > {t.rel_l2:.0e}")
    if t.cosine is not None and not case.cosine >= t.cosine:
        case.failures.append(f"cosine {case.cosine:.6f} < {t.cosine}")
    if t.top1_agreement is not None and case.source in t.agreement_sources \
            and case.top1_agreement < t.top1_agreement:
        case.failures.append(f"top-1 agreement {case.top1_agreement:.2%} < {t.top1_agreement:.0%}")
    if t.accuracy_drop is not None and case.accuracy_reference is not None:
        drop = case.accuracy_reference - case.accuracy_artifact
        if drop > t.accuracy_drop:
            case.failures.append(f"accuracy drop {drop:.2f} points > {t.accuracy_drop}")


def _reference_logits(model: torch.nn.Module, x: np.ndarray, batch_size: int) -> np.ndarray:
    outs = []
    with torch.inference_mode():
        for s in range(0, len(x), batch_size):
            outs.append(model(torch.from_numpy(x[s:s + batch_size])).float().numpy())
    return np.concatenate(outs)


def environment() -> dict:
    """The versions and platform a report's numbers come from (kernels differ between them)."""
    import platform

    import onnxruntime

    from crossvit import __version__
    from crossvit.runtime.cpu_choice import cpu_fingerprint
    from crossvit.runtime.openvino import openvino_version

    return {"crossvit": __version__, "onnxruntime": onnxruntime.__version__, "openvino": openvino_version(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "machine": platform.processor() or platform.machine(), "cpu": cpu_fingerprint()}


def real_image_case(model: torch.nn.Module, run: Callable[[np.ndarray], np.ndarray], preprocessor,
                    labels, images: str | Path | None = None, *, batch: int = 32,
                    say: Callable[[str], None] | None = None) -> tuple[CaseResult, list]:
    """The real-image case of the gate: the folder (default: the shipped held-out images) through
    `preprocessor`, the reference `model` and `run` (the artifact's session, or any other way to
    compute the logits, such as PyTorch under autocast) in pieces of `batch`; the two compared, and
    top-1 accuracy of both where the images are labelled with `labels`. Returns (case, the images
    that could not be read, with why)."""
    folder = Path(images) if images else heldout_images()
    image_set: ImageSet = list_images(folder)
    (say or (lambda m: None))(f"real images: {len(image_set)} from {folder}")
    refs, outs, kept, bad = [], [], [], []  # in pieces: a large folder is never one array of images
    for x, good, errors in iter_image_set(image_set, preprocessor):
        bad += errors
        if len(x):
            refs.append(_reference_logits(model, x, batch))
            outs.append(np.asarray(run(x), dtype=np.float32))
            kept += good
    ref, out = np.concatenate(refs), np.concatenate(outs)
    case = CaseResult(source="images", batch_size=batch, n=len(ref), **compare(ref, out))
    names = list(labels)
    if image_set.labels is not None and all(image_set.labels[i] in names for i in kept):
        truth = np.array([names.index(image_set.labels[i]) for i in kept])
        case.accuracy_reference = float((ref.argmax(1) == truth).mean() * 100)
        case.accuracy_artifact = float((out.argmax(1) == truth).mean() * 100)
    return case, bad


def gate_thresholds(precision: str, random_weights: bool) -> Thresholds:
    """The gate of a precision: today's for a trained model; for one with random weights (top-1
    agreement of near-tied logits says nothing) rel L2 and cosine on every case instead."""
    spec = get_precision(precision)
    return spec.random_weights if random_weights else spec.thresholds


RANDOM_WEIGHTS_GATE = "random weights: judged by rel L2 and cosine, not top-1 agreement"


def check_parity(artifact: str | Path, reference: LoadedModel, *, images: str | Path | None = None,
                 batch_sizes: list[int] | None = None, thresholds: Thresholds | None = None,
                 seed: int | None = None, progress: Callable[[str], None] | None = None,
                 backend: str | None = None, hint: str | None = None) -> ParityReport:
    """Run the gate; returns the report (check `bool(report)`).

    The artifact runs through the session that would serve it: ONNX Runtime on the CPU for an
    .onnx (OpenVINO for an int8-ov file), TensorRT for a .plan (never a fallback: the gate judges
    the file it was given), or `backend` when given. `hint` is OpenVINO's inference precision
    ("bf16" computes an fp32 file in bf16: it is gated as bf16; on an int8-ov file only the layers
    NNCF left in float: still int8-ov). A model with random weights (its metadata says so) is gated
    by `gate_thresholds(precision, random_weights=True)`.
    """
    say = progress or (lambda m: None)
    start = time.perf_counter()
    info = read_artifact(artifact)
    if images is not None:
        list_images(images)  # a missing or empty folder is said now, not after the random cases
    expected = tuple(reference.info.preprocessing["input_size"])
    if info.input_shape != expected or len(info.labels) != len(reference.info.labels):
        raise ConfigError(f"{Path(artifact).name} takes {info.input_shape} and has {len(info.labels)} classes; "
                          f"the reference takes {expected} with {len(reference.info.labels)}: not the same model")
    precision = effective_precision(info.precision, hint)
    random_weights = info.random_weights or reference.info.random_weights
    t = thresholds or gate_thresholds(precision, random_weights)
    kind = artifact_kind(Path(artifact))
    backend = backend or (get_precision(info.precision).runtime if kind == "onnx" else AUTO_BACKEND[kind])
    library = (info.raw.get("tensorrt") or {}).get("library") if kind == "engine" else None
    report = ParityReport(artifact=str(artifact), reference=str(reference.source or reference.info.name),
                          precision=precision, backend=(library if library == "tensorrt-rtx" else backend)
                          + (f" ({hint} hint)" if hint else ""),  # session.describe() replaces it once open
                          thresholds=dataclasses.asdict(t), artifact_sha256=sha256_file(artifact),
                          gate=RANDOM_WEIGHTS_GATE if random_weights else "")
    sizes = batch_sizes or sorted({1, 2, 7, info.batch_max})
    bad = [b for b in sizes if b < 1]
    if bad:
        raise ConfigError(f"batch sizes must be >= 1, got {bad}")
    rng = np.random.default_rng(seed)
    model = reference.model.eval()
    try:
        options = {"hint": hint} if hint else {}
        if backend == "openvino":
            options["yardstick"] = None  # the gate measures what it compiles now, not against an earlier report
        session = open_session(artifact, backend=backend, device="cpu" if kind == "onnx" else "auto", **options)
    except CrossViTError as e:
        report.not_run = str(e)
        return report
    report.backend = session.describe()
    with session:
        try:
            # every model the session would compile, now: OpenVINO's refuses a batch size whose model
            # answers a row differently from its first (a row's answer would depend on its batch-mates)
            session.prepare(info.batch_max)
        except BatchSizeRefused as e:
            report.not_run = str(e)
            report.seconds = time.perf_counter() - start
            return report
        probe_record = getattr(session, "probe_record", None)
        report.probe = probe_record() if probe_record else None
        try:
            for b in sizes:
                say(f"random inputs, batch {b}")
                x = rng.standard_normal((b, *info.input_shape), dtype=np.float32)
                ref, out = _reference_logits(model, x, b), session.infer(x)
                case = CaseResult(source="random", batch_size=b, n=b, **compare(ref, out))
                _gate(case, t)
                report.cases.append(case)
            case, errors = real_image_case(model, session.infer, session.preprocessor, info.labels, images,
                                           batch=min(info.batch_max, 32), say=say)
            report.image_errors += errors
            _gate(case, t)
            report.cases.append(case)
        except CrossViTError:
            raise
        except Exception as e:  # the backend could not execute the graph (e.g. fp8 on CPU)
            report.not_run = f"{report.backend} cannot run this {info.precision} artifact: {first_line(e)}"
    report.seconds = time.perf_counter() - start
    return report


def reference_problem(fp32: str | Path, reference: LoadedModel, rows: int = 2, seed: int = 0) -> str | None:
    """None when `reference` computes what the fp32 ONNX computes (a few seeded random rows through
    both, judged by the fp32 gate's thresholds), else how far apart they are: a gate against another
    model would judge nothing."""
    info = read_artifact(fp32)
    x = np.random.default_rng(seed).standard_normal((rows, *info.input_shape), dtype=np.float32)
    with open_session(fp32, backend="onnxruntime", device="cpu") as session:
        out = session.infer(x)
    ref = _reference_logits(reference.model.eval(), x, rows)
    if ref.shape != out.shape:
        return f"it has {ref.shape[1]} classes, {Path(fp32).name} {out.shape[1]}"
    case = CaseResult(source="random", batch_size=rows, n=rows, **compare(ref, out))
    _gate(case, gate_thresholds("fp32", info.random_weights or reference.info.random_weights))
    return "; ".join(case.failures) or None


def require_pass(report: ParityReport) -> None:
    if not report:
        raise ParityFailure(f"parity {report.verdict}: {report.artifact}")
