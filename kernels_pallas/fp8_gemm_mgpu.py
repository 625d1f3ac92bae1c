"""Block-scaled FP8 GEMM (W8A8) for Hopper on Mosaic GPU: wgmma with per-K-block promotion.

The Triton-lowered kernel in :mod:`kernels_pallas.fp8_gemm` reaches 249-294 TFLOP/s at
4096x7168→2048 on the H200, against 846-887 for XLA's *unscaled* fp8 dot (docs/benchmarks.md).
This one is written for Mosaic GPU (``plgpu``), the Pallas backend that emits Hopper's warpgroup
MMA (``wgmma``) and TMA copies directly:

* grid: one program per SM (:data:`~kernels_pallas._common.GPU_NUM_SMS`) looping over the output
  tiles ``[bm, bn]`` (``plgpu.nd_loop`` in ``plgpu.planar_snake`` order, ``grid_tile_width`` wide,
  so that programs running together share operand tiles in L2);
* per tile, a TMA pipeline (``plgpu.emit_pipeline``, ``max_concurrent_steps`` stages in shared
  memory) over the 128-wide K blocks streams ``xq [bm, 128]``, ``wq [bn, 128]`` (both e4m3, both
  K-major as fp8 ``wgmma`` requires: the weight tile is fed transposed, ``[N, K]`` being the Hub
  layout) and the two scale vectors of that K block;
* per K block, ``wgmma`` into a fresh float32 accumulator, then "promotion" in registers
  (DeepGEMM's scheme, SPEC §7): ``total += acc * xs[rows, kb, None] * ws[None, cols, kb]``. The
  scales are applied per 128-wide partial product in float32, exactly as the reference does, so
  the only difference from :func:`~kernels_pallas.fp8_gemm.w8a8_matmul_ref` is summation order.

Scale layouts made by the wrapper (small arrays): ``xs`` transposed to ``[K/128, M]`` and the
weight scales expanded along N to ``[K/128, N]`` (one float per output column per K block), so
each K step reads two contiguous vectors that broadcast along the tile's rows and columns.

With ``MgpuConfig(warp_specialized=True)`` (:func:`_warp_specialized`) a program's tile is
``[2*bm, bn]``: a memory warpgroup runs the TMA pipeline and two compute warpgroups own ``bm`` rows
each, as in DeepGEMM.

Shapes: K a multiple of 128, N a multiple of ``bn`` (64 or 128, inside one 128-wide scale block);
M is padded to the tile's rows by the wrapper. The model's projections satisfy these; others go to the
Triton kernel (:func:`supported`).

Status: exact in JAX's Mosaic GPU interpreter on CPU, and lowered for CUDA on CPU (``jax.export``,
which runs Mosaic's layout inference), both forms (``tests/test_kernels.py``). Not yet compiled
to PTX or timed on a GPU: ``benchmarks/kernels.py --only dense`` times it beside the others.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas._common import (FP8_DTYPE, QBLOCK, cdiv, mgpu_block_product, mgpu_persistent_kernel,
                                   mgpu_zeros, plgpu_module, round_up)

__all__ = ["MgpuConfig", "supported", "w8a8_matmul_mgpu"]


@dataclasses.dataclass(frozen=True)
class MgpuConfig:
    bm: int = 64                  # rows per tile: a multiple of 64 (one warpgroup's wgmma M; at 128
    #                               the two float32 tiles (wgmma accumulator and promoted total) take 256
    #                               registers a thread, more than it has)
    bn: int = 128                 # columns per tile: 64 or 128 (inside one 128-wide scale block)
    max_concurrent_steps: int = 4  # TMA pipeline stages in shared memory
    grid_tile_width: int = 4      # planar snake: row tiles visited per column sweep
    # Warp specialization (as DeepGEMM and JAX's Hopper matmul example do): a memory warpgroup
    # issues the TMA copies while two compute warpgroups each own `bm` rows of a [2*bm, bn] tile,
    # so copies, MMAs and the promotion of one warpgroup overlap the other's.
    warp_specialized: bool = False


def supported(m: int, n: int, k: int, cfg: MgpuConfig = MgpuConfig()) -> bool:
    """Shapes this kernel takes (others fall back to the Triton kernel)."""
    return k % QBLOCK == 0 and n % cfg.bn == 0 and QBLOCK % cfg.bn == 0 and cfg.bm % 64 == 0 and m > 0



def w8a8_matmul_mgpu(xq_MK: jax.Array, xs_Mk: jax.Array, wq_NK: jax.Array, ws_nk: jax.Array, *,
                     out_dtype=jnp.bfloat16, cfg: MgpuConfig = MgpuConfig(), interpret: bool = False
                     ) -> jax.Array:
    """``C[m, n] = Σ_kb (Σ_{k∈kb} xq[m,k]·wq[n,k]) · xs[m,kb] · ws[n//128, kb]`` (float32 accumulation,
    ``out_dtype`` out). ``xq_MK`` e4m3 ``[M, K]``, ``xs_Mk`` float32 ``[M, K/128]``, ``wq_NK`` e4m3
    ``[N, K]``, ``ws_nk`` float32 ``[ceil(N/128), K/128]``. ``interpret``: JAX's Mosaic GPU
    interpreter (CPU)."""
    plgpu = plgpu_module()
    m, k = xq_MK.shape
    n = wq_NK.shape[0]
    if xq_MK.dtype != FP8_DTYPE or wq_NK.dtype != FP8_DTYPE:
        raise ValueError(f"w8a8_matmul_mgpu: e4m3 operands expected, got {xq_MK.dtype} and {wq_NK.dtype}")
    if not supported(m, n, k, cfg):
        raise ValueError(f"w8a8_matmul_mgpu: unsupported shape M={m} N={n} K={k} for {cfg} "
                         f"(K a multiple of 128, N of bn, bn dividing 128, bm of 64)")
    bm, bn = cfg.bm, cfg.bn
    cta_bm = 2 * bm if cfg.warp_specialized else bm   # rows per program's tile
    mp = round_up(m, cta_bm)
    if mp != m:  # zero rows (scale 0): their outputs are computed and cut off
        xq_MK = jnp.pad(xq_MK, ((0, mp - m), (0, 0)))
        xs_Mk = jnp.pad(xs_Mk, ((0, mp - m), (0, 0)))
    kb = k // QBLOCK
    xs_kM = xs_Mk.astype(jnp.float32).T                                       # [K/128, Mp]
    ws_kN = jnp.repeat(ws_nk.astype(jnp.float32).T, QBLOCK, axis=1)[:, :n]    # [K/128, N]
    grid_m, grid_n = mp // cta_bm, n // bn
    if cfg.warp_specialized:
        return _warp_specialized(xq_MK, wq_NK, xs_kM, ws_kN, m, mp, n, kb, grid_m, grid_n, out_dtype, cfg,
                                 interpret)

    def body(x_g, w_g, xs_g, ws_g, o_g):
        @plgpu.nd_loop((grid_m * grid_n,), collective_axes="sm")
        def _tile(info):
            mi, ni = plgpu.planar_snake(info.index[0], (grid_m, grid_n), 1, cfg.grid_tile_width)

            def step(_, x_s, w_s, xs_s, ws_s, total):
                part = mgpu_block_product(x_s, w_s, (bm, bn))
                return total + part * xs_s[0][:, None] * ws_s[0][None, :]

            total = plgpu.emit_pipeline(
                step, grid=(kb,),
                in_specs=[plgpu.BlockSpec((bm, QBLOCK), lambda j: (mi, j)),
                          plgpu.BlockSpec((bn, QBLOCK), lambda j: (ni, j)),
                          plgpu.BlockSpec((1, bm), lambda j: (j, mi)),
                          plgpu.BlockSpec((1, bn), lambda j: (j, ni))],
                max_concurrent_steps=cfg.max_concurrent_steps,
                init_carry=mgpu_zeros((bm, bn)),
            )(x_g, w_g, xs_g, ws_g)

            @functools.partial(pl.run_scoped, o_s=plgpu.SMEM((bm, bn), out_dtype))
            def _store(o_s):
                o_s[...] = total.astype(out_dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_s, o_g.at[pl.ds(mi * bm, bm), pl.ds(ni * bn, bn)])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel = mgpu_persistent_kernel(body, ((mp, n), out_dtype), grid_m * grid_n, interpret=interpret)
    out = kernel(xq_MK, wq_NK, xs_kM, ws_kN)
    return out[:m] if mp != m else out


def _warp_specialized(xq_MK, wq_NK, xs_kM, ws_kN, m, mp, n, kb, grid_m, grid_n, out_dtype, cfg, interpret):
    """:func:`w8a8_matmul_mgpu` with ``cfg.warp_specialized``: per program, tiles of ``[2*bm, bn]``;
    warpgroups 0 and 1 compute (rows ``wg*bm ...``), warpgroup 2 runs the TMA pipeline."""
    plgpu = plgpu_module()
    bm, bn = cfg.bm, cfg.bn
    cta_bm = 2 * bm

    def pipeline(step, context):
        return plgpu.emit_pipeline_warp_specialized(
            step, grid=(kb,), memory_registers=40,
            in_specs=[plgpu.BlockSpec((cta_bm, QBLOCK), lambda j: (0, j)),
                      plgpu.BlockSpec((bn, QBLOCK), lambda j: (0, j)),
                      plgpu.BlockSpec((1, cta_bm), lambda j: (j, 0)),
                      plgpu.BlockSpec((1, bn), lambda j: (j, 0))],
            wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=cfg.max_concurrent_steps,
            compute_context=context)

    def body(x_g, w_g, xs_g, ws_g, o_g):
        def views(mi, ni):
            return (x_g.at[pl.ds(mi * cta_bm, cta_bm)], w_g.at[pl.ds(ni * bn, bn)],
                    xs_g.at[:, pl.ds(mi * cta_bm, cta_bm)], ws_g.at[:, pl.ds(ni * bn, bn)])

        ignore = lambda *_, **__: None  # noqa: E731 - the allocations do not depend on the body

        @functools.partial(pl.run_scoped, allocs=pipeline(ignore, ignore).get_allocations(*views(0, 0)),
                           o_s=plgpu.SMEM((2, bm, bn), out_dtype), collective_axes="wg")
        def _scope(allocs, o_s):
            wg = jax.lax.axis_index("wg")

            @plgpu.nd_loop((grid_m * grid_n,), collective_axes="sm")
            def _tile(info):
                mi, ni = plgpu.planar_snake(info.index[0], (grid_m, grid_n), 1, cfg.grid_tile_width)
                rows = pl.ds(wg * bm, bm)

                def step(_, x_s, w_s, xs_s, ws_s, total):
                    part = mgpu_block_product(x_s.at[rows], w_s, (bm, bn))
                    return total + part * xs_s[0, rows][:, None] * ws_s[0][None, :]

                def context(run):
                    total = run(mgpu_zeros((bm, bn)))
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the previous tile's store
                    o_s[wg] = total.astype(out_dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(o_s.at[wg], o_g.at[pl.ds(mi * cta_bm + wg * bm, bm),
                                                                pl.ds(ni * bn, bn)])

                pipeline(step, context)(*views(mi, ni), allocations=allocs)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel = mgpu_persistent_kernel(body, ((mp, n), out_dtype), grid_m * grid_n, interpret=interpret,
                                    warpgroups=3)
    out = kernel(xq_MK, wq_NK, xs_kM, ws_kN)
    return out[:m] if mp != m else out


def _self_check():  # pragma: no cover - a manual smoke run: python -m kernels_pallas.fp8_gemm_mgpu
    from kernels_pallas.fp8_gemm import _w8a8_from_quantized_ref, quantize_act_1x128
    kx, kw, ks = jax.random.split(jax.random.PRNGKey(0), 3)
    m, n, k = 100, 256, 384
    xq, xs = quantize_act_1x128(jax.random.normal(kx, (m, k), jnp.float32))
    wq = (jax.random.normal(kw, (n, k), jnp.float32) * 50).astype(FP8_DTYPE)
    ws = jax.random.uniform(ks, (cdiv(n, QBLOCK), k // QBLOCK), jnp.float32, 1e-3, 2e-3)
    ref = _w8a8_from_quantized_ref(xq, xs, wq, ws)
    for ws_ in (False, True):
        got = w8a8_matmul_mgpu(xq, xs, wq, ws, out_dtype=jnp.float32, cfg=MgpuConfig(warp_specialized=ws_),
                               interpret=True)
        print("warp_specialized", ws_, "max abs err", float(jnp.max(jnp.abs(got - ref))),
              "ref max", float(jnp.max(jnp.abs(ref))))


if __name__ == "__main__":
    _self_check()
