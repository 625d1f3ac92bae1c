"""The MoE router's ``noaux_tc`` selection (SPEC §5) on float32 router logits, in one GPU kernel.

Per token: ``s = sigmoid(logits)``, ``sb = s + bias`` (selection only); group score = sum of the
top 2 ``sb`` of each of ``n_group`` groups of consecutive experts; the ``topk_group`` best groups
are kept (ties to the lower group index), the other experts get -inf; the ``top_k`` experts by
``sb`` among the kept (ties to the lower index, as ``lax.top_k``); weights ``s`` at those
indices, divided by their sum if ``norm_topk_prob``, times ``scaling``. Returns
``(idx [T, K] int32, weight [T, K] float32, s [T, E] float32)``.

Why a kernel: compiled for an H200, XLA ran the selection as 8 launches after the logits' dot
(two ``top_k`` custom fusions, a reduce, selects, a slice, multiplies), for a few KB of data
per token: at decode the router was 9 launches per MoE layer. With the kernel: the dot, the
kernel, and (outside the router scope) the layer's bias sliced from the scanned stack, which XLA
had fused into its own ops (a 1 KB copy): 59 → 53 launches per MoE layer at batch 1.

* GPU (Triton-lowered Pallas): grid over tiles of ``block_t`` rows (default one row per
  program, one warp: every reduction stays within a warp, no shared memory or barrier; 16 rows
  on 4 warps spilled registers for E=256 and took 10 s to compile); each program loads its
  ``[bt, E]`` logits (rows masked on the last tile) and the bias, and does everything in
  registers: per group (a static loop, an ``expert // (E / n_group) == g`` lane mask) the max,
  the index of its first occurrence, then the max without it; each group's rank among the
  group scores; ``top_k`` rounds of argmax (first index of the max) over the kept lanes, the
  unbiased score gathered by a masked sum. Indices and weights are stored column by column, so
  ``top_k`` need not be a power of two; ``E`` must be (Triton's block shapes; DeepSeek-V3: 256),
  other expert counts take the reference. Differentiable: the backward is the reference's
  (weights and scores as functions of the logits at the kernel's indices).
* TPU and CPU: the reference. No TPU kernel: XLA's TPU compiler fuses these elementwise ops and
  reductions, and the launch overhead a kernel saves here is a GPU cost.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu_triton

from kernels_pallas import backend
from kernels_pallas._common import cdiv, masked_load, next_pow2

__all__ = ["moe_route_ref", "moe_route_gpu", "moe_route", "top_k_mask"]

#: added to the chosen scores' sum before normalising, as HF does (DeepSeek's reference adds
#: nothing): it changes no sum of float32 scores, but sigmoid(logits <= -88) is 0 in XLA and 0/0
#: would make the token's hidden state NaN
_TINY = 1e-20


class _Opts(NamedTuple):
    n_group: int
    topk_group: int
    top_k: int
    norm_topk_prob: bool
    scaling: float


def _check(logits_TE, bias_E, o: _Opts, layer=None) -> None:
    if logits_TE.ndim != 2:
        raise ValueError(f"moe_route: logits must be [tokens, experts], got shape {tuple(logits_TE.shape)}")
    E = logits_TE.shape[1]
    if bias_E.ndim != 1 + (layer is not None) or bias_E.shape[-1] != E:
        want = f"[layers, {E}] (layer= given)" if layer is not None else f"({E},)"
        raise ValueError(f"moe_route: bias shape {tuple(bias_E.shape)}, expected {want} for logits "
                         f"{tuple(logits_TE.shape)}")
    if o.n_group < 1 or E % o.n_group:
        raise ValueError(f"moe_route: n_group={o.n_group} does not divide the {E} experts")
    if E // o.n_group < 2:
        raise ValueError(f"moe_route: groups of {E // o.n_group} expert(s); the group score needs >= 2")
    if not 1 <= o.topk_group <= o.n_group:
        raise ValueError(f"moe_route: topk_group={o.topk_group} not in [1, n_group={o.n_group}]")
    if not 1 <= o.top_k <= E:
        raise ValueError(f"moe_route: top_k={o.top_k} not in [1, {E} experts]")
    if o.top_k > o.topk_group * (E // o.n_group):
        raise ValueError(f"moe_route: top_k={o.top_k} exceeds the {o.topk_group * (E // o.n_group)} experts "
                         f"of the {o.topk_group} kept groups")


def top_k_mask(x_TG: jax.Array, k: int) -> jax.Array:
    """``[T, G]`` bool: the entries ``lax.top_k(x, k)`` picks (ties to the lower index), by rank:
    ``g`` is kept when fewer than ``k`` entries come before it. Elementwise compares and one sum,
    which XLA fuses with their neighbours; ``top_k`` and a scatter of its indices are two more GPU
    kernels per MoE layer at decode."""
    g = jnp.arange(x_TG.shape[-1])
    before = (x_TG[:, None, :] > x_TG[:, :, None]) | ((x_TG[:, None, :] == x_TG[:, :, None])
                                                      & (g[None, :] < g[:, None]))
    return jnp.sum(before, axis=-1) < k


def _weights(logits_TE, idx_TK, o: _Opts):
    """``(weight [T, K], s [T, E])``: the differentiable part, given the chosen experts."""
    s = jax.nn.sigmoid(logits_TE.astype(jnp.float32))
    w = jnp.take_along_axis(s, idx_TK, axis=1)
    if o.norm_topk_prob:   # + 1e-20 as HF: scores that underflow to 0 give weights 0, not 0/0
        w = w / (jnp.sum(w, axis=-1, keepdims=True) + _TINY)
    return w * o.scaling, s


def _route_ref(logits_TE, bias_E, o: _Opts):
    T, E = logits_TE.shape
    G = o.n_group
    s = jax.nn.sigmoid(logits_TE.astype(jnp.float32))
    sb = s + bias_E.astype(jnp.float32)
    group_score_TG = jnp.sum(lax.top_k(sb.reshape(T, G, E // G), 2)[0], axis=-1)
    keep_TE = jnp.repeat(top_k_mask(group_score_TG, o.topk_group), E // G, axis=1)
    _, idx = lax.top_k(jnp.where(keep_TE, sb, -jnp.inf), o.top_k)
    idx = idx.astype(jnp.int32)
    return (idx, *_weights(logits_TE, idx, o))


def moe_route_ref(logits_TE, bias_E, *, n_group: int, topk_group: int, top_k: int, norm_topk_prob: bool,
                  scaling: float, layer=None):
    """Plain-jnp reference (see the module doc): ``(idx [T, K] int32, weight [T, K] float32,
    scores [T, E] float32)``. ``layer``: ``bias_E`` is a stack of layers' biases ``[L, E]``, this
    one is used."""
    o = _Opts(n_group, topk_group, top_k, bool(norm_topk_prob), float(scaling))
    _check(logits_TE, bias_E, o, layer)
    if layer is not None:
        bias_E = lax.dynamic_index_in_dim(bias_E, layer, 0, False)
    return _route_ref(logits_TE, bias_E, o)


# ---------------------------------------------------------------------------------------------------
# GPU kernel (Triton-lowered Pallas)
# ---------------------------------------------------------------------------------------------------


def _gpu_route_kernel(l_ref, x_ref, b_ref, idx_ref, w_ref, s_ref, *, t, bt, o: _Opts):
    """Rows ``i * bt ...`` of ``x_ref`` ``[T, E]`` logits, ``b_ref`` ``[layers, E]`` biases (layer
    ``l_ref[0]``'s used); writes
    ``idx_ref`` / ``w_ref`` ``[T, K]`` and ``s_ref`` ``[T, E]``."""
    E = x_ref.shape[1]
    per = E // o.n_group
    row0 = pl.program_id(0) * bt
    rows_ok = (row0 + jnp.arange(bt) < t)[:, None] if t % bt else None   # [bt, 1]; None: a whole tile
    x = masked_load(x_ref.at[pl.ds(row0, bt), :], rows_ok)
    s = jax.nn.sigmoid(x.astype(jnp.float32))
    sb = s + plgpu_triton.load(b_ref.at[pl.ds(l_ref[0], 1), :]).astype(jnp.float32)
    col = lax.broadcasted_iota(jnp.int32, (bt, E), 1)
    group = col // per
    neg = jnp.float32(-jnp.inf)

    # each group's score: its largest sb plus the largest of the rest (top-2 sum, ties counted)
    scores = []
    for g in range(o.n_group):
        v = jnp.where(group == g, sb, neg)
        first = jnp.argmax(v, axis=1).astype(jnp.int32)
        rest = jnp.where(col == first[:, None], neg, v)
        scores.append(jnp.max(v, axis=1) + jnp.max(rest, axis=1))
    # group g is kept when fewer than topk_group groups rank before it (higher, or equal and lower)
    keep = jnp.zeros((bt, E), jnp.bool_)
    for g in range(o.n_group):
        before = jnp.zeros((bt,), jnp.int32)
        for h in range(o.n_group):
            if h != g:
                ahead = (scores[h] >= scores[g]) if h < g else (scores[h] > scores[g])
                before = before + ahead.astype(jnp.int32)
        keep = keep | ((group == g) & (before < o.topk_group)[:, None])
    cand = jnp.where(keep, sb, neg)

    # top_k rounds: the first index of the max, its unbiased score, then that lane removed
    idx, w = [], []
    for _ in range(o.top_k):
        i = jnp.argmax(cand, axis=1).astype(jnp.int32)
        hit = col == i[:, None]
        idx.append(i)
        w.append(jnp.sum(jnp.where(hit, s, 0.0), axis=1))
        cand = jnp.where(hit, neg, cand)
    if o.norm_topk_prob:
        total = sum(w[1:], w[0]) + _TINY
        w = [wk / total for wk in w]

    def store(ref, val, mask):
        if mask is None:
            plgpu_triton.store(ref, val)
        else:
            plgpu_triton.store(ref, val, mask=mask)

    store(s_ref.at[pl.ds(row0, bt), :], s, rows_ok)
    for k in range(o.top_k):   # column by column: K need not be a power of two
        store(idx_ref.at[pl.ds(row0, bt), pl.ds(k, 1)], idx[k][:, None], rows_ok)
        store(w_ref.at[pl.ds(row0, bt), pl.ds(k, 1)], (w[k] * o.scaling)[:, None], rows_ok)


def _gpu_call(logits_TE, bias_LE, lay, o: _Opts, interpret: bool, block_t: int, num_warps: int):
    T, E = logits_TE.shape
    K = o.top_k
    bt = max(1, min(block_t, next_pow2(T)))
    kernel = functools.partial(_gpu_route_kernel, t=T, bt=bt, o=o)
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct((T, K), jnp.int32), jax.ShapeDtypeStruct((T, K), jnp.float32),
                   jax.ShapeDtypeStruct((T, E), jnp.float32)),
        grid=(cdiv(T, bt),),
        compiler_params=plgpu_triton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="moe_route_gpu",
    )(lay, logits_TE, bias_LE)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _route_gpu(logits_TE, bias_LE, lay, o, interpret, block_t, num_warps):
    return _gpu_call(logits_TE, bias_LE, lay, o, interpret, block_t, num_warps)


def _route_gpu_fwd(logits_TE, bias_LE, lay, o, interpret, block_t, num_warps):
    out = _gpu_call(logits_TE, bias_LE, lay, o, interpret, block_t, num_warps)
    return out, (logits_TE, bias_LE, out[0])


def _route_gpu_bwd(o, interpret, block_t, num_warps, res, ct):
    """The reference's gradient at the kernel's indices (the bias steers selection only)."""
    logits_TE, bias_LE, idx_TK = res
    _, vjp = jax.vjp(lambda x: _weights(x, idx_TK, o), logits_TE)
    return vjp((ct[1], ct[2]))[0], jnp.zeros_like(bias_LE), None


_route_gpu.defvjp(_route_gpu_fwd, _route_gpu_bwd)


def gpu_takes(E: int) -> bool:
    """Whether the GPU kernel routes over ``E`` experts (a power of two: Triton's block shapes)."""
    return E >= 2 and E & (E - 1) == 0


def moe_route_gpu(logits_TE, bias_E, *, n_group: int, topk_group: int, top_k: int, norm_topk_prob: bool,
                  scaling: float, layer=None, interpret: bool = False, block_t: int = 1, num_warps: int = 1):
    """The GPU kernel (see the module doc); arguments as :func:`moe_route_ref` (a layer's bias of
    a stack read in place). ``block_t``: rows per program (clipped to the next power of two of ``T``)."""
    o = _Opts(n_group, topk_group, top_k, bool(norm_topk_prob), float(scaling))
    _check(logits_TE, bias_E, o, layer)
    T, E = logits_TE.shape
    if not gpu_takes(E):
        raise ValueError(f"moe_route_gpu: {E} experts is not a power of two (moe_route takes the reference)")
    if block_t < 1 or block_t & (block_t - 1):
        raise ValueError(f"moe_route_gpu: block_t={block_t} must be a power of two")
    if T == 0:
        return (jnp.zeros((0, top_k), jnp.int32), jnp.zeros((0, top_k), jnp.float32), jnp.zeros((0, E), jnp.float32))
    lay = jnp.reshape(jnp.asarray(0 if layer is None else layer, jnp.int32), (1,))
    bias_LE = bias_E[None] if layer is None else bias_E
    return _route_gpu(logits_TE, bias_LE, lay, o, bool(interpret), int(block_t), int(num_warps))


def moe_route(logits_TE, bias_E, *, n_group: int, topk_group: int, top_k: int, norm_topk_prob: bool,
              scaling: float, layer=None, impl: str = "auto"):
    """The noaux_tc routing of ``logits_TE`` ``[T, E]`` (see the module doc); ``impl`` as in
    :mod:`kernels_pallas.backend`: the GPU kernel on GPU targets (``E`` a power of two), the
    reference on TPU and CPU."""
    kw = dict(n_group=n_group, topk_group=topk_group, top_k=top_k, norm_topk_prob=norm_topk_prob, scaling=scaling,
              layer=layer)
    target, interpret = backend.split_impl(impl)
    if target == "gpu" and gpu_takes(logits_TE.shape[-1]):
        return moe_route_gpu(logits_TE, bias_E, interpret=interpret, **kw)
    return moe_route_ref(logits_TE, bias_E, **kw)
