"""MTP speculative decoding: greedy output equal to plain greedy token for token, the loop's cache
invariant, the rejection rule's distribution, stats, and input errors.

Random weights alone give almost no accepted drafts (the random MTP head never agrees with the
random main head), so most tests also use a "constant drafter" variant of the same checkpoint: the
MTP's final norm is zeroed (its logits are all 0, so it always drafts token 0) and the main head
keeps only the rows of tokens 5 and 9 (its argmax is 0 unless token 5 or 9 scores above 0). The
main model then emits 0, 5 and 9 in an irregular mix, and drafts are accepted exactly when the
next token is 0: both the accept (2 tokens per step) and the reject path run, in every row, at
every position. The shipped demo model covers the realistic case (high acceptance).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import deepseek_jax as dj
from deepseek_jax import cli
from deepseek_jax.cache import LatentCache
from deepseek_jax.errors import DeepSeekError
from deepseek_jax.generate import Generator, Weights, _Knobs
from deepseek_jax.speculative import _probs, _verify, decode_spec, prefill_spec
from deepseek_jax.sampling import SamplingParams

# Five prompts of different lengths: batch bucket 8, prompt bucket 32.
PROMPTS = [[0, 5, 17], [0, 9, 3, 200, 77, 31, 8, 120, 64], list(range(3, 20)), [0, 250, 11, 12, 13],
           list(range(40, 70))]


@pytest.fixture(scope="module")
def model(ckpt_a):
    return dj.load(ckpt_a, dtype="float32", mtp=True)


@pytest.fixture(scope="module")
def gen(model):
    return Generator(model)


def constant_drafter(model):
    """The checkpoint with the MTP always drafting 0 and the main head over {0, 5, 9} (see above)."""
    m = nnx.clone(model)
    norm = m.mtp.shared_head.norm
    norm.weight[...] = jnp.zeros_like(norm.weight[...])
    keep = jnp.zeros((m.cfg.vocab_size, 1), bool).at[jnp.array([5, 9])].set(True)
    w = m.lm_head.weight[...]
    m.lm_head.weight[...] = jnp.where(keep, w, 0).astype(w.dtype)
    return m


@pytest.fixture(scope="module")
def gen_c(model):
    return Generator(constant_drafter(model))


def same(a, b):
    return [x.output_ids for x in a] == [x.output_ids for x in b] and \
        [x.finish_reason for x in a] == [x.finish_reason for x in b]


def run_both(gen, prompts, **kw):
    plain = gen.generate(prompts, **kw)
    plain_stats = gen.last_stats
    spec = gen.generate(prompts, speculative="mtp", **kw)
    return plain, plain_stats, spec, gen.last_stats


# ---- greedy identity ---------------------------------------------------------------------------
def test_random_checkpoint_greedy_identical(gen):
    plain, _, spec, st = run_both(gen, PROMPTS, max_new_tokens=24, stop_at_eos=False)
    assert same(plain, spec)
    assert [len(r.output_ids) for r in spec] == [24] * 5
    assert st.speculative == "mtp" and st.drafted > 0 and 0 <= st.accepted <= st.drafted
    # eos: a token that row 1 emits mid-way ends it there (other rows may end too).
    eos = plain[1].output_ids[5]
    plain, _, spec, _ = run_both(gen, PROMPTS, max_new_tokens=24, eos_id=eos)
    assert same(plain, spec) and spec[1].finish_reason == "eos"


@pytest.mark.parametrize("kw", [dict(max_new_tokens=40, stop_at_eos=False), dict(max_new_tokens=40, eos_id=9),
                                dict(max_new_tokens=40, eos_id=5), dict(max_new_tokens=7, eos_id=5),
                                dict(max_new_tokens=1), dict(max_new_tokens=2), dict(max_new_tokens=3, eos_id=9)])
def test_accept_and_reject_paths_identical(gen_c, kw):
    plain, pst, spec, st = run_both(gen_c, PROMPTS, **kw)
    assert same(plain, spec), [(p.output_ids, s.output_ids) for p, s in zip(plain, spec)]
    assert st.new_tokens == pst.new_tokens
    n = kw["max_new_tokens"]
    for r in spec:
        assert len(r.output_ids) == n if r.finish_reason == "length" else len(r.output_ids) < n
        if "eos_id" in kw:
            assert kw["eos_id"] not in r.output_ids
    if "eos_id" in kw and n > 3:
        assert {r.finish_reason for r in spec} == {"eos"}
    if n == 40 and "eos_id" not in kw:
        assert 0 < st.accepted < st.drafted          # both paths ran


def test_mixed_outputs_exercise_both_paths(gen_c):
    spec = gen_c.generate(PROMPTS, max_new_tokens=40, stop_at_eos=False, speculative="mtp")
    toks = {t for r in spec for t in r.output_ids}
    assert toks == {0, 5, 9}
    st = gen_c.last_stats
    assert 0.2 < st.acceptance_rate < 0.95
    assert st.new_tokens == 200


def test_max_len_cut(model):
    """Rows whose budget is cut by the max length stop exactly there (finish reason "length")."""
    gen = Generator(constant_drafter(model), max_len=40)
    plain, _, spec, st = run_both(gen, PROMPTS, max_new_tokens=64, stop_at_eos=False)
    assert same(plain, spec)
    assert [len(r.output_ids) for r in spec] == [40 - len(p) for p in PROMPTS]
    assert st.buckets[2] == 40 and st.accepted > 0


def test_streaming_matches(gen_c):
    full = gen_c.generate(PROMPTS, max_new_tokens=30, eos_id=9, speculative="mtp")
    got = {i: [] for i in range(len(PROMPTS))}
    res = gen_c.generate(PROMPTS, max_new_tokens=30, eos_id=9, speculative="mtp", stream_chunk=3,
                         stream=lambda r, ids: got[r].extend(ids))
    assert same(full, res)
    assert [got[i] for i in range(len(PROMPTS))] == [r.output_ids for r in full]


# ---- the loop invariant: caches hold what a fresh pass over the decided tokens computes ------------
@pytest.mark.parametrize("per_layer", [False, True])
def test_caches_match_a_fresh_pass(gen_c, per_layer):
    model = gen_c.model
    graphdef, params = nnx.split(model)
    weights = Weights(params, model.unstacked() if per_layer else None)
    B, P, S = 4, 32, 64
    prompts = PROMPTS[:4]
    ids = np.zeros((B, P), np.int32)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = p
    lens = np.array([len(p) for p in prompts], np.int32)
    end = np.minimum(lens + 12, S - 1).astype(np.int32)
    knobs = _Knobs(jnp.int32(9), jnp.bool_(False), jnp.float32(1.0), jnp.int32(0), jnp.float32(1.0))
    pre = jax.jit(partial(prefill_spec, graphdef, True, False, S))
    dec = jax.jit(partial(decode_spec, graphdef, True, False))
    for limit in (3, 6):   # stop mid-way, while rows sit at different positions
        st = pre(weights, jnp.asarray(ids), jnp.asarray(lens), jnp.asarray(end), jnp.ones(B, bool),
                 jnp.uint32(0), knobs)
        st = dec(weights, st, jnp.int32(limit), knobs)
        assert isinstance(st.cache.moe, tuple) == per_layer
        st = st._replace(cache=st.cache.stacked())
        buf, cur, draft = np.asarray(st.buf_BS), np.asarray(st.cur_B), np.asarray(st.draft_B)
        assert len(set(cur.tolist())) > 1, cur            # rows advanced by different amounts
        # One fresh causal pass over every row's whole buffer: its entries before a row's ``cur``
        # depend only on the decided tokens there (what lies beyond is never looked at).
        dense, moe, mtp_cache, x = _fresh_pass(model, jnp.asarray(buf))
        for r in range(B):
            c = int(cur[r])
            for got, want in ((st.cache.dense, dense), (st.cache.moe, moe)):
                np.testing.assert_allclose(np.asarray(got[:, r, :c]), np.asarray(want[:, r, :c]), atol=2e-5)
            np.testing.assert_allclose(np.asarray(st.mtp_cache[r, :c]), np.asarray(mtp_cache[r, :c]), atol=2e-5)
            # The pending draft is the MTP's guess from row cur-1 (always 0 for this drafter).
            assert draft[r] == int(jnp.argmax(model.mtp_head(x[r, c - 1])))


@nnx.jit
def _fresh_pass(model, buf_BS):
    """The main model over ``buf[:, :S-1]`` from an empty cache, then the MTP over its hidden
    states and the next tokens: both caches and the MTP's hidden rows."""
    B, S = buf_BS.shape
    ref = model(buf_BS[:, :-1], cache=LatentCache.zeros(model.cfg, B, S, jnp.float32))
    x, mtp_cache, _ = model.mtp_hidden(ref.hidden, buf_BS[:, 1:],
                                       cache_BSC=jnp.zeros((B, S, model.cfg.latent_dim), jnp.float32))
    return ref.cache.dense, ref.cache.moe, mtp_cache, x


@pytest.mark.parametrize("T,B", [(2, 2), (3, 2), (2, 8)])
def test_verify_pass_equals_one_token_passes(model, T, B):
    """A few new tokens per row through the absorbed form (what a verify step runs) give the
    numbers of the same tokens fed one at a time (what plain decoding runs), bit for bit on the
    reference backend, and the same cache. (B=8: the MoE runs every expert on every token.)"""
    P, S = 6, 16
    ids = jnp.asarray(np.arange(B * (P + T)).reshape(B, P + T) * 7 % model.cfg.vocab_size, jnp.int32)
    cache = model(ids[:, :P], cache=LatentCache.zeros(model.cfg, B, S, jnp.float32)).cache
    pos = jnp.broadcast_to(jnp.arange(P, P + T, dtype=jnp.int32), (B, T)) + jnp.arange(B)[:, None] % 4
    run = jax.jit(lambda i, p, c: model(i, p, cache=c, absorbed=True))
    got = run(ids[:, P:], pos, cache)
    c, logits, hidden = cache, [], []
    for t in range(T):
        out = run(ids[:, P + t:P + t + 1], pos[:, t:t + 1], c)
        c = out.cache
        logits.append(out.logits)
        hidden.append(out.hidden)
    np.testing.assert_array_equal(np.asarray(got.logits), np.asarray(jnp.concatenate(logits, 1)))
    np.testing.assert_array_equal(np.asarray(got.hidden), np.asarray(jnp.concatenate(hidden, 1)))
    for a, b in ((got.cache.dense, c.dense), (got.cache.moe, c.moe)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---- sampling: the rejection rule keeps the target distribution --------------------------------
def test_rejection_rule_distribution():
    V, n = 6, 40000
    rng = np.random.default_rng(0)
    p0 = rng.dirichlet(np.ones(V)).astype(np.float32)
    p1 = rng.dirichlet(np.ones(V)).astype(np.float32)
    q = rng.dirichlet(np.ones(V) * 0.5).astype(np.float32)
    logits = jnp.log(jnp.stack([jnp.asarray(p0), jnp.asarray(p1)]))[None].repeat(n, 0)   # [n, 2, V]
    keys = jax.random.split(jax.random.key(1), n)
    draft = jax.random.categorical(jax.random.key(2), jnp.log(jnp.asarray(q)), shape=(n,)).astype(jnp.int32)
    knobs = _Knobs(jnp.int32(0), jnp.bool_(True), jnp.float32(1.0), jnp.int32(0), jnp.float32(1.0))
    t1, t2, ok = jax.jit(partial(_verify, knobs=knobs, greedy=False, filtered=False))(
        logits, draft, jnp.broadcast_to(jnp.asarray(q), (n, V)), keys)
    f1 = np.bincount(np.asarray(t1), minlength=V) / n
    f2 = np.bincount(np.asarray(t2), minlength=V) / n
    np.testing.assert_allclose(f1, p0, atol=0.012)
    np.testing.assert_allclose(f2, p1, atol=0.012)
    # Acceptance probability is sum_x min(p(x), q(x)).
    assert abs(float(np.mean(np.asarray(ok))) - float(np.minimum(p0, q).sum())) < 0.012
    assert np.all(np.asarray(t1)[np.asarray(ok)] == np.asarray(draft)[np.asarray(ok)])


def _filtered_probs(logits, T, k, p):
    """Temperature, then top-k, then top-p (the smallest prefix of the sorted distribution whose
    mass reaches p), in float64 numpy: the rule README and sampling.py state."""
    z = np.asarray(logits, np.float64) / T
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(z.size, bool)
    keep[order[:k or z.size]] = True
    pr = np.where(keep, np.exp(z - z.max()), 0.0)
    pr /= pr.sum()
    before = np.cumsum(pr[order]) - pr[order]
    drop = order[(before >= p) & (np.arange(z.size) > 0)]
    pr[drop] = 0.0
    return pr / pr.sum()


@pytest.mark.parametrize("T, k, p", [(0.7, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.6), (1.5, 3, 0.8)])
def test_rejection_rule_keeps_the_filtered_distribution(T, k, p):
    """With temperature, top-k and top-p, the draft's q and the verifier's p filtered alike: the
    first token follows p0, the bonus token after an accepted draft p1, a draft is accepted with
    probability sum(min(p0, q)), and no token outside the filtered support is ever drawn."""
    V, n = 8, 40000
    rng = np.random.default_rng(5)
    l0, l1 = (rng.normal(0.0, 1.5, V).astype(np.float32) for _ in range(2))
    lq = (l0 + rng.normal(0.0, 0.7, V)).astype(np.float32)   # a draft near the target, as the MTP head's
    filtered = k > 0 or p < 1
    knobs = _Knobs(jnp.int32(0), jnp.bool_(True), jnp.float32(T), jnp.int32(k), jnp.float32(p))
    P0, P1, Q = (_filtered_probs(x, T, k, p) for x in (l0, l1, lq))
    q = np.asarray(_probs(jnp.asarray(lq)[None], knobs, filtered))[0]
    np.testing.assert_allclose(q, Q, atol=1e-6)
    draft = jax.random.categorical(jax.random.key(2), jnp.log(jnp.asarray(q)), shape=(n,)).astype(jnp.int32)
    logits = jnp.broadcast_to(jnp.asarray(np.stack([l0, l1]))[None], (n, 2, V))
    t1, t2, ok = map(np.asarray, jax.jit(partial(_verify, knobs=knobs, greedy=False, filtered=filtered))(
        logits, draft, jnp.broadcast_to(jnp.asarray(q), (n, V)), jax.random.split(jax.random.key(1), n)))
    assert not (P0[t1] == 0).any() and not (P1[t2[ok]] == 0).any()
    np.testing.assert_allclose(np.bincount(t1, minlength=V) / n, P0, atol=0.012)
    np.testing.assert_allclose(np.bincount(t2[ok], minlength=V) / ok.sum(), P1, atol=0.015)
    assert abs(ok.mean() - np.minimum(P0, Q).sum()) < 0.012 and ok.mean() > 0.3


def test_sampling_runs_and_is_reproducible(gen_c):
    s = SamplingParams(temperature=0.9, top_k=3)
    a = gen_c.generate(PROMPTS, max_new_tokens=12, sampling=s, seed=3, speculative="mtp")
    st = gen_c.last_stats
    b = gen_c.generate(PROMPTS, max_new_tokens=12, sampling=s, seed=3, speculative="mtp")
    assert same(a, b)
    assert st.drafted > 0 and [len(r.output_ids) for r in a] == [12] * 5
    assert {t for r in a for t in r.output_ids} <= {0, 5, 9} | set(range(gen_c.vocab_size))


# ---- the FP8 path keeps the MTP module -------------------------------------------------------
def test_dequantized_generator_keeps_mtp(model, gen):
    assert model.cfg.fp8 and gen.weights == "dequantize" and gen.model.mtp is not None
    assert gen.model.mtp.mlp.experts.gate_proj.weight.dtype == jnp.float32


# ---- errors ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt_no_mtp(tmp_path_factory):
    from tests.conftest import CONFIG_A
    from deepseek_jax.synthetic import random_hub_checkpoint
    return str(random_hub_checkpoint(tmp_path_factory.mktemp("nomtp"), dict(CONFIG_A, num_nextn_predict_layers=0),
                                     seed=1))


def test_speculative_needs_mtp(model, ckpt_no_mtp, capsys):
    gen = Generator(dj.load(ckpt_no_mtp))
    with pytest.raises(DeepSeekError, match="MTP module"):
        gen.generate(PROMPTS[:1], max_new_tokens=2, speculative="mtp")
    with pytest.raises(DeepSeekError, match="speculative"):
        Generator(model).generate(PROMPTS[:1], max_new_tokens=2, speculative="eagle")
    code = cli.main(["generate", ckpt_no_mtp, "--prompt-ids", "1,2,3", "--speculative", "mtp"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("deepseek-jax generate: error: --speculative mtp:") and "no MTP layer" in lines[0]


# ---- the shipped model ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_gen():
    from deepseek_jax.commands.demo import demo_checkpoint
    from deepseek_jax.tokenizer import Tokenizer
    d = demo_checkpoint()
    return Generator(dj.load(d, mtp=True), Tokenizer.from_dir(d))


def test_shipped_model_greedy_identical(demo_gen):
    from deepseek_jax.commands.demo import DEMO_TASK
    from deepseek_jax.tasks import SyntheticDataset
    ds = SyntheticDataset(DEMO_TASK, demo_gen.tokenizer, batch_size=24, seed=11, split="eval")
    examples = ds.examples(0)
    prompts = [ds.encode(p)[0] for p, _ in examples]
    assert len({len(p) for p in prompts}) > 3                      # different lengths
    for kw in (dict(max_new_tokens=8), dict(max_new_tokens=2), dict(max_new_tokens=3),
               dict(max_new_tokens=10, stop_at_eos=False)):
        plain, pst, spec, st = run_both(demo_gen, prompts, **kw)
        assert same(plain, spec), kw
        if kw == dict(max_new_tokens=8):
            assert {r.finish_reason for r in spec} == {"eos"}
            assert sum(demo_gen.tokenizer.decode(r.output_ids) == a for r, (_, a) in zip(spec, examples)) >= 22
            assert st.acceptance_rate >= 0.8 and st.steps < pst.steps
        if kw == dict(max_new_tokens=2):
            assert {r.finish_reason for r in spec} == {"length"} | ({"eos"} & {r.finish_reason for r in plain})


def test_cli_generate_speculative(capsys):
    from deepseek_jax.commands.demo import demo_checkpoint
    code = cli.main(["generate", demo_checkpoint(), "--prompt", "123+456", "--speculative", "mtp",
                     "--temperature", "0", "--max-new-tokens", "8"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip() == "579"
    assert "drafts accepted" in err
