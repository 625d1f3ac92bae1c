"""Scoring a corpus of texts of mixed lengths on CPU: ``dj.sequence_logprobs`` (batched by length
bucket, log-probs taken on the device) against scoring each text alone with ``dj.logits`` +
``dj.token_logprobs`` and against HF transformers' model on each text alone, side by side.

All three run the test suite's tiny random FP8 checkpoint (config A: 256-token vocab, 256
positions) in float32, HF loaded the way ``tests/hf_ref.py`` loads it. The corpus: ``--texts``
random token sequences with lengths drawn uniformly from 2 to ``--max-len``. After a warm-up pass
(which compiles every length bucket, and every length for the one-at-a-time path), the three run in
alternation ``--repeats`` times and each keeps its best time. The per-token log-probs are compared
between them as a check (the last column of each table): the script exits 1, after printing every
table, when a difference exceeds ``TOLERANCE``.

A second table scores multiple choice: ``--questions`` random contexts (2 to ``--max-len`` - 1
tokens), each with 4 one-token answers, by ``dj.loglikelihood`` (answers sharing one row, and each
request as its own row) and by HF's model (one pass per request, and one per question reading the
4 answers from its last position). ``--questions 0`` skips it.

A third table scores multiple choice with answers of several tokens (as HellaSwag's or ARC's):
``--long-questions`` random contexts (``--max-len`` / 4 to ``--max-len`` / 2 tokens), each with 4
answers of 2 to ``--max-len`` / 8 tokens, by ``dj.loglikelihood`` (each context computed once and
cached for its answers, and a row per request) and by HF's model (a pass per request, and the
context's ``past_key_values`` computed once and copied for each answer). ``--long-questions 0``
skips it.

    .venv/bin/python benchmarks/score_texts.py [--texts 64] [--max-len 200] [--batch-size 8] [--questions 32]
        [--long-questions 32]

``--max-len`` is at least 16 with the third table (its answers are 2 to ``--max-len`` / 8 tokens),
3 with the second, else 2.
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
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# not this folder itself: its kernels.py would shadow the `kernels` package transformers imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
sys.path.insert(0, ROOT)

from benchmarks._args import ArgumentParser, at_least, nonnegative_int, positive_int  # noqa: E402

#: The check: the largest |log-prob difference| against the reference engine (float32 on both
#: sides; per token, summed over an answer's tokens in the third table). The small runs of
#: tests/test_benchmark_scripts.py show up to 7e-5 (summed over 25 tokens, docs/benchmarks.md).
TOLERANCE = 1e-3
#: the differences over TOLERANCE: "table / engine: difference"
CHECK_FAILURES: list[str] = []


def check(table: str, name: str, diff: float) -> str:
    """The last column's cell; a difference over ``TOLERANCE`` is recorded (and marked)."""
    if not diff <= TOLERANCE:
        CHECK_FAILURES.append(f"{table} / {name}: {diff:.1e}")
        return f"{diff:.1e} FAILED"
    return f"{diff:.1e}"


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=positive_int, default=64)
    ap.add_argument("--max-len", type=at_least(2), default=200,
                    help="longest text (default 200; >= 16 with --long-questions, >= 3 with --questions)")
    ap.add_argument("--batch-size", type=positive_int, default=8)
    ap.add_argument("--repeats", type=positive_int, default=3)
    ap.add_argument("--questions", type=nonnegative_int, default=32)
    ap.add_argument("--long-questions", type=nonnegative_int, default=32)
    ap.add_argument("--no-hf", action="store_true")
    a = ap.parse_args(argv)
    need = 16 if a.long_questions else 3 if a.questions else 2
    if a.max_len < need:
        ap.error(f"argument --max-len: at least {need} here, got {a.max_len} (16 with --long-questions, whose "
                 "answers are 2 to max-len/8 tokens; 3 with --questions; else 2)")

    import jax

    import deepseek_jax as dj
    from deepseek_jax.synthetic import random_hub_checkpoint
    from tests.conftest import CONFIG_A

    tmp = tempfile.mkdtemp(prefix="score_bench_")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    ckpt = random_hub_checkpoint(os.path.join(tmp, "ckpt_a"), CONFIG_A,
                                 seed=1, max_shard_bytes=200_000, bias_range=(0.0, 0.5))
    model = dj.load(ckpt, dtype="float32")
    rng = np.random.default_rng(0)
    max_len = min(a.max_len, model.cfg.max_position_embeddings)
    seqs = [rng.integers(0, model.cfg.vocab_size, int(n)).tolist()
            for n in rng.integers(2, max_len + 1, a.texts)]
    n_tokens = sum(len(s) - 1 for s in seqs)

    def batched():
        return dj.sequence_logprobs(model, seqs, batch_size=a.batch_size)

    def alone():
        out = []
        for s in seqs:
            ids = np.array([s], np.int32)
            out.append(dj.token_logprobs(dj.logits(model, ids), ids)[0])
        return out

    engines = {"sequence_logprobs": batched, "one at a time (dj.logits)": alone}
    if not a.no_hf:
        import torch

        from tests.hf_ref import hf_model
        hf, _ = hf_model(ckpt)

        def hf_alone():
            out = []
            with torch.no_grad():
                for s in seqs:
                    ids = torch.tensor([s])
                    lp = torch.log_softmax(hf(input_ids=ids).logits[0, :-1].float(), -1)
                    out.append(lp.gather(-1, ids[0, 1:, None])[:, 0].numpy())
            return out
        engines["HF transformers, one at a time"] = hf_alone

    def race(engines):   # warm-up (every compile), then alternate, best of --repeats
        results, best = {}, {}
        for name, fn in engines.items():
            t = time.perf_counter()
            results[name] = fn()
            print(f"# warm-up {name}: {time.perf_counter() - t:.1f} s", flush=True)
        for _ in range(a.repeats):
            for name, fn in engines.items():
                t = time.perf_counter()
                fn()
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
        return results, best

    results, best = race(engines)
    ref = results["one at a time (dj.logits)"]
    print(f"\n{datetime.date.today()} · jax {jax.__version__} · {platform.machine()}, {os.cpu_count()} CPUs · "
          f"{a.texts} texts, 2-{max_len} tokens ({n_tokens} scored) · batch size {a.batch_size} · best of {a.repeats}")
    base = best["sequence_logprobs"]
    print(f"{'engine':<34}{'s':>9}{'tokens/s':>11}{'x slower than batched':>24}{'max |dlogp| vs ours alone':>28}")
    for name in engines:
        diff = max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(results[name], ref))
        print(f"{name:<34}{best[name]:>9.3f}{n_tokens / best[name]:>11,.0f}{best[name] / base:>24.2f}"
              f"{check('texts', name, diff):>28}")
    if a.questions > 0:
        multiple_choice(a, model, rng, race, hf if not a.no_hf else None)
    if a.long_questions > 0:
        long_answers(a, model, rng, race, hf if not a.no_hf else None)
    if CHECK_FAILURES:
        print(f"error: log-prob differences over {TOLERANCE:.0e}: {'; '.join(CHECK_FAILURES)}", file=sys.stderr)
        return 1
    return 0


def multiple_choice(a, model, rng, race, hf) -> None:
    import deepseek_jax as dj
    max_len = min(a.max_len, model.cfg.max_position_embeddings)
    requests = []
    for n in rng.integers(2, max_len, a.questions):
        ctx = rng.integers(0, model.cfg.vocab_size, int(n)).tolist()
        requests += [(ctx, [int(t)]) for t in rng.choice(model.cfg.vocab_size, 4, replace=False)]
    mc = {"loglikelihood, answers share a row": lambda: [r.logprob for r in dj.loglikelihood(
              model, requests, batch_size=a.batch_size)],
          "loglikelihood, a row per request": lambda: [r.logprob for r in dj.loglikelihood(
              model, requests, batch_size=a.batch_size, share=False)]}
    if hf is not None:
        import torch

        def hf_per_request():
            out = []
            with torch.no_grad():
                for ctx, cont in requests:
                    logits = hf(input_ids=torch.tensor([ctx + cont])).logits[0, len(ctx) - 1].float()
                    out.append(float(torch.log_softmax(logits, -1)[cont[0]]))
            return out

        def hf_per_question():
            out = []
            with torch.no_grad():
                for q in range(0, len(requests), 4):
                    ctx = requests[q][0]
                    lsm = torch.log_softmax(hf(input_ids=torch.tensor([ctx])).logits[0, -1].float(), -1)
                    out += [float(lsm[cont[0]]) for _, cont in requests[q:q + 4]]
            return out
        mc["HF transformers, a pass per request"] = hf_per_request
        mc["HF transformers, a pass per question"] = hf_per_question
    choice_table(race, mc, len(requests), "shared",
                 f"{a.questions} questions x 4 one-token answers ({len(requests)} requests)")



def long_answers(a, model, rng, race, hf) -> None:
    import deepseek_jax as dj
    max_len = min(a.max_len, model.cfg.max_position_embeddings)
    V = model.cfg.vocab_size
    requests = []
    for n in rng.integers(max_len // 4, max_len // 2 + 1, a.long_questions):
        ctx = rng.integers(0, V, int(n)).tolist()
        requests += [(ctx, rng.integers(0, V, int(m)).tolist()) for m in rng.integers(2, max_len // 8 + 1, 4)]
    n_tokens = sum(len(c) + len(x) for c, x in requests)
    n_once = sum(len(requests[q][0]) for q in range(0, len(requests), 4)) + sum(len(x) for _, x in requests)
    mc = {"loglikelihood, context cached once": lambda: [r.logprob for r in dj.loglikelihood(
              model, requests, batch_size=a.batch_size)],
          "loglikelihood, a row per request": lambda: [r.logprob for r in dj.loglikelihood(
              model, requests, batch_size=a.batch_size, share=False)]}
    if hf is not None:
        import copy

        import torch

        def hf_score(logits, cont):
            lp = torch.log_softmax(logits.double(), -1)
            return float(lp[torch.arange(len(cont)), torch.tensor(cont)].sum())

        def hf_per_request():
            with torch.no_grad():
                return [hf_score(hf(input_ids=torch.tensor([ctx + cont])).logits[0, len(ctx) - 1:-1], cont)
                        for ctx, cont in requests]

        def hf_cached_context():   # past_key_values: the name transformers 5.x still takes (with a warning)
            out = []
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                for q in range(0, len(requests), 4):
                    ctx = requests[q][0]
                    first = hf(input_ids=torch.tensor([ctx]), use_cache=True)
                    for _, cont in requests[q:q + 4]:
                        rest = hf(input_ids=torch.tensor([cont[:-1]]), use_cache=True,
                                  past_key_values=copy.deepcopy(first.past_key_values)).logits[0]
                        out.append(hf_score(torch.cat([first.logits[0, -1:], rest]), cont))
            return out
        mc["HF transformers, a pass per request"] = hf_per_request
        mc["HF transformers, context cached (KV copy)"] = hf_cached_context
    choice_table(race, mc, len(requests), "cached",
                 f"{a.long_questions} questions x 4 answers of 2-{max_len // 8} tokens ({len(requests)} requests; "
                 f"{n_tokens} context + answer tokens, {n_once} with each context once)")


def choice_table(race, engines, n_requests: int, base_word: str, title: str) -> None:
    """Races the engines (the first is the base; "a row per request" is the reference of the
    last column) and prints their table of summed log-prob results."""
    results, best = race(engines)
    base = best[next(iter(engines))]
    ref = results["loglikelihood, a row per request"]
    print(f"\nmultiple choice: {title}")
    print(f"{'engine':<42}{'s':>9}{'requests/s':>12}{'x slower than ' + base_word:>22}"
          f"{'max |dlogp| vs a row each':>28}")
    for name in engines:
        diff = float(np.abs(np.asarray(results[name]) - np.asarray(ref)).max())
        print(f"{name:<42}{best[name]:>9.3f}{n_requests / best[name]:>12,.0f}{best[name] / base:>22.2f}"
              f"{check(title.split(' (')[0], name, diff):>28}")

if __name__ == "__main__":
    sys.exit(main())
