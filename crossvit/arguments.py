"""Argument types and the one-line-error parser shared by the CLI and the benchmark tools.

They live below both (DESIGN.md): `benchmarks/` parses its own options with them and never
imports the CLI.
"""

from __future__ import annotations

import argparse
import math


def printable(text: str) -> str:
    """`text` with control and format characters escaped (\\n, \\x1b, ...), so a label or a file
    name cannot forge a line of output or drive the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def int_at_least(minimum: int):
    """An argparse type: an integer >= `minimum`, or argparse's one-line usage error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value
    return parse


positive_int = int_at_least(1)
seed = int_at_least(0)


def number_from(minimum: float, strict: bool):
    """An argparse type: a finite number above `minimum` (`strict`) or at least it."""
    what = f"a number {'>' if strict else '>='} {minimum:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


positive_number = number_from(0, strict=True)  # seconds, milliseconds
non_negative_number = number_from(0, strict=False)


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line (and exit code 2, as argparse's own)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {printable(message)} (see {self.prog} --help)\n")
