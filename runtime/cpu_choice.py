"""Which CPU path runs an fp32 ONNX: the candidates, their gates, and the choice per machine.

A *candidate* is one way to compute the model on a CPU: a file beside the fp32 reference, the
backend that runs it and, for OpenVINO, an inference-precision hint:

    fp32      onnxruntime          the reference
    fp32      openvino (fp32)      OpenVINO's own kernels
    fp32      openvino (bf16)      computed in bf16 (CPUs with AVX512-BF16 or AMX): gated as bf16
    int8-cpu  onnxruntime          dynamic int8 (ONNX Runtime); run one row at a time, because its
                                   per-call scales make a row's answer depend on its batch-mates
    int8-ov   openvino (fp32)      static int8 (NNCF post-training quantization), float layers in fp32
    int8-ov   openvino (bf16)      the same file with its float layers in bf16 (OpenVINO's own default
                                   on CPUs with bf16 arithmetic): gated as int8-ov, in a report of its own

A candidate may run for users only after its parity gate passed on these very bytes: its report
beside the file (`gate_report_path`) says "pass" about the file's sha256, for the precision the
candidate computes in. `crossvit deploy` times every gated candidate on the machine it runs on
and records the fastest in `NAME.cpu.json` with the machine's CPU fingerprint
(`cpu_fingerprint`). `open_session(backend="auto")` runs the recorded choice where the
fingerprint matches; on another CPU (or with no record) it applies `rule_for_flags`, and says so.
Nothing here imports torch.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from crossvit.contract import PRECISION_TABLE
from crossvit.errors import ArtifactError, BackendUnavailable, CrossViTError
from crossvit.files import check_input_file, sha256_file

from .artifact import read_artifact

log = logging.getLogger("crossvit.runtime")

CHOICE_FORMAT = 1
MAX_JSON_BYTES = 16 << 20  # a report or a choice record is a few kB; more is not one of ours
# The CPU flags that change which path is fastest (and what `crossvit bench` records).
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_bf16",
               "amx_int8", "amx_tile")


# -- the machine -------------------------------------------------------------------------------

def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_model() -> str | None:
    return next((l.split(":", 1)[1].strip() for l in _cpuinfo().splitlines() if l.startswith("model name")), None)


def cpu_flags() -> set[str]:
    """The CPU's flags from /proc/cpuinfo: x86's "flags", Arm's "Features" (empty where there is none)."""
    line = next((l for l in _cpuinfo().splitlines() if l.startswith(("flags", "Features"))), "")
    return set(line.split(":", 1)[-1].split())


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_fingerprint() -> dict:
    """What makes one CPU path faster than another: the model, the cores this process may use and
    the speed flags. Two machines with equal fingerprints get the same choice."""
    return {"cpu_model": cpu_model(), "cores": usable_cores(), "flags": sorted(set(SPEED_FLAGS) & cpu_flags())}


def describe_fingerprint(fp: dict) -> str:
    """A fingerprint in words (one read from a file may hold anything: it is said as it is)."""
    if not isinstance(fp, dict):
        return str(fp)[:80]
    flags = fp.get("flags") or []
    flags = " ".join(map(str, flags)) if isinstance(flags, (list, tuple)) else str(flags)
    return f"{str(fp.get('cpu_model') or 'unknown CPU')[:80]}, {fp.get('cores')} cores, {flags[:200] or 'no speed flags'}"


# -- the candidates ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    file: str  # a file name beside the fp32 reference
    backend: str  # "onnxruntime" or "openvino"
    precision: str  # what it computes in, and is gated as
    hint: str | None = None  # OpenVINO's inference precision: for an fp32 file, or int8-ov's float layers

    @property
    def label(self) -> str:
        engine = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}[self.backend]
        hint = f" with the {self.hint} hint" if self.hint and self.hint != self.precision else ""
        return f"{engine} {self.precision}{hint} ({self.file})"

    @property
    def key(self) -> tuple[str, str, str | None]:
        """(backend, precision, hint): what RULES name."""
        return self.backend, self.precision, self.hint

    @property
    def options(self) -> dict:
        return {"hint": self.hint} if self.hint else {}

    def to_dict(self) -> dict:
        return asdict(self)


def file_precision(name: str) -> str | None:
    """`NAME.int8-ov.onnx` -> "int8-ov" (the precision a file's name says; its metadata decides)."""
    parts = name.split(".")
    return parts[-2] if len(parts) >= 3 and parts[-2] in PRECISION_TABLE else None


def candidates_for(fp32: Path) -> list[Candidate]:
    """Every CPU candidate whose file is beside `fp32` (gated or not), the reference first."""
    stem = fp32.name[:-len(".fp32.onnx")] if fp32.name.endswith(".fp32.onnx") else fp32.stem
    out = [Candidate(fp32.name, "onnxruntime", "fp32"), Candidate(fp32.name, "openvino", "fp32", "fp32"),
           Candidate(fp32.name, "openvino", "bf16", "bf16")]
    for name, spec in PRECISION_TABLE.items():
        if spec.target == "cpu" and (fp32.parent / f"{stem}.{name}.onnx").is_file():
            out.append(Candidate(f"{stem}.{name}.onnx", spec.runtime, name))
            if name == "int8-ov":
                out.append(Candidate(f"{stem}.{name}.onnx", spec.runtime, name, "bf16"))
    return out


def gate_report_path(folder: Path, candidate: Candidate) -> Path:
    """`NAME.int8-ov.parity.json` for a file run by its own backend as it is; otherwise the backend
    and hint in the name: `NAME.fp32.openvino-bf16.parity.json`, `NAME.int8-ov.openvino-bf16.parity.json`."""
    stem = Path(candidate.file).stem
    spec = PRECISION_TABLE.get(file_precision(candidate.file) or "", None)
    if candidate.hint is None and spec is not None and spec.runtime == candidate.backend:
        return folder / f"{stem}.parity.json"
    return folder / f"{stem}.{candidate.backend}-{candidate.hint or candidate.precision}.parity.json"


def _read_json(path: Path) -> dict | None:
    try:
        check_input_file(path, ArtifactError)  # a FIFO would hang this, /dev/zero fill memory
        if path.stat().st_size > MAX_JSON_BYTES:
            return None
        data = json.loads(path.read_text())
    except (CrossViTError, OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


class FileHashes:
    """sha256 of each file, computed once per lookup."""

    def __init__(self):
        self._seen: dict[Path, str] = {}

    def __call__(self, path: Path) -> str:
        if path not in self._seen:
            self._seen[path] = sha256_file(path)
        return self._seen[path]


def gate_problem(fp32: Path, candidate: Candidate, sha=None) -> str | None:
    """None when the candidate's report beside it passed for these bytes and this precision, and a
    variant was made from this very fp32 file (its metadata names it, with the same sha256);
    otherwise what is wrong, in a few words."""
    sha = sha or FileHashes()
    path = fp32.parent / candidate.file
    report_path = gate_report_path(fp32.parent, candidate)
    if not report_path.exists():
        return f"no gate report beside it ({report_path.name})"
    report, wrong = _read_report(report_path, candidate)
    if wrong:
        return wrong
    try:
        if path != fp32:
            info = read_artifact(path)
            source = info.raw.get("source") or {}
            if not isinstance(source, dict) or source.get("onnx") != fp32.name:
                return f"it was not made from {fp32.name}"
            if source.get("sha256") != sha(fp32):
                return f"it was made from another {fp32.name} (that file changed since)"
        if report.get("artifact_sha256") != sha(path):
            return "the file changed after its gate"
    except (CrossViTError, OSError) as e:
        return f"it cannot be read ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})"
    return None


def _read_report(report_path: Path, candidate: Candidate) -> tuple[dict | None, str | None]:
    """The gate report at `report_path` and, where it does not vouch for `candidate` (bytes apart:
    `_report_problem`), why, in a few words."""
    report = _read_json(report_path)
    if report is None:
        return None, f"its gate report {report_path.name} is not one of ours"
    wrong = _report_problem(report, candidate)
    if wrong and not wrong.startswith("its gate"):
        wrong = f"its gate report {report_path.name} {wrong}"
    return report, wrong


_HINT = re.compile(r"\b(fp32|bf16|f16) hint\b")


def _report_problem(report: dict, candidate: Candidate) -> str | None:
    """What keeps a gate report from vouching for `candidate`, apart from its bytes: a verdict other
    than pass, or cases that do not all pass (the verdict is theirs: `ParityReport.verdict`); another
    precision, backend or OpenVINO hint than the candidate runs with; another OpenVINO or CPU than
    this one (OpenVINO's kernels, and with them the function, change with its version, the CPU and
    the thread count: `cpu_fingerprint` has the cores). None when it vouches."""
    if report.get("verdict") != "pass":
        return f"its gate said {str(report.get('verdict'))[:40]!r}"
    cases = report.get("cases")
    if report.get("not_run") or not isinstance(cases, list) or not cases or \
            not all(isinstance(c, dict) and c.get("failures") == [] for c in cases):
        return "says pass, but its cases do not all pass"
    backend = str(report.get("backend", ""))
    if report.get("precision") != candidate.precision or not backend.startswith(candidate.backend):
        return "is about another precision or backend"
    if candidate.backend != "openvino":
        return None
    said = _HINT.search(backend)
    if (said.group(1) if said else "fp32") != (candidate.hint or "fp32"):
        return f"is about the {said.group(1) if said else 'fp32'} hint, not the {candidate.hint or 'fp32'} one"
    from .openvino import openvino_version

    env = report.get("environment") if isinstance(report.get("environment"), dict) else {}
    there, here = env.get("openvino"), openvino_version()
    if there != here and here is not None:
        return (f"was gated with OpenVINO {str(there)[:40] if there else 'of an unrecorded version'}, this is "
                f"{here} (`crossvit deploy --retune` gates it again)")
    if env.get("cpu") != cpu_fingerprint():  # its kernels and thread count, and with them the function, differ
        return (f"was gated on another CPU ({describe_fingerprint(env['cpu']) if env.get('cpu') else 'unrecorded'}; "
                f"this one: {describe_fingerprint(cpu_fingerprint())}; `crossvit deploy --retune` gates it again)")
    return None


def variant_gate_refuses(path: Path, precision: str, sha=None) -> str | None:
    """Why the variant `path` (a `precision` file, run in its own backend) must not stand in for an
    engine built from it: a gate report beside it that does not vouch for these bytes (failed, not
    run, another file's). None where it vouches, or where there is none (the user's own file)."""
    candidate = Candidate(path.name, PRECISION_TABLE[precision].runtime if precision in PRECISION_TABLE
                          else "onnxruntime", precision)
    report_path = gate_report_path(path.parent, candidate)
    if not os.path.lexists(report_path):
        return None
    report, wrong = _read_report(report_path, candidate)
    if wrong is None and report.get("artifact_sha256") != (sha or FileHashes())(path):
        wrong = f"its gate report {report_path.name} is about other bytes"
    return wrong


def gate_passed(fp32: Path, candidate: Candidate, sha=None) -> bool:
    """True when the candidate's report beside it passed for these bytes (`gate_problem`)."""
    return gate_problem(fp32, candidate, sha) is None


def gate_yardstick(path: Path, precision: str, hint: str | None, sha=None) -> dict | None:
    """The probe answer (`OpenVinoSession.probe_record`) of the passing gate report beside `path` (a
    `precision` file) for OpenVINO with `hint`, when the report is about these very bytes; else None.
    A session holds its first model to it (where it was computed the same way: the session decides).
    `sha`: the `FileHashes` of the choice that picked `path`, so its file is not read twice."""
    from .openvino import effective_precision

    sha = sha or FileHashes()
    hint = hint or "fp32"
    candidate = Candidate(path.name, "openvino", effective_precision(precision, hint),
                          None if precision == "int8-ov" and hint == "fp32" else hint)
    report = _read_json(gate_report_path(path.parent, candidate))
    if report is None or report.get("verdict") != "pass" or not isinstance(report.get("probe"), dict) or \
            report.get("precision") != candidate.precision or not str(report.get("backend", "")).startswith("openvino"):
        return None
    try:
        if report.get("artifact_sha256") != sha(path):
            return None
    except OSError:
        return None
    return report["probe"]


def gated_candidates(fp32: Path) -> list[Candidate]:
    sha = FileHashes()
    return [c for c in candidates_for(fp32) if gate_passed(fp32, c, sha)]


# -- the choice --------------------------------------------------------------------------------

def choice_path(fp32: Path) -> Path:
    """`NAME.fp32.onnx` -> `NAME.cpu.json`, beside it."""
    stem = fp32.name[:-len(".fp32.onnx")] if fp32.name.endswith(".fp32.onnx") else fp32.stem
    return fp32.with_name(f"{stem}.cpu.json")


# The order tried where nothing was measured on this CPU, by what the CPU has. AMX computes bf16
# as fast as int8 and more accurately (issue 22's Xeon: OpenVINO bf16 15.5 ms, int8 15.9 ms at
# batch 1); without AMX, static int8 on VNNI is fastest (2-core EPYC, crossvit_15_240, batch 1:
# OpenVINO int8 3.3x PyTorch eager, bf16 2.3x, ONNX Runtime int8-cpu 1.9x); without VNNI (AVX2
# only) OpenVINO's int8 is no faster than PyTorch eager and ONNX Runtime's int8-cpu is fastest
# (2-core AVX2 EPYC, crossvit_15_240, six deploy runs: int8-cpu 1.6-1.8x at batch 1, OpenVINO fp32
# 1.2x, OpenVINO int8 p50 98-147 ms against eager's 101-134; benchmarks/results/cpu_epyc_avx2_2core/
# cpu_choice/), so there it is not tried without a measurement: it was slower than the fp32 file.
# int8-ov with the bf16 hint (where the CPU has bf16) comes before int8-ov as it is: on the AVX-512
# EPYC, with static shapes and the cross-attention folded, it was 7.7 % faster at batch 1 and 8.6 %
# at batch 8 (median per-turn ratios over 30 and 10 turns; benchmarks/results/cpu_epyc_2core/
# cpu_path/int8ov_bf16_hint/), where with one dynamic-batch model it had been 5-11 % slower. On AMX
# it was never measured (the Xeon's 15.9 ms was the fp32 hint, dynamic batch).
OV_INT8, OV_INT8_BF16 = ("openvino", "int8-ov", None), ("openvino", "int8-ov", "bf16")
OV_FP32, OV_BF16 = ("openvino", "fp32", "fp32"), ("openvino", "bf16", "bf16")
ORT_INT8, ORT_FP32 = ("onnxruntime", "int8-cpu", None), ("onnxruntime", "fp32", None)
RULES = (
    ("amx_bf16", [OV_BF16, OV_INT8_BF16, OV_INT8, ORT_INT8, OV_FP32, ORT_FP32]),
    ("avx512_vnni", [OV_INT8_BF16, OV_INT8, ORT_INT8, OV_BF16, OV_FP32, ORT_FP32]),
    ("avx_vnni", [OV_INT8, ORT_INT8, OV_FP32, ORT_FP32]),
    ("", [ORT_INT8, OV_FP32, ORT_FP32]),
)


def rule_for_flags(flags: set[str], candidates: list[Candidate]) -> Candidate | None:
    """The first of `candidates` in the order RULES gives for a CPU with `flags`."""
    order = next(order for flag, order in RULES if not flag or flag in flags)
    for key in order:
        for c in candidates:
            if c.key == key:
                return c
    return None


def read_choice(fp32: Path) -> tuple[dict | None, str | None]:
    """The recorded choice beside `fp32` (its `chosen` a `Candidate`), or (None, why not): no record,
    or one that is not ours, or names a path that is not one of the candidates beside `fp32`."""
    path = choice_path(fp32)
    if not path.exists() and not path.is_symlink():
        return None, f"no {path.name} beside it (`crossvit deploy` measures one)"
    record = _read_json(path)
    if record is None or record.get("format") != CHOICE_FORMAT:
        return None, f"{path.name} is not a choice record crossvit can read (`crossvit deploy --retune` writes one)"
    chosen, source, speedup = record.get("chosen"), record.get("source"), record.get("speedup")
    if not isinstance(source, dict) or source.get("onnx") != fp32.name:
        return None, f"{path.name} is about another file than {fp32.name}"
    fields = ("file", "backend", "precision", "hint")
    if not isinstance(chosen, dict) or not all(isinstance(chosen.get(k), (str, type(None))) for k in fields):
        return None, f"{path.name} names its choice in a form crossvit does not write"
    candidate = Candidate(**{k: chosen.get(k) for k in fields})
    if candidate not in candidates_for(fp32):  # a file elsewhere, or one no CPU path runs (a TensorRT variant)
        return None, (f"{path.name} names {str(candidate.file)[:80]!r} ({str(candidate.backend)[:20]}, "
                      f"{str(candidate.precision)[:20]}), not one of the CPU paths beside {fp32.name}")
    spans = record.get("speedup_range")  # where no single ratio held: its turns' lowest and highest
    if speedup is not None and not (isinstance(speedup, dict) and all(
            v is None or (type(v) in (int, float) and 0 < v < 1e4) for v in speedup.values())) or \
            spans is not None and not (isinstance(spans, dict) and all(
                isinstance(v, list) and len(v) == 2 and all(type(x) in (int, float) and 0 < x < 1e4 for x in v)
                and v[0] <= v[1] for v in spans.values())):
        return None, f"{path.name} gives its speed-ups in a form crossvit does not write"
    return {**record, "chosen": candidate}, None


def _unavailable(candidate: Candidate, flags: set[str]) -> str | None:
    """Why this machine cannot run it at all, or None."""
    if candidate.backend != "openvino":
        return None
    from .openvino import import_openvino

    try:
        import_openvino()
    except BackendUnavailable as e:  # not installed, or an install that cannot be imported
        return str(e)
    if candidate.hint == "bf16" and not {"avx512_bf16", "amx_bf16"} & flags:
        return "this CPU has no bf16 arithmetic"
    return None


VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})  # int8 products summed in int32, not int16


def sums_int8_in_int32(flags: set[str] | None = None) -> bool:
    """Whether the CPU with `flags` (default: this machine's) sums u8 x s8 products in int32 (VNNI
    or AMX), so 8-bit weights cannot saturate on it. False for any other flags, Arm's included:
    int8-ov then keeps 7-bit weights, the choice measured everywhere."""
    flags = cpu_flags() if flags is None else flags
    return bool(VNNI_FLAGS & flags)


VNNI_ONLY = "none: 8-bit weights, for CPUs with VNNI or AMX"  # int8-ov's precision_tool.overflow_fix


def _saturates_here(folder: Path, candidate: Candidate, flags: set[str]) -> str | None:
    """Why an int8 file cannot be trusted on this CPU although its gate passed elsewhere: x86 without
    VNNI sums u8 x s8 pairs in int16 (VPMADDUBSW), which saturates with 8-bit weights. Files made
    since crossvit used 7-bit ones (int8-cpu's `reduce_range`, int8-ov's overflow fix in every
    layer) say so in their metadata; older ones are left out here, with the reason."""
    import platform

    if candidate.precision not in ("int8-cpu", "int8-ov") or sums_int8_in_int32(flags) or \
            platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return None
    try:
        tool = read_artifact(folder / candidate.file).raw.get("precision_tool") or {}
    except (CrossViTError, OSError):
        return None  # gate_problem says what is wrong with the file
    if isinstance(tool, dict) and (tool.get("reduce_range") is True or tool.get("overflow_fix") == "all layers"):
        return None
    if isinstance(tool, dict) and tool.get("overflow_fix") == VNNI_ONLY:
        return ("its 8-bit weights saturate on a CPU without VNNI (it was made on one with VNNI, for it): "
                "export it again on this machine")
    return ("its 8-bit weights saturate on a CPU without VNNI (it was made before crossvit used 7-bit ones; "
            "export it again)")


def choose_cpu_path(fp32: Path) -> tuple[Candidate, str] | None:
    """The candidate to run for `fp32` on this CPU and why, or None for the file itself in ONNX Runtime.

    The recorded choice when it was measured on a CPU with this fingerprint and its gate still
    holds; otherwise the rule for this CPU's flags over the gated candidates that can run here."""
    candidate, why = decide_cpu_path(fp32)
    return (candidate, why) if candidate is not None else None


def decide_cpu_path(fp32: Path, sha=None) -> tuple[Candidate | None, str | None]:
    """`choose_cpu_path`, and when it runs the file itself although other CPU paths lie beside it
    (variant files, gate reports, a choice record), why none of them: (None, why). (None, None)
    for a lone fp32 file. `sha` (a `FileHashes`) keeps the files' sha256 for the session that opens
    the choice."""
    if file_precision(fp32.name) not in (None, "fp32"):
        return None, None  # a variant file (NAME.int8-ov.onnx) runs as it is: the choice is the fp32 file's
    candidates = candidates_for(fp32)
    if not choice_path(fp32).exists() and len(candidates) == 3 and \
            not any(gate_report_path(fp32.parent, c).exists() for c in candidates[1:]):
        return None, None  # the common case (a lone fp32 file) costs a few stat calls, no parsing or hashing
    here = cpu_fingerprint()
    flags = set(here["flags"])
    sha = sha or FileHashes()
    record, why = read_choice(fp32)
    if record is not None:
        chosen = record["chosen"]
        source = record.get("source") or {}
        measured = record.get("fingerprint") if isinstance(record.get("fingerprint"), dict) else {}
        if source.get("sha256") != sha(fp32):
            why = f"{choice_path(fp32).name} is about another {fp32.name}"
        elif measured != here:
            why = (f"{choice_path(fp32).name} was measured on another CPU ({describe_fingerprint(measured)}; "
                   f"this one: {describe_fingerprint(here)})")
        elif problem := gate_problem(fp32, chosen, sha):
            why = f"its choice, {chosen.label}, no longer has a passing gate beside it ({problem})"
        elif problem := _unavailable(chosen, flags):
            why = f"its choice, {chosen.label}, cannot run here ({problem})"
        else:
            ratio, spans = record.get("speedup") or {}, record.get("speedup_range") or {}
            said = ", ".join(f"{v:.2f}x PyTorch eager at batch {b}" if isinstance(v, (int, float)) and v else
                             f"{spans[b][0]:.2f}-{spans[b][1]:.2f}x PyTorch eager at batch {b} turn by turn"
                             for b, v in sorted(ratio.items()) if isinstance(v, (int, float)) and v or b in spans)
            noisy = (", on noisy timings (`crossvit deploy --retune` on a quiet machine measures again)"
                     if record.get("noisy") else "")
            return chosen, (f"measured fastest of the gated CPU paths on this CPU{' (' + said + ')' if said else ''}"
                            f"{noisy}")
    problems = {c: _unavailable(c, flags) or gate_problem(fp32, c, sha) or _saturates_here(fp32.parent, c, flags)
                for c in candidates}
    rule = rule_for_flags(flags, [c for c in candidates if problems[c] is None])
    if rule is None or (rule.file == fp32.name and rule.backend == "onnxruntime" and rule.precision == "fp32"):
        # say why each other path beside it is out: a variant file as it is always, another way to
        # run a file (an OpenVINO hint) only where it was gated (a report exists)
        out = [f"{c.label}: {problems[c]}" for c in candidates[1:] if problems[c] is not None
               and (c.hint is None or gate_report_path(fp32.parent, c).exists())]
        return None, "; ".join(out) or why
    return rule, f"the rule for this CPU's flags ({' '.join(sorted(flags & set(SPEED_FLAGS))) or 'none'}): {why}"
