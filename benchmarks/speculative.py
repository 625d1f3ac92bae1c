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

Outputs are checked to be identical token for token (greedy). Compile time is excluded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", help="checkpoint (default: the shipped demo model)")
    ap.add_argument("--prompts", type=int, default=32, help="held-out prompts per round (default 32)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

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

    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
