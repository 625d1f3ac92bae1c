"""MTP speculative decoding against plain decoding, side by side, on the shipped demo model (CPU).

    python benchmarks/speculative.py [--ckpt DIR] [--prompts 32] [--batch 1 8] [--rounds 5] [--json]

Both modes run the same held-out prompts of the model's task (greedy, stop at eos, the same
``Generator``, compiled executables warmed up first) in alternation for ``--rounds`` rounds; each
mode keeps its best round. Per batch size it reports:

* acceptance: accepted drafts / drafts that could be used (``GenerationStats``);
* loop steps per call: decode-loop iterations per ``generate`` call (the first token comes from
  prefill; a row's eos takes a step of its own), plain and speculative;
* end-to-end tokens/s: new tokens / (prefill + decode) over all calls, and its speed-up;
* decode tokens/s: tokens produced by the decode loop / decode time (prefill excluded), and its
  speed-up; this is what speculative decoding changes;
* step cost: decode time per loop iteration, speculative / plain (what one verify step costs).

Outputs are checked to be identical token for token (greedy): the script exits 1 (after printing)
when they are not. Compile time is excluded.

``--passes`` adds, at batch 1, what a decode call is made of (microseconds, best of ``--rounds``
alternating rounds): one main-model pass over 1-4 new tokens and one MTP pass over 1-2 rows (a
``fori_loop`` of 200 passes over a 32-position cache), one loop iteration of each mode (decode
executable with eos ignored and a limit of 16 iterations, less the fixed cost, divided by the
iterations it ran: the speculative loop stops early at the cache's end), a call's fixed decode
cost (the executable with no iteration, plus reading the results back) and prefill, and the
speed-up bound they give (each program run once untimed first):
a call costs ``fixed + steps x iteration``, so with the measured steps per call the decode
speed-up is at most ``(fixed + steps_plain x it_plain) / (fixed + steps_spec x it_spec)``, and
with the iteration cut to its model passes (no bookkeeping) or to 1-token passes, less yet.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._args import ArgumentParser, positive_int  # noqa: E402  (argparse only)


def versions() -> str:
    import flax
    import jax
    return (f"jax {jax.__version__} · flax {flax.__version__} · numpy {np.__version__} · Python "
            f"{platform.python_version()} · {platform.machine()} · {os.cpu_count()} CPU cores")


def run_mode(gen, batches, spec):
    tot = dict(tokens=0, dec_tokens=0, prefill=0.0, decode=0.0, steps=0, drafted=0, accepted=0, outputs=[])
    for prompts in batches:
        res = gen.generate(prompts, max_new_tokens=8, speculative=spec)
        st = gen.last_stats
        tot["tokens"] += st.new_tokens
        # The decode loop produced every token but each row's first (drawn by prefill).
        tot["dec_tokens"] += st.new_tokens - sum(1 for r in res if r.output_ids)
        tot["prefill"] += st.prefill_s
        tot["decode"] += st.decode_s
        tot["steps"] += max(st.steps - 1, 0)
        tot["drafted"] += st.drafted
        tot["accepted"] += st.accepted
        tot["outputs"] += [r.output_ids for r in res]
    return tot


def pass_costs(gen, prompt, rounds):
    """Per-pass, per-iteration and per-call costs at batch 1, in microseconds (see ``--passes``)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from deepseek_jax import generate as G
    from deepseek_jax.cache import LatentCache

    prep = gen._prepared or G._as_is(gen.model)   # what the generator's executables take
    graphdef, params = prep.graphdef, prep.weights
    cfg, n, S = gen.model.cfg, 200, 32
    cache = LatentCache.zeros(cfg, 1, S, dtype=gen.model.prec.dtype)
    if params.layers is not None:   # the generator decodes from per-layer weights and cache
        cache = cache.per_layer()
    mcache = jnp.zeros((1, S, cfg.latent_dim), gen.model.prec.dtype)

    def main_pass(T):
        def f(params, c):
            def body(i, c):
                model = nnx.merge(graphdef, params.params)
                pos = (5 + i % 8 + jnp.arange(T, dtype=jnp.int32))[None]
                out = model((pos * 7) % cfg.vocab_size, pos, cache=c, absorbed=True, unstacked=params.layers)
                # (Float 0 * x is not folded away, so the last layer's FFN and the head still run.)
                leaves, tree = jax.tree.flatten(out.cache)
                return jax.tree.unflatten(tree, [leaves[0] + 0.0 * jnp.max(out.logits)] + leaves[1:])
            return jax.lax.fori_loop(0, n, body, c)
        return jax.jit(f).lower(params, cache).compile(), cache

    def mtp_pass(T):
        def f(params, c):
            def body(i, c):
                model = nnx.merge(graphdef, params.params)
                pos = (5 + i % 8 + jnp.arange(T, dtype=jnp.int32))[None]
                h = jnp.full((1, T, cfg.hidden_size), 0.1, c.dtype) + c[0, 0, 0]
                x, c, _ = model.mtp_hidden(h, (pos * 7) % cfg.vocab_size, pos, cache_BSC=c, absorbed=True)
                return c + 0.0 * jnp.max(model.mtp_head(x[:, -1]))
            return jax.lax.fori_loop(0, n, body, c)
        return jax.jit(f).lower(params, mcache).compile(), mcache

    P = len(prompt)
    ids = np.zeros((1, 16), np.int32)
    ids[0, :P] = prompt
    knobs = G._Knobs(jnp.int32(gen.eos_id), jnp.bool_(False), *G.GREEDY.traced())   # eos ignored
    args = (jnp.asarray(ids), jnp.asarray([P], np.int32), jnp.asarray([S - 1], np.int32),
            jnp.asarray([True]), jnp.uint32(0))
    exe = {spec: G._executables(prep, (1, 16, S, True, False, spec, None, None), args, knobs)[0]
           for spec in (False, True)}
    passes = {f"main pass, {T} new token{'s' if T > 1 else ''}": main_pass(T) for T in (1, 2, 3, 4)}
    passes.update({f"MTP pass, {T} row{'s' if T > 1 else ''}": mtp_pass(T) for T in (1, 2)})

    def call(spec, limit):
        """Seconds of one decode call up to ``limit`` steps, and the loop iterations it ran."""
        pre, dec = exe[spec]
        st = jax.block_until_ready(pre(prep.leaves, *args, knobs))
        step0 = int(st.step)
        t0 = time.perf_counter()
        st = dec(prep.leaves, st, np.int32(limit), knobs)   # (numpy, as the generator passes it)
        _, _, _, step = jax.device_get((st.buf_BS, st.cur_B, st.done_B, st.step))
        return time.perf_counter() - t0, int(step) - step0

    def prefill(spec):
        t0 = time.perf_counter()
        jax.block_until_ready(exe[spec][0](prep.leaves, *args, knobs))
        return time.perf_counter() - t0

    for f, a in passes.values():   # warm-up: each program once, untimed
        jax.block_until_ready(f(params, a))
    for spec in (False, True):
        prefill(spec)
        call(spec, 1)
        call(spec, 17)
    best, iterations = {}, {}
    for _ in range(rounds):
        for name, (f, a) in passes.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(params, a))
            best[name] = min(best.get(name, 1e9), (time.perf_counter() - t0) / n * 1e6)
        for spec in (False, True):
            mode = "MTP" if spec else "plain"
            t_prefill = prefill(spec)
            (t_fixed, _), (t_loop, iterations[mode]) = call(spec, 1), call(spec, 17)
            for key, v in ((f"{mode} prefill", t_prefill), (f"{mode} fixed decode cost", t_fixed),
                           (f"{mode} iterations", t_loop)):
                best[key] = min(best.get(key, 1e9), v * 1e6)
    print(f"pass costs: a 16-step decode call ran {iterations['plain']} loop iterations plain, "
          f"{iterations['MTP']} MTP", file=sys.stderr, flush=True)
    for mode in ("plain", "MTP"):   # (the same prompt every round: the same iterations)
        best[f"{mode} loop iteration"] = ((best.pop(f"{mode} iterations") - best[f"{mode} fixed decode cost"])
                                          / max(iterations[mode], 1))
    return best


def bound_lines(c, plain_steps, spec_steps):
    """The decode speed-up bounds that the measured costs ``c`` give (see ``--passes``)."""
    fp, fs = c["plain fixed decode cost"], c["MTP fixed decode cost"]
    ip, i_s = c["plain loop iteration"], c["MTP loop iteration"]
    m1, m2, t1, t2 = (c["main pass, 1 new token"], c["main pass, 2 new tokens"], c["MTP pass, 1 row"],
                      c["MTP pass, 2 rows"])
    ratio = lambda num, den: f"{num:.0f} / {den:.0f} us = {num / den:.2f}x"  # noqa: E731
    return [
        f"measured: plain call {ratio(fp + plain_steps * ip, fs + spec_steps * i_s)}",
        f"bookkeeping free (iterations = model passes: {m1:.0f} vs {m2:.0f} + {t2:.0f} us): "
        + ratio(fp + plain_steps * m1, fp + spec_steps * (m2 + t2)),
        f"... and no fixed cost: {ratio(plain_steps * m1, spec_steps * (m2 + t2))}",
        "... and a 2-token verify / 2-row MTP pass as cheap as 1 token/row: "
        + ratio(plain_steps * m1, spec_steps * (m1 + t1)),
        f"... and a free MTP (only the {spec_steps:.2f} steps): {ratio(plain_steps * m1, spec_steps * m1)}",
    ]


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", help="checkpoint (default: the shipped demo model)")
    ap.add_argument("--prompts", type=positive_int, default=32, help="held-out prompts per round (default 32)")
    ap.add_argument("--batch", type=positive_int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=positive_int, default=5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--passes", action="store_true", help="also break batch 1 down into per-pass costs")
    args = ap.parse_args(argv)
    if args.ckpt is not None and not os.path.isdir(args.ckpt):
        ap.error(f"--ckpt {args.ckpt!r}: no such directory")

    import deepseek_jax as dj
    from deepseek_jax.commands.demo import DEMO_TASK, demo_checkpoint
    from deepseek_jax.generate import Generator
    from deepseek_jax.tasks import SyntheticDataset
    from deepseek_jax.tokenizer import Tokenizer

    ckpt = args.ckpt or demo_checkpoint()
    tok = Tokenizer.from_dir(ckpt)
    gen = Generator(dj.load(ckpt, mtp=True), tok)
    ds = SyntheticDataset(DEMO_TASK, tok, batch_size=args.prompts, seed=77, split="eval")
    examples = ds.examples(0)
    prompts = [ds.encode(p)[0] for p, _ in examples]
    rows = []
    for B in args.batch:
        batches = [prompts[i:i + B] for i in range(0, len(prompts), B)]
        for spec in (None, "mtp"):          # warm-up: compile every bucket
            run_mode(gen, batches, spec)
        best = {}
        for _ in range(args.rounds):
            for spec in (None, "mtp"):
                t = run_mode(gen, batches, spec)
                key = spec or "plain"
                if key not in best or t["prefill"] + t["decode"] < best[key]["prefill"] + best[key]["decode"]:
                    best[key] = t
        p, s = best["plain"], best["mtp"]
        same = p["outputs"] == s["outputs"]
        right = sum(tok.decode(o) == a for o, (_, a) in zip(s["outputs"], examples))
        e2e = lambda t: t["tokens"] / (t["prefill"] + t["decode"])  # noqa: E731
        dec = lambda t: t["dec_tokens"] / t["decode"]  # noqa: E731
        row = dict(batch=B, prompts=len(prompts), new_tokens=p["tokens"], exact_match=right / len(prompts),
                   identical=same, acceptance=s["accepted"] / max(s["drafted"], 1),
                   plain_steps_per_call=p["steps"] / len(batches), spec_steps_per_call=s["steps"] / len(batches),
                   plain_tok_s=e2e(p), spec_tok_s=e2e(s), speedup=e2e(s) / e2e(p),
                   plain_decode_tok_s=dec(p), spec_decode_tok_s=dec(s), decode_speedup=dec(s) / dec(p),
                   plain_step_ms=1e3 * p["decode"] / max(p["steps"], 1),
                   spec_step_ms=1e3 * s["decode"] / max(s["steps"], 1),
                   plain_prefill_ms=1e3 * p["prefill"] / len(batches), spec_prefill_ms=1e3 * s["prefill"] / len(batches))
        row["step_cost"] = row["spec_step_ms"] / row["plain_step_ms"]
        rows.append(row)
        print(f"batch {B}: {json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})}",
              file=sys.stderr, flush=True)

    costs = pass_costs(gen, prompts[0], args.rounds) if args.passes else None
    if args.json:
        print(json.dumps(rows if costs is None else dict(rows=rows, pass_costs_us=costs), indent=1))
        return check_identical(rows)
    load = os.getloadavg()
    print(f"date {datetime.date.today().isoformat()} · {versions()} · load average {load[0]:.1f}\n")
    print("| batch | prompts | new tokens | exact match | identical | acceptance | loop steps/call | plain tok/s | "
          "MTP tok/s | speed-up | plain decode tok/s | MTP decode tok/s | decode speed-up | step cost (MTP/plain) |")
    print("|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['prompts']} | {r['new_tokens']} | {r['exact_match']:.0%} | "
              f"{'yes' if r['identical'] else 'NO'} | {r['acceptance']:.1%} | "
              f"{r['plain_steps_per_call']:.2f} → {r['spec_steps_per_call']:.2f} | "
              f"{r['plain_tok_s']:,.0f} | {r['spec_tok_s']:,.0f} | {r['speedup']:.2f}x | "
              f"{r['plain_decode_tok_s']:,.0f} | {r['spec_decode_tok_s']:,.0f} | {r['decode_speedup']:.2f}x | "
              f"{r['spec_step_ms']:.3f} / {r['plain_step_ms']:.3f} ms = {r['step_cost']:.2f} |")
    if costs is not None:
        print("\nBatch 1, microseconds (best of rounds):\n\n| cost | us |\n|---|---:|")
        for k, v in costs.items():
            print(f"| {k} | {v:.0f} |")
        r1 = next((r for r in rows if r["batch"] == 1), None)
        if r1 is not None:
            print("\nDecode speed-up bounds at batch 1 (plain / MTP decode time per call):\n")
            for line in bound_lines(costs, r1["plain_steps_per_call"], r1["spec_steps_per_call"]):
                print(f"- {line}")
    return check_identical(rows)


def check_identical(rows) -> int:
    """1 (with a line on stderr) when a batch size's speculative outputs differ from plain decoding's."""
    bad = [r["batch"] for r in rows if not r["identical"]]
    if bad:
        print(f"error: speculative outputs differ from plain decoding's (greedy) at batch "
              f"{', '.join(map(str, bad))}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    from deepseek_jax.errors import DeepSeekError
    try:
        raise SystemExit(main())
    except DeepSeekError as e:   # a checkpoint the model cannot load: one line
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
