"""Argument parsing shared by the benchmark scripts: a bad value is one line on stderr, exit 2.

``ArgumentParser`` is argparse's, with ``error`` printing ``prog: error: message`` alone (no usage
block); the ``type=`` functions below name what they expect. Imports nothing but argparse.
"""

from __future__ import annotations

import argparse


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser; its errors (and ``parser.error``) are one line, exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _int(s: str, what: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None


def at_least(minimum: int):
    """``type=``: an integer >= ``minimum``."""
    def parse(s: str) -> int:
        v = _int(s, f"an integer >= {minimum}")
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {s!r}")
        return v
    parse.__name__ = f"integer >= {minimum}"
    return parse


positive_int = at_least(1)
nonnegative_int = at_least(0)


def int_list(minimum: int = 1, empty: bool = False):
    """``type=``: comma-separated integers, each >= ``minimum`` (``empty``: '' gives [])."""
    def parse(s: str) -> list[int]:
        what = f"comma-separated integers >= {minimum}"
        try:
            vals = [int(x) for x in s.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if (not vals and not empty) or any(v < minimum for v in vals):
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return vals
    parse.__name__ = "integer list"
    return parse
