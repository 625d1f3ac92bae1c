"""``deepseek-jax convert HF_DIR OUT_DIR``: Hub safetensors -> Orbax checkpoint (streaming)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The converter's arguments."""
    p.add_argument("hf_dir", help="Hub checkpoint directory (config.json + safetensors shards)")
    p.add_argument("out_dir", help="output directory (must be empty or absent)")
    p.add_argument("--dtype", default=None, metavar="{fp8,bf16}",
                   help="fp8: keep e4m3 weights + float32 block scales; bf16: dequantize "
                        "(fp8_cast_bf16.py semantics). Default: the source's")
    p.add_argument("--no-mtp", dest="mtp", action="store_false", help="leave out the MTP layer")
    p.add_argument("--resume", action="store_true", help="continue an interrupted conversion in OUT_DIR")
    p.add_argument("--force", action="store_true", help="delete a non-empty OUT_DIR first")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a Hub checkpoint into an Orbax checkpoint (streaming)",
                       description="Streams a Hub checkpoint into an Orbax checkpoint holding the model's "
                                   "parameter state (stacked layers/experts, FP8 kept by default), plus "
                                   "config.json, tokenizer files and a manifest for `verify`.")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deepseek_jax import orbax_ckpt

    s = orbax_ckpt.convert(args.hf_dir, args.out_dir, dtype=args.dtype, mtp=args.mtp, resume=args.resume,
                           force=args.force, progress=not args.quiet)
    if s["already_complete"]:
        print(f"{s['out_dir']}: conversion already complete")
    else:
        print(f"converted {s['tensors']} tensors into {s['params']} arrays ({s['bytes'] / 1e9:.2f} GB, "
              f"{s['dtype']}) at {s['out_dir']} in {s['seconds']:.1f}s ({s['gb_per_s']:.2f} GB/s"
              + (f", {s['resumed_chunks']} chunks resumed" if s["resumed_chunks"] else "") + ")")
        if s["cast_from"]:
            print(f"note: source tensors in other float dtypes were converted to the Hub layout's "
                  f"({', '.join(s['cast_from'])}; rounded to nearest where narrower)")
    return 0
