"""RMSNorm, optionally after a residual add, in one GPU kernel (SPEC §2).

    h = x + residual            (in x's dtype; skipped without a residual)
    y = w · h / sqrt(mean(h²) + eps)    (float32, then ``out_dtype``)

Why a kernel: compiled for an H200, XLA runs a norm as two launches, the row's sum of squares and
then the scaled copy that the next Pallas GEMM reads; with the residual add before it, three
(``benchmarks/gpu_compile.py --by kind``). The model uses it for each decoder layer's input norm,
MLA's ``q_a_layernorm`` and the post-attention add + norm. At batch-1 decode the GEMMs before two
of them split K, and XLA had fused their partial sums into the norm's first op; in front of a
Pallas call a sum is a launch of its own. So the kernel also takes a GEMM's unsummed split-K
partials (:class:`~kernels_pallas._common.SplitK`, from ``w8a16_matmul(..., sum_splits=False)``)
as ``x`` or as the residual and sums them itself. For the 4-layer model at batch 1: 170.6 → 152.5
launches per step (163.6 with the norms but the sums still XLA's).

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
from kernels_pallas._common import SplitK, masked_load, next_pow2, summed

__all__ = ["rms_norm_ref", "rms_norm"]


def _shape(a):
    return tuple(a.parts.shape[1:]) if isinstance(a, SplitK) else tuple(a.shape)


def _check(x, w, residual, layer):
    xs = _shape(x)
    if len(xs) < 1 or w.shape[-1:] != xs[-1:] or w.ndim != 1 + (layer is not None):
        want = "[layers, D] (layer= given)" if layer is not None else "[D]"
        raise ValueError(f"rms_norm: expected a {want} weight for x {xs}, got {tuple(w.shape)}")
    if residual is not None and _shape(residual) != xs:
        raise ValueError(f"rms_norm: residual shape {_shape(residual)} != x shape {xs}")


def _x_dtype(x, out_dtype):
    """``x``'s dtype; a :class:`SplitK` ``x`` is summed and rounded to ``out_dtype`` (float32 if
    None), as the GEMM it comes from would have returned it."""
    return jnp.dtype(out_dtype or jnp.float32) if isinstance(x, SplitK) else x.dtype


def _norm(h, w, eps: float, out_dtype):
    h32 = h.astype(jnp.float32)
    y = h32 * jax.lax.rsqrt(jnp.mean(h32 * h32, axis=-1, keepdims=True) + eps)
    return (w.astype(jnp.float32) * y).astype(out_dtype)


def rms_norm_ref(x, w, *, eps: float, out_dtype=None, residual=None, layer=None):
    """Plain jnp: ``norm(x)``, or with ``residual`` the pair ``(x + residual, norm(x + residual))``
    (the sum in ``x``'s dtype). ``out_dtype`` defaults to ``x``'s. ``layer``: ``w`` is a stack of
    layers' weights ``[L, D]``, this one is used. ``x`` or ``residual`` may be a GEMM's unsummed
    split-K partials (:class:`~kernels_pallas._common.SplitK`): summed and rounded to the dtype the
    GEMM would have returned (``out_dtype`` for ``x``, ``x``'s dtype for ``residual``)."""
    _check(x, w, residual, layer)
    if layer is not None:
        w = jax.lax.dynamic_index_in_dim(w, layer, 0, False)
    x = summed(x, _x_dtype(x, out_dtype))
    out_dtype = out_dtype or x.dtype
    if residual is None:
        return _norm(x, w, eps, out_dtype)
    h = x + summed(residual, x.dtype).astype(x.dtype)
    return h, _norm(h, w, eps, out_dtype)


# ---------------------------------------------------------------------------------------------------
# GPU kernel (Triton-lowered Pallas)
# ---------------------------------------------------------------------------------------------------


def _gpu_rms_kernel(*refs, d, bd, eps, has_residual, x_splits, r_splits, xdt):
    """One row: ``x_ref`` (and ``r_ref``) ``[M, D]``, or ``[S, M, D]`` float32 split-K partials
    (``x_splits`` / ``r_splits`` = S) summed here; ``w_ref`` ``[layers, D]`` with ``l_ref`` the
    layer; writes ``o_ref`` (and ``h_ref``, the sum) ``[M, D]``. ``xdt``: ``x``'s dtype."""
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

    def load(ref, splits, k0, mask):
        if splits is None:
            return masked_load(ref.at[row, pl.ds(k0, bd)], mask)
        part = lambda s, acc: acc + masked_load(ref.at[s, row, pl.ds(k0, bd)], mask).astype(jnp.float32)  # noqa: E731
        return jax.lax.fori_loop(0, splits, part, jnp.zeros((bd,), jnp.float32)).astype(xdt)

    def h_block(k0, mask):
        h = load(x_ref, x_splits, k0, mask)
        if r_ref is not None:
            h = (h.astype(jnp.float32) + load(r_ref, r_splits, k0, mask).astype(xdt).astype(jnp.float32)
                 ).astype(xdt)
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


def _splits(a):
    return a.shape[0] if a is not None and a.ndim == 3 else None


def _gpu_call(x2, w, r2, lay, eps, out_dtype, xdt, interpret, block_d, num_warps):
    """``x2`` / ``r2``: ``[M, D]``, or ``[S, M, D]`` float32 partials."""
    m, d = x2.shape[-2:]
    bd = min(block_d, next_pow2(d))
    has_residual = r2 is not None
    out_shape = [jax.ShapeDtypeStruct((m, d), out_dtype)]
    if has_residual:
        out_shape.append(jax.ShapeDtypeStruct((m, d), xdt))
    kernel = functools.partial(_gpu_rms_kernel, d=d, bd=bd, eps=eps, has_residual=has_residual,
                               x_splits=_splits(x2), r_splits=_splits(r2), xdt=xdt)
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


def _wrap(a):
    """A 3-D operand of the kernel is split-K partials."""
    return SplitK(a) if a is not None and a.ndim == 3 else a


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def _rms_gpu(x2, w, r2, lay, eps, out_dtype, xdt, interpret, block_d, num_warps):
    return _gpu_call(x2, w, r2, lay, eps, out_dtype, xdt, interpret, block_d, num_warps)


def _rms_gpu_fwd(x2, w, r2, lay, eps, out_dtype, xdt, interpret, block_d, num_warps):
    return _gpu_call(x2, w, r2, lay, eps, out_dtype, xdt, interpret, block_d, num_warps), (x2, w, r2, lay)


def _rms_gpu_bwd(eps, out_dtype, xdt, interpret, block_d, num_warps, res, ct):
    """The reference's gradient (the layer index gets none)."""
    x2, w, r2, lay = res
    kw = dict(eps=eps, out_dtype=out_dtype, layer=lay[0])
    if r2 is None:
        _, vjp = jax.vjp(lambda x, w: rms_norm_ref(_wrap(x), w, **kw), x2, w)
        return (*vjp(ct), None, None)
    _, vjp = jax.vjp(lambda x, w, r: rms_norm_ref(_wrap(x), w, residual=_wrap(r), **kw), x2, w, r2)
    return (*vjp(ct), None)


_rms_gpu.defvjp(_rms_gpu_fwd, _rms_gpu_bwd)


def rms_norm_gpu(x, w, *, eps: float, out_dtype=None, residual=None, layer=None, interpret: bool = False,
                 block_d: int = 1024, num_warps: int = 4):
    """The GPU kernel; arguments and results as :func:`rms_norm_ref` (any leading dims); the
    weight of a ``[L, D]`` stack read in place (``layer=``), split-K partials summed in the kernel."""
    _check(x, w, residual, layer)
    xdt = _x_dtype(x, out_dtype)
    out_dtype = jnp.dtype(out_dtype or xdt)
    shape = _shape(x)
    lead, d = shape[:-1], shape[-1]
    m = math.prod(lead)
    if m == 0:
        return rms_norm_ref(x, w, eps=eps, out_dtype=out_dtype, residual=residual, layer=layer)

    def rows(a, dtype):
        if a is None:
            return None
        if isinstance(a, SplitK):
            return a.parts.astype(jnp.float32).reshape(a.parts.shape[0], m, d)
        return a.astype(dtype).reshape(m, d)

    lay = jnp.reshape(jnp.asarray(0 if layer is None else layer, jnp.int32), (1,))
    w2 = w[None] if layer is None else w
    out = _rms_gpu(rows(x, xdt), w2, rows(residual, xdt), lay, float(eps), out_dtype, xdt, bool(interpret),
                   int(block_d), int(num_warps))
    if residual is None:
        return out.reshape(shape)
    return out[0].reshape(shape), out[1].reshape(shape)


def rms_norm(x, w, *, eps: float, out_dtype=None, residual=None, layer=None, impl: str = "auto"):
    """RMSNorm of ``x`` (``[..., D]``) by ``w`` (``[D]``, or with ``layer`` a stack ``[L, D]``),
    after adding ``residual`` if given (then ``(x + residual, norm)``); ``impl`` as in
    :mod:`kernels_pallas.backend`: the GPU kernel on GPU targets, the reference elsewhere."""
    target, interpret = backend.split_impl(impl)
    kw = dict(eps=eps, out_dtype=out_dtype, residual=residual, layer=layer)
    if target == "gpu":
        return rms_norm_gpu(x, w, interpret=interpret, **kw)
    return rms_norm_ref(x, w, **kw)
