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


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


def inv_frequencies(cfg: DeepSeekConfig) -> tuple[np.ndarray, float]:
    """The (YaRN-corrected) inverse frequencies ``[R/2]`` and the cos/sin multiplier."""
    dim, theta = cfg.qk_rope_head_dim, cfg.rope_theta
    inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    rs = cfg.rope_scaling
    if rs is None or rs.factor <= 1.0:
        return inv.astype(np.float32), 1.0

    def corr_dim(rot: float) -> float:
        return dim * math.log(rs.original_max_position_embeddings / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(corr_dim(rs.beta_fast)), 0)
    high = min(math.ceil(corr_dim(rs.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0.0, 1.0)
    inv = inv / rs.factor * ramp + inv * (1.0 - ramp)
    mult = _yarn_mscale(rs.factor, rs.mscale) / _yarn_mscale(rs.factor, rs.mscale_all_dim or 1.0) \
        if rs.mscale_all_dim else _yarn_mscale(rs.factor, rs.mscale)
    return inv.astype(np.float32), float(mult)


class Rope:
    """Precomputed frequencies; ``apply(x_...R, positions)``. Plain Python, no parameters."""

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
