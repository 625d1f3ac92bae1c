"""Log-probs of generated tokens (``Generator.generate(..., logprobs=True)``, ``generate --logprobs``).

Each generated token's log-prob must be the number :func:`deepseek_jax.sequence_logprobs` gives
for that position of prompt + output (the raw distribution: temperature 1, no top-k/top-p),
whatever the decoding mode: greedy, sampled, streamed, speculative, with stop strings, rows
ending at eos or at their length. Top log-probs (``top_logprobs=K``, ``--top-logprobs K``): the
K most likely tokens of each such position, ``jax.lax.top_k`` of the ``log_softmax`` of
:func:`deepseek_jax.logits` over prompt + output.

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
    outs = prefill_outputs(gen, (4, 16, 32, True, False, False, None, None))   # key[8:]: (logprobs, top K)
    assert {(False, 0), (True, 0)} <= set(outs)
    extra = len(outs[(True, 0)]) - len(outs[(False, 0)])
    assert extra == 1
    assert any(o.shape == (4, 32) and o.dtype == np.float32 for o in outs[(True, 0)])
    assert not any(o.dtype == np.float32 and o.shape == (4, 32) for o in outs[(False, 0)])
    # max_new_tokens=0: an empty list when asked for
    assert gen.generate(prompts, max_new_tokens=0, logprobs=True)[0].logprobs == []
    assert gen.generate(prompts, max_new_tokens=0)[0].logprobs is None


def prefill_outputs(gen, base) -> dict:
    """The cached prefill executables of ``gen``'s model whose key starts with ``base``: their
    output leaves, by the rest of the key."""
    outs = {}
    for (ident, key), (pre, _) in G._EXECUTABLES.items():
        if ident == (gen._prepared or G._as_is(gen.model)).ident and key[:len(base)] == base:
            outs[key[len(base):]] = jax.tree.leaves(pre.out_info)
    return outs


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


# ---- top log-probs ---------------------------------------------------------------------------
K = 5


@pytest.fixture(scope="module")
def top_greedy(gen, prompts):
    """Greedy with ``top_logprobs=K`` (which implies ``logprobs``), the buckets of ``greedy``."""
    res = gen.generate(prompts, top_logprobs=K, **KW)
    assert gen.last_stats.buckets == (4, 16, 32)
    return res


def raw_logp(model, prompts, results) -> list[np.ndarray]:
    """Per row, ``log_softmax(dj.logits(prompt + output))`` at the positions that drew the output
    tokens, float32 ``[len(output), V]``."""
    seqs = [p + r.output_ids for p, r in zip(prompts, results)]
    ids = np.zeros((len(seqs), max(map(len, seqs))), np.int32)   # right padding: no effect on earlier positions
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = s
    logp = np.asarray(jax.nn.log_softmax(dj.logits(model, ids).astype(np.float32), axis=-1))
    return [logp[b, len(p) - 1:len(p) - 1 + len(r.output_ids)] for b, (p, r) in enumerate(zip(prompts, results))]


def check_top(model, prompts, results, k=K, atol=ATOL):
    """Each result's ``top_logprobs`` is ``jax.lax.top_k`` of the reference log-probs at every
    output position: the values within ``atol``, every listed id's own reference log-prob within
    ``atol``, and the ids exactly wherever the reference order is clear (no two of its k + 1 best
    within ``2 atol``: a near tie may swap between two ways of computing the logits). The chosen
    token is listed, with its ``logprobs`` value exactly, whenever its rank is below k."""
    clear = listed = 0
    for b, (r, ref) in enumerate(zip(results, raw_logp(model, prompts, results))):
        assert isinstance(r.top_logprobs, list) and len(r.top_logprobs) == len(r.output_ids), b
        ref_v, ref_i = (np.asarray(a) for a in jax.lax.top_k(ref, k + 1))
        for j, (tok, top) in enumerate(zip(r.output_ids, r.top_logprobs)):
            assert len(top) == k and all(type(i) is int and type(v) is float for i, v in top), (b, j)
            ids, vals = [i for i, _ in top], np.array([v for _, v in top])
            assert len(set(ids)) == k and np.all(np.diff(vals) <= 0), (b, j, top)
            np.testing.assert_allclose(vals, ref_v[j, :k], atol=atol, rtol=0, err_msg=f"row {b} pos {j}")
            np.testing.assert_allclose(vals, ref[j, ids], atol=atol, rtol=0, err_msg=f"row {b} pos {j}")
            if np.all(-np.diff(ref_v[j]) > 2 * atol):
                clear += 1
                assert ids == ref_i[j, :k].tolist(), (b, j, top, ref_i[j])
            if ref[j, tok] > ref_v[j, k - 1] + atol:    # rank < k
                listed += 1
                assert (tok, r.logprobs[j]) in top, (b, j, tok, top)
            if tok in ids:
                assert top[ids.index(tok)][1] == r.logprobs[j], (b, j)
    n = sum(len(r.output_ids) for r in results)
    assert clear >= n // 2, (clear, n)     # the exact-order check covers most positions
    return listed


def test_top_logprobs_greedy_match_top_k(model, prompts, greedy, top_greedy):
    """Greedy: the tokens and log-probs are those of ``logprobs=True`` alone, each position's
    list is the top-k of the raw distribution, and its first entry is the chosen token."""
    assert [r.output_ids for r in top_greedy] == [r.output_ids for r in greedy]
    for r, g in zip(top_greedy, greedy):
        np.testing.assert_allclose(r.logprobs, g.logprobs, atol=1e-6, rtol=0)
        assert [top[0] for top in r.top_logprobs] == list(zip(r.output_ids, r.logprobs))
    assert check_top(model, prompts, top_greedy) == len(prompts) * N


def test_top_logprobs_sampled(model, gen, prompts, greedy):
    """Sampled (temperature 0.7, top-p 0.9): the lists are still the raw distribution's, and
    a sampled token that is not the most likely one is listed where it ranks."""
    res = gen.generate(prompts, sampling=SamplingParams(0.7, top_p=0.9), seed=3, top_logprobs=K, **KW)
    assert [r.output_ids for r in res] != [r.output_ids for r in greedy]
    check(model, prompts, res)
    assert check_top(model, prompts, res) > 0
    assert any(top[0][0] != tok and tok in [i for i, _ in top]
               for r in res for tok, top in zip(r.output_ids, r.top_logprobs))


def test_top_logprobs_speculative(model, gen, prompts, top_greedy):
    """MTP speculative greedy: the verifier's lists at both positions (accepted draft and bonus
    token) match plain decoding's."""
    res = gen.generate(prompts, speculative="mtp", top_logprobs=K, **KW)
    assert gen.last_stats.accepted > 0 and gen.last_stats.steps < N
    assert [r.output_ids for r in res] == [r.output_ids for r in top_greedy]
    check(model, prompts, res)
    check_top(model, prompts, res)
    for r, g in zip(res, top_greedy):
        np.testing.assert_allclose([[v for _, v in t] for t in r.top_logprobs],
                                   [[v for _, v in t] for t in g.top_logprobs], atol=ATOL, rtol=0)
        assert [t[0] for t in r.top_logprobs] == list(zip(r.output_ids, r.logprobs))


def test_top_logprobs_stop_strings_and_streaming(model, gen, prompts, top_greedy):
    """A stop string cuts the lists with ``output_ids``; ``generate_text`` passes ``top_logprobs``.
    Streamed in chunks, the lists are the same as in one go."""
    streamed = gen.generate(prompts, top_logprobs=K, stream=lambda row, ids: None, stream_chunk=3, **KW)
    assert [r.top_logprobs for r in streamed] == [r.top_logprobs for r in top_greedy]
    stop = gen.tokenizer.decode(top_greedy[0].output_ids)[2:5]
    res = gen.generate_text(TEXTS, stop=[stop], top_logprobs=K, stream_chunk=N, **KW)
    assert res[0].finish_reason == "stop" and 0 < len(res[0].output_ids) < N
    for r, g in zip(res, top_greedy):
        n = len(r.output_ids)
        assert r.output_ids == g.output_ids[:n] and len(r.top_logprobs) == len(r.logprobs) == n
        assert r.top_logprobs == g.top_logprobs[:n] and r.logprobs == g.logprobs[:n]
    assert res[0].to_json()["top_logprobs"] == [[list(p) for p in t] for t in res[0].top_logprobs]
    check_top(model, prompts, res)


def test_top_logprobs_off_by_default_json_and_executables(gen, prompts, greedy, top_greedy):
    """Off by default (and with ``logprobs=True`` alone, or K = 0): ``None`` and no JSON key.
    K > 0 implies ``logprobs``. JSON: ``[id, logprob]`` pairs after ``"logprobs"``. K is part of
    the executables' key: its state holds exactly two arrays more than ``logprobs`` alone, the
    int32 and float32 ``[Bb, S, K]`` buffers; K = 0 reuses the ``logprobs`` executables."""
    assert all(r.top_logprobs is None for r in greedy)
    # (the executables these calls need, used again first: other tests in this process may have
    # pushed them out of the generator's bounded cache since)
    for kw in (dict(), dict(logprobs=True), dict(top_logprobs=K)):
        gen.generate(prompts, **kw, **KW)
    n = gen.compile_count
    for kw in (dict(), dict(top_logprobs=0), dict(logprobs=True, top_logprobs=0)):
        res = gen.generate(prompts, **kw, **KW)
        assert all(r.top_logprobs is None for r in res)
        assert "top_logprobs" not in res[0].to_json()
    res = gen.generate(prompts, logprobs=False, top_logprobs=K, **KW)   # implied
    assert [r.logprobs for r in res] == [r.logprobs for r in top_greedy]
    assert [r.top_logprobs for r in res] == [r.top_logprobs for r in top_greedy]
    assert gen.compile_count == n
    js = top_greedy[1].to_json()
    assert list(js) == ["prompt_ids", "output_ids", "text", "finish_reason", "logprobs", "top_logprobs"]
    assert js["top_logprobs"] == [[[i, v] for i, v in t] for t in top_greedy[1].top_logprobs]
    assert json.loads(json.dumps(js)) == js
    assert all(len(t) == K and all(len(p) == 2 for p in t) for t in js["top_logprobs"])
    outs = prefill_outputs(gen, (4, 16, 32, True, False, False, None, None))
    assert {(True, 0), (True, K)} <= set(outs)
    assert len(outs[(True, K)]) - len(outs[(True, 0)]) == 2
    assert sorted(str(o.dtype) for o in outs[(True, K)] if o.shape == (4, 32, K)) == ["float32", "int32"]
    assert not any(o.shape == (4, 32, K) for o in outs[(True, 0)])
    empty = gen.generate(prompts, max_new_tokens=0, top_logprobs=K)[0]
    assert empty.top_logprobs == [] and empty.logprobs == []
    assert gen.generate(prompts, max_new_tokens=0, logprobs=True)[0].top_logprobs is None


@pytest.mark.parametrize("bad", [-1, 21, 2.5, "3", True, None, np.float32(4)])
def test_bad_top_logprobs_value(gen, prompts, bad):
    with pytest.raises(DeepSeekError, match=r"top_logprobs must be an integer in \[0, 20\]") as e:
        gen.generate(prompts, max_new_tokens=2, top_logprobs=bad)
    assert "\n" not in str(e.value)


def test_top_logprobs_numpy_int_and_max(model, gen, prompts):
    """A numpy integer is an integer; K = 20 (the most) works (one row, batch bucket 1)."""
    res = gen.generate(prompts[:1], max_new_tokens=3, stop_at_eos=False, top_logprobs=np.int64(20))
    assert len(res[0].top_logprobs) == 3 and all(len(t) == 20 for t in res[0].top_logprobs)
    check_top(model, prompts[:1], res, k=20)


def test_cli_top_logprobs_json(top_greedy, capsys):
    """``--top-logprobs K --json`` adds both keys (``--logprobs`` implied)."""
    argv = ["generate", dj.demo_checkpoint(), "--max-new-tokens", N, "--temperature", 0, "--ignore-eos", "--json",
            "--top-logprobs", K]
    for t in TEXTS:
        argv += ["--prompt", t]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [list(row) for row in rows] == [["prompt_ids", "output_ids", "text", "finish_reason", "logprobs",
                                            "top_logprobs"]] * 3
    assert [row["output_ids"] for row in rows] == [r.output_ids for r in top_greedy]
    for row, r in zip(rows, top_greedy):
        np.testing.assert_allclose(row["logprobs"], r.logprobs, atol=ATOL, rtol=0)
        assert [[i for i, _ in t] for t in row["top_logprobs"]][:3] == [[i for i, _ in t] for t in r.top_logprobs][:3]
        np.testing.assert_allclose([[v for _, v in t] for t in row["top_logprobs"]],
                                   [[v for _, v in t] for t in r.top_logprobs], atol=ATOL, rtol=0)


@pytest.mark.parametrize("value,message", [
    ("21", "--top-logprobs: expected an integer in 0..20, got '21'"),
    ("-1", "--top-logprobs: expected an integer in 0..20, got '-1'"),
    ("2.5", "--top-logprobs: expected an integer in 0..20, got '2.5'"),
    ("x", "--top-logprobs: expected an integer in 0..20, got 'x'"),
    ("3", "--top-logprobs needs --json"),
])
def test_cli_top_logprobs_errors(capsys, value, message):
    extra = [] if "json" in message else ["--json"]
    code, out, err = run_cli(capsys, "generate", dj.demo_checkpoint(), "--prompt", "1+1", "--top-logprobs", value,
                             *extra)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith(f"deepseek-jax generate: error: {message}"), lines[0]
