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

:func:`store_latent` writes entries already made (a TPU decode step's, or a prefill's): XLA's
scatter, or on a TPU a kernel that writes into the cache in the layout a TPU keeps it in (see
:func:`store_latent_tpu`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from kernels_pallas import backend
from kernels_pallas._common import SplitK, summed

__all__ = ["write_latent_ref", "write_latent", "store_latent_ref", "store_latent"]


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
    return store_latent_ref(cache, jnp.concatenate([c, k_pe], axis=-1), pos, layer=layer)


# ---------------------------------------------------------------------------------------------------
# Finished entries into the cache: XLA's scatter, or on a TPU a kernel over the cache as a TPU stores it
# ---------------------------------------------------------------------------------------------------


def _check_store(cache, new, pos, layer):
    if cache.ndim != 3 + (layer is not None):
        want = "[layers, B, S, C] (layer= given)" if layer is not None else "[B, S, C]"
        raise ValueError(f"store_latent: expected a {want} cache, got shape {tuple(cache.shape)}")
    if new.ndim != 3 or tuple(new.shape[:2]) != tuple(pos.shape) or new.shape[0] != cache.shape[-3] \
            or new.shape[2] != cache.shape[-1]:
        raise ValueError(f"store_latent: entries [B, T, C] must match positions [B, T] and the cache's "
                         f"batch and width; got entries {tuple(new.shape)}, positions {tuple(pos.shape)}, cache "
                         f"{tuple(cache.shape)}")


def store_latent_ref(cache, new, pos, *, layer=None):
    """``cache`` (``[B, S, C]``, or with ``layer`` all layers' ``[layers, B, S, C]``) with the
    entries ``new`` ``[B, T, C]`` written at positions ``pos`` ``[B, T]`` (a negative position
    counts from the end, as a NumPy index; one out of range is dropped): XLA's scatter."""
    _check_store(cache, new, pos, layer)
    new = new.astype(cache.dtype)
    if layer is not None:
        b = jnp.arange(cache.shape[1])[:, None]
        return cache.at[layer, b, pos].set(new, mode="drop")
    b = jnp.arange(cache.shape[0])[:, None]
    return cache.at[b, pos].set(new, mode="drop")


def _tpu_store_kernel(p_ref, _l_ref, new_ref, cache_in, cache_ref, *, s_len, bt):
    """One sequence's entry ``new_ref`` ``[C, 1]`` into its cache block ``[C, bt]`` (the cache
    transposed, tokens along the lanes; the output block aliases the input's)."""
    p = p_ref[pl.program_id(0)]
    at = jnp.where(p < 0, p + s_len, p)
    keep = (at >= 0) & (at < s_len)
    lane = jax.lax.broadcasted_iota(jnp.int32, (1, bt), 1)
    hit = (lane == jnp.clip(at, 0, s_len - 1) % bt) & keep
    cache_ref[...] = jnp.where(hit, new_ref[...].astype(cache_ref.dtype), cache_in[...])


#: lanes of one TPU vector register: the narrowest cache block the TPU kernel can write
_LANES = 128
#: the largest whole-row block (``[C, S]``) the TPU kernel takes where S is not a multiple of 128
_MAX_ROW_BLOCK_BYTES = 4 << 20


def tpu_store_block(s_len: int, width: int, itemsize: int) -> int | None:
    """Tokens per block of the TPU store kernel for an ``S``-token cache: 128 where they divide
    ``S``, else the whole row ``S`` (a block dimension must be a multiple of 128 or the whole
    dimension) while it is at most 4 MiB; None beyond (XLA's scatter writes such a cache)."""
    if s_len % _LANES == 0:
        return _LANES
    return s_len if s_len * width * itemsize <= _MAX_ROW_BLOCK_BYTES else None


def store_latent_tpu(cache, new, pos, *, layer=None, interpret: bool = False):
    """The TPU kernel; arguments and result as :func:`store_latent_ref`.

    A TPU stores the cache ``[.., S, C]`` transposed (its default layout for an array whose minor
    dimension, C = 576, is not a multiple of 128, puts S minor), and ``kernels_pallas.mla_decode``
    reads it that way. XLA's TPU scatter instead wants the written window (C) minor: a scatter
    into the cache made XLA transpose the whole stacked cache around every layer's write. Here
    each sequence's entry goes into the ``[C, 128]`` block of the transposed view that holds its
    position, read, patched and written back in place (the cache is the aliased output): 147 KB
    read and written per sequence and token at C = 576 in bfloat16, where the transposes moved
    the whole cache."""
    from jax.experimental.pallas import tpu as pltpu

    _check_store(cache, new, pos, layer)
    stacked = layer is not None
    c4 = cache if stacked else cache[None]
    s_len, width = c4.shape[2], c4.shape[3]
    bt = tpu_store_block(s_len, width, c4.dtype.itemsize)
    if bt is None:
        raise ValueError(f"store_latent_tpu: a {s_len}-token cache (not a multiple of {_LANES}) with "
                         f"{width * c4.dtype.itemsize}-byte entries is too big for one block")
    lay = jnp.reshape(jnp.asarray(0 if layer is None else layer, jnp.int32), (1,))

    def block(b, p_ref, l_ref):
        p = p_ref[b]
        at = jnp.clip(jnp.where(p < 0, p + s_len, p), 0, s_len - 1)
        return l_ref[0], b, 0, at // bt

    call = pl.pallas_call(
        functools.partial(_tpu_store_kernel, s_len=s_len, bt=bt),
        out_shape=jax.ShapeDtypeStruct((*c4.shape[:2], width, s_len), c4.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(c4.shape[1],),
            in_specs=[pl.BlockSpec((None, width, 1), lambda b, p_ref, l_ref: (b, 0, 0)),
                      pl.BlockSpec((None, None, width, bt), block)],
            out_specs=pl.BlockSpec((None, None, width, bt), block),
        ),
        input_output_aliases={3: 0},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=backend.tpu_interpret_arg(interpret),
        name="store_latent_tpu",
    )
    c_t = jnp.swapaxes(c4, -1, -2)   # free on a TPU: the layout it already has
    for t in range(pos.shape[1]):    # T new tokens per row (decode: 1); one call each
        c_t = call(pos[:, t].astype(jnp.int32), lay, new[:, t, :, None], c_t)
    out = jnp.swapaxes(c_t, -1, -2)
    return out if stacked else out[0]


def store_latent(cache, new, pos, *, layer=None, impl: str = "auto"):
    """Writes finished entries ``new`` ``[B, T, C]`` into ``cache`` at ``pos`` (see
    :func:`store_latent_ref`); ``impl`` as in :mod:`kernels_pallas.backend`: the TPU kernel on TPU
    targets (:func:`store_latent_tpu`; a cache whose length is not a multiple of 128 and whose rows
    are over 4 MiB takes the scatter), XLA's scatter elsewhere."""
    target, interpret = backend.split_impl(impl)
    if target == "tpu" and tpu_store_block(cache.shape[-2], cache.shape[-1], cache.dtype.itemsize):
        return store_latent_tpu(cache, new, pos, layer=layer, interpret=interpret)
    return store_latent_ref(cache, new, pos, layer=layer)


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
