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
    p.add_argument("ckpt", help="checkpoint directory (Hub layout or Orbax)")
    p.add_argument("--ids", required=True, help=".npy file of int token ids [B, T] (or [T])")
    p.add_argument("--out", help="file for float32 logits, in .npy format, written at exactly this path (its "
                                 "directory must exist)")
    p.add_argument("--mode", choices=("prefill", "decode"), default="prefill",
                   help="prefill: one pass (naive MLA); decode: one token at a time over the latent cache")
    p.add_argument("--prefill", type=int, default=0,
                   help="with --mode decode only: tokens prefilled in one pass first (default 0)")
    p.add_argument("--mtp", action="store_true", help="write the MTP module's logits [B, T-1, V] (row i predicts i+2)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--logprobs", help="file for per-token log-probs [B, T-1] (log p(t_i+1 | t_<=i)), in .npy "
                                      "format, written at exactly this path")
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


def _check_output(flag: str, path: str) -> None:
    """Fails now, not after the compute, when ``path`` cannot be written."""
    if os.path.isdir(path):
        raise DeepSeekError(f"{flag}: {path} is a directory (give a file path)")
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise DeepSeekError(f"{flag}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise DeepSeekError(f"{flag}: cannot write {path} (permission denied)")


def _save(flag: str, path: str, array: np.ndarray) -> None:
    """``np.save`` into exactly ``path`` (``np.save(path)`` would append ``.npy``)."""
    try:
        with open(path, "wb") as f:
            np.save(f, array, allow_pickle=False)
    except OSError as e:
        raise DeepSeekError(f"{flag}: cannot write {path}: {e.strerror or e}") from None


def run(args: argparse.Namespace) -> int:
    import contextlib

    import jax

    import deepseek_jax as dj

    if not (args.out or args.logprobs or args.json):
        raise DeepSeekError("nothing to write: give --out, --logprobs or --json")
    for flag, path in (("--out", args.out), ("--logprobs", args.logprobs)):
        if path:
            _check_output(flag, path)
    if args.out and args.logprobs and os.path.abspath(args.out) == os.path.abspath(args.logprobs):
        raise DeepSeekError(f"--out and --logprobs are the same file {args.out}")
    if args.mtp and (args.mode != "prefill" or args.prefill):
        raise DeepSeekError("--mtp scores in one pass: --mode decode / --prefill do not apply")
    if args.prefill and args.mode != "decode":
        raise DeepSeekError(f"--prefill {args.prefill} needs --mode decode (prefill mode scores in one pass)")
    if args.prefill < 0:
        raise DeepSeekError(f"--prefill must be >= 0, got {args.prefill}")
    runtime.check_args(args)
    ids = _read_ids(args.ids)
    if ids.ndim in (1, 2) and args.prefill > ids.shape[-1]:
        raise DeepSeekError(f"--prefill {args.prefill} exceeds the {ids.shape[-1]} tokens per row of --ids")
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
        _save("--out", args.out, logits.astype(np.float32))
    if args.logprobs:
        _save("--logprobs", args.logprobs, lp)
    if args.json:
        for b in range(ids.shape[0]):
            print(json.dumps({"row": b, "tokens_scored": int(lp.shape[1]),
                              "mean_logprob": float(lp[b].mean()) if lp.shape[1] else None,
                              "perplexity": float(dj.perplexity(lp[b])) if lp.shape[1] else None}))
    return 0
