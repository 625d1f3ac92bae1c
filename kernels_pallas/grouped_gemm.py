"""Grouped (ragged) expert matmul: rows sorted by expert, one weight matrix per expert.

``y[r] = x[r] @ w[g(r)].T`` where ``g(r)`` is the expert whose contiguous row range (from ``group_sizes``)
holds row ``r``; rows past ``sum(group_sizes)`` give 0.  Weights are the Hub's ``[out, in]`` layout,
``w_ENK [E, N, K]``, in bf16/f32, or ``float8_e4m3fn`` with block scales ``w_scale [E, ceil(N/128),
ceil(K/128)]`` (W8A16 semantics: dequantize, then dot in ``x.dtype`` with float32 accumulation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas._common import dequantize_blocks, is_fp8

__all__ = ["grouped_matmul_ref", "grouped_matmul"]


def _check_args(x_MK, w_ENK, group_sizes_E, w_scale):
    if x_MK.ndim != 2:
        raise ValueError(f"x must be [M, K], got shape {x_MK.shape}")
    if w_ENK.ndim != 3:
        raise ValueError(f"w must be [E, N, K], got shape {w_ENK.shape}")
    if x_MK.shape[1] != w_ENK.shape[2]:
        raise ValueError(f"x inner dim {x_MK.shape[1]} != expert weight in-dim {w_ENK.shape[2]} "
                         f"(w is [E, out, in] = {tuple(w_ENK.shape)})")
    if group_sizes_E.shape != (w_ENK.shape[0],):
        raise ValueError(f"group_sizes shape {group_sizes_E.shape} != ({w_ENK.shape[0]},)")
    if is_fp8(w_ENK.dtype) and w_scale is None:
        raise ValueError("float8 expert weights need w_scale [E, ceil(N/128), ceil(K/128)]")


def _compute_dtype(x_MK, w_ENK):
    return x_MK.dtype if is_fp8(w_ENK.dtype) else jnp.promote_types(x_MK.dtype, w_ENK.dtype)


def grouped_matmul_ref(x_MK: jax.Array, w: jax.Array, group_sizes_E: jax.Array, *,
                       w_scale: jax.Array | None = None, out_dtype=None) -> jax.Array:
    """Reference grouped matmul via ``jax.lax.ragged_dot`` → ``[M, N]`` (``out_dtype`` default x.dtype).

    Differentiable w.r.t. ``x`` and (non-FP8) ``w``.  Note: XLA lowers ragged_dot to a dense masked
    product on GPU, which does not fit in memory at 256 experts x 32k rows; use it for checking.
    """
    _check_args(x_MK, w, group_sizes_E, w_scale)
    out_dtype = x_MK.dtype if out_dtype is None else out_dtype
    cdt = _compute_dtype(x_MK, w)
    if is_fp8(w.dtype):
        w_ENK = dequantize_blocks(w, w_scale).astype(cdt)
    else:
        w_ENK = w.astype(cdt)
    y = lax.ragged_dot(x_MK.astype(cdt), jnp.swapaxes(w_ENK, 1, 2), group_sizes_E.astype(jnp.int32),
                       precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return y.astype(out_dtype)


def grouped_matmul(x_MK, w, group_sizes_E, *, w_scale=None, out_dtype=None, impl="auto"):
    """Grouped matmul, Pallas kernel or reference (see :mod:`kernels_pallas.backend`)."""
    return grouped_matmul_ref(x_MK, w, group_sizes_E, w_scale=w_scale, out_dtype=out_dtype)
