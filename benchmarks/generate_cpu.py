"""Generation tokens/s on CPU: this engine against HF transformers' ``generate``, side by side.

Both run the same tiny random FP8 checkpoint (the test suite's config A), HF loaded in float32
the way ``tests/hf_ref.py`` loads it (weights dequantized with numpy, eager attention), ours in
float32 W8A16. Greedy, the same prompts, and the same number of new tokens for both (eos
ignored: ``stop_at_eos=False`` here, ``min_new_tokens`` there). Batches 1 and 8. After one
warm-up run each, the engines run in alternation (``--repeats`` rounds, so that load from other
processes on the machine hits both alike) and each keeps its best time; HF runs with 1 and with
2 torch threads in every round and is credited with the faster setting. Our compile time is
reported separately. The first 16 generated tokens are compared between the engines as a
sanity check (both are greedy on the same weights): the script exits 1, after printing the table,
when any row's differ.

    .venv/bin/python benchmarks/generate_cpu.py [--new-tokens 128] [--prompt-len 16]
"""

from __future__ import annotations

import atexit
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# not this folder itself: its kernels.py would shadow the `kernels` package transformers imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
sys.path.insert(0, ROOT)

from benchmarks._args import ArgumentParser, int_list, positive_int  # noqa: E402


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=positive_int, default=128)
    ap.add_argument("--prompt-len", type=positive_int, default=16)
    ap.add_argument("--batches", type=int_list(), default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--repeats", type=positive_int, default=5)
    ap.add_argument("--threads", type=int_list(), default="1,2",
                    help="torch thread counts to try for HF, comma-separated (best is kept)")
    args = ap.parse_args(argv)

    import jax
    import torch
    import transformers

    import deepseek_jax as dj
    from deepseek_jax.generate import Generator
    from deepseek_jax.synthetic import random_hub_checkpoint
    from tests.conftest import CONFIG_A
    from tests.hf_ref import hf_model

    thread_options = args.threads
    tmp = tempfile.mkdtemp(prefix="gen_bench_")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    ckpt = random_hub_checkpoint(os.path.join(tmp, "ckpt_a"), CONFIG_A, seed=1, max_shard_bytes=200_000,
                                 bias_range=(0.0, 0.5))
    ours = Generator(dj.load(ckpt, dtype="float32"))
    hf, _ = hf_model(ckpt)
    hf.generation_config.pad_token_id = CONFIG_A["eos_token_id"]

    rng = np.random.default_rng(0)
    V, N, P = CONFIG_A["vocab_size"], args.new_tokens, args.prompt_len
    rows = []
    for B in args.batches:
        prompts = rng.integers(2, V, (B, P))

        def run_ours():
            res = ours.generate(prompts.tolist(), max_new_tokens=N, stop_at_eos=False)
            assert all(len(r.output_ids) == N for r in res)
            return np.array([r.output_ids for r in res]), ours.last_stats

        def run_hf(threads):
            torch.set_num_threads(threads)
            ids = torch.from_numpy(prompts.astype(np.int64))
            t0 = time.perf_counter()
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, min_new_tokens=N,
                                  do_sample=False)
            dt = time.perf_counter() - t0
            assert out.shape == (B, P + N), out.shape
            return out[:, P:].numpy(), dt

        ours_out, st = run_ours()
        compile_s = st.compile_s
        hf_out, _ = run_hf(thread_options[0])
        ours_t, hf_t = float("inf"), {t: float("inf") for t in thread_options}
        for _ in range(args.repeats):
            s = run_ours()[1]
            ours_t = min(ours_t, s.prefill_s + s.decode_s)
            for t in thread_options:
                hf_t[t] = min(hf_t[t], run_hf(t)[1])
        hf_threads = min(hf_t, key=hf_t.get)
        hf_t = hf_t[hf_threads]
        # Sanity: both are greedy on the same weights; count rows whose first 16 tokens agree
        # (float32 rounding differences can flip a near-tie later on in a random model).
        agree = int(sum((ours_out[b, :16] == hf_out[b, :16]).all() for b in range(B)))
        rows.append(dict(batch=B, new=B * N, ours_s=ours_t, hf_s=hf_t, compile_s=compile_s, agree=agree,
                         hf_threads=hf_threads))

    stamp = datetime.date.today().isoformat()
    print(f"date {stamp} · jax {jax.__version__} · flax {__import__('flax').__version__} · "
          f"torch {torch.__version__} · transformers {transformers.__version__} · "
          f"{platform.machine()} · {os.cpu_count()} CPU cores")
    print(f"checkpoint: tests' config A (FP8, D={CONFIG_A['hidden_size']}, {CONFIG_A['num_hidden_layers']} layers, "
          f"{CONFIG_A['n_routed_experts']} experts, vocab {V}), prompt {P} tokens, {N} new tokens per row, "
          f"greedy, float32, best of {args.repeats}")
    print()
    print("| batch | new tokens | deepseek_jax tok/s | HF generate tok/s (torch threads) | speed-up "
          "| deepseek_jax compile (s) | first 16 tokens agree |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        o, h = r["new"] / r["ours_s"], r["new"] / r["hf_s"]
        print(f"| {r['batch']} | {r['new']} | {o:,.0f} | {h:,.0f} ({r['hf_threads']}) | {o / h:.1f}x "
              f"| {r['compile_s']:.1f} | {r['agree']}/{r['batch']} rows |")
    bad = [f"batch {r['batch']}: {r['agree']}/{r['batch']} rows" for r in rows if r["agree"] < r["batch"]]
    if bad:
        print(f"error: the first 16 tokens differ from HF's (greedy, same weights) at {'; '.join(bad)}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
