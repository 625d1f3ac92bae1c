"""``deepseek-jax verify CKPT [--against HF_DIR]``: integrity of a converted checkpoint."""

from __future__ import annotations

import argparse
import os

from deepseek_jax.errors import DeepSeekError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check a converted checkpoint (manifest, checksums, optionally the source)",
                       description="Checks that every parameter is present with its shape, dtype and "
                                   "checksum; with --against, that every Hub tensor equals the checkpoint's.")
    p.add_argument("ckpt", help="Orbax checkpoint directory (from `deepseek-jax convert`)")
    p.add_argument("--against", metavar="HF_DIR", help="the Hub checkpoint it was converted from")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deepseek_jax import orbax_ckpt

    if args.against is not None:   # a bad source fails now, not after the checkpoint's checksums
        _check_source(args.against)
    s = orbax_ckpt.verify(args.ckpt, against=args.against, progress=not args.quiet)
    msg = f"OK: {s['params']} parameters ({s['bytes'] / 1e9:.2f} GB) match the manifest"
    if args.against:
        msg += f"; {s['compared_tensors']} tensors equal those of {args.against}"
    print(msg)
    return 0


def _check_source(path: str) -> None:
    from deepseek_jax.hub import HubReader

    if not os.path.isdir(path):
        raise DeepSeekError(f"--against: {path} is not a directory")
    try:
        with HubReader(path):
            pass
    except DeepSeekError as e:
        raise DeepSeekError(f"--against: {e}") from None
