"""Pallas kernel calls on a device mesh: each in a ``jax.shard_map`` over its operands' shards.

XLA's partitioner (GSPMD) cannot split a Pallas call. On TPUs it refuses to compile one on a
mesh of more than one chip ("Mosaic kernels cannot be automatically partitioned"); on GPUs it
all-gathers the call's operands, so every device gathers the whole weight of a tensor-parallel
linear at every step. Compiled with ``kernels_pallas.aot`` for 4 chips of a TPU v5p, the
real-width model failed on every mesh (``data=4``, ``expert=4``, ``model=4``); for 4 H200s with
``model=4`` its decode step held 112 all-gathers.

So when :func:`deepseek_jax.sharding.attach_mesh` has given a module a :class:`Placement`, its
kernel calls run per shard, with the operands split as they are placed (the sharding rules):

* FP8 ``Linear``: the weight's output dim split (column-parallel: ``q_b_proj``, ``kv_b_proj``,
  ``gate/up_proj``) gives output columns per shard; its input dim split (row-parallel:
  ``o_proj``, ``down_proj``) gives partial products, summed over that axis in float32; rows split
  over the batch axes where they divide.
* MLA decode: heads split as ``q_b_proj``'s output is, rows as the latent cache's batch.
* MLA's absorbed products (``kernels_pallas.mla_absorb``): heads as ``kv_b_proj``'s rows.
* flash prefill attention (GPU), and a prefill chunk's over the cache: rows over the batch axes,
  heads as above.

The MoE's grouped GEMM already runs inside the expert-parallel ``shard_map``
(:mod:`deepseek_jax.expert_parallel`). The jnp reference path (CPU) is left to GSPMD.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a module's kernel operands live: the mesh, the rules (sorted items, hashable) and,
    for a ``Linear``, its weight's and scales' specs as placed."""

    mesh: Mesh
    rules: tuple
    weight_spec: Any = None
    scale_spec: Any = None

    @property
    def rule(self) -> dict:
        return dict(self.rules)


def _flat(axis) -> tuple[str, ...]:
    if axis is None:
        return ()
    return (axis,) if isinstance(axis, str) else tuple(axis)


def _used(spec) -> set[str]:
    return {a for entry in spec for a in _flat(entry)}


def _split(pl: Placement, logical: str, dim: int, used: set[str]):
    """The mesh axes (an entry of a ``PartitionSpec``) that split ``dim`` by rule ``logical``:
    those not already ``used``, dropped from the end until their product divides ``dim``."""
    axes = tuple(a for a in _flat(pl.rule.get(logical)) if a not in used and pl.mesh.shape[a] > 1)
    while axes and dim % math.prod(pl.mesh.shape[a] for a in axes):
        axes = axes[:-1]
    return None if not axes else axes[0] if len(axes) == 1 else axes


def shard_map_mesh(mesh: Mesh):
    """The mesh a ``shard_map`` over ``mesh`` takes: ``mesh``, or the context's abstract mesh of
    the same shape when one is set (one naming the target device, as ``kernels_pallas.aot``
    sets to compile on a host without it; shard_map refuses a mesh other than the context's)."""
    ctx = jax.sharding.get_abstract_mesh()
    return ctx if not ctx.empty and ctx.shape_tuple == mesh.abstract_mesh.shape_tuple else mesh


def _shard_map(fn, pl: Placement, in_specs, out_specs):
    return jax.shard_map(fn, mesh=shard_map_mesh(pl.mesh), in_specs=in_specs, out_specs=out_specs, check_vma=False)


def linear(kernel, x, w, s, *, layer, out_dtype, impl: str, pl: Placement):
    """``kernel(x, w, s, out_dtype=, impl=, layer=)`` (an FP8 GEMM of ``kernels_pallas``) per shard."""
    w_spec, s_spec = tuple(pl.weight_spec), tuple(pl.scale_spec)
    if w.ndim == len(w_spec) - 1:  # a scan handed this layer's slice of a stacked weight
        w_spec, s_spec = w_spec[1:], s_spec[1:]
    n_ax, k_ax = w_spec[-2], w_spec[-1]
    used = _used(w_spec)
    b_ax = _split(pl, "batch", x.shape[0], used)
    lead = (b_ax,) + (None,) * (x.ndim - 2)
    args, specs = [x, w, s], [P(*lead, k_ax), P(*w_spec), P(*s_spec)]
    if layer is not None:
        args.append(jnp.asarray(layer, jnp.int32))
        specs.append(P())

    def body(x, w, s, *layer):
        y = kernel(x, w, s, out_dtype=jnp.float32 if k_ax else out_dtype, impl=impl,
                   layer=layer[0] if layer else None)
        return jax.lax.psum(y, k_ax).astype(out_dtype) if k_ax else y

    return _shard_map(body, pl, tuple(specs), P(*lead, n_ax))(*args)


def mla_absorb(kernel, x, w, s, *, part: str, layer, pl: Placement, **kw):
    """``kernel(x, w, s, part=, layer=, **kw)`` (``kernels_pallas.mla_absorb``, ``x`` ``[B, T, H, I]``)
    per shard: heads as ``kv_b_proj``'s output rows are split, rows over the batch axes; a split of
    its latent (input) dim splits ``q_lat``'s columns (``part="k"``) or sums partial products in
    float32 (``part="v"``). A head split that would cut a head in two is left to GSPMD (the
    reference)."""
    w_spec, s_spec = tuple(pl.weight_spec), tuple(pl.scale_spec)
    if w.ndim == len(w_spec) - 1:  # a scan handed this layer's slice of a stacked weight
        w_spec, s_spec = w_spec[1:], s_spec[1:]
    r_ax, k_ax = w_spec[-2], w_spec[-1]
    if x.shape[-2] % math.prod(pl.mesh.shape[a] for a in _flat(r_ax)):
        import kernels_pallas

        return kernels_pallas.mla_absorb_ref(x, w, s, part=part, layer=layer, **{
            k: v for k, v in kw.items() if k != "impl"})
    b_ax = _split(pl, "batch", x.shape[0], _used(w_spec))
    lead = (b_ax,) + (None,) * (x.ndim - 3)
    x_spec = P(*lead, r_ax, None if part == "k" else k_ax)
    args, specs = [x, w, s], [x_spec, P(*w_spec), P(*s_spec)]
    if layer is not None:
        args.append(jnp.asarray(layer, jnp.int32))
        specs.append(P())
    out_dtype = kw.pop("out_dtype", None) or x.dtype
    partial = part == "v" and k_ax is not None

    def body(x, w, s, *layer):
        y = kernel(x, w, s, part=part, layer=layer[0] if layer else None,
                   out_dtype=jnp.float32 if partial else out_dtype, **kw)
        return jax.lax.psum(y, k_ax).astype(out_dtype) if partial else y

    out_spec = P(*lead, r_ax, k_ax if part == "k" else None)
    return _shard_map(body, pl, tuple(specs), out_spec)(*args)


def mla_decode(kernel, q_lat_BHL, q_pe_BHR, cache, lengths_B, *, layer, pl: Placement, **kw):
    """``kernel(q_lat, q_pe, cache, lengths, layer=, **kw)`` (``kernels_pallas.mla_decode``) per
    shard: rows as the cache's batch dim is split, heads by the ``heads`` rule."""
    from deepseek_jax.sharding import cache_spec

    stacked = cache.ndim == 4
    c_spec = tuple(cache_spec(dict(pl.mesh.shape), pl.rule, cache.shape if stacked else (1, *cache.shape)))
    b_ax = c_spec[1]
    h_ax = _split(pl, "heads", q_lat_BHL.shape[1], set(_flat(b_ax)))
    args = [q_lat_BHL, q_pe_BHR, cache, lengths_B]
    specs = [P(b_ax, h_ax, None), P(b_ax, h_ax, None), P(*(c_spec if stacked else c_spec[1:])), P(b_ax)]
    if layer is not None:
        args.append(jnp.asarray(layer, jnp.int32))
        specs.append(P())

    def body(q, qp, c, n, *layer):
        return kernel(q, qp, c, n, layer=layer[0] if layer else None, **kw)

    return _shard_map(body, pl, tuple(specs), P(b_ax, h_ax, None))(*args)


def store_latent(kernel, cache, new_BTC, pos_BT, *, layer, pl: Placement, **kw):
    """``kernel(cache, new, pos, layer=, **kw)`` (``kernels_pallas.store_latent``) per shard: the
    cache as placed, the entries and positions by its batch split (each row's cache is local)."""
    from deepseek_jax.sharding import cache_spec

    stacked = cache.ndim == 4
    c_spec = tuple(cache_spec(dict(pl.mesh.shape), pl.rule, cache.shape if stacked else (1, *cache.shape)))
    b_ax = c_spec[1]
    own = P(*(c_spec if stacked else c_spec[1:]))
    args, specs = [cache, new_BTC, pos_BT], [own, P(b_ax, None, c_spec[3]), P(b_ax, None)]
    if layer is not None:
        args.append(jnp.asarray(layer, jnp.int32))
        specs.append(P())

    def body(c, new, pos, *layer):
        return kernel(c, new, pos, layer=layer[0] if layer else None, **kw)

    return _shard_map(body, pl, tuple(specs), own)(*args)


def causal_attention(kernel, q_BTHK, k_BTHK, v_BTHA, *, pl: Placement, **kw):
    """``kernel(q, k, v, **kw)`` (``kernels_pallas.causal_attention``) per shard: rows over the
    batch axes, heads by the ``heads`` rule."""
    b_ax = _split(pl, "batch", q_BTHK.shape[0], set())
    h_ax = _split(pl, "heads", q_BTHK.shape[2], set(_flat(b_ax)))
    spec = P(b_ax, None, h_ax, None)
    return _shard_map(lambda q, k, v: kernel(q, k, v, **kw), pl, (spec, spec, spec), spec)(q_BTHK, k_BTHK, v_BTHA)


def cached_attention(kernel, q_nope, q_pe, kv, k_pe, q_pos, *, pl: Placement, **kw):
    """``kernel(q_nope, q_pe, kv, k_pe, q_pos, **kw)`` (``kernels_pallas.cached_attention``) per
    shard: rows over the batch axes, heads by the ``heads`` rule (``k_pe`` is shared by the heads)."""
    b_ax = _split(pl, "batch", q_nope.shape[0], set())
    h_ax = _split(pl, "heads", q_nope.shape[2], set(_flat(b_ax)))
    spec = P(b_ax, None, h_ax, None)
    specs = (spec, spec, spec, P(b_ax, None, None), P(b_ax, None))
    return _shard_map(lambda *a: kernel(*a, **kw), pl, specs, spec)(q_nope, q_pe, kv, k_pe, q_pos)


def moe_route(kernel, logits_TE, bias_E, *, pl: Placement, **kw):
    """``kernel(logits, bias, **kw)`` (``kernels_pallas.moe_route``, logits ``[T, E]``) per shard:
    the tokens (rows) over the batch axes where they divide, the experts and the bias whole."""
    t_ax = _split(pl, "batch", logits_TE.shape[0], set())
    rows = P(t_ax, None)
    layer = kw.pop("layer", None)
    args, specs = [logits_TE, bias_E], [rows, P(*(None,) * bias_E.ndim)]
    if layer is not None:   # the bias is all layers' [L, E], read at the layer in place
        args.append(jnp.asarray(layer, jnp.int32))
        specs.append(P())

    def body(x, b, *layer):
        return kernel(x, b, layer=layer[0] if layer else None, **kw)

    return _shard_map(body, pl, tuple(specs), (rows, rows, rows))(*args)


def uses_kernel(impl: str) -> bool:
    """Whether ``impl`` (a ``Precision.kernels`` value, resolved) runs a Pallas kernel."""
    import kernels_pallas

    return kernels_pallas.backend.split_impl(impl)[0] != "ref"
