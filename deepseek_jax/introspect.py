"""What the model computes on the way: each decoder layer's hidden states and each MoE layer's
routing (which experts every token goes to, with which weights, and all experts' affinities).

For studying the model rather than running it::

    ins = dj.internals(model, ids)
    ins.hidden[0]              # [B, T, D] the token embeddings
    ins.hidden[i + 1]          # layer i's output (the residual stream)
    ins.experts[j]             # [B, T, K] experts chosen in MoE layer ins.moe_layers[j]
    dj.internals(model, ids, attention=True).attention[i]   # [B, H, T, T] layer i's attention weights
    lens = logit_lens(model, ins)  # [L+1, B, T, V]: each layer's output through the norm and lm_head

One prefill pass (naive MLA), the same computation as :func:`deepseek_jax.logits`; the per-layer
outputs are collected from the layer scan. Everything comes back as numpy float32 / int32.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax.errors import DeepSeekError
from deepseek_jax.model import DeepSeekV3
from deepseek_jax.scoring import check_ids, to_host


class Internals(NamedTuple):
    hidden: np.ndarray          # [L+1, B, T, D]: the embeddings, then every decoder layer's output
    final_hidden: np.ndarray    # [B, T, D]: the last layer's output after the final RMSNorm
    logits: np.ndarray          # [B, T, V]: the same logits as dj.logits
    experts: np.ndarray         # [Lm, B, T, K] int32: routed experts per token, by decreasing weight
    expert_weights: np.ndarray  # [Lm, B, T, K]: their combine weights (normalised, x routed_scaling_factor)
    expert_scores: np.ndarray   # [Lm, B, T, E]: every expert's sigmoid affinity (before the balancing bias)
    moe_layers: tuple[int, ...]  # the checkpoint layer index of each row of experts / weights / scores
    attention: np.ndarray | None = None  # [L, B, H, T, T]: each head's attention weights (attention=True)


def _attention(layers, h_LBTD, pos_BT, rope):
    """``[L, B, H, T, T]``: each stacked layer's attention weights given its input ``h_LBTD``; a scan
    over the layers' attention and input norm only (not their experts)."""
    gd_attn, st_attn = nnx.split(layers.self_attn)
    gd_norm, st_norm = nnx.split(layers.input_layernorm)

    def body(_, xs):
        st_a, st_n, h_BTD = xs
        attn, norm = nnx.merge(gd_attn, st_a), nnx.merge(gd_norm, st_n)
        return None, attn.attention_probs(norm(h_BTD), pos_BT, rope)

    return jax.lax.scan(body, None, (st_attn, st_norm, h_LBTD))[1]


@partial(nnx.jit, static_argnames=("attention",))
def _run(model: DeepSeekV3, ids_BT, attention: bool = False):
    f32 = jnp.float32
    emb = model.embed_tokens(ids_BT, model.prec.dtype)
    out = model(ids_BT, layer_outputs=True)
    inputs = jnp.concatenate([emb[None], out.layer_hidden])       # layer i's input is inputs[i]
    hidden = inputs.astype(f32)
    probs = None
    if attention:
        B, T = ids_BT.shape
        pos_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        parts, start = [], 0
        for layers in (model.dense_layers, model.moe_layers):
            if layers is not None:
                n = layers.self_attn.kv_b_proj.weight[...].shape[0]
                parts.append(_attention(layers, inputs[start:start + n], pos_BT, model.rope))
                start += n
        probs = jnp.concatenate(parts)
    st = out.moe_stats
    if st is None:
        return hidden, out.hidden.astype(f32), out.logits, None, probs
    # By decreasing weight (the router's top-k leaves them in no documented order).
    order = jnp.argsort(-st.weight_BTK, axis=-1, stable=True)
    idx = jnp.take_along_axis(st.idx_BTK, order, axis=-1)
    w = jnp.take_along_axis(st.weight_BTK, order, axis=-1)
    return hidden, out.hidden.astype(f32), out.logits, (idx, w.astype(f32), st.scores_BTE.astype(f32)), probs


def internals(model: DeepSeekV3, ids, *, attention: bool = False) -> Internals:
    """Hidden states and routing of one prefill pass over ``ids`` (``[B, T]`` or ``[T]``); see
    :class:`Internals`. Memory: ``hidden`` is ``(L+1) * B * T * D`` float32 on the host (62 x 7168
    x 4 bytes, 1.8 MB per token for DeepSeek-V3). ``attention=True`` adds every layer's attention
    weights, ``L * B * H * T * T`` float32 (DeepSeek-V3: 31 KB per token pair, 8 GB at T = 512)."""
    if not isinstance(attention, bool):
        raise DeepSeekError(f"internals: attention must be True or False, got {attention!r}")
    ids = check_ids(model, ids)
    hidden, final, logits, routing, probs = _run(model, jnp.asarray(ids), attention)
    cfg = model.cfg
    moe_layers = tuple(range(cfg.num_dense_layers, cfg.num_hidden_layers))
    B, T = ids.shape
    if routing is None:
        K, E = cfg.num_experts_per_tok, cfg.n_routed_experts
        idx, w, sc = (np.zeros((0, B, T, K), np.int32), np.zeros((0, B, T, K), np.float32),
                      np.zeros((0, B, T, E), np.float32))
    else:
        idx, w, sc = (to_host(a) for a in routing)
    return Internals(to_host(hidden), to_host(final), to_host(logits), idx.astype(np.int32), w, sc, moe_layers,
                     None if probs is None else to_host(probs))


@nnx.jit
def _lens(model: DeepSeekV3, hidden_NTD):
    return jax.lax.map(lambda h: model.lm_head(model.norm(h.astype(model.prec.dtype)), model.prec.dtype),
                       hidden_NTD)


def logit_lens(model: DeepSeekV3, ins: Internals) -> np.ndarray:
    """``[L+1, B, T, V]`` float32: the final norm and ``lm_head`` applied to every entry of
    ``ins.hidden`` (the "logit lens": what each layer's residual stream would predict if the
    model stopped there). The last entry is ``ins.logits``."""
    if not isinstance(ins, Internals):
        raise DeepSeekError(f"logit_lens: expected the Internals of dj.internals, got {type(ins).__name__}")
    if ins.hidden.shape[-1] != model.cfg.hidden_size:
        raise DeepSeekError(f"logit_lens: hidden size {ins.hidden.shape[-1]} is not this model's "
                            f"{model.cfg.hidden_size}")
    return to_host(_lens(model, jnp.asarray(ins.hidden)))


def expert_histogram(ins: Internals) -> np.ndarray:
    """``[Lm, E]`` int: how many of the tokens each MoE layer sent to each expert."""
    E = ins.expert_scores.shape[-1]
    return np.array([np.bincount(layer.reshape(-1), minlength=E) for layer in ins.experts], dtype=np.int64
                    ).reshape(len(ins.experts), E)


__all__ = ["Internals", "internals", "logit_lens", "expert_histogram"]
