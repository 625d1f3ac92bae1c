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
``deepseek-jax score --internals FILE.npz`` writes the same arrays (:func:`internals_arrays`);
:func:`load_internals` reads them back.
"""

from __future__ import annotations

import os
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax.errors import DeepSeekError
from deepseek_jax.model import DeepSeekV3
from deepseek_jax.scoring import _check_model, check_ids, to_host


class Internals(NamedTuple):
    hidden: np.ndarray          # [L+1, B, T, D]: the embeddings, then every decoder layer's output
    final_hidden: np.ndarray    # [B, T, D]: the last layer's output after the final RMSNorm
    logits: np.ndarray | None   # [B, T, V]: the same logits as dj.logits (None from load_internals)
    experts: np.ndarray         # [Lm, B, T, K] int32: routed experts per token, by decreasing weight
    expert_weights: np.ndarray  # [Lm, B, T, K]: their combine weights, x routed_scaling_factor (and
                                # normalised to sum 1 before it, if the config's norm_topk_prob)
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
    x 4 bytes, 1.8 MB per token for DeepSeek-V3), and on the device once more in the compute dtype
    and once in float32. ``attention=True`` adds every layer's attention weights,
    ``L * B * H * T * T`` float32, all layers at once on the device too (DeepSeek-V3: 31 KB per
    token pair, 8 GB at T = 512)."""
    if not isinstance(attention, (bool, np.bool_)):
        raise DeepSeekError(f"internals: attention must be True or False, got {attention!r}")
    ids = check_ids(model, ids)
    hidden, final, logits, routing, probs = _run(model, jnp.asarray(ids), bool(attention))
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


def _check_internals(fn: str, ins) -> Internals:
    if not isinstance(ins, Internals):
        raise DeepSeekError(f"{fn}: expected the Internals of dj.internals (or load_internals), "
                            f"got {type(ins).__name__}")
    return ins


def logit_lens(model: DeepSeekV3, ins: Internals) -> np.ndarray:
    """``[L+1, B, T, V]`` float32: the final norm and ``lm_head`` applied to every entry of
    ``ins.hidden`` (the "logit lens": what each layer's residual stream would predict if the
    model stopped there). The last entry is ``ins.logits``. Memory: ``(L+1) * B * T * V`` float32
    on the device and the host, 32 MB per token for DeepSeek-V3 (62 x 129,280 x 4 bytes): pass
    an ``Internals`` cut to the positions wanted (``ins._replace(hidden=ins.hidden[:, :, -8:])``)."""
    _check_model(model)
    ins = _check_internals("logit_lens", ins)
    cfg = model.cfg
    h = ins.hidden
    if not isinstance(h, (np.ndarray, jax.Array)) or h.ndim != 4 or not jnp.issubdtype(h.dtype, jnp.floating):
        raise DeepSeekError(f"logit_lens: ins.hidden must be a float [L+1, B, T, D] array, got "
                            f"{type(h).__name__} {list(getattr(h, 'shape', []))}")
    if h.shape[0] != cfg.num_hidden_layers + 1 or h.shape[-1] != cfg.hidden_size:
        raise DeepSeekError(f"logit_lens: ins.hidden is {list(h.shape)}: not this model's "
                            f"[{cfg.num_hidden_layers + 1}, B, T, {cfg.hidden_size}] (another model's internals?)")
    if ins.logits is not None and np.shape(ins.logits)[-1] != cfg.vocab_size:
        raise DeepSeekError(f"logit_lens: ins.logits has vocab {np.shape(ins.logits)[-1]}, this model "
                            f"{cfg.vocab_size} (another model's internals?)")
    return to_host(_lens(model, jnp.asarray(h)))


def expert_histogram(ins: Internals) -> np.ndarray:
    """``[Lm, E]`` int64: how many of the tokens each MoE layer sent to each expert."""
    ins = _check_internals("expert_histogram", ins)
    if np.ndim(ins.expert_scores) != 4:
        raise DeepSeekError(f"expert_histogram: ins.expert_scores must be a [Lm, B, T, E] array, got "
                            f"{type(ins.expert_scores).__name__} {list(np.shape(ins.expert_scores))}")
    experts, E = np.asarray(ins.experts), np.shape(ins.expert_scores)[-1]
    if experts.ndim != 4 or experts.dtype.kind not in "iu":
        raise DeepSeekError(f"expert_histogram: ins.experts must be integer [Lm, B, T, K], got "
                            f"{experts.dtype} {list(experts.shape)}")
    if experts.size and (experts.min() < 0 or experts.max() >= E):
        raise DeepSeekError(f"expert_histogram: expert ids must be in [0, {E}), found "
                            f"{int(experts.min())}..{int(experts.max())}")
    return np.array([np.bincount(layer.reshape(-1), minlength=E) for layer in experts], dtype=np.int64
                    ).reshape(len(experts), E)


def internals_arrays(ins: Internals) -> dict[str, np.ndarray]:
    """The arrays ``score --internals`` writes to its .npz: every field but ``logits`` (the
    ``--out`` file holds them), ``attention`` only when computed, ``moe_layers`` as int32."""
    out = {k: v for k, v in ins._asdict().items() if k != "logits" and v is not None}
    out["moe_layers"] = np.asarray(ins.moe_layers, np.int32)
    return out


def load_internals(path) -> Internals:
    """The :class:`Internals` of a ``score --internals`` file (``logits`` None: see
    :func:`internals_arrays`), for :func:`logit_lens` and :func:`expert_histogram`."""
    import zipfile

    if not isinstance(path, (str, os.PathLike)) and not hasattr(path, "read"):
        raise DeepSeekError(f"load_internals: expected the path of a score --internals file, got {type(path).__name__}")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("a single array (.npy), not an .npz archive")
        with z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DeepSeekError(f"load_internals: {path} is not a readable .npz file ({e})") from None
    need = set(Internals._fields) - {"logits", "attention"}
    if need - set(arrays):
        raise DeepSeekError(f"load_internals: {path} lacks {', '.join(sorted(need - set(arrays)))} "
                            "(not written by score --internals?)")
    if arrays["moe_layers"].ndim != 1 or (arrays["moe_layers"].size and arrays["moe_layers"].dtype.kind not in "iu"):
        raise DeepSeekError(f"load_internals: {path}: moe_layers is {arrays['moe_layers'].dtype} "
                            f"{list(arrays['moe_layers'].shape)}, expected a 1-D list of layer indices")
    arrays["moe_layers"] = tuple(int(i) for i in arrays["moe_layers"])
    return Internals(logits=None, attention=arrays.pop("attention", None),
                     **{k: arrays[k] for k in need})


__all__ = ["Internals", "internals", "logit_lens", "expert_histogram", "internals_arrays", "load_internals"]
