"""Pallas kernels for deepseek_jax (block-scaled FP8 GEMM, grouped expert GEMM, MLA decode and its
absorbed products, flash attention for prefill (and its blocked jnp form), the MoE router's selection, RMSNorm with a residual add, MLA's cache entries).

Self-contained: imports jax only, never ``deepseek_jax``.  Every kernel entry point (``w8a16_matmul``,
``grouped_matmul``, ``mla_decode``, ...) has a plain-jnp ``_ref`` with the same signature and takes
``impl=`` ("auto" | "ref" | "pallas" | "pallas_gpu" | "pallas_tpu" | "interpret" | "interpret_gpu" |
"interpret_tpu"; see :mod:`kernels_pallas.backend`); the helpers exported beside them, such as
``quantize_act_1x128``, do not.
"""

from kernels_pallas._common import SplitK
from kernels_pallas.backend import default_impl, resolve_impl
from kernels_pallas.blocked_attention import cached_attention_blocked
from kernels_pallas.flash_prefill import (cached_attention, cached_attention_ref, causal_attention,
                                          causal_attention_ref)
from kernels_pallas.fp8_gemm import (fake_quantize_act_1x128, quantize_act_1x128, w8a8_matmul, w8a8_matmul_ref,
                                     w8a16_matmul, w8a16_matmul_ref)
from kernels_pallas.grouped_gemm import grouped_matmul, grouped_matmul_ref
from kernels_pallas.latent_write import store_latent, store_latent_ref, write_latent, write_latent_ref
from kernels_pallas.mla_absorb import mla_absorb, mla_absorb_ref
from kernels_pallas.mla_decode import mla_decode, mla_decode_ref
from kernels_pallas.moe_router import moe_route, moe_route_ref
from kernels_pallas.rms_norm import rms_norm, rms_norm_ref

__all__ = [
    "SplitK",
    "default_impl",
    "resolve_impl",
    "quantize_act_1x128",
    "fake_quantize_act_1x128",
    "w8a16_matmul_ref",
    "w8a8_matmul_ref",
    "w8a16_matmul",
    "w8a8_matmul",
    "grouped_matmul_ref",
    "grouped_matmul",
    "mla_absorb_ref",
    "mla_absorb",
    "mla_decode_ref",
    "mla_decode",
    "moe_route_ref",
    "moe_route",
    "rms_norm_ref",
    "rms_norm",
    "cached_attention_ref",
    "cached_attention_blocked",
    "cached_attention",
    "causal_attention_ref",
    "causal_attention",
    "write_latent_ref",
    "write_latent",
    "store_latent_ref",
    "store_latent",
]
