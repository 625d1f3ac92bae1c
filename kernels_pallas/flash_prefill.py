"""Causal attention among a call's own tokens (the naive MLA form at prefill), flash-style on GPU.

    o[b, t, h] = Σ_{s <= t} softmax_s(scale · q[b, t, h] · k[b, s, h]) v[b, s, h]

``q``/``k`` are ``[B, T, H, K]`` (MLA: K = 128 nope + 64 rope = 192), ``v`` is ``[B, T, H, A]``
(A = 128). Causality is by token index, which equals the model's position mask whenever each
row's positions increase by one along the call (prefill and training: right-padded prompts at
positions ``0..T-1``).

* Reference (:func:`causal_attention_ref`): float32 scores ``[B, H, T, T]``, softmax, product -
  what the model's plain path computes.
* GPU (``impl="pallas_gpu"`` / ``"interpret_gpu"``): JAX's own Triton-lowered Pallas flash
  attention (``jax.experimental.pallas.ops.gpu.attention.mha``, deprecated in jax 0.11 for
  tokamax, which the GPU machine here lacks; online softmax, never
  materializes the scores; its backward is a Triton kernel too). It wants one head size for q, k
  and v and a sequence length divisible by its blocks, so ``v`` is zero-padded to K (the padded output
  columns are dropped) and T is padded with tokens after the real ones (causality keeps them
  out of every real token's window). The scores are ``[B, H, T, T]`` float32 otherwise: 8.6 GB
  per layer at a 4K prompt with DeepSeek-V3's 128 heads.

:func:`causal_attention` has no TPU kernel (its ``impl`` resolving to TPU uses the reference);
on a TPU the model runs the naive prefill through :func:`cached_attention`'s TPU kernel instead
(MLA's ``q_nope`` / ``q_pe`` / ``kv_b_proj`` output as they come, positions = token indices).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas import backend
from kernels_pallas._common import next_pow2, pad_axis, round_up
from kernels_pallas.blocked_attention import blocked_vjp, cached_attention_blocked

__all__ = ["causal_attention_ref", "causal_attention", "cached_attention_ref", "cached_attention",
           "cached_attention_tpu"]


def _check(q_BTHK, k_BTHK, v_BTHA):
    if q_BTHK.ndim != 4 or k_BTHK.shape != q_BTHK.shape:
        raise ValueError(f"q and k must be the same [B, T, H, K], got {q_BTHK.shape} and {k_BTHK.shape}")
    if v_BTHA.ndim != 4 or v_BTHA.shape[:3] != q_BTHK.shape[:3]:
        raise ValueError(f"v must be [B, T, H, A] matching q {q_BTHK.shape}, got {v_BTHA.shape}")


def causal_attention_ref(q_BTHK, k_BTHK, v_BTHA, *, scale: float) -> jax.Array:
    """Plain jnp: float32 scores and softmax, float32 accumulation → ``[B, T, H, A]`` in q's dtype."""
    _check(q_BTHK, k_BTHK, v_BTHA)
    hp = lax.Precision.HIGHEST
    f32 = jnp.float32
    s = jnp.einsum("bthk,bshk->bhts", q_BTHK.astype(f32), k_BTHK.astype(f32), precision=hp) * scale
    t = q_BTHK.shape[1]
    causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
    p = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1)
    return jnp.einsum("bhts,bsha->btha", p, v_BTHA.astype(f32), precision=hp).astype(q_BTHK.dtype)


def causal_attention(q_BTHK, k_BTHK, v_BTHA, *, scale: float, impl: str = "auto",
                     block: int | None = None) -> jax.Array:
    """Causal attention (module doc); ``impl`` as in :mod:`kernels_pallas.backend`, ``block`` the
    flash kernel's query/key block (power of two, cut to the sequence). Default: 128, or 64 when
    the head size pads to more than 128 (MLA's 192 pads to 256): a [128, 256] float32 output
    tile is 128 registers a thread at 8 warps, and 128-token K/V tiles of 256 at 2 stages ask for
    256 KiB of shared memory (227 KiB on an H100/H200)."""
    _check(q_BTHK, k_BTHK, v_BTHA)
    target, interpret = backend.split_impl(impl)
    if target != "gpu":
        return causal_attention_ref(q_BTHK, k_BTHK, v_BTHA, scale=scale)
    with warnings.catch_warnings():  # deprecated for tokamax in jax 0.11, which the lent GPU
        # machine does not have (jax 0.11.2 there); this is the flash kernel it does have
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu.attention import BlockSizes, mha

    b, t, h, kd = q_BTHK.shape
    a = v_BTHA.shape[-1]
    d = max(kd, a)
    if block is None:
        block = 128 if next_pow2(d) <= 128 else 64
    blk = min(block, next_pow2(t))
    tp = round_up(t, blk)
    pad_t = [(0, 0), (0, tp - t), (0, 0), (0, 0)]
    q = jnp.pad(q_BTHK, pad_t[:3] + [(0, d - kd)])
    k = jnp.pad(k_BTHK, pad_t[:3] + [(0, d - kd)])
    v = jnp.pad(v_BTHA.astype(q.dtype), pad_t[:3] + [(0, d - a)])
    # The backward's blocks too: without them mha's backward (a fused dq / dk / dv Triton kernel)
    # refuses to trace ("Backward block sizes must all be set"), i.e. training could not use it.
    # 32, jax's default, divides the padded length (or is cut to it).
    bwd = min(32, blk)
    o = mha(q, k, v, None, sm_scale=scale, causal=True,
            block_sizes=BlockSizes(block_q=blk, block_k=blk, block_q_dkv=bwd, block_kv_dkv=bwd, block_q_dq=bwd,
                                   block_kv_dq=bwd),
            interpret=interpret)
    return o[:, :t, :, :a]


# ---------------------------------------------------------------------------------------------------
# A chunk of new tokens attending over the cache before it (chunked prefill), by position
# ---------------------------------------------------------------------------------------------------

_NEG = -1e30  # finite "minus infinity": a fully masked block gives no inf - inf


def _check_cached(q_nope, q_pe, kv, k_pe, q_pos):
    b, t, h, n = q_nope.shape
    s = kv.shape[1]
    r = q_pe.shape[-1]
    if q_pe.shape != (b, t, h, r) or kv.ndim != 4 or kv.shape[:3] != (b, s, h) or kv.shape[3] <= n \
            or k_pe.shape != (b, s, r):
        raise ValueError(f"cached_attention: expected q_nope [B, T, H, N], q_pe [B, T, H, R], kv [B, S, H, N + A], "
                         f"k_pe [B, S, R]; got {q_nope.shape}, {q_pe.shape}, {kv.shape}, {k_pe.shape}")
    if q_pos.shape != (b, t):
        raise ValueError(f"cached_attention: expected q_pos [{b}, {t}], got {q_pos.shape}")


def cached_attention_ref(q_nope, q_pe, kv, k_pe, q_pos, *, scale: float) -> jax.Array:
    """Plain jnp, float32. ``kv`` is ``kv_b_proj``'s expansion of the cache's latents, per head
    ``[k_nope (N) | v (A)]`` side by side as it comes out; ``k_pe`` one rope key per token shared
    by the heads (MLA). ``o[b, t, h] = Σ_{s <= q_pos[b, t]} softmax_s(scale · (q_nope · k_nope[s] +
    q_pe · k_pe[s])) v[s]`` → ``[B, T, H, A]`` in ``q_nope``'s dtype."""
    _check_cached(q_nope, q_pe, kv, k_pe, q_pos)
    f32, hp = jnp.float32, lax.Precision.HIGHEST
    n = q_nope.shape[-1]
    s = (jnp.einsum("bthn,bshn->bths", q_nope.astype(f32), kv[..., :n].astype(f32), precision=hp)
         + jnp.einsum("bthr,bsr->bths", q_pe.astype(f32), k_pe.astype(f32), precision=hp)) * scale
    visible = jnp.arange(kv.shape[1])[None, None, :] <= q_pos[:, :, None]
    p = jax.nn.softmax(jnp.where(visible[:, :, None], s, -jnp.inf), axis=-1)
    return jnp.einsum("bths,bsha->btha", p, kv[..., n:].astype(f32), precision=hp).astype(q_nope.dtype)


def _gpu_cached_kernel(pos_ref, qn_ref, qp_ref, kv_ref, kp_ref, o_ref, *, t, s_len, n, bq, bk, scale):
    """One (sequence, head, ``bq`` queries) program: online softmax over ``bk``-key blocks up to the
    block holding its last query's position (keys past a query's position masked); ``k_nope`` and
    ``v`` read from their columns of ``kv`` (no slice copies)."""
    from jax.experimental.pallas import triton as plgpu_triton

    from kernels_pallas._common import masked_load

    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    a = o_ref.shape[-1]
    q0 = i * bq
    row_ok = q0 + jnp.arange(bq) < t
    pos = plgpu_triton.load(pos_ref.at[b, pl.ds(q0, bq)], mask=row_ok, other=-1)
    qn = masked_load(qn_ref.at[b, pl.ds(q0, bq), h, :], row_ok[:, None])
    qp = masked_load(qp_ref.at[b, pl.ds(q0, bq), h, :], row_ok[:, None])
    precision = lax.Precision.HIGHEST if qn.dtype == jnp.float32 else None
    dims = (((1,), (1,)), ((), ()))
    hi = jnp.minimum(jnp.max(pos) + 1, s_len)

    def body(j, carry):
        m, l, acc = carry
        k0 = j * bk
        keys = k0 + jnp.arange(bk)
        k_ok = keys < s_len
        kn = masked_load(kv_ref.at[b, pl.ds(k0, bk), h, pl.ds(0, n)], k_ok[:, None])
        vv = masked_load(kv_ref.at[b, pl.ds(k0, bk), h, pl.ds(n, a)], k_ok[:, None])
        kp = masked_load(kp_ref.at[b, pl.ds(k0, bk), :], k_ok[:, None])
        sc = (lax.dot_general(qn, kn, dims, precision=precision, preferred_element_type=jnp.float32)
              + lax.dot_general(qp, kp, dims, precision=precision, preferred_element_type=jnp.float32)) * scale
        visible = (keys[None, :] <= pos[:, None]) & k_ok[None, :]
        sc = jnp.where(visible, sc, _NEG)
        m_new = jnp.maximum(m, jnp.max(sc, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(visible, jnp.exp(sc - m_new[:, None]), 0.0)
        acc = acc * alpha[:, None] + lax.dot(p.astype(vv.dtype), vv, precision=precision,
                                             preferred_element_type=jnp.float32)
        return m_new, l * alpha + jnp.sum(p, axis=1), acc

    init = (jnp.full((bq,), _NEG, jnp.float32), jnp.zeros((bq,), jnp.float32), jnp.zeros((bq, a), jnp.float32))
    _, l, acc = lax.fori_loop(0, (hi + bk - 1) // bk, body, init)
    out = jnp.where(l[:, None] > 0, acc / jnp.where(l > 0, l, 1.0)[:, None], 0.0)
    plgpu_triton.store(o_ref.at[b, pl.ds(q0, bq), h, :], out.astype(o_ref.dtype), mask=row_ok[:, None])


def cached_attention_gpu(q_nope, q_pe, kv, k_pe, q_pos, *, scale: float, interpret: bool = False,
                         block_q: int = 64, block_k: int = 64, num_warps: int = 4, num_stages: int = 2):
    """The GPU kernel (arguments as :func:`cached_attention_ref`): grid ``(B, H, T / block_q)``; each
    program reads the keys up to its last query's position, so the later queries of a chunk see
    the whole cache and nothing after it is read. Head sizes must be powers of two (MLA: 128 /
    64 / 128)."""
    from jax.experimental.pallas import triton as plgpu_triton

    _check_cached(q_nope, q_pe, kv, k_pe, q_pos)
    b, t, h, n = q_nope.shape
    s_len = kv.shape[1]
    a = kv.shape[-1] - n
    bq = min(block_q, max(16, next_pow2(t)))
    bk = min(block_k, max(16, next_pow2(s_len)))
    kernel = functools.partial(_gpu_cached_kernel, t=t, s_len=s_len, n=n, bq=bq, bk=bk, scale=scale)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((b, t, h, a), q_nope.dtype),
        grid=(b, h, -(-t // bq)),
        compiler_params=plgpu_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="cached_attention_gpu",
    )(q_pos.astype(jnp.int32), q_nope, q_pe, kv.astype(q_nope.dtype), k_pe.astype(q_nope.dtype))


def _pow2(*dims) -> bool:
    return all(d == next_pow2(d) for d in dims)


def cached_attention(q_nope, q_pe, kv, k_pe, q_pos, *, scale: float, impl: str = "auto") -> jax.Array:
    """New tokens (a prefill chunk, or a training sequence by token index) attending over the keys
    before them, by position (see :func:`cached_attention_ref`); ``impl`` as in
    :mod:`kernels_pallas.backend`. The GPU kernel where the head sizes are powers of two, the TPU
    kernel where they are multiples of 128 (:func:`tpu_takes`; any size in the interpreter),
    elsewhere the blocked jnp form (:mod:`kernels_pallas.blocked_attention`: the same function,
    never more than ``[B, T, H, 512]`` float32 scores). Differentiable: the TPU kernel's backward
    is two TPU kernels (:mod:`kernels_pallas.attention_bwd`), the GPU kernel's the blocked form's,
    bounded the same way."""
    _check_cached(q_nope, q_pe, kv, k_pe, q_pos)
    target, interpret = backend.split_impl(impl)
    n = q_nope.shape[-1]
    if target == "gpu" and _pow2(n, q_pe.shape[-1], kv.shape[-1] - n):
        kernel = functools.partial(cached_attention_gpu, interpret=interpret)
        return blocked_vjp(kernel, scale)(q_nope, q_pe, kv, k_pe, q_pos)
    if target == "tpu" and (interpret or tpu_takes(q_nope, kv)):
        return _tpu_vjp(float(scale), interpret)(q_nope, q_pe, kv, k_pe, q_pos)
    return cached_attention_blocked(q_nope, q_pe, kv, k_pe, q_pos, scale=scale)


@functools.cache
def _tpu_vjp(scale: float, interpret: bool):
    """The TPU kernel with its own backward (:mod:`kernels_pallas.attention_bwd`): the forward
    saves its log-sum-exp for it. The positions get no cotangent."""
    from kernels_pallas.attention_bwd import cached_attention_bwd_tpu

    @jax.custom_vjp
    def attn(q_nope, q_pe, kv, k_pe, q_pos):
        return cached_attention_tpu(q_nope, q_pe, kv, k_pe, q_pos, scale=scale, interpret=interpret)

    def fwd(*args):
        o, lse = cached_attention_tpu(*args, scale=scale, interpret=interpret, with_lse=True)   # o float32
        return o.astype(args[0].dtype), (args, o, lse)

    def bwd(res, g):
        args, o, lse = res
        return (*cached_attention_bwd_tpu(*args, o, lse, g, scale=scale, interpret=interpret), None)

    attn.defvjp(fwd, bwd)
    return attn


# ---------------------------------------------------------------------------------------------------
# TPU kernel (Mosaic TPU) for cached_attention
# ---------------------------------------------------------------------------------------------------

_LANES = 128


def _tpu_cached_kernel(hi_ref, pos_ref, qn_ref, qp_ref, kv_ref, kp_ref, o_ref, *rest, n, s_len, bk, scale):
    """One (sequence, head, ``bq`` queries, ``bk`` keys) step of an online softmax: ``qn_ref``
    ``[bq, N]``, ``qp_ref`` ``[bq, R]``, ``kv_ref`` ``[bk, N + A]`` (this head's ``[k_nope | v]``),
    ``kp_ref`` ``[bk, R]``, ``pos_ref`` ``[bq, 1]``. ``hi_ref`` (SMEM): each query block's last
    visible key; key blocks after it are skipped (and not fetched: see the index map). ``rest``:
    the log-sum-exp output ``[bq, 1]`` when asked for, then the scratch (``m``, ``l``, ``acc``)."""
    lse_ref, (m_ref, l_ref, acc_ref) = (rest[0], rest[1:]) if len(rest) == 4 else (None, rest)
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full_like(m_ref, _NEG)
        l_ref[...] = jnp.zeros_like(l_ref)
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(j * bk <= hi_ref[b, i])
    def _step():
        kv = kv_ref[...]
        prec = lax.Precision.HIGHEST if kv.dtype == jnp.float32 else None
        dims = (((1,), (1,)), ((), ()))
        s = (lax.dot_general(qn_ref[...], kv[:, :n], dims, precision=prec, preferred_element_type=jnp.float32)
             + lax.dot_general(qp_ref[...], kp_ref[...], dims, precision=prec, preferred_element_type=jnp.float32))
        keys = j * bk + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        visible = (keys <= pos_ref[...]) & (keys < s_len)
        s = jnp.where(visible, s * scale, _NEG)
        m_prev = m_ref[:, :1]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.where(visible, jnp.exp(s - m_new), 0.0)
        l_ref[...] = l_ref[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
        acc_ref[...] = acc_ref[...] * alpha + jnp.dot(p.astype(kv.dtype), kv[:, n:], precision=prec,
                                                      preferred_element_type=jnp.float32)
        m_ref[...] = jnp.broadcast_to(m_new, m_ref.shape)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        tot = l_ref[:, :1]
        o_ref[...] = jnp.where(tot > 0, acc_ref[...] / jnp.where(tot > 0, tot, 1.0), 0.0).astype(o_ref.dtype)
        if lse_ref is not None:   # inf where no key is visible: the backward's p = exp(s - lse) is 0
            lse_ref[...] = jnp.where(tot > 0, m_ref[:, :1] + jnp.log(jnp.where(tot > 0, tot, 1.0)), jnp.inf)


class TpuBlocks:
    """How the TPU kernels (this forward and :mod:`kernels_pallas.attention_bwd`) block a call of
    ``T`` queries at ``q_pos`` ``[B, T]`` over ``s_len`` keys: ``bq`` queries and ``bk`` keys a
    block, ``T`` and ``S`` padded to ``tp`` / ``sp`` (``nq`` / ``nk`` blocks), the padded
    positions ``pos`` ``[B, tp]`` (-1 past the end: those queries see nothing) and ``hi``
    ``[B, nq]``, each query block's last visible key (-1 where none)."""

    def __init__(self, q_pos, s_len: int, block_q: int, block_k: int):
        b, t = q_pos.shape
        self.bq, self.bk = min(block_q, round_up(t, 16)), min(block_k, round_up(s_len, _LANES))
        self.tp, self.sp = round_up(t, self.bq), round_up(s_len, self.bk)
        self.nq, self.nk = self.tp // self.bq, self.sp // self.bk
        self.pos = pad_axis(q_pos.astype(jnp.int32), 1, self.tp, -1)
        self.hi = jnp.minimum(jnp.max(self.pos.reshape(b, self.nq, self.bq), axis=-1), s_len - 1)

    def key_block(self, bb, i, j, hi):
        """Key block ``j``'s index for query block ``i`` (``hi``: the scalar-prefetched
        :attr:`hi`), clamped to the block holding the last visible key: Pallas does not fetch a
        block again when its index repeats, so the skipped blocks after it cost no DMA."""
        return jnp.minimum(j, jnp.maximum(hi[bb, i], 0) // self.bk)


def tpu_takes(q_nope, kv) -> bool:
    """Whether the compiled TPU kernel reads these shapes in place: Mosaic tiles a block's last dim
    by 128 lanes, and the kernel takes one head's ``N`` / ``N + A`` columns of the token-major
    arrays as such a block (DeepSeek-V3: 128 and 256)."""
    n, w = q_nope.shape[-1], kv.shape[-1]
    return n % _LANES == 0 and (w - n) % _LANES == 0


def cached_attention_tpu(q_nope, q_pe, kv, k_pe, q_pos, *, scale: float, interpret: bool = False,
                         block_q: int = 256, block_k: int = 512, with_lse: bool = False):
    """The TPU kernel (arguments as :func:`cached_attention_ref`). Grid ``(B, H, T / block_q,
    S / block_k)``, the key axis sequential. ``q_nope``, ``kv`` and the output are read and
    written in their token-major ``[B, T, H * width]`` layout, one head's columns per block (no
    transposes; compiled, the widths must be multiples of 128: :func:`tpu_takes`); ``q_pe``
    (64 wide) is transposed to heads-major. Key blocks past a query block's last position are
    neither computed nor fetched (their block index is clamped to the last visible one, which
    Pallas does not fetch again). ``T`` and ``S`` are padded to the blocks (padded queries see
    nothing, padded keys are masked). ``with_lse``: also each query's log-sum-exp of its scaled
    scores, ``[B, T, H]`` float32 (``inf`` where it sees no key), and the output in float32, as
    the backward (:func:`kernels_pallas.attention_bwd.cached_attention_bwd_tpu`) takes them."""
    from jax.experimental.pallas import tpu as pltpu

    _check_cached(q_nope, q_pe, kv, k_pe, q_pos)
    b, t, h, n = q_nope.shape
    s_len, w = kv.shape[1], kv.shape[-1]
    a, r = w - n, q_pe.shape[-1]
    dt = q_nope.dtype
    blk = TpuBlocks(q_pos, s_len, block_q, block_k)
    bq, bk, tp, sp, nq, nk, pos, hi = blk.bq, blk.bk, blk.tp, blk.sp, blk.nq, blk.nk, blk.pos, blk.hi
    pad, key_block = pad_axis, blk.key_block

    kernel = functools.partial(_tpu_cached_kernel, n=n, s_len=s_len, bk=bk, scale=scale)
    out_shape = [jax.ShapeDtypeStruct((b, tp, h * a), jnp.float32 if with_lse else dt)]
    out_specs = [pl.BlockSpec((None, bq, a), lambda bb, hh, i, j, hi: (bb, i, hh))]
    if with_lse:
        out_shape.append(jax.ShapeDtypeStruct((b, h, tp, 1), jnp.float32))
        out_specs.append(pl.BlockSpec((None, None, bq, 1), lambda bb, hh, i, j, hi: (bb, hh, i, 0)))
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b, h, nq, nk),
            in_specs=[pl.BlockSpec((None, bq, 1), lambda bb, hh, i, j, hi: (bb, i, 0)),
                      pl.BlockSpec((None, bq, n), lambda bb, hh, i, j, hi: (bb, i, hh)),
                      pl.BlockSpec((None, None, bq, r), lambda bb, hh, i, j, hi: (bb, hh, i, 0)),
                      pl.BlockSpec((None, bk, w), lambda bb, hh, i, j, hi: (bb, key_block(bb, i, j, hi), hh)),
                      pl.BlockSpec((None, bk, r), lambda bb, hh, i, j, hi: (bb, key_block(bb, i, j, hi), 0))],
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((bq, _LANES), jnp.float32), pltpu.VMEM((bq, _LANES), jnp.float32),
                            pltpu.VMEM((bq, a), jnp.float32)]),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=backend.tpu_interpret_arg(interpret),
        name="cached_attention_tpu",
    )(hi, pos[..., None], pad(q_nope, 1, tp).reshape(b, tp, h * n), pad(q_pe.transpose(0, 2, 1, 3), 2, tp),
      pad(kv.astype(dt), 1, sp).reshape(b, sp, h * w), pad(k_pe.astype(dt), 1, sp))
    o = outs[0][:, :t].reshape(b, t, h, a)
    return (o, outs[1][:, :, :t, 0].transpose(0, 2, 1)) if with_lse else o
