"""The expert-parallel all-to-all: one exchange sized for the worst case against rounds of
``Precision.ep_capacity`` x the balanced share, side by side.

    python benchmarks/expert_exchange.py [--tokens 2048] [--experts 64] [--top-k 8] [--hidden 512]
        [--moe-hidden 256] [--rounds 3] [--capacities worst,4,2,1.25] [--h200 8] [--json FILE]

Part 1, on this machine: 8 CPU devices (``JAX_NUM_CPU_DEVICES``), the routed experts split over
``expert=8`` (float32), ``--tokens`` tokens (split over the shards, as a prefill chunk is),
two routings: uniform (each token's ``K`` experts drawn at random) and skewed (expert
popularity ``1 / rank``, Zipf). Per capacity and routing: the rounds the exchange takes
(counted from the routing as its ``pmax`` counts them), the bytes each device sends per layer
(both all-to-alls, rows and expert ids), XLA's temporaries of the compiled forward, and the
forward and forward + backward time, each the best of ``--rounds`` calls, with the outputs
checked against the worst-case exchange (float32, 1e-6).
Ratios are worst-case time / this time (above 1: faster).

Part 2 (``--h200 N``, needs the CUDA plugin of ``kernels_pallas/aot.py`` in ``.gpu_aot``):
one real-width DeepSeek-V3 MoE layer's experts (256 experts, top-8, 7168 -> 2048, FP8) on
``expert=N`` H200s, for a 1024-token prefill chunk, compiled by XLA for the GPUs without
them: the all-to-all bytes per device and XLA's temporaries per device, per capacity.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if "--h200" in " ".join(sys.argv):
        from benchmarks._plugins import plugins_first
        plugins_first("gpu", sys.argv)
    os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")

import datetime
import json
import platform
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._args import ArgumentParser, at_least, positive_int
from deepseek_jax import expert_parallel, sharding
from deepseek_jax.quant import Precision

CAPACITIES = (None, 4.0, 2.0, 1.25)


def _a2a_bytes(hlo: str) -> int:
    """Bytes the all-to-alls of a lowered (StableHLO) program send per device, per execution of
    each (a loop's body counted once)."""
    total = 0
    for dims, dt in re.findall(r"all_to_all.*: \(tensor<([\dx]+)x(\w+)>\)", hlo):
        n = int(np.prod([int(d) for d in dims.split("x")]))
        total += n * {"f32": 4, "bf16": 2, "i32": 4, "f8E4M3FN": 1}[dt]
    return total


def _routing(kind: str, m: int, E: int, K: int, rng) -> np.ndarray:
    p = np.ones(E) if kind == "uniform" else 1.0 / np.arange(1, E + 1)
    p = p / p.sum()
    return np.stack([rng.choice(E, K, replace=False, p=p) for _ in range(m)]).astype(np.int32)


def _best(fn, *args, rounds: int) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


def _capacities(text: str) -> tuple:
    caps = tuple(None if c.strip() == "worst" else float(c) for c in text.split(",") if c.strip())
    if not caps or caps[0] is not None or any(c is not None and c <= 0 for c in caps[1:]):
        raise SystemExit("--capacities: 'worst' first (the baseline of the ratios), then numbers > 0")
    return caps


def cpu_table(a) -> list[dict]:
    E, K, D, F, M = a.experts, a.top_k, a.hidden, a.moe_hidden, a.tokens
    n_ep = 8
    mesh = sharding.make_mesh({"data": 1, "expert": n_ep, "model": 1})
    rules = sharding.RULES["ep_tp"]
    rng = np.random.default_rng(0)
    arrays = tuple((jnp.asarray(rng.normal(0, 0.05, s), jnp.float32), None)
                   for s in ((E, F, D), (E, F, D), (E, D, F)))
    x = jnp.asarray(rng.normal(0, 1, (M, D)), jnp.float32)
    w = jnp.asarray(rng.uniform(0.1, 1, (M, K)), jnp.float32)
    r = jnp.asarray(rng.normal(0, 1, (M, D)), jnp.float32)
    m_local = M // n_ep
    rows = []
    for kind in ("uniform", "skewed"):
        idx = jnp.asarray(_routing(kind, M, E, K, rng))
        # the fullest (sender, receiver) pair, as the rounds' count sees it
        dest = np.asarray(idx).reshape(n_ep, m_local * K) // (E // n_ep)
        fullest = max(int(np.bincount(d, minlength=n_ep).max()) for d in dest)
        ref = None
        base = {}
        for cap in a.capacities:
            prec = Precision(ep_capacity=cap, kernels="ref")   # the jnp reference (--h200 sets the GPU's)
            c = expert_parallel.round_capacity(m_local, K, n_ep, E // n_ep, cap)   # the program's own

            def fwd(arrays, x, w, prec=prec):
                return expert_parallel.moe_apply(arrays, x, idx, w, prec, mesh, rules, n_experts=E)

            with jax.set_mesh(mesh):
                f = jax.jit(fwd)
                g = jax.jit(jax.grad(lambda arrays, x, w: jnp.sum(fwd(arrays, x, w) * r), argnums=(0, 1, 2)))
                lowered = f.lower(arrays, x, w)
                temp = lowered.compile().memory_analysis().temp_size_in_bytes
                y = np.asarray(f(arrays, x, w))
                t_f = _best(f, arrays, x, w, rounds=a.rounds)
                t_g = _best(g, arrays, x, w, rounds=a.rounds)
            ref = y if ref is None else ref
            err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
            n_rounds = 1 if c >= m_local * min(K, E // n_ep) else -(-fullest // c)
            row = dict(routing=kind, capacity=cap, rows_per_pair=c, rounds=n_rounds,
                       sent_mb=_a2a_bytes(lowered.as_text()) * n_rounds / 1e6, temp_mb=temp / 1e6,
                       fwd_ms=t_f * 1e3, fwd_bwd_ms=t_g * 1e3, rel_err=err)
            if cap is None:
                base = row
            row["fwd_speedup"] = base["fwd_ms"] / row["fwd_ms"]
            row["fwd_bwd_speedup"] = base["fwd_bwd_ms"] / row["fwd_bwd_ms"]
            rows.append(row)
    return rows


def h200_table(n: int, capacities: tuple) -> list[dict]:
    """Part 2: compiled for ``n`` H200s, not run."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from deepseek_jax.quant import FP8
    from kernels_pallas import aot

    E, K, D, F, M = 256, 8, 7168, 2048, 1024
    devices, abstract_device = aot.devices("gpu", n)
    mesh = sharding.make_mesh({"data": 1, "expert": n, "model": 1}, devices)
    rules = sharding.RULES["ep_tp"]
    sds = jax.ShapeDtypeStruct
    ex = NamedSharding(mesh, P("expert"))
    tok = NamedSharding(mesh, P("expert", None))
    arrays = tuple((sds(s, FP8, sharding=ex), sds((s[0], s[1] // 128, s[2] // 128), jnp.float32, sharding=ex))
                   for s in ((E, F, D), (E, F, D), (E, D, F)))
    x = sds((M, D), jnp.bfloat16, sharding=tok)
    idx = sds((M, K), jnp.int32, sharding=tok)
    w = sds((M, K), jnp.float32, sharding=tok)
    rows = []
    for cap in capacities:
        prec = Precision(dtype=jnp.bfloat16, ep_capacity=cap)

        def fwd(arrays, x, idx, w, prec=prec):
            return expert_parallel.moe_apply(arrays, x, idx, w, prec, mesh, rules, n_experts=E)

        lowered = aot.lower_sharded(fwd, (arrays, x, idx, w), mesh, abstract_device)
        compiled = lowered.compile()
        c = expert_parallel.round_capacity(M // n, K, n, E // n, cap)
        rows.append(dict(capacity=cap, rows_per_pair=c, sent_mb_per_round=_a2a_bytes(lowered.as_text()) / 1e6,
                         temp_mb=compiled.memory_analysis().temp_size_in_bytes / 1e6))
    return rows


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=at_least(8), default=2048)
    ap.add_argument("--experts", type=at_least(8), default=64)
    ap.add_argument("--top-k", type=positive_int, default=8)
    ap.add_argument("--hidden", type=positive_int, default=512)
    ap.add_argument("--moe-hidden", type=positive_int, default=256)
    ap.add_argument("--rounds", type=positive_int, default=3)
    ap.add_argument("--capacities", type=_capacities, default=CAPACITIES,
                    help="comma-separated Precision.ep_capacity values, 'worst' (None) first (default worst,4,2,1.25)")
    ap.add_argument("--h200", type=int, default=0, help="also compile a real-width MoE layer for this many H200s")
    ap.add_argument("--plugins", default=None, help="directory holding the CUDA plugin (default .gpu_aot)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.tokens % 8 or a.experts % 8:
        ap.error("--tokens and --experts must be multiples of the 8 shards")
    if a.top_k > a.experts:
        ap.error(f"--top-k {a.top_k}: more than the {a.experts} experts")
    if len(jax.devices("cpu")) < 8:
        print("needs 8 CPU devices: JAX_NUM_CPU_DEVICES=8", file=sys.stderr)
        return 2
    print(f"# {datetime.date.today()}  jax {jax.__version__}  {platform.processor() or platform.machine()}  "
          f"{os.cpu_count()} cores  8 CPU devices, expert=8")
    print(f"# MoE: {a.experts} experts, top-{a.top_k}, {a.hidden} -> {a.moe_hidden}, {a.tokens} tokens "
          f"({a.tokens // 8} per shard), float32, best of {a.rounds}")
    rows = cpu_table(a)
    print(f"\n{'routing':8s} {'capacity':>8s} {'rows/pair':>9s} {'rounds':>6s} {'sent MB':>8s} {'temp MB':>8s} "
          f"{'fwd ms':>8s} {'x':>5s} {'fwd+bwd ms':>10s} {'x':>5s} {'rel err':>8s}")
    for r in rows:
        cap = "worst" if r["capacity"] is None else f"{r['capacity']:g}"
        print(f"{r['routing']:8s} {cap:>8s} {r['rows_per_pair']:9d} {r['rounds']:6d} {r['sent_mb']:8.2f} "
              f"{r['temp_mb']:8.1f} {r['fwd_ms']:8.1f} {r['fwd_speedup']:5.2f} {r['fwd_bwd_ms']:10.1f} "
              f"{r['fwd_bwd_speedup']:5.2f} {r['rel_err']:8.1e}")
    h200 = []
    if a.h200:
        h200 = h200_table(a.h200, a.capacities)
        print(f"\n# one DeepSeek-V3 MoE layer's experts, 1024-token chunk, expert={a.h200} H200s (compiled, not run)")
        print(f"{'capacity':>8s} {'rows/pair':>9s} {'sent MB / round':>15s} {'temp MB':>8s}")
        for r in h200:
            cap = "worst" if r["capacity"] is None else f"{r['capacity']:g}"
            print(f"{cap:>8s} {r['rows_per_pair']:9d} {r['sent_mb_per_round']:15.1f} {r['temp_mb']:8.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(cpu=rows, h200=h200), f, indent=1)
    bad = [r for r in rows if not r["rel_err"] < 1e-6]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
