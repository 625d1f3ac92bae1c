"""Scoring: full-sequence logits (prefill or token-by-token decode), MTP logits, log-probs, and
conditional log-likelihoods (:func:`loglikelihood`).

This is the interface the parity checks use (``deepseek-jax score``); keep it stable.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax.cache import LatentCache
from deepseek_jax.errors import DeepSeekError, check_bool
from deepseek_jax.model import DeepSeekV3


def check_ids(model: DeepSeekV3, ids) -> np.ndarray:
    """Validates a ``[B, T]`` integer id array against the model's vocab and positions."""
    _check_model(model)
    try:
        ids = np.asarray(ids)
    except ValueError:
        raise DeepSeekError("ids: expected a [batch, length] array; rows of different lengths "
                            "(pad them, or score them separately)") from None
    except jax.errors.TracerArrayConversionError:
        raise DeepSeekError("ids: a traced array: these functions run their own jitted programs, call "
                            "them outside jax.jit") from None
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0 or ids.shape[0] == 0:
        raise DeepSeekError(f"ids: expected a non-empty [batch, length] array, got shape {list(ids.shape)}")
    if ids.dtype.kind not in "iu":
        raise DeepSeekError(f"ids: expected integer token ids, got dtype {ids.dtype}")
    V = model.cfg.vocab_size
    bad = (ids < 0) | (ids >= V)
    if bad.any():
        b, t = np.argwhere(bad)[0]
        raise DeepSeekError(f"ids: token id {int(ids[b, t])} at [{b}, {t}] is outside the vocab [0, {V})")
    if ids.shape[1] > model.cfg.max_position_embeddings:
        raise DeepSeekError(f"ids: length {ids.shape[1]} exceeds max_position_embeddings "
                            f"{model.cfg.max_position_embeddings}")
    return ids.astype(np.int32)


def _check_model(model) -> None:
    if not isinstance(model, DeepSeekV3):
        raise DeepSeekError(f"model: expected a DeepSeekV3 (from dj.load), got {type(model).__name__}")
    from deepseek_jax import sharding   # noqa: PLC0415
    sharding.check_context_mesh(model)


def to_host(x) -> np.ndarray:
    """A (possibly multi-host, sharded) array as one numpy array on every process."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@nnx.jit
def _prefill_logits(model: DeepSeekV3, ids_BT):
    out = model(ids_BT)
    return out.logits, out.hidden


@nnx.jit
def _mtp(model: DeepSeekV3, ids_BT, hidden_BTD):
    return model.mtp_logits(ids_BT, hidden_BTD)


@partial(nnx.jit, static_argnames=("prefill",))
def _decode_logits(model: DeepSeekV3, ids_BT, prefill: int):
    B, T = ids_BT.shape
    cache = LatentCache.zeros(model.cfg, B, T, dtype=model.prec.dtype)
    parts = []
    if prefill:
        out = model(ids_BT[:, :prefill], cache=cache)
        cache = out.cache
        parts.append(out.logits)
    graphdef, state = nnx.split(model)

    def step(cache, t):
        m = nnx.merge(graphdef, state)
        tok = jax.lax.dynamic_slice_in_dim(ids_BT, t, 1, axis=1)
        out = m(tok, jnp.full((B, 1), t, jnp.int32), cache=cache, absorbed=True)
        return out.cache, out.logits[:, 0]

    if T > prefill:
        _, logits_TBV = jax.lax.scan(step, cache, jnp.arange(prefill, T))
        parts.append(jnp.swapaxes(logits_TBV, 0, 1))
    return jnp.concatenate(parts, axis=1)


def logits(model: DeepSeekV3, ids, *, mode: str = "prefill", prefill: int = 0) -> np.ndarray:
    """float32 logits ``[B, T, V]`` of every position.

    ``mode="prefill"``: one naive-MLA pass over the whole sequence. ``mode="decode"``: the first
    ``prefill`` tokens in one pass writing the latent cache, then one token at a time through the
    absorbed MLA path.
    """
    if mode not in ("prefill", "decode"):
        raise DeepSeekError(f"logits: mode {mode!r} unknown (prefill|decode)")
    if isinstance(prefill, bool) or not isinstance(prefill, (int, np.integer)):
        raise DeepSeekError(f"logits: prefill must be an integer, got {prefill!r}")
    ids = check_ids(model, ids)
    if mode == "prefill":
        if prefill:
            raise DeepSeekError(f"logits: prefill={prefill} needs mode='decode' (a prefill pass reads the "
                                "whole sequence at once)")
        return to_host(_prefill_logits(model, jnp.asarray(ids))[0])
    if not 0 <= prefill <= ids.shape[1]:
        raise DeepSeekError(f"logits: prefill {prefill} outside [0, {ids.shape[1]}] (the sequence length)")
    # rows padded to a multiple of the mesh's data axis (see generate.batch_bucket)
    pl = getattr(getattr(model, "norm", None), "placement", None)
    d = 1 if pl is None else int(dict(pl.mesh.shape).get("data", 1))
    B = ids.shape[0]
    padded = np.concatenate([ids, np.repeat(ids[:1], -B % d, axis=0)]) if B % d else ids
    return to_host(_decode_logits(model, jnp.asarray(padded), int(prefill)))[:B]


def mtp_logits(model: DeepSeekV3, ids) -> np.ndarray:
    """``[B, T-1, V]``: row i is the MTP module's prediction of token i+2."""
    _check_model(model)
    if model.mtp is None:
        raise DeepSeekError("mtp_logits: this model has no MTP module; load it with mtp=True "
                            "(the checkpoint needs its MTP layer, num_nextn_predict_layers >= 1)")
    ids = check_ids(model, ids)
    if ids.shape[1] < 2:
        raise DeepSeekError(f"mtp_logits: ids must have at least 2 tokens per row, got {ids.shape[1]}")
    ids_j = jnp.asarray(ids)
    _, hidden = _prefill_logits(model, ids_j)
    return to_host(_mtp(model, ids_j, hidden))


#: Positions per lm_head call in :func:`sequence_logprobs` (bounds the ``[B, chunk, V]`` logits).
_HEAD_CHUNK = 256
#: Shortest padded length of :func:`sequence_logprobs` (shorter buckets would compile more often).
_MIN_BUCKET = 16


def _head_scores(model: DeepSeekV3, hidden_BTD, ids_BT, greedy: bool, *, head=None, chunk: int = _HEAD_CHUNK):
    """Position t's log-prob of ``ids[:, t + 1]`` from the final hidden states, ``[B, T]`` float32,
    and with ``greedy`` also whether that token is the argmax of position t's logits (``[B, T]``
    bool; ``None`` without). The last column's target is ``ids[:, 0]``, a placeholder. The head
    (``head``, default ``model.lm_head``; training passes the MTP module's too) runs over
    ``chunk`` positions at a time, so the ``[B, T, V]`` logits (8.5 GB at B=8, T=2048 and
    DeepSeek-V3's vocab) never exist at once; differentiated, each chunk's logits are computed
    again in the backward pass rather than kept (``jax.checkpoint``)."""
    B, T = ids_BT.shape
    tgt_BT = jnp.roll(ids_BT, -1, axis=1)
    c = max(1, min(T, chunk))
    head = model.lm_head if head is None else head

    @jax.checkpoint
    def chunk_scores(xs):
        h_BcD, t_Bc = xs
        logits = head(h_BcD, model.prec.dtype)
        picked = jnp.take_along_axis(logits, t_Bc[..., None], axis=-1)[..., 0]
        lp = picked - jax.nn.logsumexp(logits, axis=-1)
        if not greedy:
            return lp
        # argmax: the first index among equal maxima, as greedy decoding (sampling.py) picks it
        return lp, jnp.argmax(logits, axis=-1).astype(t_Bc.dtype) == t_Bc

    Tp = -(-T // c) * c   # a length over the largest power-of-two bucket may not divide
    hidden = jnp.pad(hidden_BTD, ((0, 0), (0, Tp - T), (0, 0)))
    tgt_BT = jnp.pad(tgt_BT, ((0, 0), (0, Tp - T)))
    h_NBcD = jnp.moveaxis(hidden.reshape(B, Tp // c, c, -1), 1, 0)
    t_NBc = jnp.moveaxis(tgt_BT.reshape(B, Tp // c, c), 1, 0)
    out = jax.lax.map(chunk_scores, (h_NBcD, t_NBc))
    unchunk = lambda x_NBc: jnp.moveaxis(x_NBc, 0, 1).reshape(B, Tp)[:, :T]  # noqa: E731
    return (unchunk(out[0]), unchunk(out[1])) if greedy else (unchunk(out), None)


def _alt_scores(model: DeepSeekV3, hidden_BTD, pos_B, tok_BK):
    """The log-probs of K tokens per row at one position per row (``[B, K]`` float32), and whether
    each is that position's argmax (``[B, K]`` bool)."""
    h_BD = jnp.take_along_axis(hidden_BTD, pos_B[:, None, None], axis=1)[:, 0]
    logits_BV = model.lm_head(h_BD[:, None], model.prec.dtype)[:, 0]
    picked = jnp.take_along_axis(logits_BV, tok_BK, axis=-1)
    return (picked - jax.nn.logsumexp(logits_BV, axis=-1, keepdims=True),
            jnp.argmax(logits_BV, axis=-1)[:, None].astype(tok_BK.dtype) == tok_BK)


@partial(nnx.jit, static_argnames=("greedy",))
def _next_token_scores(model: DeepSeekV3, ids_BT, greedy: bool = False, alt=None):
    """:func:`_head_scores` of one prefill pass over ``ids``.

    ``alt = (pos_B, tok_BK)``: also :func:`_alt_scores` of K other tokens at one position per
    row: the other last tokens of :func:`loglikelihood` requests that share everything before them."""
    hidden = model(ids_BT, logits=False).hidden
    return _head_scores(model, hidden, ids_BT, greedy) + (() if alt is None else _alt_scores(model, hidden, *alt))


@partial(nnx.jit, static_argnames=("max_len",))
def _context_pass(model: DeepSeekV3, ids_BT, last_B, first_BK, max_len: int):
    """Prefill of right-padded contexts into a fresh ``max_len`` latent cache; returns the cache and
    :func:`_alt_scores` of each row's candidate first continuation tokens ``first_BK`` at its last
    context position ``last_B``."""
    cache = LatentCache.zeros(model.cfg, ids_BT.shape[0], max_len, dtype=model.prec.dtype)
    out = model(ids_BT, cache=cache, logits=False)
    return (out.cache,) + _alt_scores(model, out.hidden, last_B, first_BK)


@nnx.jit
def _continuation_pass(model: DeepSeekV3, cache: LatentCache, row_B, ids_BT, start_B):
    """Continuations over the contexts :func:`_context_pass` cached: row b is ``ids[b]`` at
    positions ``start[b]...`` after context ``row[b]`` of ``cache`` (each row gets a copy of its
    context's entries, so several continuations of one context never see each other); returns
    :func:`_head_scores` (greedy) of the continuation tokens."""
    cache = jax.tree.map(lambda c_LBSC: c_LBSC[:, row_B], cache)
    pos_BT = start_B[:, None] + jnp.arange(ids_BT.shape[1], dtype=jnp.int32)
    hidden = model(ids_BT, pos_BT, cache=cache, absorbed=True, logits=False).hidden
    return _head_scores(model, hidden, ids_BT, greedy=True)


def _pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for 0)."""
    return 1 << max(0, n - 1).bit_length()


def _bucket(n: int, limit: int, least: int = _MIN_BUCKET) -> int:
    """The padded length of an ``n``-token sequence: a power of two >= ``least``, at most
    ``limit`` (then a multiple of ``_MIN_BUCKET`` or the limit itself)."""
    b = max(least, 1 << (n - 1).bit_length())
    if b <= limit:
        return b
    return min(limit, -(-n // _MIN_BUCKET) * _MIN_BUCKET)


#: Shortest padded length of a continuation pass (answers are often a few tokens).
_MIN_CONT_BUCKET = 4


def _rows_per_context_row(n_ctx: int, m_max: int, limit: int) -> int:
    """Continuation rows per context row of :func:`_score_shared_contexts`' passes: about as many
    tokens as a context pass holds, at most 4x its rows."""
    return min(4, _bucket(n_ctx, limit) // _bucket(m_max, limit, _MIN_CONT_BUCKET))


def _worth_caching(n_ctx: int, conts: list[np.ndarray], limit: int) -> bool:
    """Whether a context continued by ``conts`` (some longer than a token) costs fewer passes
    cached than as a row per request: one context row plus ``k / r`` continuation rows, against
    ``k`` rows (``r``: :func:`_rows_per_context_row`). Each cached pass also holds fewer tokens."""
    k = len(conts)
    r = _rows_per_context_row(n_ctx, max(map(len, conts)), limit)
    return r >= 1 and 1 + k / r < k


def _check_call(fn: str, model, items, what: str, batch_size) -> None:
    """The checks :func:`sequence_logprobs` and :func:`loglikelihood` share: the model, a
    non-empty list ``items`` (``what`` names its elements), ``batch_size``."""
    _check_model(model)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise DeepSeekError(f"{fn}: batch_size must be an integer >= 1, got {batch_size!r}")
    name = "seqs" if fn == "sequence_logprobs" else "requests"
    if isinstance(items, (str, bytes)) or not hasattr(items, "__len__"):
        raise DeepSeekError(f"{fn}: {name} must be a list of {what}")
    if len(items) == 0:
        raise DeepSeekError(f"{fn}: {name} is empty")


def _check_seq(model: DeepSeekV3, seq, what: str) -> np.ndarray:
    """One flat sequence of token ids as int32 (vocab and length checked); errors name ``what``."""
    try:
        if isinstance(seq, (str, bytes)):
            raise DeepSeekError("text where token ids are expected: encode it first "
                                "(deepseek_jax.tokenizer.Tokenizer.encode), or use score --pairs / --text-file")
        a = np.asarray(seq)
        if a.ndim != 1:
            hint = " (one sequence is still a list of sequences: [ids])" if a.ndim == 0 else ""
            raise DeepSeekError(f"expected a 1-D list of token ids, got shape {list(a.shape)}{hint}")
        if a.size == 0:
            raise DeepSeekError("empty: no token ids")
        return check_ids(model, a)[0]
    except DeepSeekError as e:
        raise DeepSeekError(f"{what}: {str(e).removeprefix('ids: ')}") from None
    except ValueError:
        raise DeepSeekError(f"{what}: not a flat list of token ids") from None


def _score_rows(model: DeepSeekV3, rows: list[np.ndarray], batch_size: int, greedy: bool,
                alts: list[list[int]] | None = None):
    """Every row's ``(log-probs [n-1], argmax flags [n-1] or None)``, in the input order: rows
    sorted by length, ``batch_size`` at a time (fewer rows: their number rounded up to a power of
    two), right-padded to :func:`_bucket`'s length; one compile per padded length.

    ``alts`` (with ``greedy``): per row, other tokens to score in place of its last one; each
    row's tuple then also holds their ``(log-probs [k], argmax flags [k])``."""
    limit = model.cfg.max_position_embeddings
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: list = [None] * len(rows)
    B = min(int(batch_size), _pow2(len(rows)))
    K = 0 if alts is None else _pow2(max(map(len, alts)))
    for start in range(0, len(order), B):
        group = order[start:start + B]
        T = _bucket(len(rows[group[-1]]), limit)
        batch = np.zeros((B, T), np.int32)
        for r, i in enumerate(group):
            batch[r, :len(rows[i])] = rows[i]
        alt = None
        if K:
            pos, toks = np.zeros(B, np.int32), np.zeros((B, K), np.int32)
            for r, i in enumerate(group):
                pos[r] = len(rows[i]) - 2
                toks[r, :len(alts[i])] = alts[i]
            alt = (jnp.asarray(pos), jnp.asarray(toks))
        lp, gr, *alt_out = _next_token_scores(model, jnp.asarray(batch), greedy=greedy, alt=alt)
        lp = to_host(lp)
        gr = to_host(gr) if greedy else None
        alt_lp, alt_gr = (to_host(alt_out[0]), to_host(alt_out[1])) if K else (None, None)
        for r, i in enumerate(group):
            n = len(rows[i]) - 1
            out[i] = (lp[r, :n].astype(np.float32), gr[r, :n].astype(bool) if greedy else None)
            if K:
                k = len(alts[i])
                out[i] += (alt_lp[r, :k].astype(np.float32), alt_gr[r, :k].astype(bool))
    return out


def sequence_logprobs(model: DeepSeekV3, seqs, *, batch_size: int = 8) -> list[np.ndarray]:
    """Log-probs of sequences of any lengths: for each sequence of ``n`` token ids, the float32
    ``[n - 1]`` array of ``log p(t_i+1 | t_<=i)``, in the input order.

    Sequences are sorted by length, grouped ``batch_size`` at a time (fewer sequences: their
    number rounded up to a power of two) and right-padded to a power-of-two length (at least 16, at
    most ``max_position_embeddings``). Attention is causal and no token is dropped by the router,
    so a real token never depends on the pads after it: in float32 the padding changes nothing
    beyond rounding (~1e-5); in bfloat16 the padded shapes change how XLA blocks the matmuls, and
    a log-prob can move by ~0.1. One compile per padded length; log-probs are taken on the device,
    so only ``[B, T]`` floats come back (not ``[B, T, V]`` logits).
    """
    fn = "sequence_logprobs"
    _check_call(fn, model, seqs, "token-id sequences", batch_size)
    rows = [_check_seq(model, seq, f"{fn}: sequence {i}") for i, seq in enumerate(seqs)]
    return [lp for lp, _ in _score_rows(model, rows, batch_size, greedy=False)]


class Likelihood(NamedTuple):
    """One :func:`loglikelihood` request's result."""

    #: ``sum log p(continuation | context)`` over the continuation's tokens (float64 sum of float32 terms)
    logprob: float
    #: whether every continuation token is the argmax of the logits before it (greedy decoding
    #: from the context would produce exactly the continuation; ties go to the lowest id, as in decoding)
    is_greedy: bool
    #: the continuation's length in tokens
    tokens: int
    #: ``[tokens]`` float32: each continuation token's log-prob
    token_logprobs: np.ndarray


def _score_shared_contexts(model: DeepSeekV3, groups: list[tuple[np.ndarray, list[np.ndarray]]],
                           batch_size: int) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Per ``(context, continuations)`` group, each continuation's ``(log-probs [m], argmax flags
    [m])``, the context computed once: :func:`_context_pass` prefills ``batch_size`` contexts into
    a latent cache and scores every continuation's first token at the last context position;
    :func:`_continuation_pass` runs the continuations of two or more tokens, each over a copy of its
    context's cache entries, in passes of about as many tokens as a context pass (``batch_size``
    rows, up to 4x as many when the padded continuations are that much shorter than the padded
    contexts; the cache copies then hold up to 4x the context pass's cache). Compiles: one per
    padded context length and cache length, and one per continuation pass shape and cache length."""
    limit = model.cfg.max_position_embeddings
    order = sorted(range(len(groups)), key=lambda g: len(groups[g][0]) + max(map(len, groups[g][1])))
    B = min(int(batch_size), _pow2(len(groups)))
    K = _pow2(max(len(conts) for _, conts in groups))
    batches = [order[s:s + B] for s in range(0, len(order), B)]
    long_rows = [[(r, j) for r, g in enumerate(batch) for j, c in enumerate(groups[g][1]) if len(c) > 1]
                 for batch in batches]
    R_max = _pow2(max(map(len, long_rows)))
    out: list = [[None] * len(conts) for _, conts in groups]
    for batch, rows in zip(batches, long_rows):
        n_max = max(len(groups[g][0]) for g in batch)
        m_max = max(len(c) for g in batch for c in groups[g][1])
        T_cont = _bucket(m_max, limit, _MIN_CONT_BUCKET)
        # every padded continuation position must land in the cache, beyond its row's real tokens
        S = max(_bucket(n_max + T_cont, limit), -(-(n_max + T_cont) // _MIN_BUCKET) * _MIN_BUCKET)
        T_ctx = _bucket(n_max, limit)
        R = min(R_max, B * max(1, _rows_per_context_row(n_max, m_max, limit)))
        ids = np.zeros((B, T_ctx), np.int32)
        last, first = np.zeros(B, np.int32), np.zeros((B, K), np.int32)
        for r, g in enumerate(batch):
            ctx, conts = groups[g]
            ids[r, :len(ctx)], last[r] = ctx, len(ctx) - 1
            first[r, :len(conts)] = [c[0] for c in conts]
        cache, first_lp, first_gr = _context_pass(model, jnp.asarray(ids), jnp.asarray(last), jnp.asarray(first),
                                                  max_len=S)
        first_lp, first_gr = to_host(first_lp), to_host(first_gr)
        for r, g in enumerate(batch):
            for j, c in enumerate(groups[g][1]):
                out[g][j] = (first_lp[r, j:j + 1].astype(np.float32), first_gr[r, j:j + 1].astype(bool))
        for s in range(0, len(rows), R):
            chunk = rows[s:s + R]
            row, start = np.zeros(R, np.int32), np.zeros(R, np.int32)
            cont_ids = np.zeros((R, T_cont), np.int32)
            for b, (r, j) in enumerate(chunk):
                ctx, conts = groups[batch[r]]
                row[b], start[b] = r, len(ctx)
                cont_ids[b, :len(conts[j])] = conts[j]
            lp, gr = _continuation_pass(model, cache, jnp.asarray(row), jnp.asarray(cont_ids), jnp.asarray(start))
            lp, gr = to_host(lp), to_host(gr)
            for b, (r, j) in enumerate(chunk):   # column t scores token t + 1
                m = len(groups[batch[r]][1][j])
                lp0, gr0 = out[batch[r]][j]
                out[batch[r]][j] = (np.append(lp0, lp[b, :m - 1]), np.append(gr0, gr[b, :m - 1].astype(bool)))
    return out


def _score_rows_shared_last(model: DeepSeekV3, rows: list[np.ndarray], n_ctx: list[int], batch_size: int,
                            share: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each ``context + continuation`` row's ``(log-probs, argmax flags)`` of its positions, rows
    that are equal but for their last token (``share``) scored as one row."""
    first: dict[tuple, int] = {}
    owner = []                            # request -> the row (the first request of its set)
    for i, (row, c) in enumerate(zip(rows, n_ctx)):
        owner.append(first.setdefault((c, row[:-1].tobytes()), i) if share else i)
    if len(set(owner)) == len(rows):      # nothing shared: each request its own row
        return [(lp, gr) for lp, gr in _score_rows(model, rows, batch_size, greedy=True)]
    members: dict[int, list[int]] = {}
    for i, h in enumerate(owner):
        members.setdefault(h, []).append(i)
    heads = list(members)
    scored = _score_rows(model, [rows[h] for h in heads], batch_size, greedy=True,
                         alts=[[int(rows[i][-1]) for i in members[h]] for h in heads])
    parts: list = [None] * len(rows)
    for h, (lp, gr, alt_lp, alt_gr) in zip(heads, scored):
        for j, i in enumerate(members[h]):   # the shared tokens' scores, then its own last one
            parts[i] = (np.append(lp[:-1], alt_lp[j]), np.append(gr[:-1], alt_gr[j]))
    return parts


def loglikelihood(model: DeepSeekV3, requests, *, batch_size: int = 8, share: bool = True) -> list[Likelihood]:
    """Conditional log-likelihoods, the lm-evaluation-harness primitive: for each
    ``(context_ids, continuation_ids)`` pair (each a non-empty 1-D list or array of token ids), the
    :class:`Likelihood` of the continuation after the context, in the input order.

    ``is_greedy`` is argmax equality at every continuation position (``argmax(logits) == token``,
    the first index among equal maxima, exactly the token greedy decoding would pick), computed on
    the device beside the log-probs. ``context + continuation`` is at most
    ``max_position_embeddings`` tokens (nothing is truncated); requests are batched by length as in
    :func:`sequence_logprobs` (only ``[B, T]`` values come back, never ``[B, T, V]`` logits).

    ``share`` (the default) computes a context once for all the requests that continue it:

    * when every continuation of a context is one token (multiple choice with one-token answers,
      e.g. " A" / " B" / " C" / " D"), the context and its answers run as one row whose pass scores
      all the answers at its last position: four answers cost one row instead of four;
    * otherwise (answers of several tokens, as in HellaSwag or ARC) the context is prefilled once
      into the latent cache and its continuations run over copies of that cache, each at the
      positions after the context. The continuation pass is the absorbed MLA form that chunked
      prefill uses: the same function as one pass over ``context + continuation``, equal to it
      within float32 rounding (~1e-5).

    ``share=False`` runs every request as its own ``context + continuation`` row.
    """
    fn = "loglikelihood"
    _check_call(fn, model, requests, "(context_ids, continuation_ids) pairs", batch_size)
    share = check_bool(f"{fn}: share", share)
    ctxs, conts = [], []
    limit = model.cfg.max_position_embeddings
    for i, req in enumerate(requests):
        if isinstance(req, (str, bytes, dict)) or not hasattr(req, "__len__") or len(req) != 2:
            raise DeepSeekError(f"{fn}: request {i}: expected a (context_ids, continuation_ids) pair")
        ctx = _check_seq(model, req[0], f"{fn}: request {i}: context")
        cont = _check_seq(model, req[1], f"{fn}: request {i}: continuation")
        if len(ctx) + len(cont) > limit:
            raise DeepSeekError(f"{fn}: request {i}: context + continuation is {len(ctx) + len(cont)} tokens, "
                                f"over max_position_embeddings {limit}")
        ctxs.append(ctx)
        conts.append(cont)
    # contexts continued by two or more requests, one of them longer than a token: cached once
    groups: list[list[int]] = []
    if share:
        by_ctx: dict[bytes, list[int]] = {}
        for i, ctx in enumerate(ctxs):
            by_ctx.setdefault(ctx.tobytes(), []).append(i)
        groups = [g for g in by_ctx.values() if len(g) > 1 and any(len(conts[i]) > 1 for i in g)
                  and _worth_caching(len(ctxs[g[0]]), [conts[i] for i in g], limit)]
    parts: list = [None] * len(requests)   # per request: (log-probs, argmax flags) of its continuation
    if groups:
        scored = _score_shared_contexts(model, [(ctxs[g[0]], [conts[i] for i in g]) for g in groups], batch_size)
        for g, res in zip(groups, scored):
            for i, lp_gr in zip(g, res):
                parts[i] = lp_gr
    rest = [i for i in range(len(requests)) if parts[i] is None]
    if rest:
        rows = [np.concatenate([ctxs[i], conts[i]]) for i in rest]
        n_ctx = [len(ctxs[i]) for i in rest]
        for i, c, (lp, gr) in zip(rest, n_ctx, _score_rows_shared_last(model, rows, n_ctx, batch_size, share)):
            parts[i] = (lp[c - 1:], gr[c - 1:])      # position t predicts token t + 1
    return [Likelihood(float(lp.sum(dtype=np.float64)), bool(gr.all()), len(lp), lp) for lp, gr in parts]


def token_logprobs(logits_BTV: np.ndarray, ids_BT: np.ndarray, offset: int = 1) -> np.ndarray:
    """``log p(ids[:, i + offset] | ...)`` from ``logits[:, i]``: ``[B, T - offset]`` float32.

    ``logits`` ``[B, L, V]`` and ``ids`` ``[B, T]`` come from the same call, ``L == T - offset + 1``:
    :func:`logits`' ``T`` rows with ``offset=1``, :func:`mtp_logits`' ``T - 1`` rows with ``offset=2``;
    the last row's prediction, past the end of ``ids``, is unused.
    """
    logits_BTV, ids_BT = _check_logprob_args(logits_BTV, ids_BT, offset)
    lg = jnp.asarray(logits_BTV[:, : ids_BT.shape[1] - offset], jnp.float32)
    lp = jax.nn.log_softmax(lg, axis=-1)
    tgt = jnp.asarray(ids_BT[:, offset:])
    return np.asarray(jnp.take_along_axis(lp, tgt[..., None], axis=-1)[..., 0])


def _check_logprob_args(logits, ids, offset):
    """The shape/dtype checks of :func:`token_logprobs`, as one-line :class:`DeepSeekError`s."""
    if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or offset < 1:
        raise DeepSeekError(f"token_logprobs: offset must be an integer >= 1, got {offset!r}")
    try:   # (ragged nested lists: numpy's "inhomogeneous shape")
        if not hasattr(logits, "shape") or not hasattr(logits, "dtype"):
            logits = np.asarray(logits)
        if not hasattr(ids, "shape") or not hasattr(ids, "dtype"):
            ids = np.asarray(ids)
    except (TypeError, ValueError):
        raise DeepSeekError("token_logprobs: logits and ids must be rectangular arrays ([batch, length, vocab] "
                            "and [batch, length])") from None
    if len(logits.shape) != 3:
        raise DeepSeekError(f"token_logprobs: logits must be [batch, length, vocab], got shape {list(logits.shape)}")
    if np.dtype(logits.dtype).kind != "f" and logits.dtype != jnp.bfloat16:
        raise DeepSeekError(f"token_logprobs: logits must be floating point, got dtype {logits.dtype}")
    if len(ids.shape) != 2:
        raise DeepSeekError(f"token_logprobs: ids must be [batch, length], got shape {list(ids.shape)}")
    if np.dtype(ids.dtype).kind not in "iu":
        raise DeepSeekError(f"token_logprobs: ids must be integer token ids, got dtype {ids.dtype}")
    (B, L, V), (Bi, T) = logits.shape, ids.shape
    if B != Bi:
        raise DeepSeekError(f"token_logprobs: logits batch {B} != ids batch {Bi} "
                            f"(logits {list(logits.shape)}, ids {list(ids.shape)})")
    if offset > T:
        raise DeepSeekError(f"token_logprobs: offset {offset} exceeds the ids length {T}")
    if L != T - offset + 1:   # (logits' T rows with offset 2: the main head scored two tokens ahead)
        hint = " (dj.logits' rows predict the next token: offset=1; dj.mtp_logits' T - 1 rows take offset=2)"
        raise DeepSeekError(f"token_logprobs: logits length {L} does not match ids length {T} "
                            f"(want {T - offset + 1} positions for offset={offset}; logits {list(logits.shape)}, "
                            f"ids {list(ids.shape)}){hint if offset > 1 and L == T else ''}")
    ids_np = np.asarray(ids)
    bad = (ids_np < 0) | (ids_np >= V)
    if bad.any():
        b, t = np.argwhere(bad)[0]
        raise DeepSeekError(f"token_logprobs: token id {int(ids_np[b, t])} at [{b}, {t}] is outside the "
                            f"logits' vocab [0, {V})")
    return logits, ids_np


def perplexity(logprobs_BT) -> np.ndarray:
    """Per-row perplexity ``exp(-mean log p)``: of a ``[B, T]`` array of token log-probs (one
    row: ``[T]``, a scalar), or of a list of rows of any lengths, as :func:`sequence_logprobs`
    gives them (one value per row)."""
    if isinstance(logprobs_BT, (list, tuple)) and logprobs_BT and all(np.ndim(r) == 1 for r in logprobs_BT):
        try:
            rows = [np.asarray(r, np.float64) for r in logprobs_BT]
        except (TypeError, ValueError):
            raise DeepSeekError("perplexity: the rows must hold numbers (log-probs)") from None
        if any(r.size == 0 for r in rows):
            raise DeepSeekError("perplexity: a row has no log-probs (a one-token sequence has none)")
        return np.array([np.exp(-r.mean()) for r in rows])
    try:
        lp = np.asarray(logprobs_BT, np.float64)
    except (TypeError, ValueError):
        raise DeepSeekError("perplexity: expected a [batch, length] array of log-probs or a list of 1-D "
                            "rows") from None
    if lp.ndim == 0 or lp.shape[-1] == 0:
        raise DeepSeekError(f"perplexity: expected log-probs over at least one position, got shape {list(lp.shape)}")
    return np.exp(-np.mean(lp, axis=-1))
