#!/usr/bin/env python
"""Converts a Hub DeepSeek-V3 checkpoint into an Orbax checkpoint (the same as `deepseek-jax convert`).

    python tools/convert.py HF_DIR OUT_DIR [--dtype fp8|bf16] [--no-mtp] [--resume] [--force]

The work is done by :func:`deepseek_jax.orbax_ckpt.convert` (see its module docstring).
"""

from __future__ import annotations

import argparse
import sys

from deepseek_jax.commands.convert import add_arguments, run
from deepseek_jax.errors import DeepSeekError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="convert.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except DeepSeekError as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
