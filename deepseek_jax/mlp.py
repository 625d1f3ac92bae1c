"""SwiGLU MLP: ``down(silu(gate x) * up x)`` (dense layers and the shared expert)."""

from __future__ import annotations

import jax
from flax import nnx

from deepseek_jax.quant import Linear, Precision


class MLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, fp8: bool, prec: Precision, rngs: nnx.Rngs):
        self.gate_proj = Linear(dim, hidden, fp8=fp8, prec=prec, rngs=rngs)
        self.up_proj = Linear(dim, hidden, fp8=fp8, prec=prec, rngs=rngs)
        self.down_proj = Linear(hidden, dim, fp8=fp8, prec=prec, rngs=rngs)

    def __call__(self, x_TD: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x_TD)) * self.up_proj(x_TD))
