"""Expert-parallel MoE dispatch with ``jax.shard_map`` (routed experts split over ``expert``).

Routing runs outside (GSPMD, cheap). Inside the shard_map each device holds its shard of the
tokens and its ``E_l = E / n_expert`` experts (and, when the expert hidden dim is split over
``model``, a slice of each expert's hidden units: partial outputs are summed over ``model``).

Two dispatch modes, chosen statically from the token count:

* **all-to-all** (tokens split over ``expert`` too; prefill and large batches): each device
  sorts its (token, expert) assignments by expert, packs them per destination shard into a
  fixed buffer ``[n_expert, cap, D]``, ``all_to_all`` sends each shard its rows, the shard runs
  grouped GEMMs over its local experts, and a second ``all_to_all`` returns the results to the
  slots they came from. ``cap = tokens_local * min(K, E_l)`` is the worst case (a token's K
  experts are distinct, so at most ``min(K, E_l)`` of them live on one shard): no token is ever
  dropped, at inference or in training. (A ``ragged_all_to_all`` exchange that sends only the
  filled rows is the GPU/TPU optimisation; it is not implemented on CPU, where this runs.)
* **replicated tokens** (few tokens, e.g. decode at batch 1): every expert shard sees all of
  its data shard's tokens, computes the assignments to its own experts, and the outputs are
  summed over ``expert``: DeepSeek's own demo does this (an all-reduce after the MoE).
"""

from __future__ import annotations

import math
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from deepseek_jax.kernel_mesh import shard_map_mesh
from deepseek_jax.quant import Precision


def is_distributed(mesh) -> bool:
    return mesh.shape.get("expert", 1) > 1 or mesh.shape.get("model", 1) > 1


def _axes_tuple(axis) -> tuple[str, ...]:
    if axis is None:
        return ()
    return (axis,) if isinstance(axis, str) else tuple(axis)


def moe_apply(arrays: tuple, x_MD: jax.Array, idx_MK: jax.Array, w_MK: jax.Array, prec: Precision,
              mesh, rules, *, n_experts: int, layer: jax.Array | None = None) -> jax.Array:
    """Routed-expert output ``[M, D]`` with experts sharded over the mesh. ``layer``: the arrays
    are all scanned layers' experts ``[L, E, ...]`` and this is the layer (traced); each shard
    reads its ``[L, E_l, ...]`` in place (``Precision.weights_in_place``) instead of a per-layer
    slice, which XLA copies when it feeds a Pallas call."""
    from deepseek_jax.sharding import param_spec

    rules = dict(rules)
    ms = dict(mesh.shape)
    M, D = x_MD.shape
    K = idx_MK.shape[1]
    n_ep = ms.get("expert", 1)

    # Expert weight specs: the same resolution that placed them (sharding.shard_model).
    names = (("mlp", "experts", "gate_proj"), ("mlp", "experts", "up_proj"), ("mlp", "experts", "down_proj"))
    if layer is not None:   # the stacked layers' axis comes first (and is never split)
        names = tuple(("moe_layers",) + n for n in names)
    w_specs = []
    for name, (w, s) in zip(names, arrays):
        fp8_shape = w.shape if s is not None else None
        ws = param_spec(name + ("weight",), w.shape, ms, rules, fp8_shape)
        ss = param_spec(name + ("weight_scale_inv",), s.shape, ms, rules, fp8_shape) if s is not None else None
        w_specs.append((ws, ss))
    lead = 0 if layer is None else 1
    e_split = w_specs[0][0][lead] == "expert"
    f_split = w_specs[0][0][lead + 1] == "model"
    E_l = n_experts // n_ep if e_split else n_experts

    # Token sharding: over the batch axes that divide M, plus ``expert`` for all-to-all mode.
    tok_axes = tuple(a for a in _axes_tuple(rules.get("batch")) if a != "model")
    tok_axes = tuple(a for a in tok_axes if M % ms[a] == 0)
    while tok_axes and M % math.prod(ms[a] for a in tok_axes):
        tok_axes = tok_axes[:-1]
    m_local = M // math.prod(ms[a] for a in tok_axes) if tok_axes else M
    a2a = e_split and n_ep > 1 and ("expert" in tok_axes or m_local % n_ep == 0)
    if a2a and "expert" not in tok_axes:
        tok_axes = tok_axes + ("expert",)
    tok_spec = P(tok_axes or None, None)

    def body(x, idx, w, lay, *flat):
        arr = tuple((flat[2 * i], flat[2 * i + 1]) for i in range(3))
        offset = None
        if layer is not None:   # local [L, E_l, ...] -> [L * E_l, ...], a free reshape
            arr = tuple(tuple(None if a is None else a.reshape(-1, *a.shape[2:]) for a in ws) for ws in arr)
            offset = lay * E_l
        shard = jax.lax.axis_index("expert") if e_split and n_ep > 1 else 0
        if a2a:
            y = _dispatch_all_to_all(arr, x, idx, w, prec, E_l, n_ep, f_split, offset)
        else:
            y = _dispatch_replicated(arr, x, idx, w, prec, shard, E_l, offset)
            axes = (("expert",) if e_split and n_ep > 1 else ()) + (("model",) if f_split else ())
            if axes:
                y = jax.lax.psum(y, axes)
        return y.astype(prec.dtype)

    flat_args, flat_specs = [], []
    for (w, s), (ws, ss) in zip(arrays, w_specs):
        flat_args += [w, s]
        flat_specs += [ws, ss]
    fn = jax.shard_map(body, mesh=shard_map_mesh(mesh), in_specs=(tok_spec, tok_spec, tok_spec, P(), *flat_specs),
                       out_specs=tok_spec, check_vma=False)
    return fn(x_MD, idx_MK, w_MK, jnp.asarray(0 if layer is None else layer, jnp.int32), *flat_args)


def _combine(y_AD, w_A, token_A, m: int, dtype):
    y = y_AD.astype(jnp.float32) * w_A[:, None].astype(jnp.float32)
    return jnp.zeros((m, y_AD.shape[-1]), jnp.float32).at[token_A].add(y).astype(dtype)


def _dispatch_replicated(arr, x, idx, w, prec, shard, E_l, offset=None):
    """Every expert shard sees the same tokens and handles the assignments to its experts."""
    from deepseek_jax.moe import experts_apply

    m, K = idx.shape
    local = idx.reshape(-1) - shard * E_l
    key = jnp.where((local >= 0) & (local < E_l), local, E_l)  # foreign experts sort last
    order = jnp.argsort(key, stable=True)
    sizes = jnp.bincount(key, length=E_l + 1)[:E_l].astype(jnp.int32)
    token = order // K
    y = experts_apply(arr, x[token], sizes, prec, offset)  # rows past sum(sizes) are zeros
    return _combine(y, w.reshape(-1)[order], token, m, prec.dtype)


def _dispatch_all_to_all(arr, x, idx, w, prec, E_l, n_ep, f_split, offset=None):
    """Send each assignment's row to the shard owning its expert, compute, send back."""
    from deepseek_jax.moe import experts_apply

    m, K = idx.shape
    D = x.shape[-1]
    cap = m * min(K, E_l)
    expert_A = idx.reshape(-1)
    order = jnp.argsort(expert_A, stable=True)          # grouped by destination, then expert
    e_sorted = expert_A[order]
    dest = e_sorted // E_l
    start = jnp.cumsum(jnp.bincount(dest, length=n_ep)) - jnp.bincount(dest, length=n_ep)
    slot = jnp.arange(order.shape[0]) - start[dest]
    token = order // K

    send_x = jnp.zeros((n_ep, cap, D), x.dtype).at[dest, slot].set(x[token])
    send_e = jnp.full((n_ep, cap), E_l, jnp.int32).at[dest, slot].set((e_sorted % E_l).astype(jnp.int32))
    recv_x = jax.lax.all_to_all(send_x.reshape(n_ep * cap, D), "expert", 0, 0, tiled=True)
    recv_e = jax.lax.all_to_all(send_e.reshape(n_ep * cap), "expert", 0, 0, tiled=True)

    order2 = jnp.argsort(recv_e, stable=True)           # empty slots (E_l) sort last
    sizes = jnp.bincount(recv_e, length=E_l + 1)[:E_l].astype(jnp.int32)
    y_sorted = experts_apply(arr, recv_x[order2], sizes, prec, offset)
    y = jnp.zeros_like(y_sorted).at[order2].set(y_sorted)
    if f_split:
        y = jax.lax.psum(y, "model")
    back = jax.lax.all_to_all(y, "expert", 0, 0, tiled=True).reshape(n_ep, cap, D)
    return _combine(back[dest, slot], w.reshape(-1)[order], token, m, prec.dtype)
