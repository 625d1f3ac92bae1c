"""Rotary position embedding with YaRN context extension (SPEC §4).

Convention: interleaved pairs ``(x[2i], x[2i+1])`` are rotated as one complex number, which is
how DeepSeek's weights were trained. Angles are ``p * inv_freq'[i]`` in float32, ``p`` the
absolute position.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import DeepSeekConfig


def inv_frequencies(cfg: DeepSeekConfig) -> tuple[np.ndarray, float]:
    """The (YaRN-corrected) inverse frequencies ``[R/2]`` and the cos/sin multiplier.

    Float32 step by step in HF's order, ``base ** (i / R)`` rounded once from float64 (correctly
    rounded): at V3's base 10000 that is torch's float32 ``pow`` to the bit, elsewhere within an
    ulp of it, where NumPy's float32 ``pow`` is 1-2 ulp off on some ``i`` (angles are
    ``p * inv_freq``, so an ulp is 2.7e-4 relative error in the logits at p = 160K)."""
    f32 = np.float32
    dim, theta = cfg.qk_rope_head_dim, cfg.rope_theta
    exponent = np.arange(0, dim, 2, dtype=f32) / f32(dim)
    base_pow = (np.float64(theta) ** exponent.astype(np.float64)).astype(f32)
    inv = f32(1.0) / base_pow
    rs = cfg.rope_scaling
    if rs is None or rs.factor <= 1.0:
        return inv, 1.0

    def corr_dim(rot: float) -> float:
        return dim * math.log(rs.original_max_position_embeddings / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(corr_dim(rs.beta_fast)), 0)
    high = min(math.ceil(corr_dim(rs.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=f32) - f32(low)) / f32(high - low), f32(0), f32(1))
    keep = f32(1) - ramp                                  # the share of the unscaled frequency
    interpolated = f32(1.0) / (f32(rs.factor) * base_pow)
    inv = interpolated * (f32(1) - keep) + inv * keep
    return inv.astype(f32), float(rs.cos_sin_multiplier)


class Rope:
    """Precomputed frequencies: ``cos_sin(positions)`` gives the (YaRN-scaled) angles' cos and sin,
    ``apply(x_...R, cos, sin)`` rotates. Plain Python, no parameters."""

    def __init__(self, cfg: DeepSeekConfig):
        inv, mult = inv_frequencies(cfg)
        self.inv_freq = inv
        self.mult = mult

    def cos_sin(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(self.inv_freq)
        return jnp.cos(ang) * self.mult, jnp.sin(ang) * self.mult

    def apply(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """Rotates ``x [..., R]``; ``cos``/``sin`` broadcast against ``[..., R/2]``."""
        dtype = x.dtype
        xr = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
        x0, x1 = xr[..., 0], xr[..., 1]
        out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
        return out.reshape(x.shape).astype(dtype)
