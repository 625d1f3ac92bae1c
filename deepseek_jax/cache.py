"""The MLA latent cache (SPEC §3): per layer, per sequence, per position ``[c (L) | k_pe (R)]``.

576 values per token per layer for V3, against 40960 for a full K/V cache. Dense and MoE layers
are scanned separately, so their caches are two stacked arrays ``[layers, B, S, L+R]``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from deepseek_jax.config import DeepSeekConfig


class LatentCache(NamedTuple):
    dense: jax.Array | None   # [L_dense, B, S, C] (per_layer(): a tuple of [B, S, C])
    moe: jax.Array | None     # [L_moe, B, S, C]

    @property
    def max_len(self) -> int:
        arr = self.moe if self.moe is not None else self.dense
        return arr[0].shape[1] if isinstance(arr, tuple) else arr.shape[2]

    def per_layer(self) -> "LatentCache":
        """Each stack as a tuple of per-layer arrays (what ``DeepSeekV3.__call__(..., unstacked=...)`` reads and
        writes without slicing); :meth:`stacked` undoes it."""
        def split(a):
            return a if a is None or isinstance(a, tuple) else tuple(a[i] for i in range(a.shape[0]))
        return LatentCache(split(self.dense), split(self.moe))

    def stacked(self) -> "LatentCache":
        def join(a):
            return jnp.stack(a) if isinstance(a, tuple) else a
        return LatentCache(join(self.dense), join(self.moe))

    @classmethod
    def zeros(cls, cfg: DeepSeekConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> "LatentCache":
        C = cfg.latent_dim

        def make(n: int):
            return jnp.zeros((n, batch, max_len, C), dtype) if n else None

        return cls(make(cfg.num_dense_layers), make(cfg.num_moe_layers))
