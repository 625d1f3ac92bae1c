"""Grouped expert GEMM for Hopper on Mosaic GPU (``wgmma``): bf16, W8A16 and W8A8 (block scales).

Rows of ``x [M, K]`` are sorted by expert, ``group_sizes [E]`` rows per expert (zeros allowed,
rows past the groups get zeros), expert weights ``w [E', N, K]`` (the Hub's ``[out, in]``; with
``expert_offset`` group ``g`` uses ``w[expert_offset + g]`` of a larger stack, read in place).

* **bf16**: ``y = x @ w[g].T`` with float32 accumulation straight in the ``wgmma`` accumulator
  over 64-wide K steps.
* **W8A16** (the model's FP8 experts): bf16 ``x``, e4m3 ``w`` with 128x128 scales ``ws``; each
  weight tile is dequantized in registers (e4m3 → float32 x its block scale → bf16, the rounding of
  :func:`~kernels_pallas.grouped_gemm.grouped_matmul_ref`), written to one of two shared-memory
  slots and fed to a bf16 ``wgmma`` (a step's conversion overlaps the previous step's MMA);
  float32 accumulation over 64-wide K steps.
* **W8A8**: e4m3 ``xq`` with 1x128 scales ``xs [M, K/128]``, e4m3 ``w`` with 128x128 scales
  ``ws [E', N/128, K/128]``: per 128-wide K block a fresh accumulator, promoted in registers as
  ``total += acc * xs[rows, kb] * ws[g, cols // 128, kb]`` (as :mod:`kernels_pallas.fp8_gemm_mgpu`
  does for one weight).

Schedule (:func:`_block_tile_schedule`): one tile per (``bm``-row block, group) pair that share
rows, as JAX's ``ragged_dot_mgpu`` example tiles; an expert with no rows costs nothing, and there
are at most ``ceil(M/bm) + min(E, M) + 1`` tiles. TMA loads the tile's whole row block (a block
index: a row offset computed from scalars read in the kernel fails Mosaic's layout inference); the
tile's own rows are stored with a ladder of power-of-two TMA stores (a store's size is static),
the block's other rows are computed and dropped. The per-tile numbers go to shared memory once
per program; each program (one per SM) loops over (row tile, column tile) pairs.

The wrapper makes the scale layouts (FP8 modes): the activation scales transposed,
``[K/128, M]`` (W8A8), and the weight scales expanded along N, ``[E', K/128, N]``. The latter is
``E' x K/128 x N x 4`` bytes (235 MB for 256 experts at 7168→4096) written at every call: ~2% of a
32K-row prefill call, and far too much for decode-sized calls, which keep the Triton kernel
(``grouped_gemm.MGPU_FP8_MIN_ROWS``).

Status: exact in JAX's Mosaic GPU interpreter on CPU against the references, and lowered for
CUDA on CPU, all three modes (``tests/test_kernels.py``). Not yet compiled or timed on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas._common import (FP8_DTYPE, QBLOCK, is_fp8, mgpu_block_product, mgpu_persistent_kernel,
                                   mgpu_zeros, plgpu_module)

__all__ = ["MgpuGroupedConfig", "grouped_supported", "gmm_mgpu", "grouped_w8a8_ref"]


@dataclasses.dataclass(frozen=True)
class MgpuGroupedConfig:
    bm: int = 64                   # rows per tile (multiple of 64: one warpgroup's wgmma M)
    bn: int = 128                  # columns per tile (64 or 128; W8A8: inside one scale block)
    bk: int = 64                   # bf16 K step (W8A8 steps one 128-wide scale block)
    max_concurrent_steps: int = 4  # TMA pipeline stages in shared memory
    grid_tile_width: int = 4       # planar snake over (row tile, column tile)


def grouped_supported(m: int, n: int, k: int, fp8: bool, cfg: MgpuGroupedConfig = MgpuGroupedConfig()) -> bool:
    bk = QBLOCK if fp8 else cfg.bk
    return (m > 0 and k % bk == 0 and n % cfg.bn == 0 and cfg.bm % 64 == 0
            and (not fp8 or QBLOCK % cfg.bn == 0))


def grouped_w8a8_ref(xq_MK, xs_Mk, w, ws, group_sizes_E, *, out_dtype=jnp.float32, expert_offset=None):
    """Plain-jnp reference of the W8A8 grouped product (per expert: the block GEMM of
    :func:`kernels_pallas.fp8_gemm._w8a8_from_quantized_ref` on every row, kept on its rows)."""
    from kernels_pallas.fp8_gemm import _w8a8_from_quantized_ref
    e = group_sizes_E.shape[0]
    if expert_offset is not None:
        w = lax.dynamic_slice_in_dim(w, expert_offset, e, 0)
        ws = lax.dynamic_slice_in_dim(ws, expert_offset, e, 0)
    ends = jnp.cumsum(group_sizes_E.astype(jnp.int32))
    rows = jnp.arange(xq_MK.shape[0], dtype=jnp.int32)
    expert_M = jnp.sum(ends[None, :] <= rows[:, None], axis=1)

    def one(carry, g):
        y = _w8a8_from_quantized_ref(xq_MK, xs_Mk, w[g], ws[g])
        return jnp.where((expert_M == g)[:, None], y, carry), None

    y, _ = lax.scan(one, jnp.zeros((xq_MK.shape[0], w.shape[1]), jnp.float32), jnp.arange(e))
    return y.astype(out_dtype)


def _block_tile_schedule(group_sizes_E, m: int, bm: int):
    """Row tiles aligned to ``bm``-row blocks (TMA loads whole blocks): one tile per (block, group)
    pair that share rows. Returns int32 ``[T]`` arrays: group (``E`` = the rows past the groups,
    which get zeros), block, first row, end row (``first == end``: unused tile). ``T = ceil(M/bm) +
    min(E, M) + 1`` bounds the count (each non-empty group adds at most one tile to the blocks), so
    experts without rows cost nothing and a decode call launches a handful of tiles."""
    e = group_sizes_E.shape[0]
    sizes = group_sizes_E.astype(jnp.int32)
    tail = jnp.maximum(m - jnp.sum(sizes), 0)
    sizes = jnp.concatenate([sizes, tail[None]])                     # [E + 1]
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    first, last = starts // bm, (ends - 1) // bm
    ntiles = jnp.where(sizes > 0, last - first + 1, 0)
    tile_end = jnp.cumsum(ntiles)
    tile_start = tile_end - ntiles
    t = jnp.arange(-(-m // bm) + min(e, m) + 1, dtype=jnp.int32)
    g = jnp.searchsorted(tile_end, t, side="right", method="compare_all").astype(jnp.int32)  # empty groups skipped
    valid = g <= e
    gc = jnp.minimum(g, e)
    blk = first[gc] + t - tile_start[gc]
    r0 = jnp.maximum(starts[gc], blk * bm)
    r1 = jnp.minimum(ends[gc], blk * bm + bm)
    return (jnp.where(valid, g, e + 1), jnp.where(valid, blk, 0), jnp.where(valid, r0, 0),
            jnp.where(valid, r1, 0))


def _mode(x_dtype, w_dtype, x_scale, w_scale) -> str:
    """"bf16", "w8a8" or "w8a16" from the operands; anything else is a one-line error."""
    if is_fp8(w_dtype) and w_scale is None:
        raise ValueError("gmm_mgpu: e4m3 weights need w_scale")
    if is_fp8(x_dtype) and is_fp8(w_dtype) and x_scale is not None:
        return "w8a8"
    if x_dtype == jnp.bfloat16 and is_fp8(w_dtype) and x_scale is None:
        return "w8a16"
    if x_dtype == jnp.bfloat16 and w_dtype == jnp.bfloat16:
        return "bf16"
    raise ValueError(f"gmm_mgpu: unsupported operands x {jnp.dtype(x_dtype).name}"
                     f"{' with x_scale' if x_scale is not None else ''}, w {jnp.dtype(w_dtype).name}: expected "
                     "bf16 x bf16, bf16 x e4m3 (W8A16) or e4m3 x e4m3 with x_scale (W8A8)")



def gmm_mgpu(x_MK, w, group_sizes_E, *, x_scale=None, w_scale=None, out_dtype=jnp.bfloat16,
             expert_offset=None, cfg: MgpuGroupedConfig = MgpuGroupedConfig(), interpret: bool = False):
    """``[M, K] x [E', N, K] → [M, N]`` grouped (see the module doc). bf16: ``x`` and ``w`` bf16;
    W8A16: bf16 ``x``, e4m3 ``w`` with ``w_scale [E', N/128, K/128]``; W8A8: e4m3 ``x`` with
    ``x_scale [M, K/128]`` and e4m3 ``w`` with ``w_scale``."""
    plgpu = plgpu_module()
    m, k = x_MK.shape
    e = group_sizes_E.shape[0]
    n = w.shape[1]
    mode = _mode(x_MK.dtype, w.dtype, x_scale, w_scale)
    fp8 = mode == "w8a8"
    if not grouped_supported(m, n, k, mode != "bf16", cfg):
        raise ValueError(f"gmm_mgpu: unsupported shape M={m} N={n} K={k} for {cfg}")
    bm, bn = cfg.bm, cfg.bn
    bk = QBLOCK if fp8 else cfg.bk
    if mode == "w8a16" and QBLOCK % bk:
        raise ValueError(f"gmm_mgpu: W8A16 needs bk dividing {QBLOCK}, got {bk}")
    mp = -(-m // bm) * bm
    if mp != m:  # whole row blocks: every TMA window lies inside x
        x_MK = jnp.pad(x_MK, ((0, mp - m), (0, 0)))
        if fp8:
            x_scale = jnp.pad(x_scale, ((0, mp - m), (0, 0)))
    tg, blk, r0, r1 = _block_tile_schedule(group_sizes_E, m, bm)
    off = jnp.asarray(0 if expert_offset is None else expert_offset, jnp.int32)
    tw = jnp.minimum(tg, e - 1) + off                # the weight each tile reads
    meta = jnp.stack([tg, r0, r1, tw, blk]).astype(jnp.int32)  # [5, T]
    # [5, chunks, 256] for the TMA copy into shared memory (<= 256 elements per dimension);
    # padding tiles have row0 == row1 == 0 and do nothing
    num_t = -(-tg.shape[0] // 256) * 256
    meta = jnp.pad(meta, ((0, 0), (0, num_t - tg.shape[0]))).reshape(5, num_t // 256, 256)
    grid_n = n // bn
    args = [meta, x_MK, w]
    if fp8:
        args.append(x_scale.astype(jnp.float32).T)                                # [kb, Mp]
    if mode != "bf16":
        ws_t = jnp.swapaxes(w_scale.astype(jnp.float32), 1, 2)                   # [E', kb, N/128]
        args.append(jnp.repeat(ws_t, QBLOCK, axis=2)[:, :, :n])                  # [E', kb, N]

    def body(meta_g, x_g, w_g, *rest):
        pl.run_scoped(functools.partial(body_smem, meta_g, x_g, w_g, *rest),
                      plgpu.SMEM((5, num_t // 256, 256), jnp.int32), plgpu.Barrier())

    def body_smem(meta_g, x_g, w_g, *rest):
        *rest, meta_s, bar = rest
        plgpu.copy_gmem_to_smem(meta_g, meta_s, bar)
        plgpu.barrier_wait(bar)
        if fp8:
            xs_g, ws_g, o_g = rest
        elif mode == "w8a16":
            ws_g, o_g = rest
        else:
            (o_g,) = rest

        def _store(total, start, count, row0, ni):
            @functools.partial(pl.run_scoped, o_s=plgpu.SMEM((bm, bn), out_dtype))
            def _(o_s):
                o_s[...] = total.astype(out_dtype)
                plgpu.commit_smem()
                # TMA stores have static sizes: the tile's `count` rows (1..bm, from smem row
                # `start`) go out as one store per set bit of `count`, largest first.
                done = jnp.int32(0)
                size = bm
                while size >= 1:
                    @pl.when((count & size) != 0)
                    def _(size=size, done=done):
                        plgpu.copy_smem_to_gmem(o_s.at[pl.ds(start + done, size)],
                                                o_g.at[pl.ds(row0 + done, size), pl.ds(ni * bn, bn)])
                    done = done + (count & size)
                    size //= 2
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        @plgpu.nd_loop((num_t * grid_n,), collective_axes="sm")
        def _tile(info):
            t, ni = plgpu.planar_snake(info.index[0], (num_t, grid_n), 1, cfg.grid_tile_width)
            g, row0, row1, gw, b = (meta_s[i, t // 256, t % 256] for i in range(5))
            w_e = w_g.at[gw]

            def compute():
                if fp8:
                    def step(_, x_s, w_s, xs_s, ws_s, total):
                        part = mgpu_block_product(x_s, w_s, (bm, bn))
                        return total + part * xs_s[0][:, None] * ws_s[0, 0][None, :]

                    return plgpu.emit_pipeline(
                        step, grid=(k // QBLOCK,),
                        in_specs=[plgpu.BlockSpec((bm, QBLOCK), lambda j: (b, j)),
                                  plgpu.BlockSpec((bn, QBLOCK), lambda j: (ni, j)),
                                  plgpu.BlockSpec((1, bm), lambda j: (j, b)),
                                  plgpu.BlockSpec((1, 1, bn), lambda j: (gw, j, ni))],
                        max_concurrent_steps=cfg.max_concurrent_steps,
                        init_carry=mgpu_zeros((bm, bn)),
                    )(x_g, w_e, xs_g, ws_g)

                if mode == "w8a16":
                    def w8a16_scope(acc_ref, wb_s):
                        def step(idx, x_s, w_s, ws_s):
                            # The dequantized weight tile, rounded as the reference rounds it, in one
                            # of two shared-memory slots: this step's conversion overlaps the
                            # previous step's wgmma, which reads the other slot.
                            slot = wb_s.at[idx[0] % 2]
                            slot[...] = (w_s[...].astype(jnp.float32) * ws_s[0, 0][:, None]).astype(x_s.dtype)
                            plgpu.commit_smem()
                            plgpu.wgmma(acc_ref, x_s, slot.transpose((1, 0)))
                            plgpu.wgmma_wait(1)   # the previous step's wgmma (the other slot) is done

                        plgpu.emit_pipeline(
                            step, grid=(k // bk,),
                            # (x_s is read by a wgmma still in flight when the step returns:
                            # its buffer is released one step late)
                            in_specs=[plgpu.BlockSpec((bm, bk), lambda j: (b, j), delay_release=1),
                                      plgpu.BlockSpec((bn, bk), lambda j: (ni, j)),
                                      plgpu.BlockSpec((1, 1, bn), lambda j: (gw, j * bk // QBLOCK, ni))],
                            max_concurrent_steps=cfg.max_concurrent_steps,
                        )(x_g, w_e, ws_g)
                        plgpu.wgmma_wait(0)
                        return acc_ref[...]
                    return pl.run_scoped(
                        lambda wb_s: pl.run_scoped(lambda acc_ref: w8a16_scope(acc_ref, wb_s),
                                                   plgpu.ACC((bm, bn), jnp.float32)),
                        plgpu.SMEM((2, bn, bk), x_g.dtype))

                def acc_scope(acc_ref):
                    plgpu.emit_pipeline(
                        lambda _, x_s, w_s: plgpu.wgmma(acc_ref, x_s, w_s.transpose((1, 0))),
                        grid=(k // bk,),
                        in_specs=[plgpu.BlockSpec((bm, bk), lambda j: (b, j), delay_release=1),
                                  plgpu.BlockSpec((bn, bk), lambda j: (ni, j), delay_release=1)],
                        max_concurrent_steps=cfg.max_concurrent_steps,
                    )(x_g, w_e)
                    return acc_ref[...]
                return pl.run_scoped(acc_scope, plgpu.ACC((bm, bn), jnp.float32))

            @pl.when((row1 > row0) & (g < e))
            def _():
                _store(compute(), row0 - b * bm, row1 - row0, row0, ni)

            @pl.when((row1 > row0) & (g == e))  # rows past the groups: zeros
            def _():
                _store(mgpu_zeros((bm, bn)),
                       row0 - b * bm, row1 - row0, row0, ni)

    out = mgpu_persistent_kernel(body, ((mp, n), out_dtype), num_t * grid_n, interpret=interpret)(*args)
    return out[:m] if mp != m else out


def _self_check():  # pragma: no cover - manual: python -m kernels_pallas.grouped_gemm_mgpu
    import numpy as np

    from kernels_pallas.fp8_gemm import quantize_act_1x128
    from kernels_pallas.grouped_gemm import grouped_matmul_ref
    rng = np.random.default_rng(0)
    m, e, n, k = 150, 4, 256, 256
    sizes = jnp.asarray([40, 0, 70, 30], jnp.int32)  # 140 of 150 rows: a zero tail
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    wf = jnp.asarray(rng.standard_normal((e, n, k)) * 0.05, jnp.float32)
    got = gmm_mgpu(x.astype(jnp.bfloat16), wf.astype(jnp.bfloat16), sizes, out_dtype=jnp.float32, interpret=True)
    ref = grouped_matmul_ref(x.astype(jnp.bfloat16), wf.astype(jnp.bfloat16), sizes, out_dtype=jnp.float32)
    print("bf16 max abs err", float(jnp.max(jnp.abs(got - ref))), "ref max", float(jnp.max(jnp.abs(ref))))
    xq, xs = quantize_act_1x128(x)
    wq = (wf * 1000).astype(FP8_DTYPE)
    ws = jnp.full((e, n // 128, k // 128), 1e-3, jnp.float32)
    got16 = gmm_mgpu(x.astype(jnp.bfloat16), wq, sizes, w_scale=ws, out_dtype=jnp.float32, interpret=True)
    ref16 = grouped_matmul_ref(x.astype(jnp.bfloat16), wq, sizes, w_scale=ws, out_dtype=jnp.float32)
    print("w8a16 max abs err", float(jnp.max(jnp.abs(got16 - ref16))), "ref max", float(jnp.max(jnp.abs(ref16))))
    got8 = gmm_mgpu(xq, wq, sizes, x_scale=xs, w_scale=ws, out_dtype=jnp.float32, interpret=True)
    ref8 = grouped_w8a8_ref(xq, xs, wq, ws, sizes)
    print("w8a8 max abs err", float(jnp.max(jnp.abs(got8 - ref8))), "ref max", float(jnp.max(jnp.abs(ref8))))


if __name__ == "__main__":
    _self_check()
