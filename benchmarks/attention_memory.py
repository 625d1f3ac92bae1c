"""MLA's naive-form attention, plain against blocked, side by side on this machine (CPU).

    python benchmarks/attention_memory.py [--seqs 1024,2048,4096] [--heads 16] [--block 512]
        [--rounds 3] [--json FILE]

One sequence of ``T`` tokens attending causally to itself with DeepSeek-V3's head sizes (128
nope + 64 rope / 128 value), float32: ``kernels_pallas.cached_attention_ref`` (the plain form:
``[B, T, H, T]`` float32 scores, differentiated by ``jax.grad``) against
``kernels_pallas.cached_attention_blocked`` (``--block`` keys at a time, its own backward), as
``prefill_attention="plain"`` and ``"flash"`` run on CPU. Per ``T``: XLA's temporaries of the
compiled forward and of the compiled gradient (all four inputs), the forward and gradient time
(best of ``--rounds``), and the blocked form's largest relative error against the plain one
(output and every gradient). Ratios are plain / blocked (above 1: the blocked form is smaller
or faster).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import datetime
import functools
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import cached_attention_blocked, cached_attention_ref

N, R, A = 128, 64, 128   # DeepSeek-V3: q/k nope and rope head sizes, value head size


def _inputs(t: int, h: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape) * 0.5, jnp.float32)  # noqa: E731
    return f(1, t, h, N), f(1, t, h, R), f(1, t, h, N + A), f(1, t, R)


def _best(fn, args, rounds: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return min(times)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def measure(t: int, h: int, block: int, rounds: int) -> dict:
    args = _inputs(t, h)
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    w = jnp.asarray(np.random.default_rng(1).standard_normal((1, t, h, A)), jnp.float32)
    row = {"T": t, "heads": h, "block": block}
    outs = {}
    for name, attn in (("plain", cached_attention_ref),
                       ("blocked", functools.partial(cached_attention_blocked, block_k=block))):
        fwd = jax.jit(lambda *a, attn=attn: attn(*a, pos, scale=0.07))
        grad = jax.jit(jax.grad(lambda *a, attn=attn: jnp.sum(w * attn(*a, pos, scale=0.07)), argnums=(0, 1, 2, 3)))
        row[f"{name}_fwd_temp_mib"] = fwd.lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**20
        row[f"{name}_grad_temp_mib"] = grad.lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**20
        row[f"{name}_fwd_ms"] = _best(fwd, args, rounds) * 1e3
        row[f"{name}_grad_ms"] = _best(grad, args, rounds) * 1e3
        outs[name] = (fwd(*args), *grad(*args))
    row["rel_err"] = max(_rel(a, b) for a, b in zip(outs["blocked"], outs["plain"]))
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", default="1024,2048,4096", help="comma-separated sequence lengths")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--block", type=int, default=512, help="keys per block of the blocked form")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args(argv)
    try:
        seqs = [int(x) for x in a.seqs.split(",")]
    except ValueError:
        ap.error(f"--seqs: expected comma-separated integers, got {a.seqs!r}")
    if min(seqs) < 1 or a.heads < 1 or a.block < 1 or a.rounds < 1:
        ap.error("--seqs, --heads, --block and --rounds must be >= 1")
    print(f"# {datetime.date.today()}, jax {jax.__version__}, {platform.processor() or platform.machine()}, "
          f"{jax.device_count()} {jax.default_backend()} device(s); float32, {a.heads} heads, one sequence, "
          f"blocks of {a.block} keys; ratios plain / blocked")
    print("| T | fwd temp MiB plain / blocked | ratio | grad temp MiB plain / blocked | ratio "
          "| fwd ms ratio | grad ms ratio | max rel err |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for t in seqs:
        r = measure(t, a.heads, a.block, a.rounds)
        rows.append(r)
        print(f"| {t} | {r['plain_fwd_temp_mib']:.1f} / {r['blocked_fwd_temp_mib']:.1f} "
              f"| {r['plain_fwd_temp_mib'] / r['blocked_fwd_temp_mib']:.2f} "
              f"| {r['plain_grad_temp_mib']:.1f} / {r['blocked_grad_temp_mib']:.1f} "
              f"| {r['plain_grad_temp_mib'] / r['blocked_grad_temp_mib']:.2f} "
              f"| {r['plain_fwd_ms'] / r['blocked_fwd_ms']:.2f} | {r['plain_grad_ms'] / r['blocked_grad_ms']:.2f} "
              f"| {r['rel_err']:.1e} |", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"jax": jax.__version__, "rows": rows}, f, indent=1)
    bad = [r["T"] for r in rows if not r["rel_err"] < 1e-4]
    if bad:
        print(f"error: blocked attention differs from the plain form at T = {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
