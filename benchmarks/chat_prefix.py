"""Prefix reuse on CPU: prefill time with a cached prefix against prefilling whole prompts.

A tiny random FP8 model (``tiny_config`` with 2048 positions), float32.

* Chat turns: for each history length, one call generates 4 tokens after a history of H random
  tokens; the next "turn" appends 20 new tokens. ``Generator(reuse_prefix=True)`` prefills only
  those (absorbed over the kept cache); a plain generator prefills the whole H + 24.
* A batch with a shared system prompt: ``--batch`` prompts, each the same P random tokens and
  then 5-``--rest`` tokens of its own, 16 new tokens each. The default generator prefills the
  prompt once for the batch and each row's rest over a copy of its cache (``share_prefix``);
  ``share_prefix=False`` prefills every prompt whole. Prefill time, and the whole call's.
* Batches of a longer input through one generator: ``--batches`` such batches in a row (each
  with rests of its own, the same system prompt), as ``generate --batch-size`` runs them. The
  generator keeps the shared prefix's cache, so only the first batch prefills the system prompt
  and the others continue its cache (``last_stats.prefix_cached``); against the same generator
  with ``forget_prefix()`` before each batch, which prefills it in every batch. Prefill time
  summed over the batches, and the whole run's.

Each pair runs in alternation, ``--repeats`` rounds after a warm-up, best time each (the
machines here are noisy).

    .venv/bin/python benchmarks/chat_prefix.py [--histories 200,1000] [--systems 200,1000] [--batch 8] [--batches 4]
"""

from __future__ import annotations

import atexit
import datetime
import os
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks._args import ArgumentParser, at_least, int_list, positive_int  # noqa: E402


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--histories", type=int_list(), default="200,1000", help="comma-separated history lengths")
    ap.add_argument("--new", type=positive_int, default=20, help="new tokens in the next turn")
    ap.add_argument("--systems", type=int_list(), default="200,1000",
                    help="shared system prompt lengths, comma-separated")
    ap.add_argument("--batch", type=positive_int, default=8, help="prompts per batch sharing a system prompt")
    ap.add_argument("--rest", type=at_least(5), default=40,
                    help="longest rest of a prompt after the system prompt (>= 5: rests are 5 to this)")
    ap.add_argument("--batches", type=positive_int, default=4,
                    help="batches in a row through one generator (third table)")
    ap.add_argument("--repeats", type=positive_int, default=6)
    args = ap.parse_args(argv)

    import jax

    import deepseek_jax as dj
    from deepseek_jax.generate import Generator
    from deepseek_jax.synthetic import random_hub_checkpoint, tiny_config

    cfg = tiny_config(max_position_embeddings=2048)
    tmp = tempfile.mkdtemp(prefix="chat_prefix_")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    ckpt = random_hub_checkpoint(os.path.join(tmp, "ckpt"), cfg, seed=1)
    model = dj.load(ckpt, dtype="float32")
    rng = np.random.default_rng(0)
    kw = dict(max_new_tokens=4, stop_at_eos=False)
    print(f"date {datetime.date.today().isoformat()} · jax {jax.__version__} · {os.cpu_count()} CPU cores · "
          f"tiny_config (hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers), float32, "
          f"best of {args.repeats}")
    print()
    print("Chat turns:")
    print()
    print("| history tokens | new tokens | prefill, cache reused (ms) | prefill, fresh (ms) | speed-up |")
    print("|---:|---:|---:|---:|---:|")
    for hist in args.histories:
        base = rng.integers(2, cfg["vocab_size"], hist).tolist()
        new = rng.integers(2, cfg["vocab_size"], args.new).tolist()
        reuse, fresh = Generator(model, reuse_prefix=True), Generator(model)
        t_reuse, t_fresh = [], []
        for _ in range(args.repeats + 1):
            reuse._kept = None                       # every round: the same first turn, then the next
            first = reuse.generate([base], **kw)[0]
            prompt = base + first.output_ids + new
            reuse.generate([prompt], **kw)
            assert reuse.last_stats.reused_prefix == hist + kw["max_new_tokens"] - 1
            t_reuse.append(reuse.last_stats.prefill_s)
            fresh.generate([prompt], **kw)
            t_fresh.append(fresh.last_stats.prefill_s)
        a, b = min(t_reuse[1:]), min(t_fresh[1:])
        print(f"| {hist + kw['max_new_tokens']} | {args.new} | {a * 1e3:.2f} | {b * 1e3:.2f} | {b / a:.1f}x |")

    print()
    print(f"A batch of {args.batch} prompts sharing a system prompt, 16 new tokens each:")
    print()
    print("| system prompt | rests | shared | prefill, shared (ms) | prefill, whole (ms) | speed-up "
          "| call, shared (ms) | call, whole (ms) | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    kw = dict(max_new_tokens=16, stop_at_eos=False)
    for n in args.systems:
        system = rng.integers(2, cfg["vocab_size"], n).tolist()
        prompts = [system + rng.integers(2, cfg["vocab_size"], int(r)).tolist()
                   for r in rng.integers(5, args.rest + 1, args.batch)]
        shared, whole = Generator(model), Generator(model, share_prefix=False)
        times = {g: ([], []) for g in (shared, whole)}
        outs = {}
        for _ in range(args.repeats + 1):
            for g in (shared, whole):
                t0 = time.perf_counter()
                outs[g] = [r.output_ids for r in g.generate(prompts, **kw)]
                times[g][0].append(g.last_stats.prefill_s)
                times[g][1].append(time.perf_counter() - t0 - g.last_stats.compile_s)
        assert outs[shared] == outs[whole], "shared-prefix tokens differ"
        assert shared.last_stats.shared_prefix > 0 and whole.last_stats.shared_prefix == 0
        (ps, cs), (pw, cw) = ([min(t[1:]) for t in times[g]] for g in (shared, whole))
        rests = [len(p) - n for p in prompts]
        print(f"| {n} | {min(rests)}-{max(rests)} | {shared.last_stats.shared_prefix} | {ps * 1e3:.2f} | "
              f"{pw * 1e3:.2f} | {pw / ps:.1f}x | {cs * 1e3:.2f} | {cw * 1e3:.2f} | {cw / cs:.1f}x |")

    print()
    print(f"{args.batches} batches of {args.batch} prompts in a row through one generator, all with the same "
          f"system prompt, 16 new tokens each: its cache kept across the batches, or prefilled in each batch:")
    print()
    print("| batches | system prompt | shared | prefill, kept (ms) | prefill, per batch (ms) | speed-up "
          "| run, kept (ms) | run, per batch (ms) | speed-up |")
    print("|:---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.systems:
        system = rng.integers(2, cfg["vocab_size"], n).tolist()
        batches = [[system + rng.integers(2, cfg["vocab_size"], int(r)).tolist()
                    for r in rng.integers(5, args.rest + 1, args.batch)] for _ in range(args.batches)]
        kept, each = Generator(model), Generator(model)
        times = {g: ([], []) for g in (kept, each)}
        outs = {}
        for _ in range(args.repeats + 1):
            for g in (kept, each):
                g.forget_prefix()
                prefill = run = 0.0
                outs[g], cached = [], []
                for prompts in batches:
                    if g is each:
                        g.forget_prefix()
                    t0 = time.perf_counter()
                    outs[g].append([r.output_ids for r in g.generate(prompts, **kw)])
                    run += time.perf_counter() - t0 - g.last_stats.compile_s
                    prefill += g.last_stats.prefill_s
                    cached.append(g.last_stats.prefix_cached)
                times[g][0].append(prefill)
                times[g][1].append(run)
                assert cached == ([False] + [True] * (len(batches) - 1) if g is kept else [False] * len(batches))
        assert outs[kept] == outs[each], "kept-prefix tokens differ"
        (pk, rk), (pe, re_) = ([min(t[1:]) for t in times[g]] for g in (kept, each))
        print(f"| {args.batches} x {args.batch} | {n} | {kept.last_stats.shared_prefix} | {pk * 1e3:.2f} | "
              f"{pe * 1e3:.2f} | {pe / pk:.1f}x | {rk * 1e3:.2f} | {re_ * 1e3:.2f} | {re_ / rk:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
