"""MLA absorbed decode attention over the latent cache (one new query token per sequence).

The cache holds, per token, ``[c (L = kv_lora_rank) | k_pe (R)]`` (``C = L + R``, e.g. 512 + 64).
For each sequence ``b`` and head ``h``::

    s[t] = (q_lat[b, h] · c[b, t] + q_pe[b, h] · k_pe[b, t]) * scale        for t < lengths[b]
    p    = softmax(s)   (float32)
    o[b, h] = Σ_t p[t] c[b, t]                                               → [B, H, L] float32

A sequence with ``lengths[b] == 0`` gives ``o = 0``.

Kernels (online softmax, one pass over the cache; blocks past a sequence's length are never read):

* GPU (Triton-lowered Pallas): grid ``(sequence, head block)``; each program loops over the sequence's
  ``bt``-token cache blocks up to its length (masked loads), all its heads at once.
* GPU, opt-in (``$DEEPSEEK_JAX_MLA_GPU=mosaic_gpu``): the Mosaic GPU ``wgmma`` kernel of
  :mod:`kernels_pallas.mla_decode_mgpu` where it tiles the shape and the batch fills the GPU.
* TPU (Mosaic TPU): grid ``(sequence, cache block)``, all heads per step, float32 running max / sum /
  accumulator in VMEM; the cache ``BlockSpec`` index is clamped to the sequence's last block via the
  scalar-prefetched lengths, so steps past the length cause no DMA and skip compute. It reads the
  cache as the TPU stores it, transposed (tokens minor; see :func:`mla_decode_tpu`).

Split-T (flash-decoding, the GPU kernel's ``splits > 1``): each of ``S`` token chunks is its own
program writing its partial softmax state, a :class:`SplitT`; :func:`combine_splits` merges them.
``mla_decode(..., merge=False)`` hands the state back unmerged where the split-T kernel ran, so
that the next kernel merges it in its prologue (``kernels_pallas.mla_absorb(part="v")`` does: the
merge's XLA ops and the ``o_lat`` round trip through memory go away).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from kernels_pallas import backend
from kernels_pallas._common import GPU_NUM_SMS, cdiv, next_pow2

__all__ = ["mla_decode_ref", "mla_decode", "SplitT", "combine_splits"]

_NEG = -1e30  # finite "minus infinity" for the running max (avoids inf - inf)


class SplitT(NamedTuple):
    """Split-T partial softmax states of MLA decode attention, ``S`` token chunks (a pytree).

    * ``acc`` ``[S, ..., H, L]`` float32: chunk ``s``'s unnormalized ``Σ_t e^{s_t - m_s} c_t``
    * ``m`` ``[S, ..., H]`` float32: its running max ``m_s`` of the scaled scores (``-1e30`` for a
      chunk with no token: past the sequence's length)
    * ``l`` ``[S, ..., H]`` float32: its softmax denominator ``Σ_t e^{s_t - m_s}`` (0 when empty)

    ``...`` are the lead dims of the merged ``o_lat`` ``[..., H, L]`` (``[B]`` from the kernel; the
    model adds its token axis, ``[B, 1]``). :func:`combine_splits` merges them."""

    acc: jax.Array
    m: jax.Array
    l: jax.Array


def combine_splits(parts: SplitT) -> jax.Array:
    """Merges split-T partial states (:class:`SplitT`) → ``o_lat [..., H, L]`` float32:
    ``o = Σ_s e^{m_s - M} acc_s / Σ_s e^{m_s - M} l_s`` with ``M = max_s m_s``; a row whose
    denominator is 0 (every chunk empty) gives 0."""
    acc_SHL, m_SH, l_SH = parts
    mx = jnp.max(m_SH, axis=0)
    w = jnp.exp(m_SH - mx[None])
    num = jnp.sum(acc_SHL * w[..., None], axis=0)
    den = jnp.sum(l_SH * w, axis=0)
    return jnp.where(den[..., None] > 0, num / jnp.where(den > 0, den, 1.0)[..., None], 0.0)


def _check(q_lat_BHL, q_pe_BHR, cache_BSC, lengths_B, kv_lora_rank):
    b, h, l = q_lat_BHL.shape
    if l != kv_lora_rank:
        raise ValueError(f"q_lat last dim {l} != kv_lora_rank {kv_lora_rank}")
    if q_pe_BHR.shape[:2] != (b, h):
        raise ValueError(f"q_pe shape {q_pe_BHR.shape} does not match q_lat {q_lat_BHL.shape}")
    r = q_pe_BHR.shape[2]
    if cache_BSC.ndim != 3 or cache_BSC.shape[0] != b or cache_BSC.shape[2] != l + r:
        raise ValueError(f"cache shape {cache_BSC.shape} != [B={b}, S, L+R={l + r}]")
    if lengths_B.shape != (b,):
        raise ValueError(f"lengths shape {lengths_B.shape} != ({b},)")


def mla_decode_ref(q_lat_BHL, q_pe_BHR, cache_BSC, lengths_B, *, scale: float,
                   kv_lora_rank: int) -> jax.Array:
    """Plain-jnp reference (float32 throughout) → ``o_BHL`` float32."""
    _check(q_lat_BHL, q_pe_BHR, cache_BSC, lengths_B, kv_lora_rank)
    f32 = jnp.float32
    hp = lax.Precision.HIGHEST
    # q_lat·c + q_pe·k_pe is one product of [q_lat | q_pe] with the whole entry [c | k_pe], and
    # p·c is the first L columns of p·[c | k_pe]: two batched dots over the cache as stored, no
    # slice of it materialized (on CPU a slice is a copy of the cache, every decode step).
    kv_BSC = cache_BSC.astype(f32)
    q_BHC = jnp.concatenate([q_lat_BHL.astype(f32), q_pe_BHR.astype(f32)], axis=-1)
    s_BHS = jnp.einsum("bhc,bsc->bhs", q_BHC, kv_BSC, precision=hp) * scale
    valid_BS = jnp.arange(cache_BSC.shape[1])[None, :] < lengths_B[:, None]
    s_BHS = jnp.where(valid_BS[:, None, :], s_BHS, -jnp.inf)
    m = jnp.max(s_BHS, axis=-1, keepdims=True)
    p = jnp.exp(s_BHS - jnp.where(jnp.isfinite(m), m, 0.0))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    return jnp.einsum("bhs,bsc->bhc", p, kv_BSC, precision=hp)[..., :kv_lora_rank]


# ---------------------------------------------------------------------------------------------------
# GPU kernel (Triton-lowered Pallas)
# ---------------------------------------------------------------------------------------------------


def _gpu_mla_kernel(lay_ref, len_ref, ql_ref, qp_ref, c_ref, o_ref, *part_refs, h, l, r, bh, bt, scale,
                    chunk, offset):
    """One (sequence, head block[, token chunk]).  With ``chunk`` (split-T), the program covers
    tokens ``[s*chunk, (s+1)*chunk)`` and writes its unnormalized accumulator, running max and sum
    (``o_ref``, ``part_refs``): a :class:`SplitT` for :func:`combine_splits`. The sequence's length
    is ``len_ref[b] + offset``, at most the cache's."""
    b, hb = pl.program_id(0), pl.program_id(1)
    layer = lay_ref[0]  # c_ref is [L, B, S, C]: this call's layer, read in place
    n = jnp.minimum(len_ref[b] + offset, c_ref.shape[2])
    t_lo = 0
    if chunk is not None:
        sp = pl.program_id(2)
        t_lo = sp * chunk
        n = jnp.minimum(n, t_lo + chunk)
    h0 = hb * bh
    h_ok = (h0 + jnp.arange(bh) < h) if h % bh else None

    def load(ref, mask):
        if mask is None:
            return plgpu_triton.load(ref)
        return plgpu_triton.load(ref, mask=mask, other=jnp.zeros((), ref.dtype))

    ql = load(ql_ref.at[b, pl.ds(h0, bh), :], None if h_ok is None else h_ok[:, None])  # [bh, L]
    qp = load(qp_ref.at[b, pl.ds(h0, bh), :], None if h_ok is None else h_ok[:, None])  # [bh, R]
    prec = lax.Precision.HIGHEST if c_ref.dtype == jnp.float32 else None
    nt = lambda a, x: lax.dot_general(a, x, (((1,), (1,)), ((), ())), precision=prec,
                                      preferred_element_type=jnp.float32)

    def body(i, carry):
        m, s_sum, acc = carry
        t0 = t_lo + i * bt
        t_ok = t0 + jnp.arange(bt) < n
        c = load(c_ref.at[layer, b, pl.ds(t0, bt), pl.ds(0, l)], t_ok[:, None])  # [bt, L]
        kp = load(c_ref.at[layer, b, pl.ds(t0, bt), pl.ds(l, r)], t_ok[:, None])  # [bt, R]
        s = (nt(ql, c) + nt(qp, kp)) * scale  # [bh, bt]
        s = jnp.where(t_ok[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        s_sum = s_sum * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + lax.dot_general(p.astype(c.dtype), c, (((1,), (0,)), ((), ())),
                                                     precision=prec,
                                                     preferred_element_type=jnp.float32)
        return m_new, s_sum, acc

    init = (jnp.full((bh,), _NEG, jnp.float32), jnp.zeros((bh,), jnp.float32),
            jnp.zeros((bh, l), jnp.float32))
    m, s_sum, acc = lax.fori_loop(0, (jnp.maximum(n - t_lo, 0) + bt - 1) // bt, body, init)
    if chunk is not None:
        m_ref, sum_ref = part_refs
        sp = pl.program_id(2)
        rows = None if h_ok is None else h_ok[:, None]
        store = lambda ref, v, mask: plgpu_triton.store(ref, v, mask=mask) if mask is not None \
            else plgpu_triton.store(ref, v)
        store(o_ref.at[sp, b, pl.ds(h0, bh), :], acc, rows)
        store(m_ref.at[sp, b, pl.ds(h0, bh)], m, h_ok)
        store(sum_ref.at[sp, b, pl.ds(h0, bh)], s_sum, h_ok)
        return
    o = jnp.where(s_sum[:, None] > 0, acc / jnp.where(s_sum > 0, s_sum, 1.0)[:, None], 0.0)
    if h_ok is None:
        plgpu_triton.store(o_ref.at[b, pl.ds(h0, bh), :], o.astype(o_ref.dtype))
    else:
        plgpu_triton.store(o_ref.at[b, pl.ds(h0, bh), :], o.astype(o_ref.dtype), mask=h_ok[:, None])


def default_splits(batch: int, head_blocks: int, cache_len: int) -> int:
    """Split-T chunks for the GPU kernel: none while ``batch x head_blocks`` programs fill half the
    SMs; below that, enough chunks for ~2 programs per SM, at most 16 and each >= 256 tokens.
    Batch 1 with 128 heads and a 4096-token cache is otherwise 2 programs on 132 SMs, each walking
    the whole cache (untuned guess; ``benchmarks/kernels.py`` sweeps ``splits`` at B=64)."""
    programs = batch * head_blocks
    if 2 * programs >= GPU_NUM_SMS:
        return 1
    return max(1, min(16, cache_len // 256, cdiv(2 * GPU_NUM_SMS, programs)))


def mla_decode_gpu(q_lat_BHL, q_pe_BHR, cache_BSC, lengths_B, *, scale, kv_lora_rank,
                   interpret=False, block_h: int | None = None, block_t: int = 64,
                   num_warps: int = 8, num_stages: int = 2, splits: int | None = None, layer=None,
                   merge: bool = True, length_offset: int = 0):
    """GPU kernel; heads in blocks of ``block_h`` (the cache of a sequence is read once per head
    block, the later reads mostly from L2), tokens in blocks of ``block_t``.  ``splits > 1``
    (flash-decoding): the cache length is cut into that many chunks, each its own program, and the
    partial softmax states are merged afterwards (more programs in flight when B x head blocks is
    small against the 132 SMs; costs ``splits x B x H x (L + 2)`` float32 written and read).
    ``splits=None``: :func:`default_splits`. ``merge=False``: where the split-T kernel runs, its
    :class:`SplitT` is returned unmerged (``[S, B, H, L]``, ``[S, B, H]`` x 2; ``S`` may be fewer
    than ``splits``: chunks are whole token blocks); otherwise ``o_BHL`` as with ``merge=True``.
    ``length_offset``: see :func:`mla_decode` (added, and clamped to the cache, in the kernel)."""
    bsz, h, l = q_lat_BHL.shape
    r = q_pe_BHR.shape[2]
    if splits is None:
        splits = default_splits(bsz, cdiv(h, block_h or min(64, max(16, next_pow2(h)))), cache_BSC.shape[-2])
    if layer is None:
        cache_BSC = cache_BSC[None]
    lay = jnp.reshape(jnp.asarray(0 if layer is None else layer, jnp.int32), (1,))
    if splits > 1:
        s_len = cache_BSC.shape[2]
        chunk = cdiv(cdiv(s_len, splits), block_t) * block_t
        splits = cdiv(s_len, chunk)
        bh = block_h or min(64, max(16, next_pow2(h)))
        kernel = functools.partial(_gpu_mla_kernel, h=h, l=l, r=r, bh=bh, bt=block_t, scale=scale,
                                   chunk=chunk, offset=int(length_offset))
        f32 = jnp.float32
        acc, m, ssum = pl.pallas_call(
            kernel,
            out_shape=(jax.ShapeDtypeStruct((splits, bsz, h, l), f32),
                       jax.ShapeDtypeStruct((splits, bsz, h), f32),
                       jax.ShapeDtypeStruct((splits, bsz, h), f32)),
            grid=(bsz, cdiv(h, bh), splits),
            compiler_params=plgpu_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
            interpret=interpret,
            name="mla_decode_gpu_split",
        )(lay, lengths_B.astype(jnp.int32), q_lat_BHL, q_pe_BHR, cache_BSC)
        parts = SplitT(acc, m, ssum)
        return combine_splits(parts) if merge else parts
    # 64-head blocks: 701 GB/s at B=64, H=128, T=4096 on an H200 against 384 GB/s with 32
    # (benchmarks/kernels.py, 2026-11-28; docs/benchmarks.md); 64-token blocks: 957-959 GB/s
    # against 700-705 with 32 (two runs, session 3)
    bh = block_h or min(64, max(16, next_pow2(h)))
    kernel = functools.partial(_gpu_mla_kernel, h=h, l=l, r=r, bh=bh, bt=block_t, scale=scale, chunk=None,
                               offset=int(length_offset))
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((bsz, h, l), jnp.float32),
        grid=(bsz, cdiv(h, bh)),
        compiler_params=plgpu_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="mla_decode_gpu",
    )(lay, lengths_B.astype(jnp.int32), q_lat_BHL, q_pe_BHR, cache_BSC)


# ---------------------------------------------------------------------------------------------------
# TPU kernel (Mosaic TPU)
# ---------------------------------------------------------------------------------------------------

_LANES = 128


def _tpu_mla_kernel(len_ref, _lay_ref, ql_ref, qp_ref, c_ref, o_ref, m_ref, s_ref, acc_ref, *, l, bt, scale):
    b, j = pl.program_id(0), pl.program_id(1)
    n = len_ref[b]

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full_like(m_ref, _NEG)
        s_ref[...] = jnp.zeros_like(s_ref)
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(j * bt < n)
    def _step():
        # the block is the cache transposed, [C, bt]: tokens along the lanes
        t_ok = j * bt + lax.broadcasted_iota(jnp.int32, (1, bt), 1) < n  # [1, bt]
        blk = c_ref[...]
        c = jnp.where(t_ok, blk[:l, :], 0).astype(blk.dtype)  # [L, bt]; tokens past n may be garbage
        kp = blk[l:, :]  # [R, bt]: a garbage score is masked below, and its p is 0
        prec = lax.Precision.HIGHEST if blk.dtype == jnp.float32 else None
        s = (jnp.dot(ql_ref[...], c, precision=prec, preferred_element_type=jnp.float32)
             + jnp.dot(qp_ref[...], kp, precision=prec, preferred_element_type=jnp.float32)) * scale
        s = jnp.where(t_ok, s, -jnp.inf)  # [H, bt]
        m_prev = m_ref[:, :1]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new)
        s_ref[...] = s_ref[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
        pv = lax.dot_general(p.astype(c.dtype), c, (((1,), (1,)), ((), ())), precision=prec,
                             preferred_element_type=jnp.float32)  # [H, L]
        acc_ref[...] = acc_ref[...] * alpha + pv
        m_ref[...] = jnp.broadcast_to(m_new, m_ref.shape)

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        tot = s_ref[:, :1]
        o_ref[...] = jnp.where(tot > 0, acc_ref[...] / jnp.where(tot > 0, tot, 1.0), 0.0)


#: tokens per grid step of the TPU kernel. Each grid step has a fixed cost besides its DMA; a
#: 128-token block moves only 147 KB, ~55 ns of HBM time at v5p's 2.76 TB/s, so short blocks would
#: leave the kernel bound by its step count. 512 tokens: 590 KB per block (not timed: no TPU here).
TPU_BLOCK_T = 512


def mla_decode_tpu(q_lat_BHL, q_pe_BHR, cache_BSC, lengths_B, *, scale, kv_lora_rank,
                   interpret=False, block_t: int = TPU_BLOCK_T, layer=None):
    """TPU kernel; all heads per grid step, ``block_t`` tokens per step (a multiple of 128, or
    at least the cache length). ``layer``: the cache is an ``[L, B, S, C]`` stack and layer
    ``layer``'s is read in place (a scalar-prefetched index).

    The kernel reads the cache transposed, ``[.., C, S]``: that is how a TPU stores it. Its
    default layout for an array whose minor dimension is not a multiple of 128 (C = 576) puts
    the next dimension (S) minor instead, so ``swapaxes`` here is free (a bitcast), where a
    row-major ``[S, C]`` operand made XLA transpose the whole cache into and out of every decode
    program, and padded each 576-wide row to 640 lanes."""
    from jax.experimental.pallas import tpu as pltpu

    if layer is None:
        cache_BSC = cache_BSC[None]
    lay = jnp.reshape(jnp.asarray(0 if layer is None else layer, jnp.int32), (1,))
    bsz, h, l = q_lat_BHL.shape
    r = q_pe_BHR.shape[2]
    s_len, c_dim = cache_BSC.shape[2:]
    if block_t % _LANES:
        raise ValueError(f"mla_decode_tpu: block_t={block_t} must be a multiple of {_LANES}")
    bt = s_len if s_len <= block_t else block_t
    nblk = cdiv(s_len, bt)
    # a length past the cache is the whole cache, as in the reference (the kernel's mask took the
    # padded tail of a partial last block as tokens)
    lengths_B = jnp.minimum(lengths_B.astype(jnp.int32), s_len)

    def cache_map(b, j, lens, lay):  # clamp to the last block holding tokens: no DMA past the length
        last = jnp.maximum((lens[b] + bt - 1) // bt - 1, 0)
        return lay[0], b, 0, jnp.minimum(j, last)

    kernel = functools.partial(_tpu_mla_kernel, l=l, bt=bt, scale=scale)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((bsz, h, l), jnp.float32),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(bsz, nblk),
            in_specs=[pl.BlockSpec((None, h, l), lambda b, j, lens, lay: (b, 0, 0)),
                      pl.BlockSpec((None, h, r), lambda b, j, lens, lay: (b, 0, 0)),
                      pl.BlockSpec((None, None, c_dim, bt), cache_map)],
            out_specs=pl.BlockSpec((None, h, l), lambda b, j, lens, lay: (b, 0, 0)),
            scratch_shapes=[pltpu.VMEM((h, _LANES), jnp.float32),
                            pltpu.VMEM((h, _LANES), jnp.float32),
                            pltpu.VMEM((h, l), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=backend.tpu_interpret_arg(interpret),
        name="mla_decode_tpu",
    )(lengths_B, lay, q_lat_BHL, q_pe_BHR, jnp.swapaxes(cache_BSC, -1, -2))


#: ``$DEEPSEEK_JAX_MLA_GPU=mosaic_gpu``: the Mosaic GPU kernel (:mod:`kernels_pallas.mla_decode_mgpu`,
#: opt-in until a GPU session has timed it) where it tiles the shape and the batch gives it at
#: least this many CTAs (one per sequence and 64 heads, no split-T); the Triton kernel otherwise.
MLA_GPU_ENV = "DEEPSEEK_JAX_MLA_GPU"
MGPU_MIN_PROGRAMS = GPU_NUM_SMS // 2


def _mosaic_gpu_takes(q_lat_BHL, q_pe_BHR, cache_BSC) -> bool:
    if backend.gpu_kernel_family(MLA_GPU_ENV) != "mosaic_gpu":
        return False
    from kernels_pallas.mla_decode_mgpu import supported
    b, h, l = q_lat_BHL.shape
    return (b * (h // 64) >= MGPU_MIN_PROGRAMS and q_lat_BHL.dtype == cache_BSC.dtype == q_pe_BHR.dtype
            and supported(b, h, l, q_pe_BHR.shape[2], cache_BSC.shape[-2], cache_BSC.dtype))


def mla_decode(q_lat_BHL, q_pe_BHR, cache_BSC, lengths_B, *, scale: float, kv_lora_rank: int,
               impl: str = "auto", layer=None, merge: bool = True, length_offset: int = 0) -> jax.Array | SplitT:
    """Absorbed MLA decode attention → ``o_BHL`` float32 (see module doc); ``impl`` as in
    :mod:`kernels_pallas.backend`.  ``layer`` (int or traced): ``cache`` is several layers'
    ``[L, B, S, C]`` stack and layer ``layer``'s is attended over (read in place by the GPU
    and TPU kernels; the reference takes a dynamic slice).

    ``merge=False``: where the Triton GPU kernel runs split-T (:func:`default_splits` > 1: small
    batches), the result is its :class:`SplitT` unmerged, for a consumer that merges it
    (``kernels_pallas.mla_absorb(part="v")``, or :func:`combine_splits`); every other path (no
    split, the reference, TPU, Mosaic GPU) returns ``o_BHL`` as with ``merge=True``. A caller
    checks ``isinstance(result, SplitT)``.

    ``length_offset``: the lengths are ``min(lengths_B + length_offset, S)``: the decode step passes
    its query positions with offset 1 (a query sees the cache up to its own position), which the
    Triton GPU kernel adds itself; elsewhere XLA does, before the call (on a GPU that add was a
    launch per layer of its own)."""
    target, interpret = backend.split_impl(impl)
    if length_offset and not (target == "gpu" and not _mosaic_gpu_takes(q_lat_BHL, q_pe_BHR, cache_BSC)):
        lengths_B = jnp.minimum(lengths_B + length_offset, cache_BSC.shape[-2])
        length_offset = 0
    if target == "gpu" and _mosaic_gpu_takes(q_lat_BHL, q_pe_BHR, cache_BSC):
        from kernels_pallas.mla_decode_mgpu import mla_decode_mgpu
        return mla_decode_mgpu(q_lat_BHL, q_pe_BHR, cache_BSC, lengths_B, scale=scale,
                               kv_lora_rank=kv_lora_rank, layer=layer, interpret=interpret)
    if layer is not None:
        if cache_BSC.ndim != 4:
            raise ValueError(f"with layer=, the cache must be [L, B, S, C], got {cache_BSC.shape}")
        if target != "ref":
            _check(q_lat_BHL, q_pe_BHR, cache_BSC[0], lengths_B, kv_lora_rank)
            if target == "gpu":
                return mla_decode_gpu(q_lat_BHL, q_pe_BHR, cache_BSC, lengths_B, scale=scale,
                                      kv_lora_rank=kv_lora_rank, interpret=interpret, layer=layer, merge=merge,
                                      length_offset=length_offset)
            return mla_decode_tpu(q_lat_BHL, q_pe_BHR, cache_BSC, lengths_B, scale=scale, kv_lora_rank=kv_lora_rank,
                                  interpret=interpret, layer=layer)
        cache_BSC = lax.dynamic_index_in_dim(cache_BSC, layer, 0, False)
    _check(q_lat_BHL, q_pe_BHR, cache_BSC, lengths_B, kv_lora_rank)
    if target == "ref":
        return mla_decode_ref(q_lat_BHL, q_pe_BHR, cache_BSC, lengths_B, scale=scale,
                              kv_lora_rank=kv_lora_rank)
    if target == "gpu":
        return mla_decode_gpu(q_lat_BHL, q_pe_BHR, cache_BSC, lengths_B, scale=scale, kv_lora_rank=kv_lora_rank,
                              interpret=interpret, merge=merge, length_offset=length_offset)
    return mla_decode_tpu(q_lat_BHL, q_pe_BHR, cache_BSC, lengths_B, scale=scale, kv_lora_rank=kv_lora_rank,
                          interpret=interpret)
