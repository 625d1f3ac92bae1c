"""Grouped (ragged) expert matmul: rows sorted by expert, one weight matrix per expert.

``y[r] = x[r] @ w[g(r)].T`` where ``g(r)`` is the expert whose contiguous row range (from ``group_sizes``)
holds row ``r``; rows past ``sum(group_sizes)`` give 0. Group sizes are ``>= 0`` and sum to at most ``M``
(checked when they are known at the call; traced sizes are the caller's contract).  Weights are the Hub's ``[out, in]`` layout,
``w_ENK [E, N, K]``, in bf16/f32, or ``float8_e4m3fn`` with block scales ``w_scale [E, ceil(N/128),
ceil(K/128)]`` (W8A16 semantics: dequantize, then dot in ``x.dtype`` with float32 accumulation).

Kernels (``grouped_matmul``), all with a ``jax.custom_vjp`` (``dx`` for any weights, ``dw`` for
bf16/f32 weights; FP8 weights are frozen):

* GPU (Triton-lowered Pallas).  Each program computes its own *group-aligned row tile*
  ``(expert, first row, end row)`` from ``group_sizes`` (``_kernel_tile``; ``_gpu_tile_schedule``
  is the same schedule in XLA, its reference), out of a static-length list: each expert's rows are cut into ``bm``-row
  tiles starting at the expert's first row, so only an expert's last tile is partial, experts with no
  rows get no tile at all (their weights are never read: the decode path), and one extra pseudo-expert
  covers the rows past ``sum(group_sizes)`` and writes zeros.  Grid ``(tile, N tile)``; each program
  loops over K (128 at a time for FP8, applying the ``[E, N/128, K/128]`` block scale to each partial
  product), and does masked loads/stores of its own rows, so programs never overlap.  ``dx`` reuses the
  same kernel reading the weights as ``[E, contraction, out]`` (no transpose is materialised);
  ``dw[e] = dy[rows_e].T @ x[rows_e]`` is a second kernel over ``(expert, N tile, K tile)`` looping over
  the expert's rows (empty experts write zeros).
* TPU (Mosaic TPU, megablox ``gmm``/``tgmm`` design): ``bm``-aligned row tiles visited once per expert
  that overlaps them (consecutively, so the output tile stays resident in VMEM), scalar-prefetched
  ``tile → (expert, row tile)`` maps drive the ``BlockSpec`` index maps; trailing unused grid steps
  repeat the last block indices so they cause no DMA.  Empty experts are never visited by the forward.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from kernels_pallas import backend
from kernels_pallas._common import (GPU_NUM_SMS, QBLOCK, TPU_DECODE_TILE_CAP, TPU_PREFILL_TILE_CAP, and_masks,
                                   cdiv, check_fp8_operands, dequantize_blocks, expand_block_row, is_fp8, masked_load, next_pow2,
                                   round_up, tpu_tile)
from kernels_pallas.fp8_gemm import dequantize_act_1x128, fake_quantize_act_1x128, quantize_act_1x128

__all__ = ["grouped_matmul_ref", "grouped_matmul"]


def _check_args(x_MK, w_ENK, group_sizes_E, w_scale, stacked=False):
    if x_MK.ndim != 2:
        raise ValueError(f"x must be [M, K], got shape {x_MK.shape}")
    if w_ENK.ndim != 3:
        raise ValueError(f"w must be [E, N, K], got shape {w_ENK.shape}")
    if x_MK.shape[1] != w_ENK.shape[2]:
        raise ValueError(f"x inner dim {x_MK.shape[1]} != expert weight in-dim {w_ENK.shape[2]} "
                         f"(w is [E, out, in] = {tuple(w_ENK.shape)})")
    if group_sizes_E.ndim != 1 or (group_sizes_E.shape[0] > w_ENK.shape[0] if stacked
                                   else group_sizes_E.shape != (w_ENK.shape[0],)):
        raise ValueError(f"group_sizes shape {group_sizes_E.shape} does not fit {w_ENK.shape[0]} experts"
                         + (" (with expert_offset: at most that many groups)" if stacked else ""))
    if is_fp8(w_ENK.dtype):
        want = (w_ENK.shape[0], cdiv(w_ENK.shape[1], QBLOCK), cdiv(w_ENK.shape[2], QBLOCK))
        if w_scale is None or tuple(w_scale.shape) != want:   # (the kernels read past a short one)
            got = "none" if w_scale is None else f"shape {tuple(w_scale.shape)}"
            raise ValueError(f"float8 expert weights {tuple(w_ENK.shape)} need w_scale {want}, got {got}")
        check_fp8_operands(x_MK, w_ENK, w_scale)
    else:
        if w_scale is not None:
            raise ValueError(f"w_scale is for float8_e4m3fn expert weights; these are {w_ENK.dtype}")
        for name, a in (("x", x_MK), ("w", w_ENK)):
            if not jnp.issubdtype(a.dtype, jnp.floating) or is_fp8(a.dtype):
                raise ValueError(f"{name} must be bfloat16, float16 or float32, got {a.dtype}")
    if not jnp.issubdtype(group_sizes_E.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be integers, got {group_sizes_E.dtype}")
    if not isinstance(group_sizes_E, jax.core.Tracer):   # known here: check the values too
        sizes = np.asarray(group_sizes_E)
        if (sizes < 0).any() or sizes.sum() > x_MK.shape[0]:
            raise ValueError(f"group_sizes must be >= 0 and sum to at most the {x_MK.shape[0]} rows, got "
                             f"{sizes.tolist() if sizes.size <= 16 else f'{sizes.min()} to {sizes.max()}, sum {sizes.sum()}'}")


def _compute_dtype(x_MK, w_ENK):
    return x_MK.dtype if is_fp8(w_ENK.dtype) else jnp.promote_types(x_MK.dtype, w_ENK.dtype)


def _expert_of_rows(group_sizes_E: jax.Array, m: int) -> jax.Array:
    """``[m]`` int32: the expert whose row range holds each row, ``E`` for rows past the groups.

    The number of group ends ``<= row`` (``searchsorted(ends, row, side="right")``) counted with
    one compare-and-sum: ``jnp.searchsorted`` is a while loop on CPU, several ops per decode step.
    """
    ends_E = jnp.cumsum(group_sizes_E.astype(jnp.int32))
    rows_M = jnp.arange(m, dtype=jnp.int32)
    return jnp.sum(ends_E[None, :] <= rows_M[:, None], axis=1, dtype=jnp.int32)


#: The reference's few-row gather path holds at most this many gathered weight elements.
_GATHER_MAX_ELEMENTS = 1 << 28


def grouped_matmul_ref(x_MK: jax.Array, w: jax.Array, group_sizes_E: jax.Array, *,
                       w_scale: jax.Array | None = None, out_dtype=None) -> jax.Array:
    """Reference grouped matmul via ``jax.lax.ragged_dot`` → ``[M, N]`` (``out_dtype`` default x.dtype).

    Differentiable w.r.t. ``x`` and (non-FP8) ``w``.  Note: XLA lowers ragged_dot to a dense masked
    product on GPU, which does not fit in memory at 256 experts x 32k rows; use it for checking.
    """
    _check_args(x_MK, w, group_sizes_E, w_scale)
    out_dtype = x_MK.dtype if out_dtype is None else out_dtype
    cdt = _compute_dtype(x_MK, w)
    M, E = x_MK.shape[0], w.shape[0]
    if M <= 4 * E and M * w.shape[1] * w.shape[2] <= _GATHER_MAX_ELEMENTS:
        # Few rows (decode): gather each row's expert weight instead of a dense masked product
        # over all experts (what ragged_dot lowers to on CPU); only touched experts are read.
        # (4E: a speculative verification pass of up to 4 tokens per row takes the same path as
        # one-token decoding, so their numbers are identical.) The gathered [M, N, K] weights
        # are capped: uncapped, the 671B plan on a v5p-64 at batch 16 had 5.26 instead of 0.83
        # GiB of decode temporaries per device.
        expert_M = _expert_of_rows(group_sizes_E, M)
        e = jnp.minimum(expert_M, E - 1)
        w_MNK = dequantize_blocks(w[e], w_scale[e]) if is_fp8(w.dtype) else w[e]
        # Operands in the compute dtype, then float32 for the product: bf16 x bf16 products are
        # exact in float32, so this equals a bf16 dot with float32 accumulation (which XLA's CPU
        # batched dot does not implement).
        f32 = jnp.float32
        y = jnp.einsum("mk,mnk->mn", x_MK.astype(cdt).astype(f32), w_MNK.astype(cdt).astype(f32),
                       precision=lax.Precision.HIGHEST)
        return jnp.where((expert_M < E)[:, None], y, 0.0).astype(out_dtype)
    if is_fp8(w.dtype):
        w_ENK = dequantize_blocks(w, w_scale).astype(cdt)
    else:
        w_ENK = w.astype(cdt)
    y = lax.ragged_dot(x_MK.astype(cdt), jnp.swapaxes(w_ENK, 1, 2), group_sizes_E.astype(jnp.int32),
                       precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return y.astype(out_dtype)



# ---------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GpuGroupedConfig:
    """GPU tiles: ``bm`` rows per tile, ``bn`` output columns, ``bk`` contraction step (FP8: 128, or
    a divisor of 128 with ``prescale``), Triton ``num_warps``/``num_stages``; ``dw_bm`` rows per
    step of the dw kernel.  ``prescale`` (FP8): scale the weight tile (e4m3 → f32 x block scale →
    activation dtype, the reference's dequantized weight) before the dot, so the dot accumulates
    straight into the tile's accumulator, instead of scaling each 128-block's partial product.
    ``splits`` (forward): the contraction is cut into that many ranges, each its own program writing
    float32 partial sums that XLA adds afterwards (more programs streaming weights when few rows
    reach few experts, as at batch-1 decode)."""
    bm: int = 64
    bn: int = 128
    bk: int = 64
    num_warps: int = 4
    num_stages: int = 3
    dw_bn: int = 64
    dw_bk: int = 64
    dw_bm: int = 32
    prescale: bool = False
    splits: int = 1


def default_gpu_grouped_config(m: int, e: int, n: int, k: int, fp8: bool) -> GpuGroupedConfig:
    rows_per_expert = max(1, m // max(1, e))
    bm = min(128, max(16, next_pow2(rows_per_expert)))
    if bm >= 64:
        bn, warps, stages = 128, 8 if bm == 128 else 4, 3
    else:  # decode: few rows per expert; narrow column tiles so that many programs stream weights
        bn, warps, stages = 64, 4, 4
    if fp8 and bm == 128:  # prefill-sized groups: weight tiles dequantized before the dot, 64-wide
        # K steps: 228.8 against 163.7 TFLOP/s at 32768 rows / 256 experts / 7168->4096 on an
        # H200 (benchmarks/kernels.py sweep, 2026-11-28 session 3); decode-sized groups keep the
        # per-block scaling (2979 against 2533-2638 GB/s prescaled at 512 rows)
        return GpuGroupedConfig(bm=bm, bn=bn, bk=64, num_warps=warps, num_stages=stages, prescale=True)
    bk = 128 if fp8 else 64
    # Few experts with rows (batch-1 decode: 8 rows, 8 experts): split K until ~4 programs per SM
    # stream weights. Session 3's H200 profile read those 8 experts at 1.3 TB/s with 256 working
    # programs, and one-row dense GEMMs were faster the more programs they had (see
    # fp8_gemm.default_gpu_config). Not yet measured as a default; kernels.py sweeps it.
    working = min(e, m) * cdiv(n, bn)
    splits = 1
    if bm == 16 and working < 4 * GPU_NUM_SMS:
        splits = max(1, min(cdiv(k, bk), cdiv(4 * GPU_NUM_SMS, working), 8))
    return GpuGroupedConfig(bm=bm, bn=bn, bk=bk, num_warps=warps, num_stages=stages, splits=splits)


@dataclasses.dataclass(frozen=True)
class TpuGroupedConfig:
    """TPU tiles (megablox-style): ``tm`` rows (multiple of 16), ``tk``/``tn`` multiples of 128."""
    tm: int = 128
    tk: int = 512
    tn: int = 512


def default_tpu_grouped_config(m: int, n: int, c: int) -> TpuGroupedConfig:
    """Tiles of the TPU forward kernel, chosen as :func:`kernels_pallas.fp8_gemm.default_tpu_config`
    chooses them (not timed on a TPU): weight tiles up to 2048 x 2048 at <= 512 rows (decode: up to
    64 tokens x 8 experts), 1024 x 1024 above, >= 2 output tiles on the parallel axis. Before:
    512 x 512: a batch-64 decode step's gate projection (512 rows over ~200 experts) ran 14,560
    grid steps, 2,080 now."""
    cap = TPU_DECODE_TILE_CAP if m <= 512 else TPU_PREFILL_TILE_CAP
    tk = tpu_tile(round_up(c, QBLOCK), cap)
    tn = tpu_tile(n, cap, min_tiles=2) or tpu_tile(n, cap) or (n if n <= cap else QBLOCK)
    tm = min(128, round_up(m, 16))
    return TpuGroupedConfig(tm=tm, tk=tk, tn=tn)


# ---------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------


def _row_col_mask(row_ok, col_ok):
    return and_masks(None if row_ok is None else row_ok[:, None], None if col_ok is None else col_ok[None, :])


def _group_offsets(group_sizes_E):
    ends = jnp.cumsum(group_sizes_E.astype(jnp.int32))
    return ends - group_sizes_E.astype(jnp.int32), ends


# ---------------------------------------------------------------------------------------------------
# GPU kernels (Triton-lowered Pallas)
# ---------------------------------------------------------------------------------------------------


def _num_row_tiles(m: int, e: int, bm: int) -> int:
    """The GPU kernel's static row-tile count ``ceil(M/bm) + min(E, M) + 1``: at most min(E, M)
    experts have rows, each adding at most one partial tile, so a decode call (8 rows, 256
    experts) launches 10 row tiles, not 258."""
    return cdiv(m, bm) + min(e, m) + 1


def _gpu_tile_schedule(group_sizes_E, m: int, bm: int):
    """Group-aligned row tiles, in XLA: the reference of the schedule that the GPU kernel's
    programs compute themselves (:func:`_kernel_tile`).  Returns int32 arrays
    [:func:`_num_row_tiles`]: expert (E = the zero tail, > E = unused), first row, end row (end ==
    first for unused tiles)."""
    e = group_sizes_E.shape[0]
    sizes = group_sizes_E.astype(jnp.int32)
    tail = jnp.maximum(m - jnp.sum(sizes), 0)
    sizes_ext = jnp.concatenate([sizes, tail[None]])  # [E + 1]
    starts = jnp.cumsum(sizes_ext) - sizes_ext
    ntiles = (sizes_ext + bm - 1) // bm
    tile_end = jnp.cumsum(ntiles)
    tile_start = tile_end - ntiles
    t = jnp.arange(_num_row_tiles(m, e, bm), dtype=jnp.int32)
    g = jnp.searchsorted(tile_end, t, side="right", method="compare_all").astype(jnp.int32)  # empty experts are skipped
    valid = g <= e
    gc = jnp.minimum(g, e)
    r0 = starts[gc] + (t - tile_start[gc]) * bm
    r1 = jnp.minimum(starts[gc] + sizes_ext[gc], r0 + bm)
    r0 = jnp.where(valid, r0, 0)
    r1 = jnp.where(valid, r1, 0)
    return g, r0, r1


def _kernel_tile(gs_ref, t, *, e: int, m: int, bm: int):
    """:func:`_gpu_tile_schedule`'s row tile ``t``, computed by the program itself from the group
    sizes ``gs_ref`` ``[e]`` (``e`` a power of two) → ``(g, r0, r1)``: in XLA the schedule was ~5
    launches per MoE layer (a concatenate, a cumsum, the compare-and-sum, selects), here a few
    vector ops on ``e`` lanes in each program."""
    lane = jnp.arange(e, dtype=jnp.int32)
    sizes = plgpu_triton.load(gs_ref.at[pl.ds(0, e)]).astype(jnp.int32)
    ntiles = (sizes + bm - 1) // bm
    tile_end = jnp.cumsum(ntiles)
    g = jnp.sum((tile_end <= t).astype(jnp.int32))       # searchsorted(tile_end, t, side="right")
    pick = lambda v: jnp.sum(jnp.where(lane == g, v, 0))  # noqa: E731  (v[g], 0 for g == e)
    filled = jnp.sum(sizes)
    tail = jnp.maximum(m - filled, 0)                       # rows past the groups: group e, zeros
    tail_t0 = jnp.sum(ntiles)
    is_tail = g == e
    start = jnp.where(is_tail, filled, pick(jnp.cumsum(sizes) - sizes))
    size = jnp.where(is_tail, tail, pick(sizes))
    tile0 = jnp.where(is_tail, tail_t0, pick(tile_end - ntiles))
    r0 = start + (t - tile0) * bm
    r1 = jnp.minimum(start + size, r0 + bm)
    used = r1 > r0                                          # the tail's tiles past its rows: unused
    g = jnp.where(used, g, e + 1)
    return g, jnp.where(used, r0, 0), jnp.where(used, r1, 0)


def _gpu_gmm_kernel(gs_ref, off_ref, x_ref, w_ref, *rest, e, e_w, m, n, c, bm, bn, bk, w_co,
                    fp8, cdt, prescale=False, steps_per_split=None):
    """One (row tile, column tile): y[r0:r1, cols] = x[r0:r1] @ W[tw] (contracting over c), where
    ``tw = g + expert_offset`` names the tile's expert in a possibly larger stack of weights. The
    tile's group and rows come from the group sizes ``gs_ref`` (``e`` of them, zero-padded to a
    power of two past the ``e_w`` real ones), ``off_ref`` ``[1]`` the expert offset.

    w_ref: [E', O, C] (``w_co=False``, the Hub layout) or [E', C, O] (``w_co=True``, used for dx);
    FP8: scale ref [E', O/128, C/128] or [E', C/128, O/128] accordingly.
    """
    if fp8:
        s_ref, o_ref = rest
    else:
        (o_ref,) = rest
    t, j = pl.program_id(0), pl.program_id(1)
    g, r0, r1 = _kernel_tile(gs_ref, t, e=e, m=m, bm=bm)
    gw = jnp.minimum(g, e_w - 1) + off_ref[0]
    col0 = j * bn
    rows = r0 + jnp.arange(bm)
    row_ok = rows < r1
    cols = col0 + jnp.arange(bn)
    col_ok = (cols < n) if n % bn else None
    nsteps = cdiv(c, bk)
    if steps_per_split is None:
        k_lo, k_hi = 0, nsteps
        out_view = o_ref.at[pl.ds(r0, bm), pl.ds(col0, bn)]
    else:  # split-K: this program's range of contraction steps, a float32 partial sum
        sp = pl.program_id(2)
        k_lo = sp * steps_per_split
        k_hi = jnp.minimum(k_lo + steps_per_split, nsteps)
        out_view = o_ref.at[sp, pl.ds(r0, bm), pl.ds(col0, bn)]
    out_mask = _row_col_mask(row_ok, col_ok)
    precision = lax.Precision.HIGHEST if jnp.dtype(cdt) == jnp.float32 else None

    @pl.when((r1 > r0) & (g < e))
    def _compute():
        def body(kb, acc_MN):
            k0 = pl.multiple_of(kb * bk, bk)
            k_ok = (k0 + jnp.arange(bk) < c) if c % bk else None
            a = masked_load(x_ref.at[pl.ds(r0, bm), pl.ds(k0, bk)], _row_col_mask(row_ok, k_ok))
            if w_co:
                b = masked_load(w_ref.at[gw, pl.ds(k0, bk), pl.ds(col0, bn)],
                                 _row_col_mask(k_ok, col_ok))
            else:
                b = masked_load(w_ref.at[gw, pl.ds(col0, bn), pl.ds(k0, bk)],
                                 _row_col_mask(col_ok, k_ok))
            if fp8 and prescale:  # the dequantized weight tile; bk divides 128: one scale block
                kblk = k0 // QBLOCK
                if QBLOCK % bn == 0:
                    sc = s_ref[gw, kblk, col0 // QBLOCK] if w_co else s_ref[gw, col0 // QBLOCK, kblk]
                else:
                    sv = masked_load(s_ref.at[gw, kblk, cols // QBLOCK] if w_co
                                      else s_ref.at[gw, cols // QBLOCK, kblk], col_ok)
                    sc = sv[None, :] if w_co else sv[:, None]
                b = (b.astype(jnp.float32) * sc).astype(cdt)
            dims = (((1,), (0,)), ((), ())) if w_co else (((1,), (1,)), ((), ()))
            part = lax.dot_general(a.astype(cdt), b.astype(cdt), dims, precision=precision,
                                   preferred_element_type=jnp.float32)
            if fp8 and prescale:
                return acc_MN + part
            if fp8:  # bk == 128: one scale block of the contraction per step
                if QBLOCK % bn == 0:
                    sc = s_ref[gw, kb, col0 // QBLOCK] if w_co else s_ref[gw, col0 // QBLOCK, kb]
                    part = part * sc
                else:
                    sv = masked_load(s_ref.at[gw, kb, cols // QBLOCK] if w_co
                                      else s_ref.at[gw, cols // QBLOCK, kb], col_ok)
                    part = part * sv[None, :]
            return acc_MN + part

        acc = lax.fori_loop(k_lo, k_hi, body, jnp.zeros((bm, bn), jnp.float32))
        plgpu_triton.store(out_view, acc.astype(o_ref.dtype), mask=out_mask)

    @pl.when((r1 > r0) & (g == e))
    def _zero_tail():
        plgpu_triton.store(out_view, jnp.zeros((bm, bn), o_ref.dtype), mask=out_mask)


def gmm_gpu(x_MC, w, group_sizes_E, *, w_scale=None, w_co=False, out_dtype, interpret=False,
            config: GpuGroupedConfig | None = None, expert_offset=None):
    """GPU grouped matmul.  ``w`` is ``[E, O, C]`` (``w_co=False``) or ``[E, C, O]`` (``w_co=True``);
    returns ``[M, O]``.  FP8 ``w`` needs ``w_scale`` with the matching block layout.
    ``expert_offset``: group ``g`` uses ``w[expert_offset + g]`` of a larger stack (E' >= E experts,
    e.g. all layers' experts): the kernel reads the stack in place, no slice is copied."""
    m, c = x_MC.shape
    e = group_sizes_E.shape[0]
    o = w.shape[1] if w_co is False else w.shape[2]
    fp8 = is_fp8(w.dtype)
    cdt = x_MC.dtype if fp8 else jnp.promote_types(x_MC.dtype, w.dtype)
    cfg = config or default_gpu_grouped_config(m, e, o, c, fp8)
    prescale = fp8 and cfg.prescale
    bk = (cfg.bk if prescale else QBLOCK) if fp8 else cfg.bk
    if prescale and QBLOCK % bk:
        raise ValueError(f"prescaled FP8 needs bk dividing {QBLOCK}, got {bk}")
    # the row tiles' schedule is computed by each program from the group sizes (_kernel_tile), as
    # _gpu_tile_schedule computes it; the sizes zero-padded to a power of two (DeepSeek-V3's 256 are)
    ep = next_pow2(e)
    gs = group_sizes_E.astype(jnp.int32)
    gs = gs if ep == e else jnp.pad(gs, (0, ep - e))
    off = jnp.reshape(jnp.asarray(0 if expert_offset is None else expert_offset, jnp.int32), (1,))
    n_tiles = _num_row_tiles(m, e, cfg.bm)
    nsteps = cdiv(c, bk)
    steps_per_split = cdiv(nsteps, max(1, cfg.splits))
    splits = cdiv(nsteps, steps_per_split)
    kernel = functools.partial(_gpu_gmm_kernel, e=ep, e_w=e, m=m, n=o, c=c, bm=cfg.bm, bn=cfg.bn, bk=bk,
                               w_co=w_co, fp8=fp8, cdt=cdt, prescale=prescale,
                               steps_per_split=steps_per_split if splits > 1 else None)
    args = (gs, off, x_MC, w) + ((w_scale.astype(jnp.float32),) if fp8 else ())
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((splits, m, o) if splits > 1 else (m, o),
                                       jnp.float32 if splits > 1 else out_dtype),
        grid=(n_tiles, cdiv(o, cfg.bn)) + ((splits,) if splits > 1 else ()),
        compiler_params=plgpu_triton.CompilerParams(num_warps=cfg.num_warps,
                                                    num_stages=cfg.num_stages),
        interpret=interpret,
        name="grouped_gemm_gpu",
    )(*args)
    return jnp.sum(y, axis=0).astype(out_dtype) if splits > 1 else y


def _gpu_tgmm_kernel(gs_ref, x_ref, dy_ref, o_ref, *, m, n, k, bm, bn, bk, cdt):
    """dw[g, n-tile, k-tile] = dy[rows_g, n-tile].T @ x[rows_g, k-tile] (zeros for empty experts)."""
    g, jn, jk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start = gs_ref[g, 0]
    end = gs_ref[g, 1]
    n0 = jn * bn
    k0 = jk * bk
    n_ok = (n0 + jnp.arange(bn) < n) if n % bn else None
    k_ok = (k0 + jnp.arange(bk) < k) if k % bk else None
    precision = lax.Precision.HIGHEST if jnp.dtype(cdt) == jnp.float32 else None

    def body(i, acc_NK):
        r0 = start + i * bm
        row_ok = r0 + jnp.arange(bm) < end
        dy = masked_load(dy_ref.at[pl.ds(r0, bm), pl.ds(n0, bn)], _row_col_mask(row_ok, n_ok))
        xx = masked_load(x_ref.at[pl.ds(r0, bm), pl.ds(k0, bk)], _row_col_mask(row_ok, k_ok))
        return acc_NK + lax.dot_general(dy.astype(cdt), xx.astype(cdt), (((0,), (0,)), ((), ())),
                                        precision=precision, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, (end - start + bm - 1) // bm, body, jnp.zeros((bn, bk), jnp.float32))
    plgpu_triton.store(o_ref.at[g, pl.ds(n0, bn), pl.ds(k0, bk)], acc.astype(o_ref.dtype),
                       mask=_row_col_mask(n_ok, k_ok))


def tgmm_gpu(x_MK, dy_MN, group_sizes_E, *, out_dtype, interpret=False,
             config: GpuGroupedConfig | None = None):
    """``dw [E, N, K]``: per expert ``dy[rows].T @ x[rows]``."""
    m, k = x_MK.shape
    n = dy_MN.shape[1]
    e = group_sizes_E.shape[0]
    cfg = config or default_gpu_grouped_config(m, e, n, k, False)
    cdt = jnp.promote_types(x_MK.dtype, dy_MN.dtype)
    starts, ends = _group_offsets(group_sizes_E)
    gs = jnp.stack([starts, ends], axis=1)  # [E, 2]
    kernel = functools.partial(_gpu_tgmm_kernel, m=m, n=n, k=k, bm=cfg.dw_bm, bn=cfg.dw_bn,
                               bk=cfg.dw_bk, cdt=cdt)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((e, n, k), out_dtype),
        grid=(e, cdiv(n, cfg.dw_bn), cdiv(k, cfg.dw_bk)),
        compiler_params=plgpu_triton.CompilerParams(num_warps=4, num_stages=3),
        interpret=interpret,
        name="grouped_gemm_dw_gpu",
    )(gs, x_MK, dy_MN)


# ---------------------------------------------------------------------------------------------------
# TPU kernels (Mosaic TPU, megablox design)
# ---------------------------------------------------------------------------------------------------


def _tpu_gmm_schedule(group_sizes_E, m: int, mp: int, tm: int):
    """Visits of ``tm``-aligned row tiles, one per (row tile, expert overlapping it), in row order, for
    ``m`` rows padded to ``mp``; the pseudo-expert E covers rows past ``sum(group_sizes)`` (zeros).
    Returns int32 arrays:
    [T] expert, [T] row tile, [T] expert whose weights the index map names (unused steps and the
    tail repeat the previous one, so they cause no DMA), [T] valid flag, [E+1] starts, [E+1] ends."""
    e = group_sizes_E.shape[0]
    sizes = group_sizes_E.astype(jnp.int32)
    sizes_ext = jnp.concatenate([sizes, jnp.maximum(mp - jnp.sum(sizes), 0)[None]])
    starts = jnp.cumsum(sizes_ext) - sizes_ext
    ends = starts + sizes_ext
    first_tile = starts // tm
    visits = jnp.where(sizes_ext > 0, (ends + tm - 1) // tm - first_tile, 0)
    cum = jnp.cumsum(visits)
    vstart = cum - visits
    # each of the at most min(E, m) experts with rows (m: the real rows, before padding) adds <= 1
    # visit to the row tiles' (a grid step each, even unused: at batch 1, 9 steps instead of 17)
    num = mp // tm + min(e, m)
    t = jnp.arange(num, dtype=jnp.int32)
    valid = t < cum[-1]
    t_eff = jnp.where(valid, t, cum[-1] - 1)
    g = jnp.minimum(jnp.searchsorted(cum, t_eff, side="right", method="compare_all"), e).astype(jnp.int32)
    m_tile = (first_tile[g] + t_eff - vstart[g]).astype(jnp.int32)
    w_group = jnp.maximum(lax.cummax(jnp.where(g < e, g, -1), axis=0), 0).astype(jnp.int32)
    return g, m_tile, w_group, valid.astype(jnp.int32), starts.astype(jnp.int32), ends.astype(jnp.int32)


def _tpu_gmm_kernel(g_ref, mt_ref, wg_ref, valid_ref, st_ref, en_ref, sg_ref, x_ref, w_ref, *rest, e,
                    nk, tm, tn, tk, w_co, fp8, cdt):
    if fp8:
        s_ref, o_ref, acc_ref = rest
    else:
        o_ref, acc_ref = rest
    del wg_ref, sg_ref  # used by the index maps only
    n_i, t, k_i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    g = g_ref[t]
    valid = valid_ref[t] == 1
    precision = lax.Precision.HIGHEST if jnp.dtype(cdt) == jnp.float32 else None
    dims = (((1,), (0,)), ((), ())) if w_co else (((1,), (1,)), ((), ()))

    @pl.when(k_i == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(valid & (g < e))
    def _accumulate():
        if not fp8:
            acc_ref[...] += lax.dot_general(x_ref[...].astype(cdt), w_ref[...].astype(cdt), dims,
                                            precision=precision, preferred_element_type=jnp.float32)
            return
        acc = acc_ref[...]
        for sub in range(tk // QBLOCK):
            sl = slice(sub * QBLOCK, (sub + 1) * QBLOCK)
            a = x_ref[:, sl].astype(cdt)
            b = (w_ref[sl, :] if w_co else w_ref[:, sl]).astype(cdt)
            part = lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)
            acc = acc + part * expand_block_row(s_ref[sub], n_i * tn, tn)
        acc_ref[...] = acc

    @pl.when(valid & (k_i == nk - 1))
    def _store():
        rows = mt_ref[t] * tm + lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
        mask = (rows >= st_ref[g]) & (rows < en_ref[g])
        o_ref[...] = jnp.where(mask, acc_ref[...], o_ref[...].astype(jnp.float32)).astype(o_ref.dtype)


def gmm_tpu(x_MC, w, group_sizes_E, *, w_scale=None, w_co=False, out_dtype, interpret=False,
            config: TpuGroupedConfig | None = None, expert_offset=None):
    """TPU grouped matmul, same contract as :func:`gmm_gpu` (``expert_offset`` moves the weight
    index maps into a larger stack; the small scales are sliced)."""
    from jax.experimental.pallas import tpu as pltpu

    m, c = x_MC.shape
    e = group_sizes_E.shape[0]
    off = jnp.int32(0) if expert_offset is None else jnp.asarray(expert_offset, jnp.int32)
    if w_scale is not None and w_scale.shape[0] != e:
        w_scale = lax.dynamic_slice_in_dim(w_scale, off, e, 0)
    o = w.shape[2] if w_co else w.shape[1]
    fp8 = is_fp8(w.dtype)
    cdt = (jnp.bfloat16 if x_MC.dtype == jnp.bfloat16 else x_MC.dtype) if fp8 else \
        jnp.promote_types(x_MC.dtype, w.dtype)
    cfg = config or default_tpu_grouped_config(m, o, c)
    tm, tn, tk = cfg.tm, cfg.tn, cfg.tk
    cp = round_up(c, QBLOCK)
    if cp % tk:
        raise ValueError(f"TPU contraction tile {tk} must divide {cp}")
    mp = round_up(m, tm)
    if mp != m or cp != c:
        x_MC = jnp.pad(x_MC, [(0, mp - m), (0, cp - c)])
    if cp != c:
        w = jnp.pad(w, [(0, 0), (0, cp - c), (0, 0)] if w_co else [(0, 0), (0, 0), (0, cp - c)])
    nk = cp // tk
    meta = _tpu_gmm_schedule(group_sizes_E, m, mp, tm)
    num = meta[0].shape[0]
    sw = meta[2]  # weight index per step: offset into the stack; the scales are already sliced
    meta = (meta[0], meta[1], sw + off, *meta[3:], sw)

    def x_map(n_i, t, k_i, g, mt, wg, *_):
        return mt[t], k_i

    if w_co:
        w_spec = pl.BlockSpec((None, tk, tn), lambda n_i, t, k_i, g, mt, wg, *_: (wg[t], k_i, n_i))
    else:
        w_spec = pl.BlockSpec((None, tn, tk), lambda n_i, t, k_i, g, mt, wg, *_: (wg[t], n_i, k_i))
    in_specs = [pl.BlockSpec((tm, tk), x_map), w_spec]
    args = [x_MC, w]
    if fp8:  # scales as [E, contraction blocks, 1, output blocks]
        s = w_scale.astype(jnp.float32)
        s_ecb = s if w_co else jnp.swapaxes(s, 1, 2)
        s_ec1b = s_ecb[:, :, None, :]
        in_specs.append(pl.BlockSpec((None, tk // QBLOCK, 1, s_ecb.shape[2]),
                                     lambda n_i, t, k_i, g, mt, wg, v, st, en, sg: (sg[t], k_i, 0, 0)))
        args.append(s_ec1b)
    kernel = functools.partial(_tpu_gmm_kernel, e=e, nk=nk, tm=tm, tn=tn, tk=tk, w_co=w_co, fp8=fp8,
                               cdt=cdt)
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, o), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=7,
            grid=(cdiv(o, tn), num, nk),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((tm, tn), lambda n_i, t, k_i, g, mt, *_: (mt[t], n_i)),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=backend.tpu_interpret_arg(interpret),
        name="grouped_gemm_tpu",
    )(*meta, *args)
    return y[:m] if mp != m else y


def _tpu_tgmm_schedule(group_sizes_E, mp: int, tm: int):
    """Visits (expert, row tile) in row order, one visit for each empty expert (it must write zeros).
    Returns int32 arrays [T]: expert, row tile, valid, reset-accumulator, store; [E] starts, ends."""
    e = group_sizes_E.shape[0]
    sizes = group_sizes_E.astype(jnp.int32)
    starts = jnp.cumsum(sizes) - sizes
    ends = starts + sizes
    tiles = mp // tm
    first_tile = jnp.minimum(starts // tm, tiles - 1)
    visits = jnp.where(sizes > 0, (ends + tm - 1) // tm - starts // tm, 1)
    cum = jnp.cumsum(visits)
    vstart = cum - visits
    num = tiles + e
    t = jnp.arange(num, dtype=jnp.int32)
    valid = t < cum[-1]
    t_eff = jnp.where(valid, t, cum[-1] - 1)
    g = jnp.minimum(jnp.searchsorted(cum, t_eff, side="right", method="compare_all"), e - 1).astype(jnp.int32)
    m_tile = (first_tile[g] + t_eff - vstart[g]).astype(jnp.int32)
    prev_g = jnp.concatenate([jnp.full((1,), -1, jnp.int32), g[:-1]])
    next_g = jnp.concatenate([g[1:], jnp.full((1,), -1, jnp.int32)])
    next_valid = jnp.concatenate([valid[1:], jnp.zeros((1,), bool)])
    reset = valid & (prev_g != g)
    store = valid & ((next_g != g) | ~next_valid)
    i32 = lambda a: a.astype(jnp.int32)
    return g, m_tile, i32(valid), i32(reset), i32(store), i32(starts), i32(ends)


def _tpu_tgmm_kernel(g_ref, mt_ref, valid_ref, reset_ref, store_ref, st_ref, en_ref, x_ref, dy_ref,
                     o_ref, acc_ref, *, tm, cdt):
    t = pl.program_id(2)
    g = g_ref[t]
    precision = lax.Precision.HIGHEST if jnp.dtype(cdt) == jnp.float32 else None

    @pl.when(reset_ref[t] == 1)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when((valid_ref[t] == 1) & (en_ref[g] > st_ref[g]))
    def _accumulate():
        rows = mt_ref[t] * tm + lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
        keep = (rows >= st_ref[g]) & (rows < en_ref[g])
        dy = jnp.where(keep, dy_ref[...].astype(jnp.float32), 0.0).astype(cdt)
        xx = jnp.where(keep, x_ref[...].astype(jnp.float32), 0.0).astype(cdt)
        acc_ref[...] += jnp.dot(jnp.swapaxes(dy, 0, 1), xx, precision=precision,
                                preferred_element_type=jnp.float32)

    @pl.when(store_ref[t] == 1)
    def _store():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def tgmm_tpu(x_MK, dy_MN, group_sizes_E, *, out_dtype, interpret=False,
             config: TpuGroupedConfig | None = None):
    """``dw [E, N, K]``: per expert ``dy[rows].T @ x[rows]`` (megablox ``tgmm`` design)."""
    from jax.experimental.pallas import tpu as pltpu

    m, k = x_MK.shape
    n = dy_MN.shape[1]
    e = group_sizes_E.shape[0]
    cfg = config or default_tpu_grouped_config(m, n, k)
    tm = cfg.tm
    tn = next((t for t in (512, 256, 128) if n % t == 0), n if n < 128 else 128)
    tk = next((t for t in (512, 256, 128) if k % t == 0), k if k < 128 else 128)
    mp = round_up(m, tm)
    if mp != m:
        x_MK = jnp.pad(x_MK, [(0, mp - m), (0, 0)])
        dy_MN = jnp.pad(dy_MN, [(0, mp - m), (0, 0)])
    meta = _tpu_tgmm_schedule(group_sizes_E, mp, tm)
    num = meta[0].shape[0]
    cdt = jnp.promote_types(x_MK.dtype, dy_MN.dtype)
    kernel = functools.partial(_tpu_tgmm_kernel, tm=tm, cdt=cdt)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((e, n, k), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=7,
            grid=(cdiv(n, tn), cdiv(k, tk), num),
            in_specs=[pl.BlockSpec((tm, tk), lambda n_i, k_i, t, g, mt, *_: (mt[t], k_i)),
                      pl.BlockSpec((tm, tn), lambda n_i, k_i, t, g, mt, *_: (mt[t], n_i))],
            out_specs=pl.BlockSpec((None, tn, tk), lambda n_i, k_i, t, g, *_: (g[t], n_i, k_i)),
            scratch_shapes=[pltpu.VMEM((tn, tk), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=backend.tpu_interpret_arg(interpret),
        name="grouped_gemm_dw_tpu",
    )(*meta, x_MK, dy_MN)


# ---------------------------------------------------------------------------------------------------
# Public dispatcher with custom VJP
# ---------------------------------------------------------------------------------------------------


#: The grouped forward on a GPU with bf16 activations: "triton" (this module's kernel, measured on
#: the H200) or "mosaic_gpu" (:mod:`kernels_pallas.grouped_gemm_mgpu`, wgmma, where it tiles the
#: shape; not yet timed on a GPU): bf16 experts, and FP8 experts (W8A16, dequantized in the kernel)
#: from :data:`MGPU_FP8_MIN_ROWS` rows on. The backward pass keeps the Triton kernels.
GROUPED_GPU_ENV = "DEEPSEEK_JAX_GROUPED_GPU"
#: The Mosaic GPU kernel expands FP8 weight scales along N at every call (235 MB at 256 experts,
#: 7168→4096): worth it for a prefill-sized call, not for decode, which keeps the Triton kernel
#: (W8A16 and W8A8 alike).
MGPU_FP8_MIN_ROWS = 1024


def _gmm_w8a8_impl(x, w, gs, ws, off, *, out_dtype, target, interpret):
    """W8A8 forward: ``x`` quantized 1x128 here. On a GPU, from ``MGPU_FP8_MIN_ROWS`` rows on, the
    Mosaic GPU W8A8 kernel (e4m3 ``wgmma``, the only grouped W8A8 kernel) where it tiles the shape;
    otherwise the W8A16 kernels on the fake-quantized rows (the same numbers up to float32
    summation order, the rows rounded to ``x``'s dtype; decode keeps the Triton kernel, which reads
    only the touched experts' scales)."""
    xq, xs = quantize_act_1x128(x)
    asked = os.environ.get(GROUPED_GPU_ENV, "").strip()   # unset: Mosaic GPU, the only W8A8 kernel
    if (target == "gpu" and x.shape[0] >= MGPU_FP8_MIN_ROWS
            and (not asked or backend.gpu_kernel_family(GROUPED_GPU_ENV) == "mosaic_gpu")):
        from kernels_pallas.grouped_gemm_mgpu import gmm_mgpu, grouped_supported
        if grouped_supported(x.shape[0], w.shape[1], x.shape[1], fp8=True):
            return gmm_mgpu(xq, w, gs, x_scale=xs, w_scale=ws, out_dtype=out_dtype, expert_offset=off,
                            interpret=interpret)
    return _gmm_impl(dequantize_act_1x128(xq, xs, x.dtype), w, gs, ws, off, w_co=False,
                     out_dtype=out_dtype, target=target, interpret=interpret)


def _gmm_impl(x, w, gs, ws, off, *, w_co, out_dtype, target, interpret):
    if (target == "gpu" and not w_co and x.dtype == jnp.bfloat16
            and backend.gpu_kernel_family(GROUPED_GPU_ENV) == "mosaic_gpu"):
        from kernels_pallas.grouped_gemm_mgpu import gmm_mgpu, grouped_supported
        fp8 = is_fp8(w.dtype)
        if ((w.dtype == jnp.bfloat16 or (fp8 and x.shape[0] >= MGPU_FP8_MIN_ROWS))
                and grouped_supported(x.shape[0], w.shape[1], x.shape[1], fp8=fp8)):
            return gmm_mgpu(x, w, gs, w_scale=ws, out_dtype=out_dtype, expert_offset=off, interpret=interpret)
    fn = gmm_gpu if target == "gpu" else gmm_tpu
    return fn(x, w, gs, w_scale=ws, w_co=w_co, out_dtype=out_dtype, interpret=interpret,
              expert_offset=off)


def _tgmm_impl(x, dy, gs, *, out_dtype, target, interpret):
    fn = tgmm_gpu if target == "gpu" else tgmm_tpu
    return fn(x, dy, gs, out_dtype=out_dtype, interpret=interpret)


def _gmm_forward(x, w, gs, ws, off, out_dtype, target, interpret, quantize_x):
    fn = _gmm_w8a8_impl if quantize_x else functools.partial(_gmm_impl, w_co=False)
    return fn(x, w, gs, ws, off, out_dtype=out_dtype, target=target, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _gmm_with_vjp(x, w, gs, ws, off, out_dtype, target, interpret, quantize_x):
    return _gmm_forward(x, w, gs, ws, off, out_dtype, target, interpret, quantize_x)


def _gmm_fwd(x, w, gs, ws, off, out_dtype, target, interpret, quantize_x):
    y = _gmm_forward(x, w, gs, ws, off, out_dtype, target, interpret, quantize_x)
    return y, (x, w, gs, ws, off)


def _gmm_bwd(out_dtype, target, interpret, quantize_x, res, dy):
    # W8A8 (quantize_x): dx as if the quantization were the identity (straight-through)
    x, w, gs, ws, off = res
    fp8 = is_fp8(w.dtype)
    dy_c = dy.astype(x.dtype) if fp8 else dy
    # dx = dy @ W[g]: the same kernel, reading W as [E, contraction=N, out=K]
    dx = _gmm_impl(dy_c, w, gs, ws, off, w_co=True, out_dtype=x.dtype, target=target,
                   interpret=interpret)
    dw = None
    if not fp8:
        dw = _tgmm_impl(x, dy, gs, out_dtype=w.dtype, target=target, interpret=interpret)
        if dw.shape[0] != w.shape[0]:  # a slice of a larger stack: zeros elsewhere
            dw = lax.dynamic_update_slice_in_dim(jnp.zeros_like(w), dw, off, 0)
    return dx, dw, None, None, None


_gmm_with_vjp.defvjp(_gmm_fwd, _gmm_bwd)


def grouped_matmul(x_MK: jax.Array, w: jax.Array, group_sizes_E: jax.Array, *,
                   w_scale: jax.Array | None = None, out_dtype=None, impl: str = "auto",
                   expert_offset: jax.Array | int | None = None, quantize_x: bool = False) -> jax.Array:
    """Grouped matmul ``[M, K] x [E, N, K] → [M, N]`` (rows sorted by expert; see module doc).

    ``quantize_x`` (FP8 weights only): W8A8, the rows quantized 1x128 to e4m3 on the fly as the
    dense ``w8a8_matmul`` does, and the block GEMM of the quantized operands (on a GPU the Mosaic
    GPU e4m3 ``wgmma`` kernel where it tiles the shape; the reference and other backends compute
    the same product from the fake-quantized rows, float32 in the reference, ``x``'s dtype in the
    kernels). The backward treats the quantization as the identity.

    ``impl`` picks the Pallas kernel or :func:`grouped_matmul_ref` (see :mod:`kernels_pallas.backend`).
    Differentiable w.r.t. ``x`` and, for bf16/f32 weights, ``w`` (custom VJP; FP8 weights are frozen).

    ``expert_offset`` (int or traced int32): ``w`` (and ``w_scale``) is a larger stack ``[E', N, K]``
    and group ``g`` uses ``w[expert_offset + g]``, e.g. all layers' experts flattened to ``[L*E, ...]``
    inside a scan over layers.  The Pallas kernels read the stack in place; slicing the layer out
    instead costs a copy of its experts at every call (11 GB per DeepSeek-V3 layer).  The reference
    slices (``lax.dynamic_slice``).
    """
    _check_args(x_MK, w, group_sizes_E, w_scale, stacked=expert_offset is not None)
    if quantize_x and not is_fp8(w.dtype):
        raise ValueError(f"grouped_matmul: quantize_x (W8A8) needs float8_e4m3fn weights, got {w.dtype}")
    target, interpret = backend.split_impl(impl)
    e = group_sizes_E.shape[0]
    if expert_offset is not None and target == "ref":
        w = lax.dynamic_slice_in_dim(w, expert_offset, e, 0)
        w_scale = None if w_scale is None else lax.dynamic_slice_in_dim(w_scale, expert_offset, e, 0)
    if target == "ref":
        if quantize_x:  # float32 rows: the products of e4m3 values and scales, unrounded;
            out_dtype = x_MK.dtype if out_dtype is None else out_dtype  # straight-through gradient
            x32 = x_MK.astype(jnp.float32)
            x_MK = x32 + lax.stop_gradient(fake_quantize_act_1x128(x32) - x32)
        return grouped_matmul_ref(x_MK, w, group_sizes_E, w_scale=w_scale, out_dtype=out_dtype)
    out_dtype = jnp.dtype(x_MK.dtype if out_dtype is None else out_dtype)
    if x_MK.shape[0] == 0:
        return jnp.zeros((0, w.shape[1]), out_dtype)
    off = jnp.asarray(0 if expert_offset is None else expert_offset, jnp.int32)
    return _gmm_with_vjp(x_MK, w, group_sizes_E.astype(jnp.int32), w_scale, off, out_dtype, target,
                         interpret, bool(quantize_x))
