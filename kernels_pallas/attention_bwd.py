"""The backward of :func:`kernels_pallas.cached_attention` on a TPU: two Mosaic TPU kernels.

The function (see :mod:`kernels_pallas.blocked_attention`): per (sequence, head, query ``t``),
``o[t] = Σ_{s <= q_pos[t]} p[t, s] v[s]`` with ``p = softmax_s(scale · (q_nope · k_nope[s] + q_pe ·
k_pe[s]))``, ``kv = [k_nope | v]`` per head and ``k_pe`` one rope key per token shared by the
heads. Given the output's cotangent ``g``, the forward's ``o`` and each query's log-sum-exp
``lse`` (so ``p = exp(scale · s - lse)`` is recomputed, never stored), and ``delta[t] = g[t] · o[t]``:

    dp[t, s] = g[t] · v[s]               ds = p · (dp - delta) · scale
    dq_nope  = Σ_s ds k_nope[s]           dq_pe = Σ_s ds k_pe[s]
    dk_nope  = Σ_t ds q_nope[t]           dv    = Σ_t p g[t]           dk_pe = Σ_{h, t} ds q_pe[t]

* :func:`_dq_kernel`, grid ``(B, H, T / bq, S / bk)``: a query block's ``dq`` accumulated over the
  key blocks (the forward's grid; key blocks past the query block's last position are neither
  computed nor fetched).
* :func:`_dkv_kernel`, grid ``(B, S / bk, H, T / bq)``: a key block's ``dk_nope | dv`` accumulated
  over the query blocks, and its ``dk_pe`` over the heads too (the head axis is sequential, so the
  shared rope key's gradient is summed in VMEM: no ``[B, H, S, R]`` per-head array). Query blocks
  that see none of the key block (their last position before it) are skipped, and their fetch is
  clamped to the first query block that does.

The kernels work in the key block's frame for ``dk``/``dv`` (scores ``[bk, bq]``, the per-query
``lse`` and ``delta`` as rows), so every product is a plain or ``A · Bᵀ`` matmul, as in the forward.
``q_nope``, ``kv``, ``g`` and the results ``dq_nope`` / ``dkv`` are read and written in their
token-major ``[B, T, H * width]`` layout, one head's columns per block (compiled, the widths must
be multiples of 128: :func:`kernels_pallas.flash_prefill.tpu_takes`).

The reference with the same signature is :func:`kernels_pallas.blocked_attention.cached_attention_bwd_ref`
(the blocked jnp backward, itself tested against ``jax.grad`` of the plain form).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas import backend
from kernels_pallas._common import pad_axis
from kernels_pallas.flash_prefill import TpuBlocks

__all__ = ["cached_attention_bwd_tpu"]

_NT = (((1,), (1,)), ((), ()))   # a · bᵀ


def _prec(dtype):
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _dq_kernel(hi_ref, pos_ref, qn_ref, qp_ref, g_ref, lse_ref, delta_ref, kv_ref, kp_ref,
               dqn_ref, dqp_ref, dqn_acc, dqp_acc, *, n, s_len, bk, scale):
    """One (sequence, head, query block, key block) step: ``qn_ref`` ``[bq, N]``, ``qp_ref``
    ``[bq, R]``, ``g_ref`` ``[bq, A]``, ``pos_ref`` / ``lse_ref`` / ``delta_ref`` ``[bq, 1]``,
    ``kv_ref`` ``[bk, N + A]``, ``kp_ref`` ``[bk, R]``."""
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dqn_acc[...] = jnp.zeros_like(dqn_acc)
        dqp_acc[...] = jnp.zeros_like(dqp_acc)

    @pl.when(j * bk <= hi_ref[b, i])
    def _step():
        kv, kp = kv_ref[...], kp_ref[...]
        dt = kv.dtype
        prec = _prec(dt)
        kn, v = kv[:, :n], kv[:, n:]
        s = (lax.dot_general(qn_ref[...], kn, _NT, precision=prec, preferred_element_type=jnp.float32)
             + lax.dot_general(qp_ref[...], kp, _NT, precision=prec, preferred_element_type=jnp.float32))
        keys = j * bk + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        visible = (keys <= pos_ref[...]) & (keys < s_len)
        p = jnp.where(visible, jnp.exp(s * scale - lse_ref[...]), 0.0)
        dp = lax.dot_general(g_ref[...], v, _NT, precision=prec, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta_ref[...]) * scale).astype(dt)
        dqn_acc[...] += jnp.dot(ds, kn, precision=prec, preferred_element_type=jnp.float32)
        dqp_acc[...] += jnp.dot(ds, kp, precision=prec, preferred_element_type=jnp.float32)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dqn_ref[...] = dqn_acc[...].astype(dqn_ref.dtype)
        dqp_ref[...] = dqp_acc[...].astype(dqp_ref.dtype)


def _dkv_kernel(hi_ref, lo_ref, pos_ref, qn_ref, qp_ref, g_ref, lse_ref, delta_ref, kv_ref, kp_ref,
                dkv_ref, dkp_ref, dkv_acc, dkp_acc, *, n, s_len, bk, scale):
    """One (sequence, key block, head, query block) step, in the key block's frame: ``pos_ref`` /
    ``lse_ref`` / ``delta_ref`` ``[1, bq]`` rows, the rest as in :func:`_dq_kernel`. ``dkv_acc``
    sums over this head's query blocks, ``dkp_acc`` over the heads' too."""
    b, j, hh, i = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    del lo_ref   # read by the index maps only

    @pl.when(i == 0)
    def _init_head():
        dkv_acc[...] = jnp.zeros_like(dkv_acc)

    @pl.when((hh == 0) & (i == 0))
    def _init_block():
        dkp_acc[...] = jnp.zeros_like(dkp_acc)

    @pl.when(j * bk <= hi_ref[b, i])
    def _step():
        kv, kp = kv_ref[...], kp_ref[...]
        qn, qp, g = qn_ref[...], qp_ref[...], g_ref[...]
        dt = kv.dtype
        prec = _prec(dt)
        kn, v = kv[:, :n], kv[:, n:]
        s = (lax.dot_general(kn, qn, _NT, precision=prec, preferred_element_type=jnp.float32)
             + lax.dot_general(kp, qp, _NT, precision=prec, preferred_element_type=jnp.float32))   # [bk, bq]
        keys = j * bk + lax.broadcasted_iota(jnp.int32, s.shape, 0)
        visible = (keys <= pos_ref[...]) & (keys < s_len)
        p = jnp.where(visible, jnp.exp(s * scale - lse_ref[...]), 0.0)
        dp = lax.dot_general(v, g, _NT, precision=prec, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta_ref[...]) * scale).astype(dt)
        dkv_acc[:, :n] += jnp.dot(ds, qn, precision=prec, preferred_element_type=jnp.float32)
        dkv_acc[:, n:] += jnp.dot(p.astype(dt), g, precision=prec, preferred_element_type=jnp.float32)
        dkp_acc[...] += jnp.dot(ds, qp, precision=prec, preferred_element_type=jnp.float32)

    last_q = i == pl.num_programs(3) - 1

    @pl.when(last_q)
    def _finish_head():
        dkv_ref[...] = dkv_acc[...].astype(dkv_ref.dtype)

    @pl.when(last_q & (hh == pl.num_programs(2) - 1))
    def _finish_block():
        dkp_ref[...] = dkp_acc[...].astype(dkp_ref.dtype)


def cached_attention_bwd_tpu(q_nope, q_pe, kv, k_pe, q_pos, o, lse, g, *, scale: float, interpret: bool = False,
                             block_q: int = 256, block_k: int = 512):
    """Cotangents ``(d q_nope, d q_pe, d kv, d k_pe)`` of :func:`kernels_pallas.cached_attention`
    for the output cotangent ``g`` (arguments as
    :func:`~kernels_pallas.blocked_attention.cached_attention_bwd_ref`: the forward's inputs, its
    output ``o`` ``[B, T, H, A]`` (float32, as ``cached_attention_tpu(..., with_lse=True)`` gives
    it) and log-sum-exp ``lse`` ``[B, T, H]`` float32, ``inf`` where a query sees no key), each in
    its input's dtype. Two kernels (module doc); ``T`` and ``S`` are
    padded to the blocks (padded queries see nothing and carry zero cotangent, padded keys are
    masked). Compiled, a query block is a multiple of 128 tokens or the whole padded call (the
    per-query rows' lane tiling)."""
    from jax.experimental.pallas import tpu as pltpu

    b, t, h, n = q_nope.shape
    s_len, w = kv.shape[1], kv.shape[-1]
    a, r = w - n, q_pe.shape[-1]
    if o.shape != (b, t, h, a) or g.shape != o.shape or lse.shape != (b, t, h):
        raise ValueError(f"cached_attention_bwd_tpu: expected o and g [{b}, {t}, {h}, {a}] and lse [{b}, {t}, {h}]; "
                         f"got {o.shape}, {g.shape}, {lse.shape}")
    dt, f32 = q_nope.dtype, jnp.float32
    blk = TpuBlocks(q_pos, s_len, block_q, block_k)   # the forward's blocking
    bq, bk, tp, sp, nq, nk, pos, hi = blk.bq, blk.bk, blk.tp, blk.sp, blk.nq, blk.nk, blk.pos, blk.hi
    pad, key_block = pad_axis, blk.key_block
    sees = hi[:, None, :] >= (jnp.arange(nk) * bk)[None, :, None]                   # [B, nK, nQ]
    lo = jnp.where(sees.any(-1), jnp.argmax(sees, axis=-1), nq - 1).astype(jnp.int32)   # first query block per key block
    delta = jnp.sum(g.astype(f32) * o.astype(f32), axis=-1)                           # [B, T, H]
    per_q = [pad(x.transpose(0, 2, 1), 2, tp) for x in (lse.astype(f32), delta)]      # [B, H, Tp] each
    qn = pad(q_nope, 1, tp).reshape(b, tp, h * n)
    qp = pad(q_pe.astype(dt).transpose(0, 2, 1, 3), 2, tp)                             # [B, H, Tp, R]
    gg = pad(g.astype(dt), 1, tp).reshape(b, tp, h * a)
    kvp = pad(kv.astype(dt), 1, sp).reshape(b, sp, h * w)
    kpp = pad(k_pe.astype(dt), 1, sp)
    params = dict(n=n, s_len=s_len, bk=bk, scale=scale)

    dqn, dqp = pl.pallas_call(
        functools.partial(_dq_kernel, **params),
        out_shape=[jax.ShapeDtypeStruct((b, tp, h * n), dt), jax.ShapeDtypeStruct((b, h, tp, r), q_pe.dtype)],
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b, h, nq, nk),
            in_specs=[pl.BlockSpec((None, bq, 1), lambda bb, hh, i, j, hi: (bb, i, 0)),
                      pl.BlockSpec((None, bq, n), lambda bb, hh, i, j, hi: (bb, i, hh)),
                      pl.BlockSpec((None, None, bq, r), lambda bb, hh, i, j, hi: (bb, hh, i, 0)),
                      pl.BlockSpec((None, bq, a), lambda bb, hh, i, j, hi: (bb, i, hh)),
                      pl.BlockSpec((None, None, bq, 1), lambda bb, hh, i, j, hi: (bb, hh, i, 0)),
                      pl.BlockSpec((None, None, bq, 1), lambda bb, hh, i, j, hi: (bb, hh, i, 0)),
                      pl.BlockSpec((None, bk, w), lambda bb, hh, i, j, hi: (bb, key_block(bb, i, j, hi), hh)),
                      pl.BlockSpec((None, bk, r), lambda bb, hh, i, j, hi: (bb, key_block(bb, i, j, hi), 0))],
            out_specs=[pl.BlockSpec((None, bq, n), lambda bb, hh, i, j, hi: (bb, i, hh)),
                       pl.BlockSpec((None, None, bq, r), lambda bb, hh, i, j, hi: (bb, hh, i, 0))],
            scratch_shapes=[pltpu.VMEM((bq, n), f32), pltpu.VMEM((bq, r), f32)]),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=backend.tpu_interpret_arg(interpret),
        name="cached_attention_dq_tpu",
    )(hi, pos[..., None], qn, qp, gg, per_q[0][..., None], per_q[1][..., None], kvp, kpp)

    def query_block(bb, j, i, lo):   # query blocks before the first that sees key block j: fetch that one
        return jnp.maximum(i, lo[bb, j])

    dkv, dkp = pl.pallas_call(
        functools.partial(_dkv_kernel, **params),
        out_shape=[jax.ShapeDtypeStruct((b, sp, h * w), kv.dtype), jax.ShapeDtypeStruct((b, sp, r), k_pe.dtype)],
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(b, nk, h, nq),
            in_specs=[pl.BlockSpec((None, 1, bq), lambda bb, j, hh, i, hi, lo: (bb, 0, query_block(bb, j, i, lo))),
                      pl.BlockSpec((None, bq, n), lambda bb, j, hh, i, hi, lo: (bb, query_block(bb, j, i, lo), hh)),
                      pl.BlockSpec((None, None, bq, r),
                                   lambda bb, j, hh, i, hi, lo: (bb, hh, query_block(bb, j, i, lo), 0)),
                      pl.BlockSpec((None, bq, a), lambda bb, j, hh, i, hi, lo: (bb, query_block(bb, j, i, lo), hh)),
                      pl.BlockSpec((None, None, 1, bq),
                                   lambda bb, j, hh, i, hi, lo: (bb, hh, 0, query_block(bb, j, i, lo))),
                      pl.BlockSpec((None, None, 1, bq),
                                   lambda bb, j, hh, i, hi, lo: (bb, hh, 0, query_block(bb, j, i, lo))),
                      pl.BlockSpec((None, bk, w), lambda bb, j, hh, i, hi, lo: (bb, j, hh)),
                      pl.BlockSpec((None, bk, r), lambda bb, j, hh, i, hi, lo: (bb, j, 0))],
            out_specs=[pl.BlockSpec((None, bk, w), lambda bb, j, hh, i, hi, lo: (bb, j, hh)),
                       pl.BlockSpec((None, bk, r), lambda bb, j, hh, i, hi, lo: (bb, j, 0))],
            scratch_shapes=[pltpu.VMEM((bk, w), f32), pltpu.VMEM((bk, r), f32)]),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=backend.tpu_interpret_arg(interpret),
        name="cached_attention_dkv_tpu",
    )(hi, lo, pos[:, None, :], qn, qp, gg, per_q[0][:, :, None, :], per_q[1][:, :, None, :], kvp, kpp)

    return (dqn[:, :t].reshape(b, t, h, n), dqp[:, :, :t].transpose(0, 2, 1, 3), dkv[:, :s_len].reshape(b, s_len, h, w),
            dkp[:, :s_len])
