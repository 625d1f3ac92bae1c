"""Block-scaled FP8 matmuls (SPEC §7): references, Pallas kernels for GPU and TPU, dispatch.

Layouts (the Hub's ``[out, in]``):

* ``x_MK``: activations (bf16 / f32), any leading batch dims in the public functions.
* ``wq_NK``: ``float8_e4m3fn`` weights; ``ws_nk``: float32 block scales ``[ceil(N/128), ceil(K/128)]``,
  ``W[n, k] = float(Wq[n, k]) * S[n // 128, k // 128]`` (partial edge blocks included).
* ``xq_MK`` / ``xs_Mk``: e4m3 activations and their float32 scales, one per row per 128-wide K block.

Two products:

* **W8A16** (the parity semantics): ``x @ dequant(W).T`` in ``x.dtype`` with float32 accumulation.
  The kernels stream the e4m3 tiles, multiply them by ``x`` exactly (e4m3 values are exact in bf16) and
  apply the block scale to each 128-wide partial product in float32 - the same numbers as the
  reference up to the bf16 rounding of ``W`` that the reference does and the kernel does not.
* **W8A8** (optional fast path): ``x`` quantized on the fly in 1x128 blocks, then
  ``C[m,n] = Σ_kb (Σ_{k∈kb} xq[m,k]·Wq[n,k]) · xs[m,kb] · S[n//128,kb]`` with float32 accumulation.

Kernels:

* GPU (``impl="pallas_gpu"``): the Triton-lowered Pallas path (``pl.pallas_call`` with a
  ``(row tile, column tile[, K split])`` grid, an in-kernel loop over 128-wide K blocks, masked loads
  and stores for ragged edges).  e4m3 x e4m3 → f32 ``dot`` is a Hopper wgmma; the scales are applied to
  each block's partial product in registers.  Decode shapes (small M) use split-K so that enough
  programs stream the weight.
* TPU (``impl="pallas_tpu"``): Mosaic TPU ``BlockSpec`` pipeline over ``(M, N, K)`` tiles with a VMEM
  float32 accumulator; the e4m3 tiles are widened to bf16 in VMEM (exact) for the MXU.
* GPU, W8A8 with ``$DEEPSEEK_JAX_W8A8_GPU=mosaic_gpu``: the Mosaic GPU kernel of
  :mod:`kernels_pallas.fp8_gemm_mgpu` (wgmma, per-K-block promotion) where it tiles the shape.
* ``impl="interpret"`` / ``"interpret_gpu"`` / ``"interpret_tpu"`` run either one in the Pallas
  interpreter (CPU tests).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from kernels_pallas import backend
from kernels_pallas._common import (E4M3_MAX, FP8_DTYPE, GPU_NUM_SMS, QBLOCK, TPU_DECODE_TILE_CAP,
                                   TPU_PREFILL_TILE_CAP, SplitK, and_masks, cdiv, check_fp8_operands, dequantize_blocks,
                                   expand_block_row, flatten_rows, masked_load, next_pow2, round_up, tpu_tile)

__all__ = [
    "quantize_act_1x128",
    "w8a16_matmul_ref",
    "w8a8_matmul_ref",
    "w8a16_matmul",
    "w8a8_matmul",
]


# ---------------------------------------------------------------------------------------------------
# References (plain jnp; the contract the model relies on)
# ---------------------------------------------------------------------------------------------------


def quantize_act_1x128(x_MK: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Quantize activations per row, per contiguous 128-wide block of K (last block partial).

    ``s = max(amax, 1e-4) / 448``, ``xq = e4m3(x / s)`` (clipped to ±448 so that float rounding can never
    overflow into e4m3fn's NaN).  Works on any leading dims: ``[..., K]`` → (``[..., K]`` e4m3,
    ``[..., ceil(K/128)]`` float32).
    """
    *lead, k = x_MK.shape
    kb = cdiv(k, QBLOCK)
    x = x_MK.astype(jnp.float32)
    pad = kb * QBLOCK - k
    if pad:
        x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, pad)])
    x_blocks = x.reshape(*lead, kb, QBLOCK)
    amax = jnp.max(jnp.abs(x_blocks), axis=-1)
    xs = jnp.maximum(amax, 1e-4) / E4M3_MAX
    xq = jnp.clip(x_blocks / xs[..., None], -E4M3_MAX, E4M3_MAX).astype(FP8_DTYPE)
    xq = xq.reshape(*lead, kb * QBLOCK)[..., :k]
    return xq, xs.astype(jnp.float32)


def dequantize_act_1x128(xq_MK: jax.Array, xs_Mk: jax.Array, dtype=jnp.float32) -> jax.Array:
    """``xq * xs`` per 1x128 block (the inverse of ``quantize_act_1x128``, up to its rounding)."""
    k = xq_MK.shape[-1]
    s = jnp.repeat(xs_Mk.astype(jnp.float32), QBLOCK, axis=-1)[..., :k]
    return (xq_MK.astype(jnp.float32) * s).astype(dtype)


def fake_quantize_act_1x128(x_MK: jax.Array, dtype=None) -> jax.Array:
    """``x`` rounded the way W8A8 sees it: quantized per 1x128 block to e4m3, then scaled back.
    A dot of this with dequantized weights is the W8A8 block GEMM up to float32 summation order."""
    return dequantize_act_1x128(*quantize_act_1x128(x_MK), x_MK.dtype if dtype is None else dtype)


def _check_weight(x_MK, wq_NK, ws_nk, layer=None):
    check_fp8_operands(x_MK, wq_NK, ws_nk)
    if layer is not None:  # [L, N, K] stack of several layers' weights, one used
        if wq_NK.ndim != 3 or ws_nk.ndim != 3 or wq_NK.shape[0] != ws_nk.shape[0]:
            raise ValueError(f"with layer=, expected [L, N, K] weight and [L, nb, kb] scale stacks, got "
                             f"{wq_NK.shape} and {ws_nk.shape}")
        wq_NK, ws_nk = wq_NK[0], ws_nk[0]
    if wq_NK.ndim != 2 or ws_nk.ndim != 2:
        raise ValueError(f"expected 2-D weight and scale, got {wq_NK.shape} and {ws_nk.shape}")
    if x_MK.shape[-1] != wq_NK.shape[1]:
        raise ValueError(f"x inner dim {x_MK.shape[-1]} != weight in-dim {wq_NK.shape[1]} "
                         f"(weight is [out, in] = {tuple(wq_NK.shape)})")
    n, k = wq_NK.shape
    if tuple(ws_nk.shape) != (cdiv(n, QBLOCK), cdiv(k, QBLOCK)):
        raise ValueError(f"weight scale shape {tuple(ws_nk.shape)} != "
                         f"{(cdiv(n, QBLOCK), cdiv(k, QBLOCK))} for weight {tuple(wq_NK.shape)}")


def w8a16_matmul_ref(x_MK: jax.Array, wq_NK: jax.Array, ws_nk: jax.Array, *,
                     out_dtype=None) -> jax.Array:
    """``x @ dequant(Wq, S).T``: W dequantized to float32, cast to ``x.dtype``, dot with float32
    accumulation (precision HIGHEST), cast to ``out_dtype`` (default ``x.dtype``).
    ``x`` may have leading batch dims; returns ``[..., N]``."""
    _check_weight(x_MK, wq_NK, ws_nk)
    out_dtype = x_MK.dtype if out_dtype is None else out_dtype
    w_NK = dequantize_blocks(wq_NK, ws_nk).astype(x_MK.dtype)
    y = jnp.dot(x_MK, w_NK.T, preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)
    return y.astype(out_dtype)


def _w8a8_from_quantized_ref(xq_MK, xs_Mk, wq_NK, ws_nk):
    """Block GEMM of already-quantized operands → float32 ``[M, N]`` (scan over K blocks)."""
    m, k = xq_MK.shape
    n = wq_NK.shape[0]
    kb = cdiv(k, QBLOCK)
    pad = kb * QBLOCK - k
    xq = jnp.pad(xq_MK.astype(jnp.float32), [(0, 0), (0, pad)])
    wq = jnp.pad(wq_NK.astype(jnp.float32), [(0, 0), (0, pad)])
    xq_kMb = xq.reshape(m, kb, QBLOCK).transpose(1, 0, 2)
    wq_kNb = wq.reshape(n, kb, QBLOCK).transpose(1, 0, 2)
    ws_kN = jnp.repeat(ws_nk.astype(jnp.float32), QBLOCK, axis=0)[:n].T  # [kb, N]
    xs_kM = xs_Mk.astype(jnp.float32).T  # [kb, M]

    def step(acc_MN, blk):
        xq_Mb, wq_Nb, xs_M, ws_N = blk
        part = jnp.dot(xq_Mb, wq_Nb.T, preferred_element_type=jnp.float32,
                       precision=lax.Precision.HIGHEST)
        return acc_MN + part * xs_M[:, None] * ws_N[None, :], None

    acc, _ = lax.scan(step, jnp.zeros((m, n), jnp.float32), (xq_kMb, wq_kNb, xs_kM, ws_kN))
    return acc


def w8a8_matmul_ref(x_MK: jax.Array, wq_NK: jax.Array, ws_nk: jax.Array, *,
                    out_dtype=None) -> jax.Array:
    """W8A8 block GEMM: quantize ``x`` with :func:`quantize_act_1x128`, then
    ``C[m,n] = Σ_kb (Σ_{k∈kb} xq[m,k]·Wq[n,k]) · xs[m,kb] · S[n//128,kb]`` in float32.
    ``x`` may have leading batch dims; output dtype defaults to ``x.dtype``."""
    _check_weight(x_MK, wq_NK, ws_nk)
    out_dtype = x_MK.dtype if out_dtype is None else out_dtype
    x2, lead = flatten_rows(x_MK)
    xq, xs = quantize_act_1x128(x2)
    y = _w8a8_from_quantized_ref(xq, xs, wq_NK, ws_nk)
    return y.astype(out_dtype).reshape(*lead, wq_NK.shape[0])



# ---------------------------------------------------------------------------------------------------
# Kernel configuration
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GpuConfig:
    """Tiles of the GPU kernel: ``bm`` x ``bn`` output tile (powers of two, >= 16), ``splits`` K
    splits (partial float32 sums added by XLA afterwards), Triton ``num_warps`` / ``num_stages``.
    ``prescale`` (W8A16 only): scale the weight tile before the dot (e4m3 → f32 x block scale →
    activation dtype: the reference's dequantized weight), so partial products accumulate in place."""
    bm: int = 128
    bn: int = 128
    splits: int = 1
    num_warps: int = 8
    num_stages: int = 4
    prescale: bool = False


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    """Tiles of the TPU kernel: ``bm`` rows (multiple of 32), ``bn`` and ``bk`` multiples of 128."""
    bm: int = 256
    bn: int = 512
    bk: int = 512


def default_gpu_config(m: int, n: int, k: int, variant: str = "w8a8") -> GpuConfig:
    """Heuristic tiles (``benchmarks/kernels.py`` sweeps alternatives on a GPU).

    Prefill (M >= 256): W8A8 64x128 tiles, W8A16 128x128 with the weight tile prescaled.
    Small M (decode, weight-bandwidth bound): one row tile, 32-column tiles, and split-K when there
    are too few programs to keep the SMs streaming (the float32 partial sums cost
    ``splits * M * N * 8`` bytes of extra traffic, next to nothing at one row)."""
    if m >= 256 and variant == "w8a16":  # 294 TFLOP/s at 4096x7168->2048 on an H200, against
        # 165-221 unscaled (benchmarks/kernels.py sweep, 2026-11-28 session 3)
        return GpuConfig(bm=128, bn=128, splits=1, num_warps=8, num_stages=3, prescale=True)
    if m >= 256:  # 64x128 / 4 warps: 268-317 TFLOP/s W8A8 at 4096x7168->2048 and 4096x2048->7168 on
        # an H200, against 251-294 for 128x128 / 8 warps (benchmarks/kernels.py, 2026-11-28)
        return GpuConfig(bm=64, bn=128, splits=1, num_warps=4, num_stages=4)
    bm = min(64, max(16, next_pow2(m)))
    bn = 32
    programs = cdiv(m, bm) * cdiv(n, bn)
    # Up to 16 rows (one row tile): aim at ~4 programs per SM. In the H200 profile of a batch-1
    # decode step (session 3; kernels matched to layers by call counts and times) one-row
    # weights streamed at 0.7 / 1.4-1.7 / 2.2-2.3 TB/s with 144 / 224-320 / 576-768 programs.
    # Larger M keeps ~2 per SM (its activation tile is re-read once per column tile). Not yet
    # measured as a default: benchmarks/kernels.py sweeps it against the old choice.
    per_sm, cap = (4, 16) if bm == 16 else (2, 8)
    splits = 1
    if programs < per_sm * GPU_NUM_SMS:
        splits = max(1, min(cdiv(k, QBLOCK), cdiv(per_sm * GPU_NUM_SMS, programs), cap))
    return GpuConfig(bm=bm, bn=bn, splits=splits, num_warps=4, num_stages=4)


def default_tpu_config(m: int, n: int, k: int) -> TpuConfig:
    """Tiles of the TPU kernel (not timed on a TPU: none is reachable here): up to 2048 x 2048
    weight tiles at <= 64 rows (decode streams the weight; 4 MiB of e4m3 per grid step), 1024 x
    1024 above, with >= 2 column tiles for the two TensorCores of a v5p chip. Before: 512 x 512
    (256 KB per step; a batch-1 decode step of the real-width model then ran 4,832 of this
    kernel's grid steps, 392 now: ``benchmarks/tpu_compile.py``)."""
    kp = round_up(k, QBLOCK)
    cap = TPU_DECODE_TILE_CAP if m <= 64 else TPU_PREFILL_TILE_CAP
    bk = tpu_tile(kp, cap)
    bn = tpu_tile(n, cap, min_tiles=2) or tpu_tile(n, cap) or (n if n <= cap else QBLOCK)
    bm = min(256, round_up(m, 32))
    return TpuConfig(bm=bm, bn=bn, bk=bk)


# ---------------------------------------------------------------------------------------------------
# GPU kernel (Triton-lowered Pallas)
# ---------------------------------------------------------------------------------------------------


def _dot_nt(a, b, precision=None):
    """``a [P, C] @ b [Q, C].T`` → float32 ``[P, Q]``."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _gpu_scaled_gemm_kernel(*refs, m, n, k, bm, bn, kb_per_split, splits, has_xs, cdt, prescale=False):
    """One (bm x bn) output tile over a range of 128-wide K blocks.

    refs: layer [1] int32, x [M, K] (e4m3 or bf16/f32), [xs [M, kb] f32], wq [L, N, K] e4m3,
    ws [L, nb, kb] f32, out.  The weight of layer ``layer`` is read in place.
    """
    if has_xs:
        l_ref, x_ref, xs_ref, wq_ref, ws_ref, o_ref = refs
    else:
        l_ref, x_ref, wq_ref, ws_ref, o_ref = refs
        xs_ref = None
    layer = l_ref[0]  # one indexer per ref access (the Triton lowering takes no chained .at)
    i, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    nkb = cdiv(k, QBLOCK)
    row0 = i * bm
    col0 = j * bn
    rows = row0 + jnp.arange(bm)
    cols = col0 + jnp.arange(bn)
    row_ok = (rows < m) if m % bm else None
    col_ok = (cols < n) if n % bn else None
    k_ragged = k % QBLOCK != 0
    precision = lax.Precision.HIGHEST if jnp.dtype(cdt) == jnp.float32 else None

    def body(kb, acc_MN):
        k0 = pl.multiple_of(kb * QBLOCK, QBLOCK)
        k_ok = (k0 + jnp.arange(QBLOCK) < k) if k_ragged else None
        a_mk = masked_load(x_ref.at[pl.ds(row0, bm), pl.ds(k0, QBLOCK)],
                            and_masks(row_ok[:, None] if row_ok is not None else None,
                                 k_ok[None, :] if k_ok is not None else None))
        b_nk = masked_load(wq_ref.at[layer, pl.ds(col0, bn), pl.ds(k0, QBLOCK)],
                            and_masks(col_ok[:, None] if col_ok is not None else None,
                                 k_ok[None, :] if k_ok is not None else None))
        if QBLOCK % bn == 0:  # the whole column tile sits in one scale block
            w_scale = ws_ref[layer, col0 // QBLOCK, kb]
        else:
            w_scale = masked_load(ws_ref.at[layer, cols // QBLOCK, kb], col_ok)
        if prescale and not has_xs:  # dequantized weight tile, then one accumulating dot
            sc = w_scale if QBLOCK % bn == 0 else w_scale[:, None]
            b = (b_nk.astype(jnp.float32) * sc).astype(cdt)
            return acc_MN + _dot_nt(a_mk.astype(cdt), b, precision)
        if has_xs:  # e4m3 x e4m3 → f32 (wgmma on Hopper)
            part = _dot_nt(a_mk, b_nk)
        else:  # e4m3 widened to the activation dtype: exact
            part = _dot_nt(a_mk.astype(cdt), b_nk.astype(cdt), precision)
        part = part * (w_scale if QBLOCK % bn == 0 else w_scale[None, :])
        if has_xs:
            x_scale = masked_load(xs_ref.at[pl.ds(row0, bm), kb], row_ok)
            part = part * x_scale[:, None]
        return acc_MN + part

    acc0 = jnp.zeros((bm, bn), jnp.float32)
    if splits == 1:
        acc = lax.fori_loop(0, nkb, body, acc0)
        o_view = o_ref.at[pl.ds(row0, bm), pl.ds(col0, bn)]
    else:
        kb_lo = s * kb_per_split
        kb_hi = jnp.minimum(kb_lo + kb_per_split, nkb)
        acc = lax.fori_loop(kb_lo, kb_hi, body, acc0)
        o_view = o_ref.at[s, pl.ds(row0, bm), pl.ds(col0, bn)]
    out_mask = and_masks(row_ok[:, None] if row_ok is not None else None,
                    col_ok[None, :] if col_ok is not None else None)
    val = acc.astype(o_ref.dtype)
    if out_mask is None:
        plgpu_triton.store(o_view, val)
    else:
        plgpu_triton.store(o_view, val, mask=out_mask)


def _k_splits(k: int, cfg: GpuConfig) -> tuple[int, int]:
    """``(K blocks per split, splits)`` of the GPU kernel under ``cfg``: split ``s`` sums the
    128-wide K blocks ``[s * per, (s + 1) * per)`` (the last one cut at ``K``)."""
    nkb = cdiv(k, QBLOCK)
    kb_per_split = cdiv(nkb, max(1, cfg.splits))
    return kb_per_split, cdiv(nkb, kb_per_split)


def scaled_matmul_gpu(x_MK, xs_Mk, wq_NK, ws_nk, *, out_dtype, interpret=False,
                      config: GpuConfig | None = None, layer=None, sum_splits: bool = True):
    """GPU kernel: ``x [M, K]`` (e4m3 with ``xs_Mk`` scales → W8A8, or bf16/f32 with ``xs_Mk=None`` →
    W8A16) times block-scaled e4m3 ``wq [N, K]`` → ``[M, N]`` in ``out_dtype``.  With ``layer``
    (int or traced int32), ``wq``/``ws`` are ``[L, N, K]``/``[L, nb, kb]`` stacks and layer
    ``layer``'s weight is read in place (no slice is materialized). ``sum_splits=False``: where
    the configuration splits K, the float32 partials unsummed (a :class:`SplitK`)."""
    if layer is None:
        wq_NK, ws_nk = wq_NK[None], ws_nk[None]
    l_1 = jnp.reshape(jnp.asarray(0 if layer is None else layer, jnp.int32), (1,))
    m, k = x_MK.shape
    n = wq_NK.shape[1]
    has_xs = xs_Mk is not None
    cfg = config or default_gpu_config(m, n, k, "w8a8" if has_xs else "w8a16")
    kb_per_split, splits = _k_splits(k, cfg)
    cdt = jnp.float8_e4m3fn if has_xs else x_MK.dtype
    kernel = functools.partial(_gpu_scaled_gemm_kernel, m=m, n=n, k=k, bm=cfg.bm, bn=cfg.bn,
                               kb_per_split=kb_per_split, splits=splits, has_xs=has_xs, cdt=cdt,
                               prescale=cfg.prescale)
    if splits == 1:
        out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
    else:
        out_shape = jax.ShapeDtypeStruct((splits, m, n), jnp.float32)
    args = (l_1, x_MK, xs_Mk, wq_NK, ws_nk) if has_xs else (l_1, x_MK, wq_NK, ws_nk)
    y = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(cdiv(m, cfg.bm), cdiv(n, cfg.bn), splits),
        compiler_params=plgpu_triton.CompilerParams(num_warps=cfg.num_warps,
                                                    num_stages=cfg.num_stages),
        interpret=interpret,
        name="w8a8_gemm_gpu" if has_xs else "w8a16_gemm_gpu",
    )(*args)
    if splits > 1:
        return SplitK(y) if not sum_splits else jnp.sum(y, axis=0).astype(out_dtype)
    return y


# ---------------------------------------------------------------------------------------------------
# TPU kernel (Mosaic TPU)
# ---------------------------------------------------------------------------------------------------


def _tpu_scaled_gemm_kernel(*refs, n_sub, nk, bn, has_xs, cdt):
    """Grid (M/bm, N/bn, K/bk); K innermost ("arbitrary") accumulating in a VMEM f32 scratch.

    refs: layer [1] (scalar prefetch: it picks the weight's block of a layer stack), x [bm, bk],
    [xs [n_sub, bm, 1]], wq [bn, bk], ws [n_sub, 1, nb] (the K blocks' scales of every 128-column
    block, expanded to this tile's columns here), out [bm, bn], acc.
    """
    if has_xs:
        _, x_ref, xs_ref, wq_ref, ws_ref, o_ref, acc_ref = refs
    else:
        _, x_ref, wq_ref, ws_ref, o_ref, acc_ref = refs
        xs_ref = None
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    precision = lax.Precision.HIGHEST if jnp.dtype(cdt) == jnp.float32 else None
    acc = acc_ref[...]
    for t in range(n_sub):  # one 128-wide scale block at a time (static lane-aligned slices)
        a = x_ref[:, t * QBLOCK:(t + 1) * QBLOCK].astype(cdt)
        b = wq_ref[:, t * QBLOCK:(t + 1) * QBLOCK].astype(cdt)
        part = _dot_nt(a, b, precision)
        scale = expand_block_row(ws_ref[t], pl.program_id(1) * bn, bn)  # [1, bn]
        if has_xs:
            scale = xs_ref[t] * scale  # [bm, 1] * [1, bn]
        acc = acc + part * scale
    acc_ref[...] = acc

    @pl.when(kk == nk - 1)
    def _store():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def scaled_matmul_tpu(x_MK, xs_Mk, wq_NK, ws_nk, *, out_dtype, interpret=False,
                      config: TpuConfig | None = None, layer=None):
    """TPU kernel, same contract as :func:`scaled_matmul_gpu` (``layer``: the weight of a layer stack
    read in place, its block index taken from a scalar-prefetched layer; only that layer's scales
    are sliced).  Rows are padded to the row tile and K to a multiple of 128 (zeros; only weights
    with K % 128 != 0 are copied, none in DeepSeek-V3); a ragged last N tile is left to Pallas (its
    out-of-range columns are dropped)."""
    from jax.experimental.pallas import tpu as pltpu

    if layer is None:
        wq_NK = wq_NK[None]
    else:
        ws_nk = lax.dynamic_index_in_dim(ws_nk, layer, 0, False)
    l_1 = jnp.reshape(jnp.asarray(0 if layer is None else layer, jnp.int32), (1,))
    m, k = x_MK.shape
    n = wq_NK.shape[1]
    cfg = config or default_tpu_config(m, n, k)
    bm, bn, bk = cfg.bm, cfg.bn, cfg.bk
    kp = round_up(k, QBLOCK)
    if kp % bk:
        raise ValueError(f"TPU K tile {bk} must divide K rounded up to 128 ({kp})")
    mp = round_up(m, bm)
    has_xs = xs_Mk is not None
    n_sub = bk // QBLOCK
    if mp != m or kp != k:
        x_MK = jnp.pad(x_MK, [(0, mp - m), (0, kp - k)])
    if kp != k:
        wq_NK = jnp.pad(wq_NK, [(0, 0), (0, 0), (0, kp - k)])
    # the weight's block scales, K-block major: [kb, 1, nb], expanded per tile in the kernel (XLA
    # expanded them to [kb, 1, N] per call: 3.7 MB written and read for o_proj's 117 MB)
    ws_k1b = ws_nk.astype(jnp.float32).T[:, None, :]
    cdt = jnp.bfloat16 if has_xs else x_MK.dtype
    in_specs = [pl.BlockSpec((bm, bk), lambda i, j, kk, lay: (i, kk))]
    args = [l_1, x_MK]
    if has_xs:
        xs_kM1 = jnp.pad(xs_Mk.astype(jnp.float32), [(0, mp - m), (0, 0)]).T[:, :, None]
        in_specs.append(pl.BlockSpec((n_sub, bm, 1), lambda i, j, kk, lay: (kk, i, 0)))
        args.append(xs_kM1)
    in_specs += [pl.BlockSpec((None, bn, bk), lambda i, j, kk, lay: (lay[0], j, kk)),
                 pl.BlockSpec((n_sub, 1, ws_k1b.shape[2]), lambda i, j, kk, lay: (kk, 0, 0))]
    args += [wq_NK, ws_k1b]
    nk = kp // bk
    kernel = functools.partial(_tpu_scaled_gemm_kernel, n_sub=n_sub, nk=nk, bn=bn, has_xs=has_xs, cdt=cdt)
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((mp, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(mp // bm, cdiv(n, bn), nk),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk, lay: (i, j)),
            scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=backend.tpu_interpret_arg(interpret),
        name="w8a8_gemm_tpu" if has_xs else "w8a16_gemm_tpu",
    )(*args)
    return y[:m] if mp != m else y


# ---------------------------------------------------------------------------------------------------
# Public dispatchers
# ---------------------------------------------------------------------------------------------------


def _layer_of(wq, ws, layer):
    """Layer ``layer`` of ``[L, N, K]`` / ``[L, nb, kb]`` stacks (a dynamic slice)."""
    return lax.dynamic_index_in_dim(wq, layer, 0, False), lax.dynamic_index_in_dim(ws, layer, 0, False)


#: Which kernel W8A8 takes on a GPU: "triton" (this module's, measured on the H200) or "mosaic_gpu"
#: (:mod:`kernels_pallas.fp8_gemm_mgpu`: wgmma with per-K-block promotion, for shapes it tiles;
#: correct in the Mosaic GPU interpreter and lowered for CUDA on CPU, not yet timed on a GPU).
W8A8_GPU_ENV = "DEEPSEEK_JAX_W8A8_GPU"


def w8a8_gpu_kernel() -> str:
    """``$DEEPSEEK_JAX_W8A8_GPU`` (default "triton"), see :func:`backend.gpu_kernel_family`."""
    return backend.gpu_kernel_family(W8A8_GPU_ENV)


def _mgpu_supported(m: int, n: int, k: int) -> bool:
    from kernels_pallas.fp8_gemm_mgpu import supported
    return supported(m, n, k)


def _scaled_matmul(x_MK, wq_NK, ws_nk, *, out_dtype, impl, quantize_x, layer=None, sum_splits=True):
    _check_weight(x_MK, wq_NK, ws_nk, layer)
    target, interpret = backend.split_impl(impl)
    out_dtype = x_MK.dtype if out_dtype is None else out_dtype
    x2, lead = flatten_rows(x_MK)
    n = wq_NK.shape[-2]
    if x2.shape[0] == 0:
        return jnp.zeros((*lead, n), out_dtype)
    if quantize_x:
        xq, xs = quantize_act_1x128(x2)
    else:
        xq, xs = x2, None
    if (target == "gpu" and quantize_x and w8a8_gpu_kernel() == "mosaic_gpu"
            and _mgpu_supported(x2.shape[0], n, x2.shape[1])):
        from kernels_pallas.fp8_gemm_mgpu import w8a8_matmul_mgpu
        if layer is not None:
            wq_NK, ws_nk = _layer_of(wq_NK, ws_nk, layer)
        y = w8a8_matmul_mgpu(xq, xs, wq_NK, ws_nk, out_dtype=out_dtype, interpret=interpret)
    elif target == "gpu":
        y = scaled_matmul_gpu(xq, xs, wq_NK, ws_nk, out_dtype=out_dtype, interpret=interpret, layer=layer,
                              sum_splits=sum_splits)
        if isinstance(y, SplitK):
            return SplitK(y.parts.reshape(y.parts.shape[0], *lead, n))
    else:
        y = scaled_matmul_tpu(xq, xs, wq_NK, ws_nk, out_dtype=out_dtype, interpret=interpret, layer=layer)
    return y.reshape(*lead, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _kernel_matmul(x_MK, wq_NK, ws_nk, layer, out_dtype, impl, quantize_x, sum_splits):
    """The block-scaled GEMM (a kernel, or for ``impl="ref"`` the W8A8 reference) with a backward
    for ``x`` (the Pallas calls have none of their own): ``dx = dy @ dequant(W)``. For W8A8 that
    is the straight-through gradient of the rounding of ``x`` to e4m3, on every backend alike. The
    weights are frozen: no cotangent for them (LoRA or a subset fine-tune over FP8 weights)."""
    if backend.resolve_impl(impl) == "ref":   # W8A8 only: W8A16's reference differentiates as it is
        if layer is not None:
            _check_weight(x_MK, wq_NK, ws_nk, layer)
            wq_NK, ws_nk = _layer_of(wq_NK, ws_nk, layer)
        return w8a8_matmul_ref(x_MK, wq_NK, ws_nk, out_dtype=out_dtype)
    return _scaled_matmul(x_MK, wq_NK, ws_nk, out_dtype=out_dtype, impl=impl, quantize_x=quantize_x, layer=layer,
                          sum_splits=sum_splits)


def _kernel_matmul_fwd(x_MK, wq_NK, ws_nk, layer, out_dtype, impl, quantize_x, sum_splits):
    y = _kernel_matmul(x_MK, wq_NK, ws_nk, layer, out_dtype, impl, quantize_x, sum_splits)
    return y, (wq_NK, ws_nk, layer, jnp.zeros((0,), x_MK.dtype))


def _kernel_matmul_bwd(out_dtype, impl, quantize_x, sum_splits, res, dy):
    wq_NK, ws_nk, layer, x_like = res
    if layer is not None:
        wq_NK, ws_nk = _layer_of(wq_NK, ws_nk, layer)
    w_NK = dequantize_blocks(wq_NK, ws_nk)
    hi = lax.Precision.HIGHEST
    if isinstance(dy, SplitK):
        # Unsummed split-K partials (the GPU kernel with few rows, sum_splits=False): partial s is
        # x[..., K_s] @ W[:, K_s].T, so dx[..., K_s] = dy_s @ W[:, K_s] (the same K ranges as the
        # forward's default configuration, which is what made the partials).
        parts = dy.parts
        n, k = w_NK.shape
        m = math.prod(parts.shape[1:-1])
        per, splits = _k_splits(k, default_gpu_config(m, n, k, "w8a16"))
        if splits != parts.shape[0]:
            raise ValueError(f"w8a16_matmul backward: {parts.shape[0]} split-K partials, the kernel makes {splits}")
        w_NK = w_NK.astype(parts.dtype)
        step = per * QBLOCK
        dx = jnp.concatenate([jnp.einsum("...n,nk->...k", parts[s], w_NK[:, s * step:(s + 1) * step],
                                         preferred_element_type=jnp.float32, precision=hi)
                              for s in range(splits)], axis=-1)
        return dx.astype(x_like.dtype), None, None, None
    dx = jnp.einsum("...n,nk->...k", dy, w_NK.astype(dy.dtype), preferred_element_type=jnp.float32, precision=hi)
    return dx.astype(x_like.dtype), None, None, None


_kernel_matmul.defvjp(_kernel_matmul_fwd, _kernel_matmul_bwd)


def w8a16_matmul(x_MK: jax.Array, wq_NK: jax.Array, ws_nk: jax.Array, *, out_dtype=None,
                 impl: str = "auto", layer: jax.Array | int | None = None, sum_splits: bool = True):
    """``x @ dequant(Wq, S).T`` (W8A16).  ``x [..., K]`` → ``[..., N]``; ``impl`` picks the Pallas
    kernel or :func:`w8a16_matmul_ref` (see :mod:`kernels_pallas.backend`).  ``layer``: ``wq``/``ws``
    are ``[L, N, K]``/``[L, nb, kb]`` stacks and that layer's weight is used (read in place by
    the GPU and TPU kernels; the reference slices it). ``sum_splits=False``: where the GPU kernel
    splits K (few rows), its float32 partials come back unsummed as a :class:`SplitK` ``[S, ..., N]``
    for the consumer to sum (:func:`kernels_pallas.rms_norm` takes them); elsewhere the array."""
    if backend.resolve_impl(impl) == "ref":
        if layer is not None:
            _check_weight(x_MK, wq_NK, ws_nk, layer)
            wq_NK, ws_nk = _layer_of(wq_NK, ws_nk, layer)
        return w8a16_matmul_ref(x_MK, wq_NK, ws_nk, out_dtype=out_dtype)
    return _kernel_matmul(x_MK, wq_NK, ws_nk, layer, out_dtype, impl, False, sum_splits)


def w8a8_matmul(x_MK: jax.Array, wq_NK: jax.Array, ws_nk: jax.Array, *, out_dtype=None,
                impl: str = "auto", layer: jax.Array | int | None = None) -> jax.Array:
    """W8A8 block GEMM (``x`` quantized 1x128 on the fly).  ``x [..., K]`` → ``[..., N]``; ``impl``
    picks the Pallas kernel or :func:`w8a8_matmul_ref`; ``layer`` as in :func:`w8a16_matmul`. Its
    gradient for ``x`` is the straight-through ``dy @ dequant(W)`` whatever ``impl``."""
    return _kernel_matmul(x_MK, wq_NK, ws_nk, layer, out_dtype, impl, True, True)
