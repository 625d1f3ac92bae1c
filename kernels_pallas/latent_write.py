"""MLA's new latent cache entries, made and written into the cache by one GPU kernel (SPEC §3, §4).

Per new token, ``kv_a_proj_with_mqa`` gives ``kv = [c_raw (L) | k_raw (R)]``; the decode cache
holds ``[c | k_pe]``:

    c    = w · c_raw / sqrt(mean(c_raw²) + eps)          (kv_a_layernorm, float32, then ``dtype``)
    k_pe = rope(k_raw, pos)                              (interleaved pairs, float32, then ``dtype``)
    cache[b, pos] = [c | k_pe]                           (positions outside the cache: dropped)

with the rope angles ``pos · inv_freq[i]`` and ``cos``/``sin`` times ``mult`` (YaRN's multiplier),
as :class:`deepseek_jax.rope.Rope` computes them. A negative position counts from the end of the
cache, as a NumPy index does (the write's index; the angle takes the position as it is).

Why a kernel: compiled for an H200, a decode step's cache write was XLA's scatter with a bounds
check (3 launches per layer at batch 1: the check, a read of the old entry, the update) after the
norm's launches and, at batch 1, one summing the ``kv_a`` GEMM's split-K partials; 4-5 launches per
layer for 576 values per token (``benchmarks/gpu_compile.py --by kind``). Here it is one: one row
per program, the GEMM's unsummed split-K partials (:class:`~kernels_pallas._common.SplitK`) summed
in the kernel, the entry stored into the cache in place (the cache is the kernel's aliased
output), the norm's weight and the cache of a scanned layer stack read at ``layer``.

* GPU (Triton-lowered Pallas): the kernel. Forward only (decode; training never writes a cache).
* TPU and CPU: the reference (XLA's TPU compiler fuses these; launch overhead is a GPU cost).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from kernels_pallas import backend
from kernels_pallas._common import SplitK, summed

__all__ = ["write_latent_ref", "write_latent"]


def _check(cache, kv, w, pos, inv_freq, layer):
    width = (kv.parts.shape[1:] if isinstance(kv, SplitK) else kv.shape)
    if cache.ndim != 3 + (layer is not None):
        want = "[layers, B, S, C] (layer= given)" if layer is not None else "[B, S, C]"
        raise ValueError(f"write_latent: expected a {want} cache, got shape {tuple(cache.shape)}")
    if len(width) != 3 or tuple(width[:2]) != tuple(pos.shape) or width[0] != cache.shape[-3]:
        raise ValueError(f"write_latent: kv [B, T, C] must match positions [B, T] and the cache's batch "
                         f"{cache.shape[-3]}; got kv {tuple(width)}, positions {tuple(pos.shape)}")
    if width[-1] != cache.shape[-1]:
        raise ValueError(f"write_latent: kv width {width[-1]} != cache entry width {cache.shape[-1]}")
    lat, rope = w.shape[-1], width[-1] - w.shape[-1]
    if w.ndim != 1 + (layer is not None) or rope <= 0 or rope % 2:
        raise ValueError(f"write_latent: norm weight {tuple(w.shape)} must be [L] ([layers, L] with layer=), "
                         f"L < entry width {width[-1]} with an even rope width")
    if tuple(inv_freq.shape) != (rope // 2,):
        raise ValueError(f"write_latent: inv_freq must be [{rope // 2}], got {tuple(inv_freq.shape)}")


def _dtype(kv, dtype):
    """The compute dtype: ``kv``'s, or for :class:`SplitK` partials ``dtype`` (float32 if None)."""
    if dtype is not None:
        return jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if isinstance(kv, SplitK) else kv.dtype


def write_latent_ref(cache, kv, w, pos, inv_freq, *, mult: float, eps: float, dtype=None, layer=None):
    """Plain jnp: ``cache`` (``[B, S, C]``, or with ``layer`` all layers' ``[layers, B, S, C]``)
    with the entries of ``kv`` (``[B, T, C]`` in the compute dtype, or a GEMM's unsummed
    :class:`SplitK` partials ``[P, B, T, C]``, summed and rounded to ``dtype``) written at ``pos``
    (``[B, T]``); ``w``: the norm's weight ``[L]`` (``[layers, L]`` with ``layer``); ``inv_freq``
    ``[R/2]``. Returns the cache (a new array; in place under jit when it is donated)."""
    _check(cache, kv, w, pos, inv_freq, layer)
    dtype = _dtype(kv, dtype)
    kv = summed(kv, dtype).astype(dtype)
    if layer is not None:
        w = jax.lax.dynamic_index_in_dim(w, layer, 0, False)
    lat = w.shape[-1]
    c32 = kv[..., :lat].astype(jnp.float32)
    c = (w.astype(jnp.float32) * (c32 * jax.lax.rsqrt(jnp.mean(c32 * c32, axis=-1, keepdims=True) + eps))
         ).astype(dtype)
    ang = pos.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    cos, sin = jnp.cos(ang) * mult, jnp.sin(ang) * mult
    k = kv[..., lat:].astype(jnp.float32).reshape(*kv.shape[:-1], -1, 2)
    k0, k1 = k[..., 0], k[..., 1]
    k_pe = jnp.stack([k0 * cos - k1 * sin, k0 * sin + k1 * cos], axis=-1).reshape(*kv.shape[:-1], -1).astype(dtype)
    new = jnp.concatenate([c, k_pe], axis=-1).astype(cache.dtype)
    if layer is not None:
        b = jnp.arange(cache.shape[1])[:, None]
        return cache.at[layer, b, pos].set(new, mode="drop")
    b = jnp.arange(cache.shape[0])[:, None]
    return cache.at[b, pos].set(new, mode="drop")


# ---------------------------------------------------------------------------------------------------
# GPU kernel (Triton-lowered Pallas)
# ---------------------------------------------------------------------------------------------------


def _gpu_kernel(l_ref, p_ref, kv_ref, w_ref, f_ref, _cache_in, cache_ref, *, t, s_len, half_l, half_r, eps,
                mult, dtype, splits):
    """One new token. Every operand's last dim is split into (pairs, 2), so that a rope pair's two
    columns are two plain loads (``[..., 0]`` and ``[..., 1]``, no strided slice): ``kv_ref``
    ``[M, C/2, 2]`` (or ``[P, M, C/2, 2]`` float32 partials), ``p_ref`` ``[M]`` positions, ``w_ref``
    ``[layers, L/2, 2]``, ``f_ref`` ``[R/2]`` inverse frequencies; stores the entry into ``cache_ref``
    ``[layers, B, S, C/2, 2]`` (aliased to the input cache)."""
    from jax.experimental.pallas import triton as plgpu_triton

    row, layer = pl.program_id(0), l_ref[0]
    b = row // t
    p = p_ref[row]
    at = jnp.where(p < 0, p + s_len, p)                  # a NumPy index; out of range: dropped
    keep = (at >= 0) & (at < s_len)
    at = jnp.clip(at, 0, s_len - 1)

    def load(start, n, j):
        """``kv``'s columns ``2 (start + i) + j`` of this row, summed over the partials, rounded
        to ``dtype``, as float32."""
        if splits is None:
            x = plgpu_triton.load(kv_ref.at[row, pl.ds(start, n), jnp.int32(j)])
        else:
            part = lambda s, acc: acc + plgpu_triton.load(kv_ref.at[s, row, pl.ds(start, n), jnp.int32(j)])  # noqa: E731
            x = jax.lax.fori_loop(0, splits, part, jnp.zeros((n,), jnp.float32))
        return x.astype(dtype).astype(jnp.float32)

    def store(start, n, j, val):
        plgpu_triton.store(cache_ref.at[layer, b, at, pl.ds(start, n), jnp.int32(j)],
                           val.astype(dtype).astype(cache_ref.dtype), mask=jnp.broadcast_to(keep, (n,)))

    c0, c1 = load(0, half_l, 0), load(0, half_l, 1)
    inv = jax.lax.rsqrt((jnp.sum(c0 * c0) + jnp.sum(c1 * c1)) / (2 * half_l) + eps)
    for j, c in ((0, c0), (1, c1)):
        w = plgpu_triton.load(w_ref.at[layer, pl.ds(0, half_l), jnp.int32(j)]).astype(jnp.float32)
        store(0, half_l, j, w * (c * inv))

    x0, x1 = load(half_l, half_r, 0), load(half_l, half_r, 1)
    ang = p.astype(jnp.float32) * plgpu_triton.load(f_ref.at[pl.ds(0, half_r)])
    cos, sin = jnp.cos(ang) * mult, jnp.sin(ang) * mult
    store(half_l, half_r, 0, x0 * cos - x1 * sin)
    store(half_l, half_r, 1, x0 * sin + x1 * cos)


def kernel_takes(cache, w) -> bool:
    """Whether the GPU kernel writes this cache: ``L/2`` and ``R/2`` powers of two (DeepSeek-V3:
    256 and 32); other widths take the reference."""
    lat, rope = w.shape[-1], cache.shape[-1] - w.shape[-1]
    pow2 = lambda n: n >= 1 and n & (n - 1) == 0  # noqa: E731
    return lat % 2 == 0 and rope % 2 == 0 and pow2(lat // 2) and pow2(rope // 2)


def write_latent_gpu(cache, kv, w, pos, inv_freq, *, mult: float, eps: float, dtype=None, layer=None,
                     interpret: bool = False, num_warps: int = 4):
    """The GPU kernel; arguments and result as :func:`write_latent_ref` (``L/2`` and ``R/2`` powers
    of two, see :func:`kernel_takes`). The cache is the kernel's aliased output: under jit with the
    cache donated (or in a loop carrying it) it is updated in place."""
    _check(cache, kv, w, pos, inv_freq, layer)
    if not kernel_takes(cache, w):
        raise ValueError(f"write_latent_gpu: latent {w.shape[-1]} and rope {cache.shape[-1] - w.shape[-1]} widths "
                         f"must be twice powers of two")
    dtype = _dtype(kv, dtype)
    stacked = layer is not None
    c4 = cache if stacked else cache[None]
    w2 = w if stacked else w[None]
    bsz, t = pos.shape
    m = bsz * t
    if m == 0:
        return cache
    width, lat = c4.shape[-1], w2.shape[-1]
    pairs = lambda a: a.reshape(*a.shape[:-1], a.shape[-1] // 2, 2)  # noqa: E731  (a bitcast)
    if isinstance(kv, SplitK):
        kv2, splits = kv.parts.astype(jnp.float32).reshape(kv.parts.shape[0], m, width), kv.parts.shape[0]
    else:
        kv2, splits = kv.reshape(m, width), None
    lay = jnp.reshape(jnp.asarray(0 if layer is None else layer, jnp.int32), (1,))
    kernel = functools.partial(_gpu_kernel, t=t, s_len=c4.shape[2], half_l=lat // 2, half_r=(width - lat) // 2,
                               eps=float(eps), mult=float(mult), dtype=dtype, splits=splits)
    from jax.experimental.pallas import triton as plgpu_triton

    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(pairs(c4).shape, c4.dtype),
        grid=(m,),
        input_output_aliases={5: 0},
        compiler_params=plgpu_triton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="write_latent_gpu",
    )(lay, pos.reshape(m).astype(jnp.int32), pairs(kv2), pairs(w2), jnp.asarray(inv_freq, jnp.float32), pairs(c4))
    out = out.reshape(c4.shape)
    return out if stacked else out[0]


def write_latent(cache, kv, w, pos, inv_freq, *, mult: float, eps: float, dtype=None, layer=None,
                 impl: str = "auto"):
    """Makes the new tokens' latent cache entries from ``kv_a_proj_with_mqa``'s output and writes
    them into ``cache`` at ``pos`` (see the module doc and :func:`write_latent_ref`); ``impl`` as in
    :mod:`kernels_pallas.backend`: the GPU kernel on GPU targets, the reference elsewhere."""
    target, interpret = backend.split_impl(impl)
    kw = dict(mult=mult, eps=eps, dtype=dtype, layer=layer)
    inv_freq = np.asarray(inv_freq, np.float32) if not isinstance(inv_freq, jax.Array) else inv_freq
    if target == "gpu" and kernel_takes(cache, w):
        return write_latent_gpu(cache, kv, w, pos, inv_freq, interpret=interpret, **kw)
    return write_latent_ref(cache, kv, w, pos, inv_freq, **kw)
