"""``deepseek-jax export ORBAX_DIR HF_DIR``: Orbax checkpoint -> Hub safetensors layout."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write an Orbax checkpoint back in the Hub layout",
                       description="Writes config.json, safetensors shards and the index (servable by "
                                   "vLLM/SGLang). The FP8 round trip Hub -> Orbax -> Hub is bit-exact.")
    p.add_argument("ckpt", help="Orbax checkpoint directory (from `deepseek-jax convert`)")
    p.add_argument("hf_dir", help="output directory (must be empty or absent)")
    p.add_argument("--dtype", default=None, metavar="{fp8,bf16}",
                   help="bf16 dequantizes FP8 weights; fp8 block-quantizes bf16 ones. Default: as stored")
    p.add_argument("--force", action="store_true", help="delete a non-empty HF_DIR first")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deepseek_jax import orbax_ckpt

    s = orbax_ckpt.export(args.ckpt, args.hf_dir, dtype=args.dtype, force=args.force, progress=not args.quiet)
    print(f"exported {s['tensors']} tensors ({s['bytes'] / 1e9:.2f} GB, {s['dtype']}) to {s['hf_dir']} "
          f"in {s['seconds']:.1f}s")
    return 0
