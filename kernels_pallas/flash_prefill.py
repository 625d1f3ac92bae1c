"""Causal attention among a call's own tokens (the naive MLA form at prefill), flash-style on GPU.

    o[b, t, h] = Σ_{s <= t} softmax_s(scale · q[b, t, h] · k[b, s, h]) v[b, s, h]

``q``/``k`` are ``[B, T, H, K]`` (MLA: K = 128 nope + 64 rope = 192), ``v`` is ``[B, T, H, A]``
(A = 128). Causality is by token index, which equals the model's position mask whenever each
row's positions increase by one along the call (prefill and training: right-padded prompts at
positions ``0..T-1``).

* Reference (:func:`causal_attention_ref`): float32 scores ``[B, H, T, T]``, softmax, product -
  what the model's plain path computes.
* GPU (``impl="pallas_gpu"`` / ``"interpret_gpu"``): JAX's own Triton-lowered Pallas flash
  attention (``jax.experimental.pallas.ops.gpu.attention.mha``, deprecated in jax 0.11 for
  tokamax, which the GPU machine here lacks; online softmax, never
  materializes the scores; it has a backward). It wants one head size for q, k and v and a
  sequence length divisible by its blocks, so ``v`` is zero-padded to K (the padded output
  columns are dropped) and T is padded with tokens after the real ones (causality keeps them
  out of every real token's window). The scores are ``[B, H, T, T]`` float32 otherwise: 8.6 GB
  per layer at a 4K prompt with DeepSeek-V3's 128 heads.

TPU has no kernel here: ``impl`` resolving to TPU or the reference uses the reference.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas import backend
from kernels_pallas._common import next_pow2, round_up

__all__ = ["causal_attention_ref", "causal_attention"]


def _check(q_BTHK, k_BTHK, v_BTHA):
    if q_BTHK.ndim != 4 or k_BTHK.shape != q_BTHK.shape:
        raise ValueError(f"q and k must be the same [B, T, H, K], got {q_BTHK.shape} and {k_BTHK.shape}")
    if v_BTHA.ndim != 4 or v_BTHA.shape[:3] != q_BTHK.shape[:3]:
        raise ValueError(f"v must be [B, T, H, A] matching q {q_BTHK.shape}, got {v_BTHA.shape}")


def causal_attention_ref(q_BTHK, k_BTHK, v_BTHA, *, scale: float) -> jax.Array:
    """Plain jnp: float32 scores and softmax, float32 accumulation → ``[B, T, H, A]`` in q's dtype."""
    _check(q_BTHK, k_BTHK, v_BTHA)
    hp = lax.Precision.HIGHEST
    f32 = jnp.float32
    s = jnp.einsum("bthk,bshk->bhts", q_BTHK.astype(f32), k_BTHK.astype(f32), precision=hp) * scale
    t = q_BTHK.shape[1]
    causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
    p = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1)
    return jnp.einsum("bhts,bsha->btha", p, v_BTHA.astype(f32), precision=hp).astype(q_BTHK.dtype)


def causal_attention(q_BTHK, k_BTHK, v_BTHA, *, scale: float, impl: str = "auto",
                     block: int | None = None) -> jax.Array:
    """Causal attention (module doc); ``impl`` as in :mod:`kernels_pallas.backend`, ``block`` the
    flash kernel's query/key block (power of two, cut to the sequence). Default: 128, or 64 when
    the head size pads to more than 128 (MLA's 192 pads to 256): a [128, 256] float32 output
    tile is 128 registers a thread at 8 warps, and 128-token K/V tiles of 256 at 2 stages ask for
    256 KiB of shared memory (227 KiB on an H100/H200)."""
    _check(q_BTHK, k_BTHK, v_BTHA)
    target, interpret = backend.split_impl(impl)
    if target != "gpu":
        return causal_attention_ref(q_BTHK, k_BTHK, v_BTHA, scale=scale)
    with warnings.catch_warnings():  # deprecated for tokamax in jax 0.11, which the lent GPU
        # machine does not have (jax 0.11.2 there); this is the flash kernel it does have
        warnings.simplefilter("ignore", DeprecationWarning)
        from jax.experimental.pallas.ops.gpu.attention import BlockSizes, mha

    b, t, h, kd = q_BTHK.shape
    a = v_BTHA.shape[-1]
    d = max(kd, a)
    if block is None:
        block = 128 if next_pow2(d) <= 128 else 64
    blk = min(block, next_pow2(t))
    tp = round_up(t, blk)
    pad_t = [(0, 0), (0, tp - t), (0, 0), (0, 0)]
    q = jnp.pad(q_BTHK, pad_t[:3] + [(0, d - kd)])
    k = jnp.pad(k_BTHK, pad_t[:3] + [(0, d - kd)])
    v = jnp.pad(v_BTHA.astype(q.dtype), pad_t[:3] + [(0, d - a)])
    o = mha(q, k, v, None, sm_scale=scale, causal=True, block_sizes=BlockSizes(block_q=blk, block_k=blk),
            interpret=interpret)
    return o[:, :t, :, :a]
