"""RMSNorm computed in float32 (SPEC §2): ``w * x / sqrt(mean(x^2) + eps)``; the math is
``kernels_pallas.rms_norm_ref``'s, on a GPU one kernel (``kernels_pallas.rms_norm``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import kernels_pallas
from kernels_pallas.rms_norm import rms_norm_ref


def rms_norm(x: jax.Array, w: jax.Array, eps: float, dtype) -> jax.Array:
    return rms_norm_ref(x, w, eps=eps, out_dtype=dtype)


class RMSNorm(nnx.Module):
    """``kernels``: a ``Precision.kernels`` value; on a GPU target the norm (and a residual add
    before it) runs as one Pallas kernel instead of XLA's two or three launches. On a
    multi-device mesh (``placement`` set by ``sharding.attach_mesh``) XLA's form runs."""

    def __init__(self, dim: int, eps: float, *, dtype=jnp.float32, param_dtype=jnp.bfloat16, kernels: str = "ref"):
        self.eps, self.dtype, self.kernels = eps, dtype, kernels
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.placement = None

    def __call__(self, x: jax.Array, residual: jax.Array | None = None):
        """``norm(x)``, or with ``residual`` the pair ``(x + residual, norm(x + residual))``. A
        weight of all scanned layers ``[L, D]`` (``Precision.weights_in_place``) is read at the
        enclosing ``quant.scan_layer``'s index."""
        from deepseek_jax.quant import scan_layer_index

        w = self.weight[...]
        layer = scan_layer_index() if w.ndim == 2 else None
        impl = self.kernels if self.placement is None else "ref"
        return kernels_pallas.rms_norm(x, w, eps=self.eps, out_dtype=self.dtype, residual=residual, layer=layer,
                                       impl=impl)
