"""MLA's naive-form attention by position, in plain jnp, holding one block of keys' scores at a time.

The same function as :func:`kernels_pallas.flash_prefill.cached_attention_ref`,

    o[b, t, h] = Σ_{s <= q_pos[b, t]} softmax_s(scale · (q_nope · k_nope[s] + q_pe · k_pe[s])) v[s]

with ``kv`` = ``[k_nope (N) | v (A)]`` per head (``kv_b_proj``'s output) and ``k_pe`` one rope key
per token shared by the heads. The reference writes float32 scores ``[B, T, H, S]`` and its
``jax.grad`` keeps several of them (scores, probabilities, their cotangents): at a 4K-token
training sequence with DeepSeek-V3's 128 heads each is 8 GiB per layer. Here:

* forward: a loop over ``block_k``-key blocks with an online softmax (running max ``m``, sum
  ``l``, float32 accumulator), as the flash kernels do; it also returns each query's
  log-sum-exp ``lse = m + log l``;
* backward (``jax.custom_vjp``): the same loop again, each block's probabilities recomputed from
  the saved ``lse`` (``p = exp(s - lse)``), ``ds = p · (dp - Σ_a do · o)``; ``dq`` accumulated
  over the blocks, each block's ``dk`` / ``dv`` written to its rows.

So neither pass holds more than ``[B, T, H, block_k]`` scores. It runs on every backend: it is
what ``prefill_attention="flash"`` computes where no kernel applies (CPU), the backward of the GPU
cached-attention kernel (:func:`blocked_vjp`), which has none of its own, and the reference of
the TPU kernel's backward (:func:`cached_attention_bwd_ref`; :mod:`kernels_pallas.attention_bwd`).

Queries that see no key (a position below 0) get zeros, as in the kernels (the reference: NaN).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["cached_attention_blocked", "cached_attention_bwd_ref", "blocked_vjp", "BLOCK_K"]

#: Keys per block. At 512 a block's float32 scores are 1/8 of the whole at a 4K-token sequence.
BLOCK_K = 512

_NEG = -1e30   # finite "minus infinity": a block with no visible key gives no inf - inf


def _dot(spec: str, a, b):
    """``einsum`` with float32 results; float32 operands at full precision (as the reference)."""
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jnp.einsum(spec, a, b, precision=prec, preferred_element_type=jnp.float32)


def _geometry(s_len: int, block_k: int) -> tuple[int, int]:
    if block_k < 1:
        raise ValueError(f"cached_attention_blocked: block_k must be >= 1, got {block_k}")
    bk = min(block_k, s_len)
    return bk, -(-s_len // bk)


def _pad_keys(x, s_pad: int):
    """Zero keys after the last (masked by index: never visible)."""
    extra = s_pad - x.shape[1]
    return x if extra == 0 else jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))


class _Block:
    """Key block ``j``: its ``k_nope``, ``v``, ``k_pe`` and the float32 scores of every query
    against it, ``[B, T, H, bk]``, with the visible ones marked (``s <= q_pos`` and a real key)."""

    def __init__(self, j, qn, qp, kv, kp, pos, *, bk: int, s_len: int, scale: float):
        n, dt = qn.shape[-1], qn.dtype
        kvj = lax.dynamic_slice_in_dim(kv, j * bk, bk, axis=1).astype(dt)
        self.kn, self.v = kvj[..., :n], kvj[..., n:]
        self.kp = lax.dynamic_slice_in_dim(kp, j * bk, bk, axis=1).astype(dt)
        self.s = (_dot("bthn,bshn->bths", qn, self.kn) + _dot("bthr,bsr->bths", qp, self.kp)) * scale
        keys = j * bk + jnp.arange(bk)
        self.visible = ((keys[None, None, :] <= pos[:, :, None]) & (keys < s_len)[None, None, :])[:, :, None, :]


def _forward(qn, qp, kv, kp, pos, scale: float, block_k: int):
    """``(o [B, T, H, A] in q's dtype, lse [B, T, H] float32)``."""
    b, t, h, n = qn.shape
    s_len, a = kv.shape[1], kv.shape[-1] - n
    bk, nb = _geometry(s_len, block_k)
    kv, kp = _pad_keys(kv, nb * bk), _pad_keys(kp, nb * bk)

    def body(j, carry):
        m, l, acc = carry
        blk = _Block(j, qn, qp, kv, kp, pos, bk=bk, s_len=s_len, scale=scale)
        s = jnp.where(blk.visible, blk.s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(blk.visible, jnp.exp(s - m_new[..., None]), 0.0)
        acc = acc * alpha[..., None] + _dot("bths,bsha->btha", p.astype(blk.v.dtype), blk.v)
        return m_new, l * alpha + jnp.sum(p, axis=-1), acc

    f32 = jnp.float32
    init = (jnp.full((b, t, h), _NEG, f32), jnp.zeros((b, t, h), f32), jnp.zeros((b, t, h, a), f32))
    m, l, acc = lax.fori_loop(0, nb, body, init)
    seen = l > 0
    o = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)   # inf: p = 0 in the backward
    return o, lse   # o in float32: the backward's delta = g · o is taken from it (see _backward)


def _backward(qn, qp, kv, kp, pos, o, lse, g, scale: float, block_k: int):
    """Cotangents of ``(q_nope, q_pe, kv, k_pe)`` for the output's cotangent ``g``. ``o``: the
    forward's output in float32. ``ds = p · (dp - delta)`` cancels where the softmax is peaked,
    and a ``delta`` taken from ``o`` rounded to bfloat16 put 5-28% errors into bfloat16 gradients."""
    b, t, h, n = qn.shape
    s_len, r = kv.shape[1], qp.shape[-1]
    bk, nb = _geometry(s_len, block_k)
    kv_p, kp_p = _pad_keys(kv, nb * bk), _pad_keys(kp, nb * bk)
    dt = qn.dtype
    g = g.astype(dt)
    delta = jnp.sum(g.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)   # Σ_a do · o  [B, T, H]

    def body(j, carry):
        dqn, dqp, dkv, dkp = carry
        blk = _Block(j, qn, qp, kv_p, kp_p, pos, bk=bk, s_len=s_len, scale=scale)
        p = jnp.where(blk.visible, jnp.exp(blk.s - lse[..., None]), 0.0)
        dv = _dot("bths,btha->bsha", p.astype(dt), g)
        ds = (p * (_dot("btha,bsha->bths", g, blk.v) - delta[..., None]) * scale).astype(dt)
        dqn = dqn + _dot("bths,bshn->bthn", ds, blk.kn)
        dqp = dqp + _dot("bths,bsr->bthr", ds, blk.kp)
        dkn = _dot("bths,bthn->bshn", ds, qn)
        dkv = lax.dynamic_update_slice_in_dim(dkv, jnp.concatenate([dkn, dv], -1), j * bk, axis=1)
        dkp = lax.dynamic_update_slice_in_dim(dkp, _dot("bths,bthr->bsr", ds, qp), j * bk, axis=1)
        return dqn, dqp, dkv, dkp

    f32 = jnp.float32
    init = (jnp.zeros(qn.shape, f32), jnp.zeros(qp.shape, f32), jnp.zeros((b, nb * bk, h, kv.shape[-1]), f32),
            jnp.zeros((b, nb * bk, r), f32))
    dqn, dqp, dkv, dkp = lax.fori_loop(0, nb, body, init)
    return (dqn.astype(qn.dtype), dqp.astype(qp.dtype), dkv[:, :s_len].astype(kv.dtype),
            dkp[:, :s_len].astype(kp.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(qn, qp, kv, kp, pos, scale, block_k):
    return _forward(qn, qp, kv, kp, pos, scale, block_k)[0].astype(qn.dtype)


def _attention_fwd(qn, qp, kv, kp, pos, scale, block_k):
    o, lse = _forward(qn, qp, kv, kp, pos, scale, block_k)
    return o.astype(qn.dtype), (qn, qp, kv, kp, pos, o, lse)


def _attention_bwd(scale, block_k, res, g):
    return (*_backward(*res, g, scale, block_k), None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def cached_attention_blocked(q_nope, q_pe, kv, k_pe, q_pos, *, scale: float,
                             block_k: int | None = None) -> jax.Array:
    """Arguments and result as :func:`~kernels_pallas.flash_prefill.cached_attention_ref`
    (``[B, T, H, A]`` in ``q_nope``'s dtype); differentiable, by blocks of ``block_k`` keys
    (default :data:`BLOCK_K`, read at each call; module doc). With bfloat16 inputs the
    probabilities meet ``v`` in bfloat16, as in the kernels."""
    from kernels_pallas.flash_prefill import _check_cached
    _check_cached(q_nope, q_pe, kv, k_pe, q_pos)
    block_k = BLOCK_K if block_k is None else block_k
    return _attention(q_nope, q_pe, kv, k_pe, q_pos.astype(jnp.int32), float(scale), int(block_k))


def cached_attention_bwd_ref(q_nope, q_pe, kv, k_pe, q_pos, o, lse, g, *, scale: float,
                             block_k: int | None = None):
    """The backward of :func:`cached_attention_blocked`, by blocks: the cotangents ``(d q_nope,
    d q_pe, d kv, d k_pe)`` for the output cotangent ``g``, given the forward's inputs, its output
    ``o`` (in float32: its bfloat16 rounding is amplified where the softmax is peaked) and each
    query's log-sum-exp ``lse`` ``[B, T, H]`` float32 (``inf`` where it sees no key). The reference of :func:`kernels_pallas.attention_bwd.cached_attention_bwd_tpu`."""
    block_k = BLOCK_K if block_k is None else block_k
    return _backward(q_nope, q_pe, kv, k_pe, q_pos.astype(jnp.int32), o, lse, g, float(scale), int(block_k))


def blocked_vjp(kernel, scale: float, block_k: int | None = None):
    """``kernel`` (a cached-attention kernel's forward, arguments as the reference's) with
    :func:`cached_attention_blocked`'s backward: the forward's blocked loop is run again for the
    log-sum-exp (the kernels do not return it), then the blocked backward. The positions get no
    cotangent."""

    block_k = BLOCK_K if block_k is None else block_k

    @jax.custom_vjp
    def attn(q_nope, q_pe, kv, k_pe, q_pos):
        return kernel(q_nope, q_pe, kv, k_pe, q_pos, scale=scale)

    def fwd(*args):
        return attn(*args), args

    def bwd(args, g):
        q_pos = args[-1].astype(jnp.int32)
        o, lse = _forward(*args[:-1], q_pos, scale, block_k)
        return (*_backward(*args[:-1], q_pos, o, lse, g, scale, block_k), None)

    attn.defvjp(fwd, bwd)
    return attn
