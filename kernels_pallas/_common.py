"""Small helpers shared by the kernel files (no model knowledge)."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

#: Side of the square weight-scale blocks and width of the activation-scale blocks (SPEC §7).
QBLOCK = 128
#: Largest finite float8_e4m3fn value.
E4M3_MAX = 448.0
FP8_DTYPE = jnp.float8_e4m3fn
#: Streaming multiprocessors on an H100/H200: sizes split-K / split-T heuristics of the GPU kernels.
GPU_NUM_SMS = 132


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    """``x`` padded with ``value`` at the end of ``axis`` to ``size``."""
    return jnp.pad(x, [(0, size - x.shape[axis]) if d == axis else (0, 0) for d in range(x.ndim)],
                   constant_values=value)


def tpu_tile(total: int, cap: int, min_tiles: int = 1) -> int | None:
    """The largest multiple of 128 that divides ``total``, is at most ``cap`` and leaves at least
    ``min_tiles`` tiles (a TPU kernel's lane-dim tile: whole 128-lane vregs, no ragged last
    tile); None if there is none. DeepSeek-V3's 7168 gives 1792 under a cap of 2048."""
    t = (min(cap, total // min_tiles) // QBLOCK) * QBLOCK
    while t >= QBLOCK and total % t:
        t -= QBLOCK
    return t if t >= QBLOCK else None


#: Weight-tile caps of the TPU GEMM kernels: rows x columns of a tile read per grid step. Each grid
#: step of a Mosaic kernel costs a fixed overhead besides its DMA and MXU work, so a weight-bound
#: call (decode: few rows) wants few large steps, up to 2048 x 2048 (4 MiB of e4m3, 8 MiB double
#: buffered); a compute-bound one (prefill) 1024 x 1024. At least two tiles along the output stay
#: on the "parallel" grid axis, which a chip's two TensorCores (v4, v5p) split.
TPU_DECODE_TILE_CAP = 2048
TPU_PREFILL_TILE_CAP = 1024


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def is_fp8(dtype) -> bool:
    return jnp.dtype(dtype) == jnp.dtype(FP8_DTYPE)


def check_fp8_operands(x, wq, ws) -> None:
    """The dtypes a block-scaled GEMM takes, as one-line ``ValueError``s: floating ``x`` (its
    quantized form is made inside), ``float8_e4m3fn`` weights, float32 block scales. (An int32
    ``x`` made the reference cast the dequantized weights to int32; a bf16 weight was read as if
    it held e4m3 codes by the kernels.)"""
    if not jnp.issubdtype(x.dtype, jnp.floating) or is_fp8(x.dtype):
        raise ValueError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    if not is_fp8(wq.dtype):
        raise ValueError(f"block-scaled weights must be float8_e4m3fn, got {wq.dtype}")
    if ws.dtype != jnp.float32:
        raise ValueError(f"block scales must be float32 (the checkpoint's weight_scale_inv), got {ws.dtype}")


def expand_block_scale(s_nk: jax.Array, n: int, k: int) -> jax.Array:
    """[ceil(n/128), ceil(k/128)] block scales → [n, k] per-element scales (float32).
    Works on any leading batch dims (e.g. experts)."""
    s = jnp.repeat(s_nk.astype(jnp.float32), QBLOCK, axis=-2)[..., :n, :]
    return jnp.repeat(s, QBLOCK, axis=-1)[..., :k]


def expand_block_row(s_1b, col0, width: int):
    """``[1, nb]`` per-128-column-block scales → ``[1, width]`` per-column scales for columns
    ``col0 .. col0 + width`` (inside a TPU kernel: a 0/1 expansion matmul, no lane repeats;
    columns past the last block get 0)."""
    nb = s_1b.shape[1]
    blk = jax.lax.broadcasted_iota(jnp.int32, (nb, width), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (nb, width), 1) + col0
    expand = (blk == col // QBLOCK).astype(jnp.float32)
    return jnp.dot(s_1b, expand, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def dequantize_blocks(wq_NK: jax.Array, ws_nk: jax.Array) -> jax.Array:
    """Block-scaled e4m3 weights → float32 (``W[n,k] = Wq[n,k] * S[n//128, k//128]``).
    Leading dims (experts) are carried through."""
    n, k = wq_NK.shape[-2:]
    expected = (*wq_NK.shape[:-2], cdiv(n, QBLOCK), cdiv(k, QBLOCK))
    if tuple(ws_nk.shape) != expected:
        raise ValueError(f"weight scale shape {tuple(ws_nk.shape)} does not match weight "
                         f"{tuple(wq_NK.shape)} (expected {expected})")
    return wq_NK.astype(jnp.float32) * expand_block_scale(ws_nk, n, k)


def flatten_rows(x: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
    """[..., K] → ([M, K], leading shape)."""
    lead = tuple(x.shape[:-1])
    return x.reshape(math.prod(lead), x.shape[-1]), lead


def einsum32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``einsum`` with float32 accumulation. On CPU the operands are widened to float32 first:
    XLA's CPU batched dot lacks bf16 x bf16 -> f32, and bf16 products are exact in float32, so
    the result is the same as a bf16 dot accumulating in float32. The branch is taken by the
    platform the program is lowered for (``lax.platform_dependent``), not the host's default
    backend, so a program compiled here for a GPU or TPU (``kernels_pallas.aot``) gets theirs."""
    def dot(a, b):
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)

    if a.dtype == b.dtype == jnp.float32:
        return dot(a, b)
    return jax.lax.platform_dependent(a, b, cpu=lambda a, b: dot(a.astype(jnp.float32), b.astype(jnp.float32)),
                                      default=dot)


# ---- helpers of the Triton-lowered GPU kernels -------------------------------------------------


def and_masks(a, b):
    """``a & b`` where either mask may be ``None`` (no masking needed on that axis)."""
    if a is None:
        return b
    if b is None:
        return a
    return a & b


class SplitK(NamedTuple):
    """A GEMM's split-K partial products ``[S, ..., N]`` (float32), not yet summed: what
    ``w8a16_matmul(..., sum_splits=False)`` returns where its GPU kernel split the contraction, for
    a consumer kernel to sum (``kernels_pallas.rms_norm`` does) instead of an XLA launch."""

    parts: jax.Array


def summed(x, dtype):
    """``x``, or a :class:`SplitK`'s sum rounded to ``dtype`` (what the GEMM would have returned)."""
    return jnp.sum(x.parts, axis=0).astype(dtype) if isinstance(x, SplitK) else x


def masked_load(ref, mask):
    """A GPU ``load`` that fills masked-off elements with 0 (plain load when ``mask`` is None)."""
    from jax.experimental.pallas import triton as plgpu_triton

    if mask is None:
        return plgpu_triton.load(ref)
    return plgpu_triton.load(ref, mask=mask, other=jnp.zeros((), ref.dtype))


# ---- helpers of the Mosaic GPU kernels (fp8_gemm_mgpu, grouped_gemm_mgpu) ---------------------


def plgpu_module():
    """``jax.experimental.pallas.mosaic_gpu``, imported when a Mosaic GPU kernel is built."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu


def mgpu_zeros(shape) -> jax.Array:
    """A float32 zero tile in the ``wgmma`` accumulator layout (a carry or an all-zero output)."""
    plgpu = plgpu_module()
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def mgpu_persistent_kernel(body, out_shape, tiles: int, *, interpret: bool, warpgroups: int | None = None):
    """``plgpu.kernel`` with one program per SM (at most ``tiles``; axis "sm"), Warpgroup lowering
    semantics, ``warpgroups`` threads named "wg" when given, and JAX's Mosaic GPU interpreter when
    ``interpret``."""
    plgpu = plgpu_module()
    threads = {} if warpgroups is None else dict(num_threads=warpgroups, thread_name="wg")
    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct(*out_shape),
        grid=(min(GPU_NUM_SMS, tiles),),
        grid_names=("sm",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=plgpu.InterpretGPUParams() if interpret else False,
        **threads,
    )


def mgpu_block_product(x_ref, w_ref, shape) -> jax.Array:
    """``x_ref @ w_ref.T`` of one K block into a fresh float32 ``wgmma`` accumulator of ``shape``,
    waited for and read back (the per-K-block products that the W8A8 kernels scale). ``w_ref`` is
    ``[N, K]``: fed transposed, which makes it K-major, the only form e4m3 ``wgmma`` takes."""
    plgpu = plgpu_module()

    from jax.experimental import pallas as pl

    def mma(acc_ref):
        plgpu.wgmma(acc_ref, x_ref, w_ref.transpose((1, 0)))
        plgpu.wgmma_wait(0)
        return acc_ref[...]

    return pl.run_scoped(mma, plgpu.ACC(shape, jnp.float32))
