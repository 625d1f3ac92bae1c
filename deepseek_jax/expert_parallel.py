"""Expert-parallel MoE dispatch with ``jax.shard_map`` (routed experts split over ``expert``).

Routing runs outside (GSPMD, cheap). Inside the shard_map each device holds its shard of the
tokens and its ``E_l = E / n_expert`` experts (and, when the expert hidden dim is split over
``model``, a slice of each expert's hidden units: partial outputs are summed over ``model``).

Two dispatch modes, chosen statically from the token count:

* **all-to-all** (tokens split over ``expert`` too; prefill and large batches): each device
  sorts its (token, expert) assignments by expert and packs them per destination shard into a
  buffer ``[n_expert, C, D]``; ``all_to_all`` sends each shard its rows, the shard runs grouped
  GEMMs over its local experts, and a second ``all_to_all`` returns the results to the slots
  they came from. No token is ever dropped, at inference or in training.

  ``C`` is ``Precision.ep_capacity`` (default 2) times the balanced share
  ``tokens_local * K / n_expert``. A pair with more rows than ``C`` sends them in further
  rounds, and every shard runs as many rounds as the fullest pair of the whole mesh needs
  (``pmax``; one while routing is within 2x of balanced). The backward pass runs the same
  rounds (a custom VJP: a ``while`` loop has no reverse-mode derivative), recomputing their rows.

  ``ep_capacity=None`` sends everything in one round sized for the worst case,
  ``C = tokens_local * min(K, E_l)`` (a token's K experts are distinct, so at most
  ``min(K, E_l)`` of them live on one shard): ``n_expert * min(K, E_l) / K`` times the balanced
  share (16x on DeepSeek-V3's 16-shard deployment) in the buffers, the bytes sent and the rows
  the grouped GEMM is handed. Small exchanges (fewer than :data:`ROUNDS_MIN_ROWS` rows in that
  buffer) and decode steps (``moe_apply(decode=True)``) use it too.

  A ``ragged_all_to_all``, which sends only the filled rows, is GPU/TPU only: XLA's CPU backend
  does not implement it in jax 0.11.2, so nothing here could test it.
* **replicated tokens** (few tokens, e.g. decode at batch 1): every expert shard sees all of
  its data shard's tokens, computes the assignments to its own experts, and the outputs are
  summed over ``expert``: DeepSeek's own demo does this (an all-reduce after the MoE).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
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
              mesh, rules, *, n_experts: int, layer: jax.Array | None = None, decode: bool = False) -> jax.Array:
    """Routed-expert output ``[M, D]`` with experts sharded over the mesh. ``decode``: a decode
    (or speculative verification) step, whose all-to-all is one worst-case round: rounds are a
    ``while`` loop in every MoE layer, and a GPU runs XLA's while loops from the host, one round
    trip per layer per token (prefill and training amortize it over their tokens). ``layer``: the arrays
    are all scanned layers' experts ``[L, E, ...]`` and this is the layer (traced); each shard
    reads its ``[L, E_l, ...]`` in place (``Precision.weights_in_place``) instead of a per-layer
    slice, which XLA copies when it feeds a Pallas call."""
    from deepseek_jax.sharding import param_spec

    rules = dict(rules)
    ms = dict(mesh.shape)
    M, D = x_MD.shape
    n_ep = ms.get("expert", 1)

    # Expert weight specs: the same resolution that placed them (sharding.model_param_specs).
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

    sm_mesh = shard_map_mesh(mesh)

    def body(x, idx, w, lay, *flat):
        arr = tuple((flat[2 * i], flat[2 * i + 1]) for i in range(3))
        offset = None
        if layer is not None:   # local [L, E_l, ...] -> [L * E_l, ...], a free reshape
            arr = tuple(tuple(None if a is None else a.reshape(-1, *a.shape[2:]) for a in ws) for ws in arr)
            offset = lay * E_l
        shard = jax.lax.axis_index("expert") if e_split and n_ep > 1 else 0
        if a2a:
            y = _dispatch_all_to_all(arr, x, idx, w, prec, E_l, n_ep, f_split, offset, sm_mesh.axis_names,
                                     rounds=not decode)
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
    fn = jax.shard_map(body, mesh=sm_mesh, in_specs=(tok_spec, tok_spec, tok_spec, P(), *flat_specs),
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


def _dispatch_all_to_all(arr, x, idx, w, prec, E_l, n_ep, f_split, offset=None, axes=("expert",), rounds=True):
    """Send each assignment's row to the shard owning its expert, compute, send back.
    ``axes``: every axis of the mesh (the rounds' count is agreed over all of them).
    ``rounds=False``: one worst-case round whatever ``prec.ep_capacity`` says."""
    m, K = idx.shape
    worst = m * min(K, E_l)
    cap = round_capacity(m, K, n_ep, E_l, prec.ep_capacity) if rounds else worst
    static = (prec, E_l, n_ep, f_split, cap, tuple(axes))   # static: hashed by the custom VJP
    if cap >= worst:
        return _exchange(static, arr, x, idx, w, offset)
    return _exchange_rounds(static, arr, x, idx, w, offset)


#: Below this many rows in the worst-case buffer (``n_expert * tokens * min(K, E_l)``: 15 MB at
#: V3's width in bf16) the exchange is one worst-case round: small buffers gain nothing from
#: rounds, and on the jnp reference path XLA hoists the experts' dequantized weights out of the
#: rounds' loop (``plan`` on a v5p-64, decode at batch 16: 3.28 GiB of temporaries, 0.83 without).
ROUNDS_MIN_ROWS = 1024


def round_capacity(m: int, K: int, n_ep: int, E_l: int, factor: float | None) -> int:
    """Rows per (sender, receiver) pair in the exchange that runs: :func:`exchange_capacity`, or
    the worst case (one round) when its buffer is under :data:`ROUNDS_MIN_ROWS` rows."""
    worst = m * min(K, E_l)
    return worst if n_ep * worst < ROUNDS_MIN_ROWS else exchange_capacity(m, K, n_ep, E_l, factor)


def exchange_capacity(m: int, K: int, n_ep: int, E_l: int, factor: float | None) -> int:
    """Rows per (sender, receiver) pair in one all-to-all round: ``factor`` times the balanced
    share ``m * K / n_ep``, rounded up to 8 rows, at most the worst case ``m * min(K, E_l)``."""
    worst = m * min(K, E_l)
    if factor is None:
        return worst
    return min(worst, -(-math.ceil(factor * m * K / n_ep) // 8) * 8)


def _assignments(idx, E_l, n_ep):
    """The (token, expert) assignments sorted by expert: their order, destination shard, slot
    among that destination's rows, and local expert."""
    K = idx.shape[1]
    expert_A = idx.reshape(-1)
    order = jnp.argsort(expert_A, stable=True)          # grouped by destination, then expert
    e_sorted = expert_A[order]
    dest = e_sorted // E_l
    counts = jnp.bincount(dest, length=n_ep)
    slot = jnp.arange(order.shape[0]) - (jnp.cumsum(counts) - counts)[dest]
    return order, order // K, dest, slot, (e_sorted % E_l).astype(jnp.int32), counts


def _round_trip(static, arr, send_x, send_e, offset):
    """One all-to-all round: ``send_x [n_ep, cap, D]`` rows for each shard's local experts
    ``send_e [n_ep, cap]`` (``E_l``: an empty slot) out, the experts' outputs back in the same slots."""
    from deepseek_jax.moe import experts_apply

    prec, E_l, n_ep, f_split, cap, _ = static
    D = send_x.shape[-1]
    recv_x = jax.lax.all_to_all(send_x.reshape(n_ep * cap, D), "expert", 0, 0, tiled=True)
    recv_e = jax.lax.all_to_all(send_e.reshape(n_ep * cap), "expert", 0, 0, tiled=True)
    order2 = jnp.argsort(recv_e, stable=True)           # empty slots (E_l) sort last
    sizes = jnp.bincount(recv_e, length=E_l + 1)[:E_l].astype(jnp.int32)
    y_sorted = experts_apply(arr, recv_x[order2], sizes, prec, offset)
    y = jnp.zeros_like(y_sorted).at[order2].set(y_sorted)
    if f_split:
        y = jax.lax.psum(y, "model")
    return jax.lax.all_to_all(y, "expert", 0, 0, tiled=True).reshape(n_ep, cap, D)


def _exchange(static, arr, x, idx, w, offset):
    """One round, every pair's buffer the worst case: each slot a row of its own."""
    prec, E_l, n_ep, _, cap, _ = static
    m, D = x.shape
    order, token, dest, slot, e_loc, _ = _assignments(idx, E_l, n_ep)
    send_x = jnp.zeros((n_ep, cap, D), x.dtype).at[dest, slot].set(x[token])
    send_e = jnp.full((n_ep, cap), E_l, jnp.int32).at[dest, slot].set(e_loc)
    back = _round_trip(static, arr, send_x, send_e, offset)
    return _combine(back[dest, slot], w.reshape(-1)[order], token, m, prec.dtype)


def _round(static, arr, x_A, r, plan, offset):
    """Round ``r`` of the exchange: each pair's slots ``[r * cap, (r + 1) * cap)`` sent, computed
    and returned; ``[A, D]``, zero in the rows of other rounds."""
    _, E_l, n_ep, _, cap, _ = static
    order, token, dest, slot, e_loc = plan
    D = x_A.shape[-1]
    s = slot - r * cap
    mine = (s >= 0) & (s < cap)
    d, s = jnp.where(mine, dest, n_ep), jnp.where(mine, s, 0)   # not this round: dropped
    send_x = jnp.zeros((n_ep, cap, D), x_A.dtype).at[d, s].set(x_A, mode="drop")
    send_e = jnp.full((n_ep, cap), E_l, jnp.int32).at[d, s].set(e_loc, mode="drop")
    back = _round_trip(static, arr, send_x, send_e, offset)
    return jnp.where(mine[:, None], back[jnp.minimum(d, n_ep - 1), s], 0)


def _plan(static, idx):
    """The assignments (:func:`_assignments`) and the rounds the fullest pair on the mesh needs."""
    _, E_l, n_ep, _, cap, axes = static
    order, token, dest, slot, e_loc, counts = _assignments(idx, E_l, n_ep)
    rounds = (jax.lax.pmax(jnp.max(counts), axes) + cap - 1) // cap
    return (order, token, dest, slot, e_loc), rounds


def _rounds_out(static, arr, x_A, plan, rounds, offset):
    """Every round's rows: ``[A, D]``, in the sorted order of the assignments."""
    out = jnp.zeros(x_A.shape[:1] + (x_A.shape[-1],), static[0].dtype)
    return jax.lax.fori_loop(0, rounds, lambda r, acc: acc + _round(static, arr, x_A, r, plan, offset), out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _exchange_rounds(static, arr, x, idx, w, offset):
    """:func:`_exchange` with ``cap``-row buffers, for as many rounds as the fullest pair on the
    mesh needs (a ``while`` loop: its backward pass is written out below, round by round)."""
    plan, rounds = _plan(static, idx)
    out = _rounds_out(static, arr, x[plan[1]], plan, rounds, offset)
    return _combine(out, w.reshape(-1)[plan[0]], plan[1], x.shape[0], static[0].dtype)


@jax.tree_util.register_static
class _Perturbed(tuple):
    """Whether the experts' weights get a gradient (static in the residuals)."""


def _exchange_rounds_fwd(static, arr, x, idx, w, offset):
    arr_grad = any(p.perturbed for p in jax.tree.leaves(arr))
    arr, x, idx, w, offset = jax.tree.map(lambda p: p.value, (arr, x, idx, w, offset))
    return _exchange_rounds(static, arr, x, idx, w, offset), (arr, x, idx, w, offset, _Perturbed((arr_grad,)))


def _exchange_rounds_bwd(static, res, dy):
    """Round by round, the gradient of each round's rows: the same exchange run backwards, in the
    same buffers. Each round's forward, which its VJP recomputes anyway, also gives its rows for
    the combine weights' gradient (the rows' cotangent does not depend on them: the combine is
    linear in the rows)."""
    arr, x, idx, w, offset, (arr_grad,) = res
    dy = jnp.zeros(dy.shape, dy.dtype) if isinstance(dy, SymbolicZero) else dy
    m = x.shape[0]
    plan, rounds = _plan(static, idx)
    x_A, gather_vjp = jax.vjp(lambda xx: xx[plan[1]], x)

    def combine(o, ww):
        return _combine(o, ww.reshape(-1)[plan[0]], plan[1], m, static[0].dtype)

    out0 = jnp.zeros(x_A.shape, static[0].dtype)
    d_out = jax.vjp(lambda o: combine(o, w), out0)[1](dy)[0]

    def one_round(r, acc):
        d_arr, dx_A, out = acc
        if arr_grad:
            rows, vjp = jax.vjp(lambda a, xa: _round(static, a, xa, r, plan, offset), arr, x_A)
            da, dxa = vjp(d_out)
            d_arr = jax.tree.map(jnp.add, d_arr, da)
        else:
            rows, vjp = jax.vjp(lambda xa: _round(static, arr, xa, r, plan, offset), x_A)
            dxa = vjp(d_out)[0]
        return d_arr, dx_A + dxa, out + rows

    zeros_arr = jax.tree.map(jnp.zeros_like, arr) if arr_grad else None
    d_arr, dx_A, out = jax.lax.fori_loop(0, rounds, one_round, (zeros_arr, jnp.zeros_like(x_A), out0))
    dw = jax.vjp(lambda ww: combine(out, ww), w)[1](dy)[0]
    return d_arr, gather_vjp(dx_A)[0], None, dw, None


_exchange_rounds.defvjp(_exchange_rounds_fwd, _exchange_rounds_bwd, symbolic_zeros=True)
