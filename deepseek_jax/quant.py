"""128x128 block-scaled FP8 weights and the linear layers that use them (SPEC §7).

A quantized weight is two arrays kept side by side, exactly as the Hub stores them:
``weight`` (``float8_e4m3fn`` ``[..., N, K]``, i.e. ``[out, in]``) and ``weight_scale_inv``
(float32 ``[..., ceil(N/128), ceil(K/128)]``; despite its name a multiplier). Both stay in memory
as they are; the matmuls dequantize on the fly (W8A16, the reference semantics) or quantize
activations too (W8A8, an optional fast path with its own reference). The Pallas kernels in
``kernels_pallas`` implement the same signatures; which one runs is decided there by backend.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import numbers
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

import kernels_pallas
from kernels_pallas._common import einsum32  # noqa: F401  (the model's float32-accumulating einsum)
from deepseek_jax import kernel_mesh
from deepseek_jax.errors import DeepSeekError, check_bool

BLOCK = 128
FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0


@dataclasses.dataclass(frozen=True)
class Precision:
    """How a model computes. Static: part of the module graph, not of the weights.

    dtype: activation/compute dtype (float32 for parity, bfloat16 for speed).
    fp8_mode: "w8a16" (dequantize weights, the reference numbers) or "w8a8" (1x128 activation
      quantization and a block-scaled FP8 GEMM; changes the numbers, never compare it with float32).
    kernels: one of ``kernels_pallas.backend.IMPLS`` ("auto": Pallas on GPU/TPU, the jnp reference
      on CPU; "ref", "pallas", "interpret", or one platform's: "pallas_gpu", "interpret_tpu", ...).
    weights_in_place: whether the scan over stacked layers hands the kernels all layers' FP8
      weights plus a layer index (``expert_offset`` / ``layer=``) instead of slicing one layer's
      weights per step, which XLA materializes as a copy when the slice feeds a Pallas call (for a
      DeepSeek-V3 MoE layer, 11 GB of experts read and written again: ~19 ms of a 4-layer decode
      step measured on an H200). None (default): on when the kernels are compiled Pallas and the
      weights are FP8 (frozen: no weight gradient flows through the whole stacks).
    scan_unroll: ``unroll`` of the ``lax.scan`` over stacked layers (1: a loop, one traced layer
      body; ``True``: straight-line code, compile time grows with the depth). A knob for
      measuring launch and loop overhead on accelerators (``benchmarks/e2e_gpu.py`` times both).
    ep_capacity: the expert-parallel all-to-all's buffer per (sender, receiver) pair, as a multiple
      of the balanced share ``tokens * K / n_expert`` (:mod:`deepseek_jax.expert_parallel`). Rows
      past it go in further rounds of the exchange, so no token is dropped; the rounds run while
      any pair has rows left. None: one exchange sized for the worst case (every pair's buffer
      ``tokens * min(K, experts per shard)``, 16x the balanced share on 16 shards of V3).
    prefill_attention: the naive form's attention among a call's tokens. "plain" (default): float32
      scores ``[B, H, T, T]`` masked by position. "flash": a flash kernel, causal by token index,
      which is the same mask when each row's positions increase by one along the call (prefill of
      right-padded prompts, scoring, training): on GPU ``kernels_pallas.causal_attention``, on TPU
      ``kernels_pallas.cached_attention`` over the call's own keys, on CPU the same call's blocked
      jnp form (``kernels_pallas.cached_attention_blocked``: scores ``[B, T, H, 512]`` at most,
      forward and backward; the kernels' backward too); and a
      prefill chunk over an existing cache in the naive form too (``kernels_pallas.cached_attention``,
      by position) instead of the absorbed form. Not timed on a GPU or TPU yet.
    """

    dtype: jnp.dtype = jnp.float32
    fp8_mode: Literal["w8a16", "w8a8"] = "w8a16"
    kernels: str = "auto"
    weights_in_place: bool | None = None
    scan_unroll: int | bool = 1
    prefill_attention: Literal["plain", "flash"] = "plain"
    ep_capacity: float | None = 2.0

    def __post_init__(self):
        def bad(field: str, want: str) -> DeepSeekError:
            return DeepSeekError(f"Precision.{field} must be {want}, got {getattr(self, field)!r}")

        if self.fp8_mode not in ("w8a16", "w8a8"):
            raise bad("fp8_mode", "'w8a16' or 'w8a8'")
        if self.prefill_attention not in ("plain", "flash"):
            raise bad("prefill_attention", "'plain' or 'flash'")
        if self.ep_capacity is not None and not (isinstance(self.ep_capacity, numbers.Real)
                                                 and not isinstance(self.ep_capacity, bool)
                                                 and 0 < self.ep_capacity < float("inf")):
            raise bad("ep_capacity", "a finite number > 0 or None")
        try:
            dtype = jnp.dtype(self.dtype)
        except TypeError:
            dtype = None
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise bad("dtype", "a floating dtype (jnp.float32, jnp.bfloat16)")
        if self.weights_in_place is not None:   # (None: decided per backend)
            object.__setattr__(self, "weights_in_place",
                               check_bool("Precision.weights_in_place", self.weights_in_place))
        if not isinstance(self.scan_unroll, bool) and not (isinstance(self.scan_unroll, numbers.Integral)
                                                           and self.scan_unroll >= 1):
            raise bad("scan_unroll", "an integer >= 1 or a bool")
        try:   # (a bad name failed at the first trace, from inside the kernel dispatch)
            object.__setattr__(self, "kernels", kernels_pallas.backend.check_impl(self.kernels))
        except ValueError as e:
            raise DeepSeekError(f"Precision.kernels: {e}") from None


def _expand_scales(s: jax.Array, n: int, k: int) -> jax.Array:
    """``[..., ceil(N/128), ceil(K/128)]`` -> ``[..., N, K]`` (edge blocks cut to size)."""
    s = jnp.repeat(jnp.repeat(s, BLOCK, axis=-2), BLOCK, axis=-1)
    return s[..., :n, :k]


def dequantize(wq: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    """``W[i, j] = float(Wq[i, j]) * S[i // 128, j // 128]`` for any leading dims."""
    n, k = wq.shape[-2:]
    return (wq.astype(jnp.float32) * _expand_scales(scale, n, k)).astype(dtype)


def quantize(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Block-quantizes ``[..., N, K]`` to e4m3 with per-128x128-block scales ``amax / 448``.

    An all-zero block gets scale 1 (never a division by zero), and no scale is subnormal (a block
    of magnitudes ~1e-37 dequantizes to finite values, not NaN). Used for random initialisation
    and for tests; real checkpoints arrive already quantized.
    """
    w = jnp.asarray(w, jnp.float32)
    *lead, n, k = w.shape
    nb, kb = math.ceil(n / BLOCK), math.ceil(k / BLOCK)
    pad = [(0, 0)] * len(lead) + [(0, nb * BLOCK - n), (0, kb * BLOCK - k)]
    wp = jnp.pad(w, pad).reshape(*lead, nb, BLOCK, kb, BLOCK)
    amax = jnp.max(jnp.abs(wp), axis=(-3, -1))
    # (a scale below float32's smallest normal would be flushed to 0 by XLA: w / 0 = NaN weights)
    scale = jnp.where(amax > 0, jnp.maximum(amax / FP8_MAX, jnp.finfo(jnp.float32).tiny), 1.0)
    wq = (w / _expand_scales(scale, n, k)).astype(FP8)
    return wq, scale


#: From this many rows on, W8A16 on a GPU dequantizes then calls XLA's dot (cuBLAS): 540-544
#: TFLOP/s at 4096 rows (7168->2048, 2048->7168) on an H200 against 216-222 for the Pallas kernel;
#: at 64 rows the kernel wins, 0.019-0.024 ms against 0.035-0.036 (benchmarks/kernels.py, 2026-11-28).
GPU_DEQUANT_MIN_ROWS = 512


def _dense_impl(prec: Precision, rows: int) -> str:
    """The kernel impl for one FP8 linear call: ``prec.kernels``, except that "auto"/"pallas" on a
    GPU take the dequantize-then-dot reference for W8A16 with many rows (prefill)."""
    if (prec.kernels in ("auto", "pallas") and prec.fp8_mode == "w8a16" and rows >= GPU_DEQUANT_MIN_ROWS
            and kernels_pallas.backend.resolve_impl(prec.kernels) == "pallas_gpu"):
        return "ref"
    return prec.kernels


#: The layer index inside a scan over stacked layers whose FP8 weights are read in place (see
#: ``model._scan_layers``): a ``Linear`` then holds all layers' ``[L, out, in]`` and uses this one.
_SCAN_LAYER: contextvars.ContextVar = contextvars.ContextVar("deepseek_jax_scan_layer", default=None)


@contextlib.contextmanager
def scan_layer(i: jax.Array):
    """Within this block (trace time), stacked ``[L, out, in]`` FP8 linears use layer ``i``."""
    token = _SCAN_LAYER.set(i)
    try:
        yield
    finally:
        _SCAN_LAYER.reset(token)


def scan_layer_index():
    """The layer index of the enclosing :func:`scan_layer` block (trace time), or None."""
    return _SCAN_LAYER.get()


class Linear(nnx.Module):
    """``y = x Wᵀ`` with the Hub's ``[out, in]`` weight, FP8 block-scaled or plain.

    ``stack`` prepends axes to the weight (``[E, out, in]`` for routed experts); such a weight is
    used through :func:`grouped_matmul`, not ``__call__``.
    """

    def __init__(self, in_features: int, out_features: int, *, fp8: bool, prec: Precision,
                 rngs: nnx.Rngs, stack: tuple[int, ...] = (), param_dtype=jnp.bfloat16):
        self.in_features, self.out_features, self.fp8, self.prec = in_features, out_features, fp8, prec
        self.placement = None   # set by sharding.attach_mesh: kernel calls then run per shard
        shape = (*stack, out_features, in_features)
        w = jax.random.normal(rngs.params(), shape, jnp.float32) / math.sqrt(in_features)
        if fp8:
            wq, s = quantize(w)
            self.weight = nnx.Param(wq)
            self.weight_scale_inv = nnx.Param(s)
        else:
            self.weight = nnx.Param(w.astype(param_dtype))
            self.weight_scale_inv = None

    def _stacked_layer(self):
        """The layer index when this call's FP8 weight is all layers' ``[L, out, in]``, else None."""
        layer = _SCAN_LAYER.get()
        if layer is None or not self.fp8 or self.weight[...].ndim != 3:
            return None
        return layer

    def dense_weight(self, dtype=None) -> jax.Array:
        """The weight as a plain ``[..., out, in]`` array (dequantized if FP8)."""
        dtype = dtype or self.prec.dtype
        if self.fp8:
            w, s = self.weight[...], self.weight_scale_inv[...]
            layer = self._stacked_layer()
            if layer is not None:  # a dynamic slice that XLA fuses into the dequantization
                w = jax.lax.dynamic_index_in_dim(w, layer, 0, False)
                s = jax.lax.dynamic_index_in_dim(s, layer, 0, False)
            return dequantize(w, s, dtype)
        return self.weight[...].astype(dtype)

    def lora_delta(self, x: jax.Array) -> jax.Array | None:
        """The LoRA adapter's ``scale * (x Aᵀ) Bᵀ`` in the compute dtype, or None without one
        (``deepseek_jax.lora.add_lora`` sets ``lora_a [r, in]``, ``lora_b [out, r]``, ``lora_scale``)."""
        a = getattr(self, "lora_a", None)
        if a is None:
            return None
        dtype = self.prec.dtype
        r = jnp.einsum("...k,rk->...r", x.astype(dtype), a[...].astype(dtype), preferred_element_type=jnp.float32)
        y = jnp.einsum("...r,nr->...n", r.astype(dtype), self.lora_b[...].astype(dtype),
                       preferred_element_type=jnp.float32)
        return (y * self.lora_scale).astype(dtype)

    def __call__(self, x: jax.Array, sum_splits: bool = True):
        """``x Wᵀ`` in the compute dtype (plus a LoRA adapter's delta where one is attached).
        ``sum_splits=False``: where the W8A16 GPU kernel splits the contraction (few rows), its
        float32 partials unsummed (``kernels_pallas.SplitK``), for a consumer kernel to sum
        (``RMSNorm`` does); any other path returns the array."""
        delta = self.lora_delta(x)
        if delta is not None:
            return (self._base(x, sum_splits=True) + delta).astype(self.prec.dtype)
        return self._base(x, sum_splits)

    def _base(self, x: jax.Array, sum_splits: bool):
        dtype = self.prec.dtype
        x = x.astype(dtype)
        if self.fp8:
            w8a8 = self.prec.fp8_mode == "w8a8"
            fn = kernels_pallas.w8a8_matmul if w8a8 else kernels_pallas.w8a16_matmul
            impl = _dense_impl(self.prec, x.size // x.shape[-1])
            if self.placement is not None and kernel_mesh.uses_kernel(impl):
                return kernel_mesh.linear(fn, x, self.weight[...], self.weight_scale_inv[...], out_dtype=dtype,
                                          impl=impl, layer=self._stacked_layer(), pl=self.placement)
            return fn(x, self.weight[...], self.weight_scale_inv[...], out_dtype=dtype, impl=impl,
                      layer=self._stacked_layer(), **({} if w8a8 or sum_splits else {"sum_splits": False}))
        w = self.weight[...].astype(dtype)
        y = jnp.einsum("...k,nk->...n", x, w, preferred_element_type=jnp.float32,
                       precision=jax.lax.Precision.HIGHEST)
        return y.astype(dtype)


def grouped_matmul(w: jax.Array, scale: jax.Array | None, x_MK: jax.Array, group_sizes_E: jax.Array,
                   prec: Precision, expert_offset: jax.Array | None = None) -> jax.Array:
    """Rows of ``x`` sorted by expert times stacked ``[E, N, K]`` weights (FP8 if ``scale``); with
    ``expert_offset``, ``w`` holds more experts and group ``g`` uses ``w[expert_offset + g]``.
    FP8 weights with ``prec.fp8_mode == "w8a8"``: the rows are quantized 1x128 as well (W8A8)."""
    dtype = prec.dtype
    w = w if scale is not None else w.astype(dtype)
    return kernels_pallas.grouped_matmul(x_MK.astype(dtype), w, group_sizes_E, w_scale=scale,
                                         out_dtype=dtype, impl=prec.kernels, expert_offset=expert_offset,
                                         quantize_x=scale is not None and prec.fp8_mode == "w8a8")
