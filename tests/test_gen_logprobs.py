"""Log-probs of generated tokens (``Generator.generate(..., logprobs=True)``, ``generate --logprobs``).

Each generated token's log-prob must be the number :func:`deepseek_jax.sequence_logprobs` gives
for that position of prompt + output (the raw distribution: temperature 1, no top-k/top-p),
whatever the decoding mode: greedy, sampled, streamed, speculative, with stop strings, rows
ending at eos or at their length.

All on the shipped demo model (byte-level tokenizer). Few compilations: the calls fall into the
buckets batch 4, prompt 16, cache 32 (cache 16 for the eos/length mix).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import deepseek_jax as dj
from deepseek_jax import cli
from deepseek_jax import generate as G
from deepseek_jax.errors import DeepSeekError
from deepseek_jax.generate import Generator
from deepseek_jax.sampling import SamplingParams
from deepseek_jax.tokenizer import Tokenizer

TEXTS = ["12+30", "7+8", "123+456"]      # 8, 6 and 10 prompt tokens
N = 20
KW = dict(max_new_tokens=N, stop_at_eos=False)
ATOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return dj.load(dj.demo_checkpoint(), mtp=True)


@pytest.fixture(scope="module")
def gen(model):
    return Generator(model, Tokenizer.from_dir(dj.demo_checkpoint()))


@pytest.fixture(scope="module")
def prompts(gen):
    ps = [gen.encode_prompt(t) for t in TEXTS]
    assert len({len(p) for p in ps}) == len(ps)
    return ps


@pytest.fixture(scope="module")
def greedy(gen, prompts):
    """Greedy, eos ignored: every row runs its full budget (finish reason "length")."""
    res = gen.generate(prompts, logprobs=True, **KW)
    assert gen.last_stats.buckets == (4, 16, 32)
    assert all(r.finish_reason == "length" and len(r.output_ids) == N for r in res)
    return res


def reference(model, prompts, results) -> list[np.ndarray]:
    """``sequence_logprobs`` of prompt + output, the positions of the output tokens."""
    seqs = [p + r.output_ids for p, r in zip(prompts, results)]
    return [lp[len(lp) - len(r.output_ids):] for lp, r in zip(dj.sequence_logprobs(model, seqs), results)]


def check(model, prompts, results, atol=ATOL):
    for i, (r, ref) in enumerate(zip(results, reference(model, prompts, results))):
        assert isinstance(r.logprobs, list) and len(r.logprobs) == len(r.output_ids), i
        assert all(isinstance(x, float) for x in r.logprobs)
        got = np.array(r.logprobs, np.float64)
        assert np.all(got <= 0) and np.all(np.isfinite(got)), i
        np.testing.assert_allclose(got, ref, atol=atol, rtol=0, err_msg=f"row {i}")


# ---- engine ----------------------------------------------------------------------------------
def test_greedy_logprobs_match_sequence_logprobs(model, prompts, greedy):
    check(model, prompts, greedy)


def test_greedy_logprobs_are_the_distribution_max(model, prompts, greedy):
    """A greedy token's log-prob is the largest log-prob of its position (from ``dj.logits``)."""
    seqs = [p + r.output_ids for p, r in zip(prompts, greedy)]
    ids = np.zeros((len(seqs), max(map(len, seqs))), np.int32)   # right padding: no effect on earlier positions
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = s
    logp = np.asarray(jax.nn.log_softmax(dj.logits(model, ids).astype(np.float32), axis=-1))
    for b, (p, r) in enumerate(zip(prompts, greedy)):
        top = logp[b, len(p) - 1:len(p) - 1 + N].max(axis=-1)
        np.testing.assert_allclose(r.logprobs, top, atol=ATOL, rtol=0)
        assert min(r.logprobs) < -0.05      # not all ~0: the comparison means something


def test_off_by_default_and_same_tokens(gen, prompts, greedy):
    """Without ``logprobs`` (the default): ``None`` and no JSON key; the tokens are the same
    either way; the switch is part of the executables' key, and the state without it holds
    exactly one array less (the float32 ``[Bb, S]`` buffer)."""
    plain = gen.generate(prompts, **KW)
    assert [r.output_ids for r in plain] == [r.output_ids for r in greedy]
    assert all(r.logprobs is None for r in plain)
    assert list(plain[0].to_json()) == ["prompt_ids", "output_ids", "text", "finish_reason"]
    js = greedy[0].to_json()
    assert list(js) == ["prompt_ids", "output_ids", "text", "finish_reason", "logprobs"]
    assert js["logprobs"] == greedy[0].logprobs and json.loads(json.dumps(js)) == js
    # both executables are cached: neither call compiles again
    n = gen.compile_count
    gen.generate(prompts, **KW)
    gen.generate(prompts, logprobs=True, **KW)
    assert gen.compile_count == n
    base = (4, 16, 32, True, False, False, None, None)
    outs = {}
    for (ident, key), (pre, _) in G._EXECUTABLES.items():
        if ident == (gen._prepared or G._as_is(gen.model)).ident and key[:8] == base:
            outs[key[8:]] = jax.tree.leaves(pre.out_info)
    assert set(outs) == {(False,), (True,)}
    extra = len(outs[(True,)]) - len(outs[(False,)])
    assert extra == 1
    assert any(o.shape == (4, 32) and o.dtype == np.float32 for o in outs[(True,)])
    assert not any(o.dtype == np.float32 and o.shape == (4, 32) for o in outs[(False,)])
    # max_new_tokens=0: an empty list when asked for
    assert gen.generate(prompts, max_new_tokens=0, logprobs=True)[0].logprobs == []
    assert gen.generate(prompts, max_new_tokens=0)[0].logprobs is None


def test_sampled_logprobs_are_the_raw_distribution(model, gen, prompts, greedy):
    """Temperature 0.7 and top-p 0.9 choose the tokens; the log-probs stay those of the raw
    (temperature 1, unfiltered) distribution, not the sampling one."""
    res = gen.generate(prompts, sampling=SamplingParams(0.7, top_p=0.9), seed=3, logprobs=True, **KW)
    assert [r.output_ids for r in res] != [r.output_ids for r in greedy]
    check(model, prompts, res)
    # the tempered log-probs would differ markedly somewhere (so the check above can tell)
    seqs = [p + r.output_ids for p, r in zip(prompts, res)]
    ids = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = s
    lg = dj.logits(model, ids).astype(np.float32)
    tempered = np.asarray(jax.nn.log_softmax(lg / 0.7, axis=-1))
    gap = max(np.abs(np.array(r.logprobs) - tempered[b, np.arange(len(p) - 1, len(p) - 1 + N), r.output_ids]).max()
              for b, (p, r) in enumerate(zip(prompts, res)))
    assert gap > 0.01


def test_rows_ending_at_eos_and_at_length(model, gen, prompts):
    """Eos on and a budget of 3: "12+30" and "7+8" end at eos (2 digits, then eos: not output,
    no log-prob), "123+456" at its length."""
    res = gen.generate(prompts, max_new_tokens=3, logprobs=True)
    assert [r.finish_reason for r in res] == ["eos", "eos", "length"]
    assert [len(r.output_ids) for r in res] == [2, 2, 3]
    check(model, prompts, res)


def test_streaming_gives_the_same_logprobs(model, gen, prompts, greedy):
    got = {i: [] for i in range(len(prompts))}
    res = gen.generate(prompts, logprobs=True, stream=lambda row, ids: got[row].extend(ids), stream_chunk=3, **KW)
    assert [got[i] for i in range(len(prompts))] == [r.output_ids for r in res] == [r.output_ids for r in greedy]
    assert [r.logprobs for r in res] == [r.logprobs for r in greedy]


def test_speculative_logprobs(model, gen, prompts, greedy):
    """MTP speculative greedy: same tokens, and the verifier's log-probs for both the accepted
    draft and the bonus token match plain decoding's."""
    res = gen.generate(prompts, speculative="mtp", logprobs=True, **KW)
    assert gen.last_stats.accepted > 0 and gen.last_stats.steps < N   # two-token steps happened
    assert [r.output_ids for r in res] == [r.output_ids for r in greedy]
    check(model, prompts, res)
    for r, g in zip(res, greedy):
        np.testing.assert_allclose(r.logprobs, g.logprobs, atol=ATOL, rtol=0)


def test_stop_strings_cut_the_logprobs(model, gen, greedy):
    """A stop string cuts ``output_ids`` and the log-probs with them; generate_text passes
    ``logprobs`` through (with and without stop strings)."""
    plain = gen.generate_text(TEXTS, logprobs=True, **KW)
    assert [r.logprobs for r in plain] == [r.logprobs for r in greedy]
    stop = plain[0].text[2:5]
    # (one chunk runs the whole budget: the tokens past the stop string are cut on the host)
    res = gen.generate_text(TEXTS, stop=[stop], logprobs=True, stream_chunk=N, **KW)
    assert gen.last_stats.steps == N
    assert res[0].finish_reason == "stop" and 0 < len(res[0].output_ids) < N
    for r, g in zip(res, greedy):
        assert r.output_ids == g.output_ids[:len(r.output_ids)]
        assert r.logprobs == g.logprobs[:len(r.output_ids)]
    assert res[0].to_json()["logprobs"] == res[0].logprobs
    assert gen.generate_text(TEXTS, stop=[stop], **KW)[0].logprobs is None


def test_bad_logprobs_value(gen, prompts):
    with pytest.raises(DeepSeekError, match="logprobs must be True or False"):
        gen.generate(prompts, max_new_tokens=2, logprobs="yes")


# ---- CLI -------------------------------------------------------------------------------------
def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_logprobs_json(greedy, capsys):
    """``--logprobs --json`` adds the key (the command runs over the tests' 8 CPU devices: a
    sharded model and its own executables)."""
    argv = ["generate", dj.demo_checkpoint(), "--max-new-tokens", N, "--temperature", 0, "--ignore-eos", "--json",
            "--logprobs"]
    for t in TEXTS:
        argv += ["--prompt", t]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [list(row) for row in rows] == [["prompt_ids", "output_ids", "text", "finish_reason", "logprobs"]] * 3
    assert [row["output_ids"] for row in rows] == [r.output_ids for r in greedy]
    for row, r in zip(rows, greedy):
        np.testing.assert_allclose(row["logprobs"], r.logprobs, atol=ATOL, rtol=0)
        assert len(row["logprobs"]) == len(row["output_ids"])


def test_cli_logprobs_needs_json(capsys):
    code, out, err = run_cli(capsys, "generate", dj.demo_checkpoint(), "--prompt", "1+1", "--logprobs")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith("deepseek-jax generate: error: --logprobs needs --json"), lines[0]
