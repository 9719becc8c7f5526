"""`crossvit bench`'s results: the rows (`Row`), a run (`Result`: its table and JSON), the CSV and
the plot."""

from __future__ import annotations

import csv
import io
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Row:
    backend: str
    precision: str
    batch: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    images_per_s: float
    gflops: float  # achieved model GFLOP/s at the median
    vs_eager: float | None  # PyTorch eager fp32 p50 / this p50, same batch, same run; None: see no_ratio
    of_peak: float | None  # achieved GFLOP/s / the best measured GEMM rate of its precision
    spread: float  # (max - min) / min of the per-turn medians
    note: str = ""
    runs: int = 0  # timed calls, all turns together
    timed_s: float = 0.0  # their recorded times summed (what --min-time counts)
    no_ratio: str = ""  # why vs_eager is None: this row's or the baseline's turns disagree (noisy)
    timer: str = "wall"  # "wall": the host's clock around each call; "cuda-events": the device's (GPU PyTorch rows)
    turns_ms: list[float] = field(default_factory=list)  # each turn's median, in turn order (vs_eager pairs them)


@dataclass
class Result:
    model: str
    gflops_per_image: float
    rows: list[Row] = field(default_factory=list)
    gemm: dict = field(default_factory=dict)  # "library precision" -> GFLOP/s
    accuracy: dict = field(default_factory=dict)
    machine: dict = field(default_factory=dict)
    command: str = ""
    notes: list[str] = field(default_factory=list)  # what the run skipped or dropped, and why

    def table(self) -> str:
        wb = max([36, *(len(r.backend) for r in self.rows)])  # file names make long backend names
        wp = max([8, *(len(r.precision) for r in self.rows)])
        head = (f"{'backend':<{wb}} {'prec':<{wp}} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} "
                f"{'img/s':>9} {'GFLOP/s':>8} {'of peak':>7} {'vs eager':>8}  note")
        lines = [f"{self.model}: {self.gflops_per_image:.2f} GFLOP per image", head, "-" * len(head)]
        for r in self.rows:
            peak = f"{r.of_peak:6.0%}" if r.of_peak is not None else "     -"
            vs = f"{r.vs_eager:7.2f}x" if r.vs_eager is not None else f"{'-':>8}"
            lines.append(f"{r.backend:<{wb}} {r.precision:<{wp}} {r.batch:>5} "
                         f"{r.p50_ms:9.3f} {r.p90_ms:9.3f} {r.p99_ms:9.3f} "
                         f"{r.images_per_s:9.1f} {r.gflops:8.1f} {peak:>7} {vs}  {r.note}".rstrip())
        timers = {r.timer for r in self.rows}
        if timers != {"wall"} and timers:
            lines.append("timed by " + "; ".join(
                f"{'CUDA events' if t == 'cuda-events' else 'the host clock' if t == 'wall' else t}: "
                + ", ".join(dict.fromkeys(r.backend for r in self.rows if r.timer == t)) for t in sorted(timers)))
        if self.gemm:
            lines.append("GEMM rates here (GFLOP/s): " + ", ".join(f"{k} {v:.0f}" for k, v in self.gemm.items()))
        for name, acc in self.accuracy.items():
            lines.append(f"accuracy {name}: " + ", ".join(
                f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}" for k, v in acc.items()))
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"model": self.model, "gflops_per_image": self.gflops_per_image, "rows": [asdict(r) for r in self.rows],
                "gemm_gflops": self.gemm, "accuracy": self.accuracy, "machine": self.machine, "command": self.command, "notes": self.notes}


def write_csv(results: Result | list[Result], path: Path) -> None:
    """One row per backend, precision and batch (and model, for several results)."""
    from crossvit.files import atomic_write

    results = [results] if isinstance(results, Result) else results
    rows = [{"model": res.model, **asdict(r), "turns_ms": " ".join(f"{t:.6g}" for t in r.turns_ms)}
            for res in results for r in res.rows]  # a CSV cell holds the turns space-separated
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    text = buf.getvalue()
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _pyplot(option: str = "--plot"):
    """matplotlib.pyplot (headless), or the one line that says how to get it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from crossvit.errors import BackendUnavailable
        from crossvit.install import pip_install

        raise BackendUnavailable(f"{option} needs matplotlib: {pip_install('bench')}") from None
    return plt


def plot_format(path: Path) -> str:
    """The image format the file name asks for (.png, .svg, .pdf, ...); checked before the run."""
    from matplotlib.backend_bases import FigureCanvasBase

    from crossvit.errors import UsageError

    # what matplotlib writes by itself (pgf needs LaTeX, and would fail only after the run)
    kinds = [k for k in ("png", "svg", "pdf", "jpg", "jpeg", "webp", "tif", "tiff")
             if k in FigureCanvasBase.get_supported_filetypes()]
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in kinds:
        raise UsageError(f"{path}: a plot is written as .{', .'.join(kinds)}; not {path.suffix or 'a name without a suffix'}")
    return fmt


def _shape(shape) -> str:
    return "x".join(map(str, shape))


def write_plot(result: Result, path: Path) -> None:
    """Latency and throughput against batch size, one line per backend (needs matplotlib)."""
    from crossvit.files import atomic_write

    plt = _pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    keys = sorted({(r.backend, r.precision) for r in result.rows})
    for key in keys:
        rows = sorted((r for r in result.rows if (r.backend, r.precision) == key), key=lambda r: r.batch)
        label = f"{key[0]} ({key[1]})"
        left.plot([r.batch for r in rows], [r.p50_ms for r in rows], marker="o", label=label)
        right.plot([r.batch for r in rows], [r.images_per_s for r in rows], marker="o", label=label)
    for ax, what in ((left, "p50 latency (ms)"), (right, "throughput (images/s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    left.legend(fontsize=7)
    where = result.machine.get("cuda") if result.machine.get("bench_device") == "cuda" else None
    where = where or result.machine.get("cpu_model") or result.machine.get("processor")
    fig.suptitle(f"{result.model} on {where} ({time.strftime('%Y-%m-%d')})")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=plot_format(path), dpi=110))
    plt.close(fig)
