"""RMSNorm computed in float32 (SPEC §2): ``w * x / sqrt(mean(x^2) + eps)``: the module over
``kernels_pallas.rms_norm`` (its reference's math; on a GPU one kernel)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import kernels_pallas
from deepseek_jax.quant import scan_layer_index


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
        w = self.weight[...]
        layer = scan_layer_index() if w.ndim == 2 else None
        impl = self.kernels if self.placement is None else "ref"
        return kernels_pallas.rms_norm(x, w, eps=self.eps, out_dtype=self.dtype, residual=residual, layer=layer,
                                       impl=impl)
