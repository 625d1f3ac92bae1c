#!/usr/bin/env python
"""Converts a Hub DeepSeek-V3 checkpoint into an Orbax checkpoint: ``deepseek-jax convert`` itself
(the same arguments, errors and exit codes), for a checkout that is on ``PYTHONPATH`` but not installed.

    python tools/convert.py HF_DIR OUT_DIR [--dtype fp8|bf16] [--no-mtp] [--resume] [--force]

The work is done by :func:`deepseek_jax.orbax_ckpt.convert` (see its module docstring).
"""

from __future__ import annotations

import sys

from deepseek_jax import cli


def main(argv: list[str] | None = None) -> int:
    return cli.main(["convert", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
