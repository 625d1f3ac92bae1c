"""The DeepSeek-V3 model: embed -> scanned dense layers -> scanned MoE layers -> norm -> head,
with the MTP module beside it (SPEC §2, §6).

Identical layers are created stacked (every parameter gets a leading layer axis) and run with
``jax.lax.scan``, so the 61-layer model traces two layer bodies, not 61. Attribute names mirror
the Hub's tensor names (``self_attn.q_a_proj.weight``...), which keeps the checkpoint mapping a
rename plus a stack (see ``checkpoint.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.cache import LatentCache
from deepseek_jax.config import DeepSeekConfig
from deepseek_jax.mla import MLA
from deepseek_jax.mlp import MLP
from deepseek_jax.moe import MoE, MoEStats
from deepseek_jax.norm import RMSNorm
from deepseek_jax.quant import Linear, Precision, scan_layer
from deepseek_jax.rope import Rope
from deepseek_jax import sharding
from deepseek_jax.sharding import ACT_AXES


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs):
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (vocab, dim)).astype(jnp.bfloat16))

    def __call__(self, ids, dtype):
        return jnp.take(self.weight[...], ids, axis=0).astype(dtype)


class Head(nnx.Module):
    """An unquantized ``[V, D]`` projection (``lm_head``, ``shared_head.head``), float32 logits."""

    def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs):
        self.weight = nnx.Param((jax.random.normal(rngs.params(), (vocab, dim)) / dim ** 0.5).astype(jnp.bfloat16))

    def __call__(self, x, dtype):
        return jnp.einsum("...d,vd->...v", x.astype(dtype), self.weight[...].astype(dtype),
                          preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)


class DecoderLayer(nnx.Module):
    """``h += MLA(norm(h)); h += FFN(norm(h))`` with a dense MLP or a MoE as FFN."""

    def __init__(self, cfg: DeepSeekConfig, *, moe: bool, prec: Precision, rngs: nnx.Rngs):
        self.moe = moe
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=prec.dtype, kernels=prec.kernels)
        self.self_attn = MLA(cfg, prec=prec, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=prec.dtype,
                                                kernels=prec.kernels)
        if moe:
            self.mlp = MoE(cfg, prec=prec, rngs=rngs)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, fp8=cfg.fp8, prec=prec, rngs=rngs)

    def __call__(self, h_BTD, pos_BT, rope: Rope, cache_BSC=None, absorbed=False, layer_idx=None,
                 cache_layer=None):
        """``layer_idx``: experts read in place (see ``MoE``); ``cache_layer``: ``cache_BSC`` is the
        scanned layers' whole ``[L, B, S, C]`` cache and this is that layer (see ``MLA``)."""
        with jax.named_scope("attn"):
            a, cache_BSC = self.self_attn(self.input_layernorm(h_BTD), pos_BT, rope, cache_BSC=cache_BSC,
                                          absorbed=absorbed, layer=cache_layer, sum_splits=False)
        with jax.named_scope("moe" if self.moe else "mlp"):
            h_BTD, x_BTD = self.post_attention_layernorm(h_BTD, residual=a)   # h + a, and its norm
            if self.moe:
                f, stats = self.mlp(x_BTD, layer_idx)
            else:
                f, stats = self.mlp(x_BTD), None
        return h_BTD + f, cache_BSC, stats


def _stacked_layers(n: int, cfg: DeepSeekConfig, moe: bool, prec: Precision, rngs: nnx.Rngs):
    """``n`` identical layers whose parameters carry a leading layer axis."""
    if n == 0:
        return None

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r: nnx.Rngs):
        return DecoderLayer(cfg, moe=moe, prec=prec, rngs=r)

    return make(rngs)


def _to_bytes(a):
    return jax.lax.bitcast_convert_type(a, jnp.uint8) if a.dtype == jnp.float8_e4m3fn else a


def _from_bytes(a):
    return jax.lax.bitcast_convert_type(a, jnp.float8_e4m3fn) if a.dtype == jnp.uint8 else a


def _is_routed_expert(path, _value) -> bool:
    return len(path) >= 2 and path[0] == "mlp" and path[1] == "experts"


#: Small per-layer parameters that GPU kernels read (``kernels_pallas.rms_norm``,
#: ``moe_route``, ``write_latent``): with ``weights_in_place`` they are read at the layer's index too, since a
#: per-layer slice feeding a Pallas call is one more launch per layer each.
_KERNEL_PARAMS = {("input_layernorm", "weight"), ("post_attention_layernorm", "weight"), ("q_a_layernorm", "weight"),
                  ("kv_a_layernorm", "weight"), ("gate", "e_score_correction_bias")}


def _is_fp8_linear(path, value) -> bool:
    """An FP8 linear's weight or block scale, or one of :data:`_KERNEL_PARAMS` (read in place by
    layer, see ``quant.scan_layer``)."""
    if path[-1] == "weight_scale_inv" or tuple(path[-2:]) in _KERNEL_PARAMS:
        return True
    return path[-1] == "weight" and getattr(value, "dtype", None) == jnp.float8_e4m3fn


def weights_in_place(layers) -> bool:
    """Whether :func:`_scan_layers` passes these stacked layers' FP8 weights whole (all layers)
    plus a layer index instead of scanning over per-layer slices: routed experts as ``[L*E, ...]``
    at offset ``layer * E``, other FP8 linears as ``[L, out, in]`` (``quant.scan_layer``).  See
    ``Precision.weights_in_place``. Where the MoE runs in the expert-parallel ``shard_map``
    (:meth:`MoE.in_shard_map`) the routed experts stay ``[L, E, ...]`` (split over ``expert``)
    and each shard reads its local ``[L, E_l, ...]`` in place."""
    lin = layers.self_attn.kv_b_proj
    if lin.prec.weights_in_place is not None:
        return lin.prec.weights_in_place
    import kernels_pallas.backend as kb  # noqa: PLC0415
    return lin.fp8 and kb.resolve_impl(lin.prec.kernels) in ("pallas_gpu", "pallas_tpu")


class Unstacked(NamedTuple):
    """:meth:`DeepSeekV3.unstacked`: the states of each stacked layer group, one per layer."""
    dense: list | None
    moe: list | None


def unstack(layers) -> list:
    """``[state of layer 0, layer 1, ...]``: stacked layers cut by static slices."""
    state = nnx.state(layers)
    n = jax.tree.leaves(state)[0].shape[0]
    return [jax.tree.map(lambda a, i=i: a[i], state) for i in range(n)]


def _run_unstacked(layers, states, h_BTD, pos_BT, rope, cache_layers, absorbed, collect=False):
    """:func:`_scan_layers` with :func:`unstack`'s per-layer states of ``layers``, as a Python
    loop over a per-layer cache (a tuple of ``[B, S, C]``, see ``LatentCache.per_layer``, or None)."""
    graphdef = nnx.graphdef(layers)
    caches = [None] * len(states) if cache_layers is None else list(cache_layers)
    all_stats, all_h = [], []
    for i, st in enumerate(states):
        h_BTD, caches[i], stats = nnx.merge(graphdef, st)(h_BTD, pos_BT, rope, caches[i], absorbed)
        all_stats.append(stats)
        all_h.append(h_BTD)
    stats = None if all_stats[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *all_stats)
    return h_BTD, None if cache_layers is None else tuple(caches), stats, jnp.stack(all_h) if collect else None


def _scan_layers(layers, h_BTD, pos_BT, rope, cache_LBSC, absorbed, remat=False, collect=False, placement=None):
    """Runs stacked layers with ``lax.scan``; returns (h, updated cache, stacked stats, and with
    ``collect`` every layer's output ``[L, B, T, D]``, else None). ``placement``: the mesh's
    (:func:`sharding.constrain`), whose rules the cache in the carry keeps."""
    if weights_in_place(layers):
        # The FP8 weights stay outside the scanned inputs: each step's slice of a scanned input
        # feeding a custom call (a Pallas kernel) is materialized, i.e. a copy of the layer's
        # weights per step (11 GB of experts per DeepSeek-V3 layer). The routed experts,
        # flattened to [L*E, ...] (a free reshape), are read at offset layer * E; the other FP8
        # linears keep [L, out, in] and read layer i (``quant.scan_layer``).
        graphdef, experts, whole, state = nnx.split(layers, _is_routed_expert, _is_fp8_linear, ...)
        moe = getattr(layers, "mlp", None)
        if not (isinstance(moe, MoE) and moe.in_shard_map()):   # there: [L, E_l, ...] per shard
            experts = jax.tree.map(lambda a: a.reshape(a.shape[0] * a.shape[1], *a.shape[2:]), experts)
    else:
        graphdef, state = nnx.split(layers)
        experts = whole = None
    # FP8 weights cross the loop boundary as raw bytes and become e4m3 again per layer: XLA's
    # CPU backend otherwise widens every stacked f8 array to f16 before the loop (a copy of all
    # layers' weights at twice their size); on GPU/TPU the bitcasts are free.
    state = jax.tree.map(_to_bytes, state)

    # The latent cache rides in the carry, whole: each layer scatters its new entries into the
    # [L, B, S, C] stack and attends over its layer by index. As a scanned input/output instead,
    # every step would copy each layer's cache out and assemble a fresh stack (two full passes
    # over the cache per decode step, the largest array a decode step touches at long context).
    # The layer index rides in the carry: scanned over as an input, each step's index is a
    # dynamic slice of an arange, one more GPU launch per layer.
    def body(carry, st):
        h, cache, i = carry
        st = jax.tree.map(_from_bytes, st)
        c_layer = None if cache is None else i
        if experts is None:
            layer = nnx.merge(graphdef, st)
            h, cache, stats = layer(h, pos_BT, rope, cache, absorbed, cache_layer=c_layer)
        else:
            layer = nnx.merge(graphdef, experts, whole, st)
            with scan_layer(i):
                h, cache, stats = layer(h, pos_BT, rope, cache, absorbed, cache_layer=c_layer,
                                        layer_idx=i if isinstance(getattr(layer, "mlp", None), MoE) else None)
        if cache is not None:   # (else XLA split the carried cache's batch over the experts' axis
            # and gathered it whole again at every step: two all-gathers of the cache per decode step)
            cache = sharding.constrain(cache, ACT_AXES["cache_LBSC"], placement)
        return (h, cache, i + 1), (stats, h if collect else None)

    if remat:
        body = jax.checkpoint(body)
    n_layers = layers.self_attn.kv_b_proj.weight[...].shape[0]
    (h_BTD, cache_LBSC, _), (stats, h_LBTD) = jax.lax.scan(
        body, (h_BTD, cache_LBSC, jnp.int32(0)), state, length=n_layers,
        unroll=layers.self_attn.kv_b_proj.prec.scan_unroll)
    return h_BTD, cache_LBSC, stats, h_LBTD


class MTPLayer(DecoderLayer):
    """Multi-Token Prediction module (SPEC §6), checkpoint layer ``num_hidden_layers``.

    ``x_i = eh_proj([enorm(embed(t_{i+1})) ; hnorm(h_i)])``, one MoE decoder block, then
    ``logits_{i+2} = shared_head.head(shared_head.norm(x_i))``.
    """

    def __init__(self, cfg: DeepSeekConfig, *, prec: Precision, rngs: nnx.Rngs):
        super().__init__(cfg, moe=True, prec=prec, rngs=rngs)
        D = cfg.hidden_size
        self.embed_tokens = Embed(cfg.vocab_size, D, rngs=rngs)
        self.enorm = RMSNorm(D, cfg.rms_norm_eps, dtype=prec.dtype)
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps, dtype=prec.dtype)
        self.eh_proj = Linear(2 * D, D, fp8=False, prec=prec, rngs=rngs)
        self.shared_head = SharedHead(cfg, prec=prec, rngs=rngs)


class SharedHead(nnx.Module):
    def __init__(self, cfg: DeepSeekConfig, *, prec: Precision, rngs: nnx.Rngs):
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=prec.dtype)
        self.head = Head(cfg.vocab_size, cfg.hidden_size, rngs=rngs)


class Output(NamedTuple):
    logits: jax.Array | None        # [B, T, V] float32
    hidden: jax.Array               # [B, T, D] after the final norm (what MTP consumes)
    cache: LatentCache | None
    moe_stats: MoEStats | None      # stacked over MoE layers: load [Lm, E], balance [Lm], idx [Lm, B, T, K]...
    layer_hidden: jax.Array | None = None   # [L, B, T, D]: each decoder layer's output (layer_outputs=True)


class DeepSeekV3(nnx.Module):
    def __init__(self, cfg: DeepSeekConfig, *, prec: Precision = Precision(), rngs: nnx.Rngs | None = None,
                 with_mtp: bool = True):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        cfg.validate()
        self.cfg, self.prec = cfg, prec
        self.rope = Rope(cfg)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.dense_layers = _stacked_layers(cfg.num_dense_layers, cfg, False, prec, rngs)
        self.moe_layers = _stacked_layers(cfg.num_moe_layers, cfg, True, prec, rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=prec.dtype)
        self.lm_head = Head(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.mtp = MTPLayer(cfg, prec=prec, rngs=rngs) if (with_mtp and cfg.num_nextn_predict_layers) else None
        self.remat = False

    def __call__(self, ids_BT: jax.Array, pos_BT: jax.Array | None = None, *,
                 cache: LatentCache | None = None, absorbed: bool = False, logits: bool = True,
                 unstacked: Unstacked | None = None, layer_outputs: bool = False) -> Output:
        """Runs the main model.

        ``pos_BT`` defaults to ``0..T-1`` per row. With a ``cache``, the new tokens' latent entries
        are written at ``pos_BT``; ``absorbed=True`` attends over the cache (decode), otherwise
        among the call's own tokens (prefill from position 0). ``unstacked``: this model's
        :meth:`unstacked` layers, run in that form over a per-layer cache
        (:meth:`LatentCache.per_layer`). ``layer_outputs``: also return every decoder layer's
        output (the residual stream, before the final norm) as ``Output.layer_hidden``.
        """
        B, T = ids_BT.shape
        dtype = self.prec.dtype
        if pos_BT is None:
            pos_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        pl = self.norm.placement   # (set on a mesh of several devices: sharding.attach_mesh)
        with jax.named_scope("embed"):
            h = sharding.constrain(self.embed_tokens(ids_BT, dtype), ACT_AXES["x_BTD"], pl)
        cache = sharding.constrain_cache(cache, pl)
        dense_c = cache.dense if cache is not None else None
        moe_c = cache.moe if cache is not None else None
        stats, per_layer = None, []

        def run(layers, name, h, c):
            if unstacked is not None:
                return _run_unstacked(layers, getattr(unstacked, name), h, pos_BT, self.rope, c, absorbed,
                                      layer_outputs)
            return _scan_layers(layers, h, pos_BT, self.rope, c, absorbed, self.remat, layer_outputs, pl)

        if self.dense_layers is not None:
            h, dense_c, _, h_L = run(self.dense_layers, "dense", h, dense_c)
            per_layer.append(h_L)
        if self.moe_layers is not None:
            h, moe_c, stats, h_L = run(self.moe_layers, "moe", h, moe_c)
            per_layer.append(h_L)
        with jax.named_scope("lm_head"):
            h = self.norm(h)
            out_logits = self.lm_head(h, dtype) if logits else None
        new_cache = sharding.constrain_cache(cache._replace(dense=dense_c, moe=moe_c), pl) if cache is not None else None
        layer_hidden = jnp.concatenate(per_layer) if layer_outputs else None
        return Output(out_logits, h, new_cache, stats, layer_hidden)

    def unstacked(self) -> Unstacked:
        """The stacked layers' weights cut into per-layer arrays (static slices, a copy), for
        ``__call__(unstacked=...)``: the layers then run as straight-line code, each reading its
        own arrays. A pytree of arrays: pass it to a jitted function beside the parameters.

        For a loop of small steps (CPU decoding of a small model): make it once, outside the loop.
        Inside a ``while_loop`` body, a layer's slice of a stacked weight is copied at every
        iteration wherever it feeds a dot (XLA's CPU backend neither hoists nor aliases it), and
        so is its slice of a stacked cache; separate arrays are read where they are. Test config A,
        batch 8 on a 2-core CPU: 1.17x the decode rate with per-layer weights and cache (both),
        1.04x with per-layer weights alone.
        """
        return Unstacked(None if self.dense_layers is None else unstack(self.dense_layers),
                         None if self.moe_layers is None else unstack(self.moe_layers))

    def mtp_forward(self, hidden_BTD: jax.Array, next_ids_BT: jax.Array, pos_BT: jax.Array | None = None, *,
                    cache_BSC: jax.Array | None = None, absorbed: bool = False):
        """MTP logits: row i combines ``hidden[i]`` with the embedding of token ``i+1``
        (``next_ids[i]``) and predicts token ``i+2``. Returns ``(logits [B,T,V], cache, stats)``."""
        x, cache_BSC, stats = self.mtp_hidden(hidden_BTD, next_ids_BT, pos_BT, cache_BSC=cache_BSC,
                                              absorbed=absorbed)
        return self.mtp_head(x), cache_BSC, stats

    def mtp_hidden(self, hidden_BTD: jax.Array, next_ids_BT: jax.Array, pos_BT: jax.Array | None = None, *,
                   cache_BSC: jax.Array | None = None, absorbed: bool = False):
        """:meth:`mtp_forward` up to the head: ``(shared_head.norm(x) [B,T,D], cache, stats)`` (a
        generator applies :meth:`mtp_head` to the rows it needs only)."""
        if self.mtp is None:
            raise ValueError("this model has no MTP module")
        m, dtype = self.mtp, self.prec.dtype
        B, T = next_ids_BT.shape
        if pos_BT is None:
            pos_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        e = m.enorm(m.embed_tokens(next_ids_BT, dtype))
        x = m.eh_proj(jnp.concatenate([e, m.hnorm(hidden_BTD)], axis=-1))
        pl = self.norm.placement   # (the MTP layer's cache split as the main layers' are)
        cache_BSC = None if cache_BSC is None else sharding.constrain(cache_BSC, ACT_AXES["cache_LBSC"], pl)
        x, cache_BSC, stats = m(x, pos_BT, self.rope, cache_BSC, absorbed)
        if cache_BSC is not None:
            cache_BSC = sharding.constrain(cache_BSC, ACT_AXES["cache_LBSC"], pl)
        return m.shared_head.norm(x), cache_BSC, stats

    def mtp_head(self, x_BTD: jax.Array) -> jax.Array:
        """Float32 MTP logits of :meth:`mtp_hidden` rows."""
        return self.mtp.shared_head.head(x_BTD, self.prec.dtype)

    def mtp_logits(self, ids_BT: jax.Array, hidden_BTD: jax.Array) -> jax.Array:
        """``[B, T-1, V]``: row i predicts token i+2 of ``ids`` (training / scoring)."""
        return self.mtp_forward(hidden_BTD[:, :-1], ids_BT[:, 1:])[0]
