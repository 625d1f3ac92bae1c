"""``deepseek-jax score CKPT --ids IN.npy --out OUT.npy``: logits, MTP logits, log-probs."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from deepseek_jax import runtime
from deepseek_jax.errors import DeepSeekError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="logits / log-probs of token ids (the parity interface)",
                       description="Writes float32 logits [B, T, V] of int ids [B, T] (or MTP logits "
                                   "[B, T-1, V] with --mtp).")
    p.add_argument("ckpt", help="checkpoint directory (Hub layout)")
    p.add_argument("--ids", required=True, help=".npy file of int token ids [B, T] (or [T])")
    p.add_argument("--out", help=".npy file for float32 logits")
    p.add_argument("--mode", choices=("prefill", "decode"), default="prefill",
                   help="prefill: one pass (naive MLA); decode: one token at a time over the latent cache")
    p.add_argument("--prefill", type=int, default=0, help="with --mode decode: tokens prefilled in one pass first")
    p.add_argument("--mtp", action="store_true", help="write the MTP module's logits [B, T-1, V] (row i predicts i+2)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--logprobs", help=".npy file for per-token log-probs [B, T-1] (log p(t_i+1 | t_<=i))")
    p.add_argument("--json", action="store_true", help="print per-row mean log-prob and perplexity as JSON")
    runtime.add_args(p)
    p.set_defaults(func=run)


def _read_ids(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise DeepSeekError(f"--ids: {path} not found")
    try:
        ids = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DeepSeekError(f"--ids: {path} is not a readable .npy file ({e})") from None
    if ids.dtype.kind not in "iu":
        raise DeepSeekError(f"--ids: {path} holds {ids.dtype}, expected integer token ids")
    return ids


def run(args: argparse.Namespace) -> int:
    import contextlib

    import jax

    import deepseek_jax as dj

    if not (args.out or args.logprobs or args.json):
        raise DeepSeekError("nothing to write: give --out, --logprobs or --json")
    ids = _read_ids(args.ids)
    mesh = runtime.init(args)
    model = dj.load(args.ckpt, dtype=args.dtype, mtp=True if args.mtp else None, mesh=mesh, rules=args.rules)
    ids = dj.scoring.check_ids(model, ids)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        if args.mtp:
            logits = dj.mtp_logits(model, ids)
            offset = 2
        else:
            logits = dj.logits(model, ids, mode=args.mode, prefill=args.prefill)
            offset = 1
    lp = dj.token_logprobs(logits, ids, offset=offset)
    if not runtime.is_main():
        return 0
    if args.out:
        np.save(args.out, logits.astype(np.float32))
    if args.logprobs:
        np.save(args.logprobs, lp)
    if args.json:
        for b in range(ids.shape[0]):
            print(json.dumps({"row": b, "tokens_scored": int(lp.shape[1]),
                              "mean_logprob": float(lp[b].mean()) if lp.shape[1] else None,
                              "perplexity": float(dj.perplexity(lp[b])) if lp.shape[1] else None}))
    return 0
