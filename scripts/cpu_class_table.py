"""The README's "Where each CPU class stands" rows for one CPU class, from the files that
`scripts/cpu_class_run.sh` wrote: the deploy's choice record (NAME.cpu.json), each retune's
(NAME.cpu.retune_*.json) and the gate reports beside them. Nothing is typed by hand: each batch
column lists every run's ratio to PyTorch eager turn by turn (`-` where that run gave none), the
gate column each report's verdict and its rel L2 per input source.

Below the table, the gated paths ranked by the product of their median p50 at batch 1 and 8 over
the runs (how deploy chooses), beside the order `RULES` in runtime/cpu_choice.py gives this CPU's
flags where nothing was measured on it: where they differ, the measured order is the one to take.

  python scripts/cpu_class_table.py RESULTS_DIR [--machine "2-core Intel Xeon with AMX"]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from crossvit.runtime.cpu_choice import RULES, Candidate, gate_report_path

# The README's names for the paths (the deploy table's labels name the file as well).
NAMES = {
    ("openvino", "int8-ov", "bf16"): "OpenVINO int8-ov with the bf16 hint",
    ("openvino", "int8-ov", None): "OpenVINO int8-ov (fp32 hint)",
    ("onnxruntime", "int8-cpu", None): "ONNX Runtime int8-cpu (one row at a time)",
    ("openvino", "bf16", "bf16"): "OpenVINO fp32 file, bf16 hint",
    ("openvino", "fp32", "fp32"): "OpenVINO fp32",
    ("onnxruntime", "fp32", None): "ONNX Runtime fp32",
}
RULE_NAMES = {("openvino", "int8-ov", None): "OV_INT8", ("openvino", "int8-ov", "bf16"): "OV_INT8_BF16",
              ("openvino", "fp32", "fp32"): "OV_FP32", ("openvino", "bf16", "bf16"): "OV_BF16",
              ("onnxruntime", "int8-cpu", None): "ORT_INT8", ("onnxruntime", "fp32", None): "ORT_FP32"}
BATCHES = ("1", "8")


def fail(message: str) -> None:
    print(f"cpu_class_table: {message}", file=sys.stderr)
    raise SystemExit(2)


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        fail(f"{path}: cannot be read as JSON ({e})")
    if not isinstance(data, dict):
        fail(f"{path}: not a JSON object")
    return data


def records(folder: Path) -> list[tuple[str, dict]]:
    """(run name, choice record): the deploy's, then each retune's in name order."""
    deploy = [p for p in folder.glob("*.cpu.json") if ".cpu.retune_" not in p.name]
    if len(deploy) != 1:
        fail(f"{folder}: expected one NAME.cpu.json (the deploy's choice record), found {len(deploy)}")
    stem = deploy[0].name[:-len(".cpu.json")]
    runs = [("deploy", read_json(deploy[0]))]
    for p in sorted(folder.glob(f"{stem}.cpu.retune_*.json")):
        runs.append((f"retune {p.name[len(stem) + len('.cpu.retune_'):-len('.json')]}", read_json(p)))
    return runs


def key(entry: dict) -> tuple:
    return entry.get("backend"), entry.get("precision"), entry.get("hint")


def ratio_cell(entry: dict | None, batch: str) -> str:
    if entry is None:
        return "not run"
    value = (entry.get("speedup") or {}).get(batch)
    return f"{value:.2f}x" if isinstance(value, (int, float)) else "-"


def rel_l2(value: float) -> str:
    return f"{value:.3f}" if value >= 0.01 else f"{value:.1e}"


def gate_cell(folder: Path, entry: dict) -> str:
    path = gate_report_path(folder, Candidate(entry["file"], entry["backend"], entry["precision"], entry.get("hint")))
    if not path.is_file():
        return f"{entry.get('gate') or '?'} (no report: {path.name})"
    report = read_json(path)
    by_source: dict[str, list[float]] = {}
    for case in report.get("cases") or []:
        if isinstance(case, dict) and isinstance(case.get("rel_l2"), (int, float)):
            by_source.setdefault(str(case.get("source")), []).append(float(case["rel_l2"]))
    parts = []
    for source in sorted(by_source, key=lambda s: (s != "images", s)):
        low, high = min(by_source[source]), max(by_source[source])
        span = rel_l2(low) if rel_l2(low) == rel_l2(high) else f"{rel_l2(low)}–{rel_l2(high)}"
        parts.append(f"{span} {source}")
    return f"{report.get('verdict', '?')} (rel L2 {', '.join(parts)})" if parts else str(report.get("verdict", "?"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="the folder cpu_class_run.sh wrote")
    parser.add_argument("--machine", help="the machine column's first cell (default: from the deploy's record)")
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        fail(f"{args.results}: not a folder")
    runs = records(args.results)
    deploy = runs[0][1]
    fingerprint = deploy.get("fingerprint") or {}
    flags = set(fingerprint.get("flags") or [])
    machine = args.machine or (f"{fingerprint.get('cores')}-core {fingerprint.get('cpu_model')}, "
                               f"{' '.join(sorted(flags)) or 'no speed flags'}")

    entries: dict[tuple, dict[str, dict]] = {}  # path -> run name -> its entry in that run's record
    for name, record in runs:
        for entry in record.get("candidates") or []:
            if isinstance(entry, dict) and key(entry) in NAMES:
                entries.setdefault(key(entry), {})[name] = entry

    def cost(k: tuple) -> float:  # how deploy ranks paths: the product of the medians at batch 1 and 8
        product = 1.0
        for b in BATCHES:
            p50 = [e["latency"][b]["p50_ms"] for e in entries[k].values()
                   if e.get("gate") == "pass" and isinstance((e.get("latency") or {}).get(b), dict)]
            product *= statistics.median(p50) if p50 else float("inf")
        return product

    ranked = sorted(entries, key=cost)
    names = [name for name, _ in runs]
    print("| machine | path | batch 1 | batch 8 | gate |")
    print("|---|---|---|---|---|")
    for i, k in enumerate(ranked):
        chosen = [name for name, record in runs if key(record.get("chosen") or {}) == k]
        path = NAMES[k] if not chosen else f"**{NAMES[k]}** (chosen in {', '.join(chosen)})"
        cells = [", ".join(ratio_cell(entries[k].get(n), b) for n in names) for b in BATCHES]
        first = next(e for e in entries[k].values())
        where = f"{machine} ({', '.join(names)})" if i == 0 else "same"
        print(f"| {where} | {path} | {cells[0]} | {cells[1]} | {gate_cell(args.results, first)} |")

    rule_flag = next(flag for flag, _ in RULES if not flag or flag in flags)
    rule = next(order for flag, order in RULES if flag == rule_flag)
    measured = [RULE_NAMES[k] for k in ranked if cost(k) != float("inf")]
    print()
    print(f"measured order (median p50 at batch 1 times batch 8, gated paths): {', '.join(measured)}")
    print(f"RULES for this CPU ({rule_flag or 'no listed flag'}): "
          f"{', '.join(RULE_NAMES[k] for k in rule)}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # a record or report not as deploy writes them
        fail(f"a choice record or gate report is not as `crossvit deploy` writes it ({type(e).__name__}: {e})")
