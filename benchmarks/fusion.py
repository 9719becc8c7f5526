"""The CrossViT paper's efficiency claim, measured: CLS-token cross-attention fuses two branches
in time linear in the number of tokens; all-attention fusion (concatenate both branches' tokens
and self-attend) is quadratic.

    python -m crossvit.benchmarks.fusion [--dim 384] [--tokens 64,128,...,4096] [--out DIR]

Both blocks are the seed model's own `Attention` (pre-norm, SDPA): cross-attention as CrossViT
uses it (one branch's CLS token queries itself plus the other branch's patch tokens), against one
self-attention layer over all tokens of both branches. For each token count: FLOPs from
`torch.utils.flop_counter` and the p50 time of both, in interleaved turns. Writes fusion.json and
fusion.png (log-log: FLOPs and time against tokens).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from crossvit.model.seed import Attention
from crossvit.runtime.timing import measure_interleaved


def blocks(dim: int, heads: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(CLS cross-attention, all-attention) with the same width and heads."""
    dim_head = dim // heads
    return Attention(dim, heads, dim_head).eval(), Attention(dim, heads, dim_head).eval()


def fusion_inputs(tokens: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A CLS token and `tokens` patch tokens (both branches together), batch 1."""
    return torch.randn(1, 1, dim), torch.randn(1, tokens, dim)


def cross_fusion(block, cls, patches):
    return block(cls, context=patches, kv_include_self=True)  # B,1,D: the CLS query attends to N+1 tokens


def all_fusion(block, cls, patches):
    return block(torch.cat((cls, patches), dim=1))  # B,N+1,D: every token attends to every token


def flops(fn, *args) -> int:
    from crossvit.benchmarks.flops import count_flops

    return count_flops(fn, *args)


def measure(dim: int, heads: int, token_counts: list[int], runs: int = 20) -> list[dict]:
    cross, full = blocks(dim, heads)
    rows = []
    for n in token_counts:
        cls, patches = fusion_inputs(n, dim)
        with torch.inference_mode():
            lat = measure_interleaved({"cross": lambda: cross_fusion(cross, cls, patches),
                                       "all": lambda: all_fusion(full, cls, patches)},
                                      batch=1, runs=runs, max_seconds=10.0)
        rows.append({"tokens": n, "cross_gflops": flops(cross_fusion, cross, cls, patches) / 1e9,
                     "all_gflops": flops(all_fusion, full, cls, patches) / 1e9,
                     "cross_ms": lat["cross"].p50_ms, "all_ms": lat["all"].p50_ms})
    return rows


def plot(rows: list[dict], path: Path) -> None:
    from crossvit.benchmarks.report import _pyplot
    from crossvit.files import atomic_write

    plt = _pyplot("--out")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    n = [r["tokens"] for r in rows]
    for ax, key, label in ((axes[0], "gflops", "GFLOP"), (axes[1], "ms", "p50 ms (batch 1)")):
        ax.loglog(n, [r[f"cross_{key}"] for r in rows], marker="o", label="CLS cross-attention (CrossViT)")
        ax.loglog(n, [r[f"all_{key}"] for r in rows], marker="o", label="all-attention fusion")
        ax.set_xlabel("tokens (both branches)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.suptitle("Fusing two branches: linear vs quadratic in the token count")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def main(argv=None) -> int:
    from crossvit.arguments import Parser

    p = Parser(prog="python -m crossvit.benchmarks.fusion", description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=384, help="token width (crossvit_15_240's large branch: 384)")
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--tokens", default="64,128,256,512,1024,2048,4096")
    p.add_argument("--out", type=Path, default=None, metavar="FOLDER",
                   help="write fusion.json and fusion.png there (the plot needs matplotlib: the bench extra)")
    args = p.parse_args(argv)
    try:
        tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        p.error(f"--tokens: expected comma-separated token counts such as 64,256, got {args.tokens!r}")
    if not all(0 < t <= 65536 for t in tokens) or not 0 < args.heads <= args.dim or args.dim % args.heads:
        p.error("--tokens must be in 1..65536, and --dim a positive multiple of --heads")
    from crossvit.errors import CrossViTError

    try:
        return _main(args, tokens)
    except CrossViTError as e:  # an --out that cannot be written, or no matplotlib: one line, before the run
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return e.exit_code


def _main(args, tokens: list[int]) -> int:
    from crossvit.benchmarks.machine import command_line, machine_description
    from crossvit.benchmarks.report import _pyplot
    from crossvit.contract import to_json
    from crossvit.files import atomic_write, check_output_dir, check_output_path

    if args.out:
        _pyplot("--out")
        check_output_dir(args.out)
        for name in ("fusion.json", "fusion.png"):
            check_output_path(args.out / name)
    rows = measure(args.dim, args.heads, tokens)
    print(f"{'tokens':>7} {'cross GFLOP':>12} {'all GFLOP':>10} {'cross ms':>9} {'all ms':>9} {'all/cross':>9}")
    for r in rows:
        print(f"{r['tokens']:>7} {r['cross_gflops']:12.4f} {r['all_gflops']:10.3f} {r['cross_ms']:9.3f} "
              f"{r['all_ms']:9.3f} {r['all_ms'] / r['cross_ms']:8.1f}x")
    if args.out:
        text = to_json({"machine": machine_description(), "command": command_line(), "dim": args.dim,
                        "heads": args.heads, "rows": rows}, indent=2) + "\n"
        atomic_write(args.out / "fusion.json", lambda tmp: tmp.write_text(text))
        plot(rows, args.out / "fusion.png")
        print(f"wrote {args.out / 'fusion.json'} and fusion.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
