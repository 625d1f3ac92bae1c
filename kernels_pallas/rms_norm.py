"""RMSNorm, optionally after a residual add, in one GPU kernel (SPEC §2).

    h = x + residual            (in x's dtype; skipped without a residual)
    y = w · h / sqrt(mean(h²) + eps)    (float32, then ``out_dtype``)

Why a kernel: compiled for an H200, XLA runs a norm as two launches, the row's sum of squares and
then the scaled copy that the next Pallas GEMM reads; with the residual add before it, three
(``benchmarks/gpu_compile.py --by kind``). The model uses it for each decoder layer's input norm
and post-attention add + norm. At batch-1 decode that saved 7 launches per step of the 4-layer
model (170.6 → 163.6), not 12: XLA had fused ``o_proj``'s split-K partial sum into the residual
add, and before a Pallas call that sum is a launch of its own. (MLA's ``q_a_layernorm`` stays
XLA's for the same reason: its input is ``q_a_proj``'s split-K partials.)

* GPU (Triton-lowered Pallas): one row per program; the row in 1024-wide column blocks (the last
  one masked), read twice (the sum of squares, then the scaled row; the second read hits L1/L2),
  ``h`` recomputed rather than read back. Differentiable: the backward is the reference's.
* TPU and CPU: the reference (XLA's TPU compiler fuses the norm; launch overhead is a GPU cost).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import backend
from kernels_pallas._common import masked_load, next_pow2

__all__ = ["rms_norm_ref", "rms_norm"]


def _check(x, w, residual, layer):
    if x.ndim < 1 or w.shape[-1:] != x.shape[-1:] or w.ndim != 1 + (layer is not None):
        want = "[layers, D] (layer= given)" if layer is not None else "[D]"
        raise ValueError(f"rms_norm: expected a {want} weight for x {tuple(x.shape)}, got {tuple(w.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")


def _norm(h, w, eps: float, out_dtype):
    h32 = h.astype(jnp.float32)
    y = h32 * jax.lax.rsqrt(jnp.mean(h32 * h32, axis=-1, keepdims=True) + eps)
    return (w.astype(jnp.float32) * y).astype(out_dtype)


def rms_norm_ref(x, w, *, eps: float, out_dtype=None, residual=None, layer=None):
    """Plain jnp: ``norm(x)``, or with ``residual`` the pair ``(x + residual, norm(x + residual))``
    (the sum in ``x``'s dtype). ``out_dtype`` defaults to ``x``'s. ``layer``: ``w`` is a stack of
    layers' weights ``[L, D]``, this one is used."""
    _check(x, w, residual, layer)
    if layer is not None:
        w = jax.lax.dynamic_index_in_dim(w, layer, 0, False)
    out_dtype = out_dtype or x.dtype
    if residual is None:
        return _norm(x, w, eps, out_dtype)
    h = x + residual.astype(x.dtype)
    return h, _norm(h, w, eps, out_dtype)


# ---------------------------------------------------------------------------------------------------
# GPU kernel (Triton-lowered Pallas)
# ---------------------------------------------------------------------------------------------------


def _gpu_rms_kernel(*refs, d, bd, eps, has_residual):
    """One row: ``x_ref`` (and ``r_ref``) ``[M, D]``, ``w_ref`` ``[layers, D]`` with ``l_ref`` the
    layer; writes ``o_ref`` (and ``h_ref``, the sum) ``[M, D]``."""
    if has_residual:
        l_ref, x_ref, r_ref, w_ref, o_ref, h_ref = refs
    else:
        (l_ref, x_ref, w_ref, o_ref), r_ref, h_ref = refs, None, None
    from jax.experimental.pallas import triton as plgpu_triton

    row, layer = pl.program_id(0), l_ref[0]
    ragged = d % bd != 0

    def block(kb):
        """``(start, mask)`` of the ``kb``-th column block (a traced start: the last block may
        reach past ``d``, masked)."""
        k0 = kb * bd
        return k0, ((k0 + jnp.arange(bd)) < d) if ragged else None

    def h_block(k0, mask):
        h = masked_load(x_ref.at[row, pl.ds(k0, bd)], mask)
        if r_ref is not None:
            h = (h.astype(jnp.float32) + masked_load(r_ref.at[row, pl.ds(k0, bd)], mask).astype(jnp.float32)
                 ).astype(x_ref.dtype)
        return h

    def store(ref, k0, val, mask):
        if mask is None:
            plgpu_triton.store(ref.at[row, pl.ds(k0, bd)], val)
        else:
            plgpu_triton.store(ref.at[row, pl.ds(k0, bd)], val, mask=mask)

    def squares(kb, ss):
        k0, mask = block(kb)
        h = h_block(k0, mask)
        if h_ref is not None:
            store(h_ref, k0, h, mask)
        h32 = h.astype(jnp.float32)
        return ss + jnp.sum(h32 * h32)

    n_blocks = -(-d // bd)
    inv = jax.lax.rsqrt(jax.lax.fori_loop(0, n_blocks, squares, jnp.zeros((), jnp.float32)) / d + eps)

    def scaled(kb, carry):
        k0, mask = block(kb)
        w = masked_load(w_ref.at[layer, pl.ds(k0, bd)], mask).astype(jnp.float32)
        store(o_ref, k0, (w * (h_block(k0, mask).astype(jnp.float32) * inv)).astype(o_ref.dtype), mask)
        return carry

    jax.lax.fori_loop(0, n_blocks, scaled, 0)


def _gpu_call(x2, w, r2, lay, eps, out_dtype, interpret, block_d, num_warps):
    m, d = x2.shape
    bd = min(block_d, next_pow2(d))
    has_residual = r2 is not None
    out_shape = [jax.ShapeDtypeStruct((m, d), out_dtype)]
    if has_residual:
        out_shape.append(jax.ShapeDtypeStruct((m, d), x2.dtype))
    kernel = functools.partial(_gpu_rms_kernel, d=d, bd=bd, eps=eps, has_residual=has_residual)
    from jax.experimental.pallas import triton as plgpu_triton

    out = pl.pallas_call(
        kernel,
        out_shape=tuple(out_shape),
        grid=(m,),
        compiler_params=plgpu_triton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="rms_norm_gpu" if not has_residual else "add_rms_norm_gpu",
    )(*((lay, x2, r2, w) if has_residual else (lay, x2, w)))
    return (out[1], out[0]) if has_residual else out[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _rms_gpu(x2, w, r2, lay, eps, out_dtype, interpret, block_d, num_warps):
    return _gpu_call(x2, w, r2, lay, eps, out_dtype, interpret, block_d, num_warps)


def _rms_gpu_fwd(x2, w, r2, lay, eps, out_dtype, interpret, block_d, num_warps):
    return _gpu_call(x2, w, r2, lay, eps, out_dtype, interpret, block_d, num_warps), (x2, w, r2, lay)


def _rms_gpu_bwd(eps, out_dtype, interpret, block_d, num_warps, res, ct):
    """The reference's gradient (the layer index gets none)."""
    x2, w, r2, lay = res
    kw = dict(eps=eps, out_dtype=out_dtype, layer=lay[0])
    if r2 is None:
        _, vjp = jax.vjp(lambda x, w: rms_norm_ref(x, w, **kw), x2, w)
        return (*vjp(ct), None, None)
    _, vjp = jax.vjp(lambda x, w, r: rms_norm_ref(x, w, residual=r, **kw), x2, w, r2)
    return (*vjp(ct), None)


_rms_gpu.defvjp(_rms_gpu_fwd, _rms_gpu_bwd)


def rms_norm_gpu(x, w, *, eps: float, out_dtype=None, residual=None, layer=None, interpret: bool = False,
                 block_d: int = 1024, num_warps: int = 4):
    """The GPU kernel; arguments and results as :func:`rms_norm_ref` (any leading dims); the
    weight of a ``[L, D]`` stack read in place (``layer=``)."""
    _check(x, w, residual, layer)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    lead, d = x.shape[:-1], x.shape[-1]
    m = math.prod(lead)
    if m == 0:
        return rms_norm_ref(x, w, eps=eps, out_dtype=out_dtype, residual=residual, layer=layer)
    lay = jnp.reshape(jnp.asarray(0 if layer is None else layer, jnp.int32), (1,))
    w2 = w[None] if layer is None else w
    r2 = None if residual is None else residual.astype(x.dtype).reshape(m, d)
    out = _rms_gpu(x.reshape(m, d), w2, r2, lay, float(eps), out_dtype, bool(interpret), int(block_d), int(num_warps))
    if residual is None:
        return out.reshape(x.shape)
    return out[0].reshape(x.shape), out[1].reshape(x.shape)


def rms_norm(x, w, *, eps: float, out_dtype=None, residual=None, layer=None, impl: str = "auto"):
    """RMSNorm of ``x`` (``[..., D]``) by ``w`` (``[D]``, or with ``layer`` a stack ``[L, D]``),
    after adding ``residual`` if given (then ``(x + residual, norm)``); ``impl`` as in
    :mod:`kernels_pallas.backend`: the GPU kernel on GPU targets, the reference elsewhere."""
    target, interpret = backend.split_impl(impl)
    kw = dict(eps=eps, out_dtype=out_dtype, residual=residual, layer=layer)
    if target == "gpu":
        return rms_norm_gpu(x, w, interpret=interpret, **kw)
    return rms_norm_ref(x, w, **kw)
