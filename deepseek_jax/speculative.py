"""MTP speculative decoding (``Generator.generate(..., speculative="mtp")``, SPEC §6): its
compiled prefill and decode loop, built on :mod:`deepseek_jax.generate`'s.

The MTP module drafts one token ahead, the main model verifies it, and a row advances by 1 or 2
tokens per step, still in one compiled ``while_loop`` with per-row positions. The MTP layer keeps its own latent cache
``[Bb, S, C]`` (entry ``i`` = MTP row ``i``: main hidden ``h_i`` with the embedding of token
``i+1``). Loop invariant per row: tokens up to ``cur`` are decided, the main cache holds
positions ``< cur``, the MTP cache positions ``< cur``, and ``draft`` is the MTP's guess for
token ``cur+1`` (drawn from MTP row ``cur-1``). One step:

1. main model, absorbed, on ``[t_cur, draft]`` at positions ``[cur, cur+1]`` (2 tokens per row,
   each through the MLA decode kernel with its own length): logits ``p0`` (token ``cur+1``)
   and ``p1`` (token ``cur+2`` given that the draft is right), hidden ``h_cur, h_cur+1``;
2. accept the draft (greedy: ``draft == argmax p0``; sampling: the standard rejection rule,
   accept with probability ``min(1, p0(draft)/q(draft))``, else draw from
   ``norm(max(p0 - q, 0))``); token ``cur+1`` is the draft or its correction ``t1``, and when
   accepted token ``cur+2`` is drawn from ``p1`` (the bonus token ``t2``);
3. MTP, absorbed, on rows ``[cur, cur+1]`` with next tokens ``[t1, t2]`` (writes MTP entries
   ``cur, cur+1``); the next draft comes from row ``cur+1`` if accepted, else row ``cur``.

A rejected draft leaves stale entries at position ``cur+1`` in both caches; they are at the
new ``cur`` and are overwritten by the next step before any query can see them (a query at
position ``i`` attends to ``<= i``, and each step writes before it attends). A row stops at eos
(or a stop token id) or at its length budget exactly (the bonus token is dropped when the first
one ends the row).
Greedy output equals non-speculative greedy output (the same argmax of the same model at
every position) but for float rounding: the verify pass's products have two tokens per row where
plain decoding's have one, and XLA may sum them in another order (float32 on CPU: log-probs up
to ~1e-5 apart at batch 1, the same bits at batches 2 and 8 in the tests), so a near-tie between
two tokens can go either way; sampled output has the same distribution (not the same draws: the random
stream differs). ``Generator.last_stats`` counts drafts (steps where a second token was possible) and
accepted drafts.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.cache import LatentCache
from deepseek_jax.generate import (Weights, _ends, _Knobs, _prefill, _prompt_pass, _token_logprob,
                                   _top_logprobs)
from deepseek_jax.model import DeepSeekV3
from deepseek_jax.sampling import filter_logits


class SpecState(NamedTuple):
    """Loop state of speculative decoding (see the module docstring)."""
    cache: LatentCache
    mtp_cache: jax.Array   # [B, S, C] the MTP layer's latent cache
    buf_BS: jax.Array
    cur_B: jax.Array       # position of each row's last decided token (fed at the next step)
    draft_B: jax.Array     # the MTP's draft for position cur+1
    q_BV: jax.Array        # sampling: the draft's distribution [B, V] (greedy: [B, 1] unused)
    end_B: jax.Array
    done_B: jax.Array
    keys_B: jax.Array
    step: jax.Array        # 1 + loop iterations (int32 scalar)
    drafted_B: jax.Array   # int32 per row
    accepted_B: jax.Array  # int32 per row
    lp_BS: Any = None      # logprobs: as DecodeState.lp_BS (the verifier's log-probs), else None
    top_ids_BSK: Any = None  # top_logprobs: as DecodeState's (from the verifier's logits), else None
    top_lp_BSK: Any = None


def _probs(logits_BV, knobs: _Knobs, filtered: bool):
    """The sampling distribution of :func:`deepseek_jax.sampling.sample` (temperature, then top-k/p)."""
    lg = logits_BV.astype(jnp.float32) / knobs.temperature
    if filtered:
        lg = filter_logits(lg, knobs.top_k, knobs.top_p)
    return jax.nn.softmax(lg, axis=-1)


def _categorical(keys_B, probs_BV):
    logp = jnp.where(probs_BV > 0, jnp.log(jnp.where(probs_BV > 0, probs_BV, 1.0)), -jnp.inf)
    return jax.vmap(jax.random.categorical)(keys_B, logp).astype(jnp.int32)


def _fold(keys_B, *data):
    for d in data:
        keys_B = jax.vmap(lambda k, d=d: jax.random.fold_in(k, d))(keys_B)
    return keys_B


def _draft(model: DeepSeekV3, x_BD, keys_B, step, knobs: _Knobs, greedy: bool, filtered: bool):
    """``(draft token [B], its distribution q)`` from MTP rows ``x_BD``."""
    logits_BV = model.mtp_head(x_BD)
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32), jnp.zeros((x_BD.shape[0], 1), jnp.float32)
    q_BV = _probs(logits_BV, knobs, filtered)
    return _categorical(_fold(keys_B, step, 3), q_BV), q_BV


def _verify(logits_B2V, draft_B, q_BV, keys_B, knobs: _Knobs, greedy: bool, filtered: bool):
    """``(t1, t2, accepted)``: token ``cur+1`` (the draft or its correction), the bonus token
    ``cur+2`` (meaningful where accepted) from the verifier's logits at ``[cur, cur+1]``.

    Greedy: accepted iff the draft is the argmax. Sampling: the standard speculative rejection
    rule, accept with probability ``min(1, p(d)/q(d))`` else draw from ``norm(max(p - q, 0))``,
    which makes ``t1`` distributed exactly as ``p`` (``keys_B``: this step's per-row keys)."""
    if greedy:
        t1 = jnp.argmax(logits_B2V[:, 0], axis=-1).astype(jnp.int32)
        t2 = jnp.argmax(logits_B2V[:, 1], axis=-1).astype(jnp.int32)
        return t1, t2, t1 == draft_B
    p0, p1 = _probs(logits_B2V[:, 0], knobs, filtered), _probs(logits_B2V[:, 1], knobs, filtered)
    pd = jnp.take_along_axis(p0, draft_B[:, None], axis=1)[:, 0]
    qd = jnp.take_along_axis(q_BV, draft_B[:, None], axis=1)[:, 0]
    u = jax.vmap(jax.random.uniform)(_fold(keys_B, 0))
    ok = u * qd < pd
    resid = jnp.maximum(p0 - q_BV, 0.0)
    resid = jnp.where(jnp.sum(resid, axis=-1, keepdims=True) > 0, resid, p0)
    t1 = jnp.where(ok, draft_B, _categorical(_fold(keys_B, 1), resid))
    t2 = _categorical(_fold(keys_B, 2), p1)
    return t1, t2, ok


def prefill_spec(graphdef, greedy: bool, filtered: bool, S: int, weights: Weights, ids_BP, lens_B, end_B,
                 active_B, seed, knobs: _Knobs, chunk: int | None = None, logprobs: bool = False,
                 top_logprobs: int = 0) -> SpecState:
    st = _prefill(graphdef, greedy, filtered, S, weights, ids_BP, lens_B, end_B, active_B, seed, knobs,
                  keep_hidden=True, chunk=chunk, logprobs=logprobs, top_logprobs=top_logprobs)
    state, hidden_BPD = st
    model: DeepSeekV3 = nnx.merge(graphdef, weights.params)
    B, P = ids_BP.shape
    dtype = model.prec.dtype
    # MTP row i: hidden h_i with token i+1 (the first new token for the last prompt row).
    nxt_BP = jnp.pad(state.buf_BS, ((0, 0), (0, 1)))[:, 1:P + 1]

    def run(start, n, cache, absorbed):
        h = jax.lax.dynamic_slice_in_dim(hidden_BPD, start, n, axis=1)
        nxt = jax.lax.dynamic_slice_in_dim(nxt_BP, start, n, axis=1)
        pos = jnp.broadcast_to(start + jnp.arange(n, dtype=jnp.int32), (B, n))
        x, cache, _ = model.mtp_hidden(h, nxt, pos, cache_BSC=cache, absorbed=absorbed)
        return x, cache

    mtp_cache = jnp.zeros((B, S, model.cfg.latent_dim), dtype)
    mtp_cache, x_BD, _ = _prompt_pass(run, mtp_cache, P, chunk, lens_B - 1, keep_all=False)
    # (Key parent 0xFFFFFFFF: never a step index, so no key is both used and derived from.)
    draft_B, q_BV = _draft(model, x_BD, state.keys_B, jnp.uint32(0xFFFFFFFF), knobs, greedy, filtered)
    zeros = jnp.zeros((B,), jnp.int32)
    return SpecState(state.cache, mtp_cache, state.buf_BS, state.cur_B, draft_B, q_BV, state.end_B,
                     state.done_B, state.keys_B, state.step, zeros, zeros, state.lp_BS, state.top_ids_BSK,
                     state.top_lp_BSK)


def decode_spec(graphdef, greedy: bool, filtered: bool, weights: Weights, state: SpecState, limit,
                knobs: _Knobs) -> SpecState:
    rows = jnp.arange(state.buf_BS.shape[0])

    def cond(s: SpecState):
        return (s.step < limit) & ~jnp.all(s.done_B)

    def body(s: SpecState):
        model: DeepSeekV3 = nnx.merge(graphdef, weights.params)
        cur, d = s.cur_B, s.draft_B
        pos_B2 = jnp.stack([cur, cur + 1], axis=1)
        ids_B2 = jnp.stack([s.buf_BS[rows, cur], d], axis=1)
        out = model(ids_B2, pos_B2, cache=s.cache, absorbed=True,       # verify: 2 tokens per row
                    unstacked=weights.layers)
        t1, t2, ok = _verify(out.logits, d, s.q_BV, _fold(s.keys_B, s.step), knobs, greedy, filtered)
        active = ~s.done_B
        first_ends = _ends(t1, knobs)
        room2 = cur + 1 < s.end_B
        two = ok & ~first_ends & room2
        # MTP rows cur, cur+1 (their next tokens t1, t2); the next draft from the last decided row.
        x_B2D, mtp_cache, _ = model.mtp_hidden(out.hidden, jnp.stack([t1, t2], axis=1), pos_B2,
                                               cache_BSC=s.mtp_cache, absorbed=True)
        x_BD = jnp.where(two[:, None], x_B2D[:, 1], x_B2D[:, 0])
        new_d, q_BV = _draft(model, x_BD, s.keys_B, s.step, knobs, greedy, filtered)
        buf = s.buf_BS.at[rows, cur + 1].set(jnp.where(active, t1, s.buf_BS[rows, cur + 1]), mode="drop")
        p2 = jnp.where(active & two, cur + 2, buf.shape[1])   # out of range: dropped
        buf = buf.at[rows, p2].set(t2, mode="drop")
        new_cur = jnp.where(active, cur + 1 + two.astype(jnp.int32), cur)
        last = jnp.where(two, t2, t1)
        done = s.done_B | (_ends(last, knobs) & active) | (new_cur >= s.end_B)
        useful = active & ~first_ends & room2
        lp = top_ids = top_lp = None
        if s.lp_BS is not None:   # the verifier's raw log-probs of t1 (position cur+1) and t2 (cur+2)
            lp = s.lp_BS.at[rows, cur + 1].set(
                jnp.where(active, _token_logprob(out.logits[:, 0], t1), s.lp_BS[rows, cur + 1]), mode="drop")
            lp = lp.at[rows, p2].set(_token_logprob(out.logits[:, 1], t2), mode="drop")
        if s.top_ids_BSK is not None:   # and each of those positions' top-K ids and log-probs
            K = s.top_ids_BSK.shape[-1]
            ids1, vals1 = _top_logprobs(out.logits[:, 0], K)
            ids2, vals2 = _top_logprobs(out.logits[:, 1], K)
            top_ids = s.top_ids_BSK.at[rows, cur + 1].set(
                jnp.where(active[:, None], ids1, s.top_ids_BSK[rows, cur + 1]), mode="drop")
            top_ids = top_ids.at[rows, p2].set(ids2, mode="drop")
            top_lp = s.top_lp_BSK.at[rows, cur + 1].set(
                jnp.where(active[:, None], vals1, s.top_lp_BSK[rows, cur + 1]), mode="drop")
            top_lp = top_lp.at[rows, p2].set(vals2, mode="drop")
        return SpecState(out.cache, mtp_cache, buf, new_cur, jnp.where(active, new_d, d),
                         jnp.where(active[:, None], q_BV, s.q_BV), s.end_B, done, s.keys_B, s.step + 1,
                         s.drafted_B + useful.astype(jnp.int32), s.accepted_B + (useful & ok).astype(jnp.int32), lp,
                         top_ids, top_lp)

    return jax.lax.while_loop(cond, body, state)
