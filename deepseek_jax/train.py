"""Training DeepSeek-V3: loss, optimizer, aux-loss-free balancing, checkpoints, Hub export.

Loss of one batch (SPEC §5, §6), all cross-entropies averaged over the batch's target tokens::

    L = CE(logits[t] -> ids[t+1])                 main next-token loss, mask loss_mask[:, 1:]
      + λ · CE(mtp_logits[i] -> ids[i+2])          MTP row i, mask loss_mask[:, 2:]
      + α · Σ_layers balance_l                      sequence-wise balance term Σ_e f_e P_e of every
                                                    MoE layer (the MTP block's included)

Gradients flow only into :class:`flax.nnx.Param`; the routing biases (:class:`~deepseek_jax.moe.RouterBias`)
are state: after each optimizer step every MoE router (each main layer and the MTP block) moves
``bias_e += γ · sign(mean_e' load_e' - load_e)``, ``load_e`` being the number of (real, non-pad)
token assignments of that step to expert ``e``.

With ``tie_mtp`` (default, as in DeepSeek-V3) the MTP module's ``embed_tokens`` and
``shared_head.head`` are the main model's embedding and ``lm_head``: they are not trained separately,
receive the gradient through the main ones, and are kept equal to them (the Hub checkpoint stores
copies, SPEC §6).

One step is two jitted programs: ``_loss_and_grads`` (forward + backward; shared with gradient
checks) and ``_apply`` (global-norm clipping, AdamW with linear warmup + cosine decay, bias update,
metrics). The compiled programs are keyed by the model's config, not by the model object, so a new
model of the same config (a resumed run, a test) reuses them.

On a mesh with the axes of :mod:`deepseek_jax.sharding` (``data``, ``expert``, ``model``; any of
them may be absent, as in ``--data-parallel``'s ``("data",)``) the parameters are split by the same
rules as for inference (routed experts over ``expert``, heads / MLP hidden / vocab over ``model``),
each one's AdamW moments exactly as the parameter, and the batch over ``data``: a model larger
than one device trains, and the mesh may span several hosts (``jax.distributed``; every process
passes the same whole batch, each device gets its slice). On a mesh with other axis names the batch
is split over ``data_axis`` and the state replicated.

The Orbax checkpoint holds the whole train state (parameters, router biases, optimizer state, step);
the data position is the step itself (datasets are pure functions of the step, see ``tasks.py``).
:func:`export_hub` writes the trained model in the Hub layout (BF16, or FP8 with block scales).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import numbers
import os
import re
import shutil
from collections.abc import Mapping
from functools import partial, reduce
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from deepseek_jax.checkpoint import abstract_model, hub_layout, hub_slot, iter_params
from deepseek_jax.config import DeepSeekConfig
from deepseek_jax.errors import DeepSeekError, check_bool, check_int
from deepseek_jax.hub import (HubReader, HubWriter, dequantize_block_fp8_np, hub_tensor_specs,
                              quantize_block_fp8_np, write_config)
from deepseek_jax.model import DeepSeekV3
from deepseek_jax.moe import RouterBias
from deepseek_jax.quant import Precision
from deepseek_jax.sharding import MESH_AXES, attach_mesh, auto_mesh, model_param_specs, resolve_rules
from deepseek_jax.tokenizer import TOKENIZER_FILES

__all__ = ["TrainConfig", "TrainState", "Trainer", "compute_loss", "learning_rate", "make_optimizer", "model_logits",
           "cast_params", "export_hub", "load_float_model"]


# --------------------------------------------------------------------------------------------
# Configuration and optimizer
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000             # total steps: the length of the cosine schedule
    lr: float = 1e-3              # peak learning rate
    warmup: int = 100             # linear warmup steps
    min_lr_ratio: float = 0.1     # cosine decays to lr * min_lr_ratio at `steps`
    weight_decay: float = 0.1     # AdamW decoupled weight decay (not on norm weights)
    b1: float = 0.9
    b2: float = 0.95
    adam_eps: float = 1e-8
    clip_norm: float = 1.0        # global-norm gradient clipping (<= 0: off)
    mtp_weight: float = 0.3       # λ
    balance_alpha: float = 1e-4   # α
    bias_gamma: float = 1e-3      # γ (0: routing biases frozen)
    remat: bool = False           # rematerialise each scanned layer in the backward pass
    grad_accum: int = 1           # microbatches per step: gradients summed, one optimizer update
    tie_mtp: bool = True          # MTP embedding / head = the main ones
    trainable: str | None = None  # regex: only parameters whose path it matches are trained (None: all)

    def validate(self) -> "TrainConfig":
        """Returns ``self``, or raises a one-line :class:`DeepSeekError` naming the first setting
        out of range (a NaN learning rate or ``b1 = 2`` would train into NaN weights silently)."""
        def number(name, lo, hi=math.inf, lo_open=False, hi_open=False):
            v = getattr(self, name)
            ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) \
                and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
            if not ok:
                want = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}" if math.isfinite(hi) \
                    else f"{'>' if lo_open else '>='} {lo:g}"
                raise DeepSeekError(f"TrainConfig.{name} must be a finite number {'in ' if math.isfinite(hi) else ''}"
                                    f"{want}, got {v!r}")

        for name, lo in (("steps", 0), ("warmup", 0), ("grad_accum", 1)):
            check_int(f"TrainConfig.{name}", getattr(self, name), lo)
        number("lr", 0)
        number("min_lr_ratio", 0, 1)
        number("weight_decay", 0)
        number("b1", 0, 1, hi_open=True)
        number("b2", 0, 1, hi_open=True)
        number("adam_eps", 0, lo_open=True)
        for name in ("mtp_weight", "balance_alpha", "bias_gamma"):
            number(name, 0)
        c = self.clip_norm
        if isinstance(c, bool) or not isinstance(c, numbers.Real) or math.isnan(c):
            raise DeepSeekError(f"TrainConfig.clip_norm must be a number (<= 0: no clipping), got {c!r}")
        for name in ("remat", "tie_mtp"):
            check_bool(f"TrainConfig.{name}", getattr(self, name))
        if self.trainable is not None and not isinstance(self.trainable, str):
            raise DeepSeekError(f"TrainConfig.trainable must be a regular expression string or None, "
                                f"got {type(self.trainable).__name__}")
        return self

    def _hyper(self) -> dict[str, jax.Array]:
        """The numeric settings as float32 scalars: traced, not compiled in, so runs that differ
        only in them (learning rate, schedule length, γ...) share the compiled programs."""
        return {k: jnp.float32(getattr(self, k)) for k in _HYPER}

    def _static(self) -> tuple:
        return (self.clip_norm > 0, self.tie_mtp, self.remat)


_HYPER = ("steps", "lr", "warmup", "min_lr_ratio", "weight_decay", "b1", "b2", "adam_eps", "clip_norm",
          "mtp_weight", "balance_alpha", "bias_gamma")


def learning_rate(tcfg, step):
    """Linear warmup to ``lr`` over ``warmup`` steps (step 0 already gets ``lr/warmup``), then
    cosine decay to ``lr * min_lr_ratio`` at ``steps`` (constant after). ``tcfg``: a
    :class:`TrainConfig` or its ``_hyper()`` values."""
    hp = tcfg._hyper() if isinstance(tcfg, TrainConfig) else tcfg
    step = jnp.asarray(step, jnp.float32)
    lr, warmup = hp["lr"], hp["warmup"]
    warm = lr * (step + 1.0) / jnp.maximum(warmup, 1.0)
    progress = jnp.clip((step - warmup) / jnp.maximum(hp["steps"] - warmup, 1.0), 0.0, 1.0)
    cos = lr * (hp["min_lr_ratio"] + (1.0 - hp["min_lr_ratio"]) * 0.5 * (1.0 + jnp.cos(math.pi * progress)))
    return jnp.where(step < warmup, warm, cos)


def _decay_mask(params):
    """Weight decay everywhere but on RMSNorm weights (paths with 'norm' in a name)."""
    def keep(path, _):
        return not any("norm" in str(getattr(k, "key", getattr(k, "name", ""))) for k in path)
    return jax.tree_util.tree_map_with_path(keep, params)


def _clip_by_global_norm(max_norm) -> optax.GradientTransformation:
    """optax's global-norm clip, in each gradient's own dtype (optax's selects between a bfloat16
    gradient and its float32 rescaled copy, and fails for bfloat16 parameters)."""
    def update(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        factor = jnp.where(norm > max_norm, max_norm / jnp.maximum(norm, 1e-30), 1.0)
        return jax.tree.map(lambda g: (g * factor).astype(g.dtype), updates), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _make_tx(hp, clip: bool) -> optax.GradientTransformation:
    parts = [_clip_by_global_norm(hp["clip_norm"])] if clip else []
    parts.append(optax.adamw(partial(learning_rate, hp), b1=hp["b1"], b2=hp["b2"], eps=hp["adam_eps"],
                             weight_decay=hp["weight_decay"], mask=_decay_mask))
    return optax.chain(*parts)


def make_optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping (if ``clip_norm > 0``) then AdamW (decoupled weight decay, not on norm
    weights) with the :func:`learning_rate` schedule."""
    return _make_tx(tcfg._hyper(), tcfg.clip_norm > 0)


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


#: The training loss's head runs over a chunk of positions at a time when the batch's float32
#: logits ``[B, T, V]`` would be larger than this: at DeepSeek-V3's vocabulary (129,280) they are
#: 2.1 GB per 4096 tokens, and the loss's backward kept several such arrays.
CE_CHUNK_BYTES = 512 * 2**20


def _ce_terms(nll_BT, right_BT, mask_BT):
    """Mean NLL over masked positions, token accuracy and per-row 'all targets correct'."""
    n = jnp.sum(mask_BT)
    ce = jnp.sum(nll_BT * mask_BT) / jnp.maximum(n, 1.0)
    right = right_BT.astype(jnp.float32)
    acc = jnp.sum(right * mask_BT) / jnp.maximum(n, 1.0)
    row_has = jnp.sum(mask_BT, axis=1) > 0
    row_ok = jnp.all((right > 0) | (mask_BT == 0), axis=1) & row_has
    exact = jnp.sum(row_ok) / jnp.maximum(jnp.sum(row_has), 1)
    return ce, acc, exact


def _masked_ce(logits_BTV, targets_BT, mask_BT):
    """:func:`_ce_terms` of the logits ``[B, T, V]`` for the targets ``[B, T]``."""
    lp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(lp, targets_BT[..., None], axis=-1)[..., 0]
    return _ce_terms(nll, jnp.argmax(logits_BTV, axis=-1) == targets_BT, mask_BT)


def _chunked_ce(model: DeepSeekV3, hidden_BTD, ids_BT, mask_BT, head):
    """:func:`_masked_ce` of ``head(hidden)[:, :-1]`` for ``ids[:, 1:]`` (``mask_BT`` is the
    targets' mask, ``[B, T - 1]``), the head run over positions in chunks of at most
    :data:`CE_CHUNK_BYTES` of logits (:func:`deepseek_jax.scoring._head_scores`): neither pass
    holds the ``[B, T, V]`` logits."""
    from deepseek_jax.scoring import _head_scores
    B = ids_BT.shape[0]
    chunk = CE_CHUNK_BYTES // (B * model.cfg.vocab_size * 4)
    lp, right = _head_scores(model, hidden_BTD, ids_BT, greedy=True, head=head, chunk=chunk)
    return _ce_terms(-lp[:, :-1], right[:, :-1], mask_BT)


def _expert_loads(idx_LBTK, valid_BT, n_experts: int):
    """``[L, E]`` counts of (valid token, expert) assignments per layer."""
    L = idx_LBTK.shape[0]
    w = jnp.broadcast_to(valid_BT[None, :, :, None], idx_LBTK.shape).astype(jnp.float32).reshape(L, -1)
    return jax.vmap(lambda i, x: jnp.zeros((n_experts,), jnp.float32).at[i].add(x))(idx_LBTK.reshape(L, -1), w)


def compute_loss(model: DeepSeekV3, batch, mtp_weight=0.3, balance_alpha=1e-4):
    """``(loss, aux)`` of one batch (``batch`` has ``ids``, ``loss_mask``, ``valid``, all ``[B, T]``).

    ``aux``: ``ce``, ``mtp_ce``, ``balance`` (Σ over MoE layers, MTP block included), ``acc`` /
    ``exact`` (teacher-forced token accuracy / rows whose every target is the argmax, i.e. what greedy
    decoding would reproduce), ``moe_load [Lm, E]`` and ``mtp_load [E]`` (None when absent),
    ``tokens`` (real tokens) and ``targets``.
    """
    ids, valid = batch.ids, batch.valid
    mask = batch.loss_mask.astype(jnp.float32)
    E = model.cfg.n_routed_experts
    B, T = ids.shape
    chunked = B * T * model.cfg.vocab_size * 4 > CE_CHUNK_BYTES   # the head by chunks of positions
    out = model(ids, logits=not chunked)
    if chunked:
        ce, acc, exact = _chunked_ce(model, out.hidden, ids, mask[:, 1:], model.lm_head)
    else:
        ce, acc, exact = _masked_ce(out.logits[:, :-1], ids[:, 1:], mask[:, 1:])
    balance = jnp.float32(0.0)
    moe_load = mtp_load = None
    if out.moe_stats is not None:
        balance = balance + jnp.sum(out.moe_stats.balance)
        moe_load = _expert_loads(out.moe_stats.idx_BTK, valid, E)
    mtp_ce = jnp.float32(0.0)
    if model.mtp is not None:
        # Row i: hidden h_i with the embedding of token i+1, predicts token i+2 (SPEC §6).
        if chunked:
            x, _, st = model.mtp_hidden(out.hidden[:, :-1], ids[:, 1:])
            mtp_ce, _, _ = _chunked_ce(model, x, ids[:, 1:], mask[:, 2:], model.mtp.shared_head.head)
        else:
            mtp_logits, _, st = model.mtp_forward(out.hidden[:, :-1], ids[:, 1:])
            mtp_ce, _, _ = _masked_ce(mtp_logits[:, :-1], ids[:, 2:], mask[:, 2:])
        balance = balance + st.balance
        mtp_load = _expert_loads(st.idx_BTK[None], valid[:, 1:], E)[0]
    loss = ce + mtp_weight * mtp_ce + balance_alpha * balance
    aux = {"ce": ce, "mtp_ce": mtp_ce, "balance": balance, "acc": acc, "exact": exact,
           "moe_load": moe_load, "mtp_load": mtp_load,
           "tokens": jnp.sum(valid.astype(jnp.float32)), "targets": jnp.sum(mask[:, 1:])}
    return loss, aux


def load_imbalance(loads_LE: jax.Array) -> jax.Array:
    """max/mean expert load per layer, averaged over layers (1.0 = perfectly balanced)."""
    mean = jnp.mean(loads_LE, axis=-1)
    return jnp.mean(jnp.max(loads_LE, axis=-1) / jnp.maximum(mean, 1e-9))


def _all_loads(aux) -> jax.Array | None:
    parts = [x for x in (aux["moe_load"], None if aux["mtp_load"] is None else aux["mtp_load"][None]) if x is not None]
    return jnp.concatenate(parts, axis=0) if parts else None


# --------------------------------------------------------------------------------------------
# Model state plumbing
# --------------------------------------------------------------------------------------------

# (source in the main model, tied copy in the MTP module)
_TIES = ((("embed_tokens", "weight"), ("mtp", "embed_tokens", "weight")),
         (("lm_head", "weight"), ("mtp", "shared_head", "head", "weight")))
_TIED_PATHS = {copy for _, copy in _TIES}


def _is_tied_copy(path, _value) -> bool:
    return tuple(str(p) for p in path) in _TIED_PATHS


def param_path(path) -> str:
    """A parameter's name as :attr:`TrainConfig.trainable` matches it: ``moe_layers/self_attn/q_a_proj/weight``."""
    return "/".join(str(p) for p in path)


def _compile_pattern(pattern) -> re.Pattern:
    if not isinstance(pattern, str) or not pattern:
        raise DeepSeekError(f"trainable: expected a non-empty regular expression, got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise DeepSeekError(f"trainable: {pattern!r} is not a regular expression ({e})") from None


def _hub_matches(rx: re.Pattern, path, cfg: DeepSeekConfig) -> np.ndarray:
    """Per slice of the (possibly stacked) parameter at ``path``: whether ``rx`` finds its Hub
    name (``model.layers.3.mlp.experts.17.gate_proj.weight``); a bool array of the stack's shape
    (``[]`` for an unstacked one, all False for a parameter the Hub layout does not name)."""
    try:
        slot = hub_slot(tuple(str(p) for p in path), cfg)
    except KeyError:
        return np.zeros((), bool)
    names = np.asarray(slot.names, dtype=object)
    return np.vectorize(lambda n: bool(rx.search(n)), otypes=[bool])(names) if names.size else np.zeros((), bool)


def trained_predicate(pattern: str | None, model: DeepSeekV3, tie: bool = True):
    """``path -> bool``: whether :attr:`TrainConfig.trainable` trains the parameter at ``path``,
    or some of its slices (every one for ``None``; else those whose :func:`param_path`, or the Hub
    name of one of its layers / experts, ``re.search``-matches: see :func:`trained_slices`).
    Raises :class:`DeepSeekError` for a bad pattern or one that matches no parameter (with
    ``tie``, the MTP copies of the embedding and head are not parameters of their own)."""
    if pattern is None:
        return lambda path: True
    rx = _compile_pattern(pattern)

    def is_trained(path) -> bool:
        return bool(rx.search(param_path(path))) or bool(_hub_matches(rx, path, model.cfg).any())

    every = [p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    names = [p for p in every if not (tie and _is_tied_copy(p, None))]
    if not any(is_trained(p) for p in names):
        if any(is_trained(p) for p in every):
            raise DeepSeekError(f"trainable: {pattern!r} matches only the MTP copies of embed_tokens / lm_head, "
                                "which follow the main ones: match embed_tokens/weight or lm_head/weight")
        shown = ", ".join(param_path(p) for p in names[:4])
        raise DeepSeekError(f"trainable: {pattern!r} matches no parameter (names look like: {shown}, ...; "
                            "or Hub names like model.layers.3.mlp.experts.17.up_proj.weight)")
    return is_trained


def trained_slices(pattern: str | None, model: DeepSeekV3) -> dict[tuple[str, ...], np.ndarray]:
    """The parameters :attr:`TrainConfig.trainable` trains only in part: ``{path: mask}``, the
    mask a bool array over the parameter's stacked dimensions (layers, and experts for routed
    experts) saying which slices' Hub names it matches. A parameter whose own name matches, or
    all of whose slices do, is trained whole and is not listed."""
    if pattern is None:
        return {}
    rx = _compile_pattern(pattern)
    out = {}
    for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if rx.search(param_path(p)):
            continue
        m = _hub_matches(rx, p, model.cfg)
        if m.ndim and m.any() and not m.all():
            out[tuple(str(x) for x in p)] = m
    return out


def trained_count(params, masks) -> int:
    """Trained parameters among ``params`` (arrays or shapes), each with its :func:`trained_slices`
    mask or None (trained whole): of a stacked parameter trained in part, its trained slices."""
    return sum(math.prod(x.shape) if m is None else math.prod(x.shape) * int(np.asarray(m).sum()) // np.asarray(m).size
               for x, m in zip(params, masks, strict=True))


def cast_params(model: DeepSeekV3, dtype=jnp.float32) -> DeepSeekV3:
    """The model with every floating :class:`nnx.Param` cast to ``dtype`` (the modules compute in
    ``model.prec.dtype`` whatever the parameter dtype, so this changes nothing structural)."""
    if model.cfg.fp8:
        raise DeepSeekError("FP8 weights are not trainable: build the model from a config with fp8=False "
                            "(or load it with train.load_float_model)")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    return nnx.merge(graphdef, params, rest)


def _check_fp8_frozen(model: DeepSeekV3, pattern: str | None) -> None:
    """An FP8 model trains only what is not FP8 (LoRA adapters, norms, the router...): its FP8
    weights and their block scales stay frozen (the FP8 GEMMs' backward gives ``dx`` only)."""
    if pattern is None:
        raise DeepSeekError("this model holds FP8 weights, which are not trainable: train a subset that "
                            "excludes them (TrainConfig.trainable, e.g. LoRA adapters: lora.LORA_PATTERN), "
                            "or load a float copy (train.load_float_model)")
    is_trained = trained_predicate(pattern, model)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if (var[...].dtype == jnp.float8_e4m3fn or str(path[-1]) == "weight_scale_inv") and is_trained(path):
            raise DeepSeekError(f"trainable {pattern!r} matches {param_path(path)}, an FP8 weight or its "
                                "block scale: FP8 weights stay frozen (train LoRA adapters instead)")


class TrainState(NamedTuple):
    step: jax.Array        # int32 scalar: steps done
    params: Any            # nnx.State of trained nnx.Param
    tied: Any              # nnx.State of the MTP copies of embedding / lm_head (empty if untied)
    biases: Any            # nnx.State of RouterBias
    rest: Any              # anything else (normally empty)
    opt_state: Any


class _StateSpecs(NamedTuple):
    """The ``PartitionSpec`` of every leaf of a :class:`TrainState` (``state``, in flattening
    order) and of its ``params`` alone: static arguments of the jitted steps (hashable)."""
    state: tuple
    params: tuple


def _state_specs(state: TrainState, model_specs: dict[tuple[str, ...], tuple[P, tuple]]) -> _StateSpecs:
    """Each leaf's spec: a model variable's from ``model_specs`` (path -> (spec, shape)), an
    optimizer moment's from the parameter whose path ends its own and whose shape it has,
    anything else replicated."""
    def spec(path, x) -> P:
        parts = _key_parts(path)
        for i in range(1, len(parts)) if parts[0] == "opt_state" else (1,):
            s = model_specs.get(parts[i:])
            if s is not None and s[1] == tuple(np.shape(x)):
                return s[0]
        return P()

    def canonical(s: P) -> P:   # P(None, "model", None) -> P(None, "model"): as jit returns it
        parts = list(s)
        while parts and parts[-1] is None:
            parts.pop()
        return P(*parts)

    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    specs = tuple(canonical(spec(path, x)) for path, x in flat)
    fields = [_key_parts(path)[0] for path, _ in flat]
    return _StateSpecs(specs, tuple(s for s, f in zip(specs, fields) if f == "params"))


def _full_mesh(mesh: Mesh) -> Mesh:
    """``mesh`` with the three axes of :data:`deepseek_jax.sharding.MESH_AXES` in their order (an
    absent one of size 1), every axis Auto."""
    names, devs = list(mesh.axis_names), np.asarray(mesh.devices)
    for a in MESH_AXES:
        if a not in names:
            names.append(a)
            devs = devs[..., None]
    devs = devs.transpose([names.index(a) for a in MESH_AXES])
    return Mesh(devs, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _put(x, target: NamedSharding):
    """``x`` on ``target``: as it is when already there; across hosts from the value every
    process holds (a host array, or an array on this process's devices) or by resharding."""
    if isinstance(x, jax.core.Tracer):   # traced (a Trainer built under jax.eval_shape to compile)
        return jax.lax.with_sharding_constraint(x, target)
    if isinstance(x, jax.Array) and x.sharding == target:   # (equivalent is not enough: a spec with
        return x                                               # trailing Nones is another jit signature)
    if jax.process_count() == 1:
        return jax.device_put(x, target)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.jit(lambda a: a, out_shardings=target)(x)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, target, lambda idx: host[idx])


# The jitted programs take a hashable key (config, precision, remat, has-MTP) as static argument
# instead of the GraphDef, whose hash includes the identity of non-array attributes such as the
# RoPE tables (so every new model object would recompile). Equal keys mean interchangeable graphs;
# the first GraphDef registered for a key serves them all.
_GRAPHDEFS: dict[tuple, Any] = {}


def _graph_key(model: DeepSeekV3, graphdef, rules=None) -> tuple:
    from deepseek_jax.lora import lora_signature   # noqa: PLC0415
    mesh = next((m.mesh for _, m in nnx.iter_modules(model) if getattr(m, "mesh", None) is not None), None)
    key = ("DeepSeekV3", model.cfg, model.prec, bool(model.remat), model.mtp is not None, lora_signature(model),
           mesh, None if rules is None else tuple(sorted(rules.items())))
    _GRAPHDEFS.setdefault(key, graphdef)
    return key


def _merge(key, state: TrainState, params=None, tie: bool = False) -> DeepSeekV3:
    """The model of ``state`` (with ``params`` instead of its own); ``tie`` rebuilds the MTP copies
    from ``params`` so that gradients reach the main embedding / head through them."""
    p = state.params if params is None else params
    tied = _sync_tied(state.tied, p) if tie else state.tied
    return nnx.merge(_GRAPHDEFS[key], p, tied, state.biases, state.rest)


def _constrain(x, mesh: Mesh | None, spec):
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _constrain_leaves(tree, mesh: Mesh | None, specs: tuple | None):
    """Pins every leaf of ``tree`` to its spec (``specs``: one per leaf, in flattening order)."""
    if mesh is None or specs is None:
        return tree
    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten([jax.lax.with_sharding_constraint(x, NamedSharding(mesh, s))
                              for x, s in zip(leaves, specs, strict=True)])


@partial(jax.jit, static_argnames=("key", "tie", "mesh", "axis", "specs"))
def _loss_and_grads(state: TrainState, params, batch, coefs, *, key, tie, mesh, axis, specs=None):
    batch = _constrain(batch, mesh, P(axis))

    def f(p):
        model = _merge(key, state, p, tie)
        loss, aux = compute_loss(model, batch, coefs["mtp_weight"], coefs["balance_alpha"])
        if "scales" in coefs:   # a microbatch's share of the whole batch's loss (Trainer.train_step)
            w = coefs["scales"]
            loss = (w[0] * aux["ce"] + coefs["mtp_weight"] * w[1] * aux["mtp_ce"]
                    + coefs["balance_alpha"] * w[2] * aux["balance"])
        return loss, aux

    (loss, aux), grads = jax.value_and_grad(f, has_aux=True)(params)
    return loss, aux, _constrain_leaves(grads, mesh, specs and specs.params)


@partial(jax.jit, donate_argnames=("total",))
def _accumulate(total, loss, aux, grads, w):
    """Adds one microbatch to the running sums of a step: its (weighted) loss and gradients, its
    loss terms and accuracies weighted by its share (``w``: targets, MTP targets, rows, rows with
    a target), its expert loads and token counts summed."""
    share = {"ce": w[0], "acc": w[0], "mtp_ce": w[1], "balance": w[2], "exact": w[3]}
    aux = {k: v if v is None else v * share[k] if k in share else v for k, v in aux.items()}
    new = (loss, aux, grads)
    return new if total is None else jax.tree.map(jnp.add, total, new)


@partial(jax.jit, static_argnames=("key", "tie", "mesh", "axis"))
def _loss_only(state: TrainState, batch, coefs, *, key, tie, mesh, axis):
    batch = _constrain(batch, mesh, P(axis))
    model = _merge(key, state, tie=tie)
    return compute_loss(model, batch, coefs["mtp_weight"], coefs["balance_alpha"])


@partial(jax.jit, static_argnames=("key",))
def _forward(state: TrainState, ids_BT, *, key):
    model = _merge(key, state)
    out = model(ids_BT)
    mtp = model.mtp_logits(ids_BT, out.hidden) if model.mtp is not None else None
    return out.logits, mtp


def model_logits(model: DeepSeekV3, ids_BT) -> tuple[np.ndarray, np.ndarray | None]:
    """``(logits [B, T, V], mtp_logits [B, T-1, V] or None)`` of a prefill pass, as numpy; compiled
    once per config (not per model object)."""
    graphdef, params, biases, rest = nnx.split(model, nnx.Param, RouterBias, ...)
    key = _graph_key(model, graphdef)
    state = TrainState(jnp.zeros((), jnp.int32), params, nnx.State({}), biases, rest, None)
    dev = jax.devices()[0]
    # Commit single-device arrays (committed or not, the same program then serves every model).
    state = jax.tree.map(lambda x: x if len(x.sharding.device_set) > 1 else jax.device_put(x, dev), state)
    logits, mtp = _forward(state, jax.device_put(jnp.asarray(ids_BT, jnp.int32), dev), key=key)
    return np.asarray(logits), None if mtp is None else np.asarray(mtp)


def _update_biases(biases, aux, gamma, frozen: tuple = (), layer_masks: dict | None = None):
    """``bias += γ sign(mean load - load)`` per router, from this step's loads; the routers of the
    top-level groups in ``frozen`` (``moe_layers``, ``mtp``) keep theirs, and so do the layers of
    a group whose entry in ``layer_masks`` (``[layers]`` bools) is False."""
    flat = []
    for path, var in nnx.to_flat_state(biases):
        top = str(path[0])
        load = aux["moe_load"] if top == "moe_layers" else aux["mtp_load"] if top == "mtp" else None
        if load is None or top in frozen or tuple(load.shape) != tuple(var.shape):
            flat.append((path, var))
            continue
        delta = gamma * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
        if layer_masks and top in layer_masks:
            delta = delta * layer_masks[top][:, None]
        flat.append((path, var.replace((var[...] + delta).astype(var.dtype))))
    return nnx.from_flat_state(flat)


def _masked(tree, masks: tuple):
    """Each leaf times its mask (``None``: as it is), the mask's dims the leaf's leading ones."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten([x if m is None else x * m.reshape(m.shape + (1,) * (x.ndim - m.ndim)).astype(x.dtype)
                              for x, m in zip(leaves, masks, strict=True)])


def _sync_tied(tied, params):
    src = {tuple(str(x) for x in p): v for p, v in nnx.to_flat_state(params)}
    by_copy = {copy: source for source, copy in _TIES}
    flat = [(p, v.replace(src[by_copy[tuple(str(x) for x in p)]][...].astype(v.dtype)))
            for p, v in nnx.to_flat_state(tied)]
    return nnx.from_flat_state(flat)


@partial(jax.jit, static_argnames=("static", "mesh", "frozen", "specs"), donate_argnames=("state",))
def _apply(state: TrainState, grads, loss, aux, coefs, masks=None, *, static: tuple, mesh, frozen: tuple = (),
           specs: "_StateSpecs | None" = None):
    """One optimizer step. ``masks``: ``(per-parameter masks or None, {group: [layers] bools})``
    for a subset of slices of stacked parameters (:func:`trained_slices`): the other slices get
    no gradient (nor weight decay, nor moments), and their layers' routers keep their biases."""
    clip, tie, _ = static
    tx = _make_tx(coefs, clip)
    if masks is not None:
        grads = _masked(grads, masks[0])
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    if masks is not None:
        updates = _masked(updates, masks[0])
    # The optimizer state keeps its dtypes (AdamW's moments in the parameter dtype): the traced
    # float32 b1 promotes bfloat16 parameters' first moment to float32, which changed the state's
    # types after the first step (both programs compiled again, the moment not updated in place).
    opt_state = jax.tree.map(lambda new, old: new.astype(old.dtype), opt_state, state.opt_state)
    params = optax.apply_updates(state.params, updates)
    biases = _update_biases(state.biases, aux, coefs["bias_gamma"], frozen, None if masks is None else masks[1])
    tied = _sync_tied(state.tied, params) if tie else state.tied
    new = TrainState(state.step + 1, params, tied, biases, state.rest, opt_state)
    new = _constrain(new, mesh, P()) if specs is None else _constrain_leaves(new, mesh, specs.state)
    loads = _all_loads(aux)
    metrics = {"loss": loss, "ce": aux["ce"], "mtp_ce": aux["mtp_ce"], "balance": aux["balance"],
               "imbalance": load_imbalance(loads) if loads is not None else jnp.float32(1.0),
               "acc": aux["acc"], "exact": aux["exact"], "tokens": aux["tokens"], "targets": aux["targets"],
               "lr": learning_rate(coefs, state.step), "grad_norm": grad_norm}
    return new, metrics


def _key_parts(path) -> tuple[str, ...]:
    """A pytree key path as strings, without nnx's trailing ``value``."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return tuple(p for p in parts if p != "value")


def _checkpoint_step(mngr, step, directory: str) -> int:
    """``step`` (default: the latest) if ``directory`` holds it, else a one-line error naming
    the steps it holds."""
    steps = sorted(mngr.all_steps())
    if not steps:
        raise DeepSeekError(f"no checkpoint in {directory}")
    if step is None:
        return steps[-1]
    if check_int("step", step, 0) not in steps:
        raise DeepSeekError(f"{directory} holds no step {step} (steps: {', '.join(map(str, steps))})")
    return int(step)


def _frozen_key(key: str) -> bool:
    """Whether a :func:`_flat_keys` key of a :class:`TrainState` is a frozen parameter's."""
    return key.split(".", 1)[0] == "rest"


def _flat_keys(tree) -> tuple[list[str], list[Any], Any]:
    """Flattens a pytree into readable unique string keys (for Orbax)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    keys = [".".join(_key_parts(path)) for path, _ in leaves]
    if len(set(keys)) != len(keys):
        raise AssertionError("train state keys are not unique")
    return keys, [x for _, x in leaves], treedef


class Trainer:
    """Holds the train state of one model and runs steps.

    >>> trainer = Trainer(cast_params(model), TrainConfig(steps=100, lr=3e-3))
    >>> for step in range(trainer.step, 100):
    ...     metrics = trainer.train_step(dataset.batch_at(step))

    ``mesh``: a mesh with axes among ``data`` / ``expert`` / ``model`` (``sharding.make_mesh``)
    splits the parameters and their optimizer state by ``rules`` (a :mod:`deepseek_jax.sharding`
    preset or table) and each batch over ``data``; on several processes every one passes the same
    whole batch. A mesh with other axis names splits the batch over ``data_axis`` and replicates
    the state.
    """

    def __init__(self, model: DeepSeekV3, tcfg: TrainConfig = TrainConfig(), *, mesh: Mesh | None = None,
                 data_axis: str = "data", rules: Any = "ep_tp"):
        if not isinstance(model, DeepSeekV3):
            raise DeepSeekError(f"model: expected a DeepSeekV3 (from dj.load or dj.init_random), "
                                f"got {type(model).__name__}")
        if not isinstance(tcfg, TrainConfig):
            raise DeepSeekError(f"tcfg: expected a TrainConfig, got {type(tcfg).__name__}")
        tcfg.validate()
        if model.cfg.fp8:
            _check_fp8_frozen(model, tcfg.trainable)
        table = None
        if mesh is not None:
            if not isinstance(mesh, Mesh):
                raise DeepSeekError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
            if data_axis not in mesh.axis_names:
                raise DeepSeekError(f"mesh has no axis {data_axis!r} (axes {mesh.axis_names})")
            if data_axis == "data" and set(mesh.axis_names) <= set(MESH_AXES):
                mesh = _full_mesh(mesh)                 # the parameters split by the rules
                table = resolve_rules(rules, mesh)
            else:
                mesh = auto_mesh(mesh)                  # other axis names: the state replicated
        self.tcfg, self.mesh, self.axis = tcfg, mesh, data_axis
        model = nnx.clone(model)
        model.remat = tcfg.remat
        if table is not None:
            attach_mesh(model, mesh, table)   # expert-parallel MoE and per-shard kernels, in the graph
        self.tie = bool(tcfg.tie_mtp and model.mtp is not None)
        if self.tie:   # the MTP layer's copies start equal to their sources, trained or not (a copy
            # whose source is frozen stays with ``rest``: from a random init it kept its own values)
            for source, copy in _TIES:
                src, dst = reduce(getattr, source, model), reduce(getattr, copy, model)
                dst[...] = src[...].astype(dst.dtype)
        self.cfg = model.cfg
        is_trained = trained_predicate(tcfg.trainable, model, tie=self.tie)
        partial_masks = trained_slices(tcfg.trainable, model)
        by_copy = {copy: source for source, copy in _TIES}
        tie = self.tie
        # A router keeps its balancing bias where its gate weight is frozen: a subset fine-tune
        # leaves the rest of the model as loaded (by layer, where only some layers' gates train).
        self.frozen_routers = tuple(g for g in ("moe_layers", "mtp") if not is_trained((g, "mlp", "gate", "weight")))

        def tied_copy(path, value) -> bool:   # follows its source, where that is trained
            return tie and _is_tied_copy(path, value) and is_trained(by_copy[tuple(str(p) for p in path)])

        def train(path, value) -> bool:
            return isinstance(value, nnx.Param) and not (tie and _is_tied_copy(path, value)) and is_trained(path)

        # Parameters ``trainable`` does not match go with ``rest``: merged into the model, not
        # differentiated, no optimizer state.
        graphdef, tied, params, biases, rest = nnx.split(model, tied_copy, train, RouterBias, ...)
        self.key = _graph_key(model, graphdef, table)
        copy = lambda t: jax.tree.map(lambda x: jnp.array(x, copy=True), t)  # noqa: E731 (state is donated)
        params, tied, biases, rest = copy(params), copy(tied), copy(biases), copy(rest)
        self._specs = None
        if table is not None:
            shape = dict(mesh.shape)
            specs = model_param_specs(model, shape, table)
            shapes = {tuple(str(x) for x in p): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(model))}
            model_specs = {p: (spec, shapes[p]) for p, spec in specs.items()}
            self._specs = _state_specs(TrainState(0, params, tied, biases, rest, ()), model_specs)
            params = self._place(params, self._specs.params)   # before the optimizer: its moments
            # (zeros like each parameter) are then made on the parameter's devices, never whole
        if self.tie:
            tied = _sync_tied(tied, params)
        state = TrainState(jnp.zeros((), jnp.int32), params, tied, biases, rest,
                           make_optimizer(tcfg).init(params))
        if table is not None:
            self._specs = _state_specs(state, model_specs)
        self.state = self._place(state)
        self._masks = None
        if partial_masks:
            flat = [_key_parts(p) for p, _ in jax.tree_util.tree_flatten_with_path(self.state.params)[0]]
            routers = {g: partial_masks[(g, "mlp", "gate", "weight")] for g in ("moe_layers",)
                       if (g, "mlp", "gate", "weight") in partial_masks}
            self._masks = self._place(([None if partial_masks.get(p) is None else jnp.asarray(partial_masks[p])
                                        for p in flat], {g: jnp.asarray(m, jnp.float32) for g, m in routers.items()}),
                                      (P(),) * (sum(p in partial_masks for p in flat) + len(routers)))
            self._masks = (tuple(self._masks[0]), self._masks[1])

    def parameter_counts(self) -> tuple[int, int]:
        """``(trained, all)`` parameter counts (the tied MTP copies not counted twice; of a
        parameter trained in part, its trained slices)."""
        every = nnx.state(_merge(self.key, self.state), nnx.Param)
        total = sum(int(v[...].size) for p, v in nnx.to_flat_state(every) if not (self.tie and _is_tied_copy(p, v)))
        masks = self._masks[0] if self._masks is not None else (None,) * len(jax.tree.leaves(self.state.params))
        return trained_count(jax.tree.leaves(self.state.params), masks), total

    # ---- placement ----------------------------------------------------------------------------
    def _place(self, tree, specs: tuple | None = None):
        """Commits ``tree`` (the train state, or ``specs``' part of it) to its devices, each leaf
        by its spec (fresh and restored states then look alike to jit: no recompilation after a
        restore)."""
        if self.mesh is None:
            return jax.device_put(tree, jax.devices()[0])
        leaves, treedef = jax.tree.flatten(tree)
        specs = specs if specs is not None else self._specs.state if self._specs is not None else (P(),) * len(leaves)
        return treedef.unflatten([_put(x, NamedSharding(self.mesh, s)) for x, s in zip(leaves, specs, strict=True)])

    def _host_batch(self, batch):
        """``batch`` (a :class:`~deepseek_jax.tasks.Batch` or an ``(ids, loss_mask, valid)``
        tuple) as checked numpy arrays: a bad id would become a NaN embedding (``jnp.take``
        fills out-of-range rows with NaN) and, through one optimizer step, NaN weights."""
        from deepseek_jax.tasks import Batch
        if isinstance(batch, tuple) and not isinstance(batch, Batch) and len(batch) == 3:
            batch = Batch(*batch)
        if not all(hasattr(batch, f) for f in Batch._fields):
            raise DeepSeekError(f"batch: expected a deepseek_jax.tasks.Batch (ids, loss_mask, valid), "
                                f"got {type(batch).__name__}")
        arrays = []
        for f in Batch._fields:
            try:   # (ragged rows: numpy's "inhomogeneous shape" error, from deep inside it)
                arrays.append(np.asarray(getattr(batch, f)))
            except ValueError:
                raise DeepSeekError(f"batch: {f} is ragged: every row must have the same length") from None
        ids, mask, valid = arrays
        if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
            raise DeepSeekError(f"batch: ids must be [batch >= 1, length >= 2], got shape {list(ids.shape)}")
        for name, x in (("loss_mask", mask), ("valid", valid)):
            if x.shape != ids.shape:
                raise DeepSeekError(f"batch: {name} has shape {list(x.shape)}, ids {list(ids.shape)}")
        if ids.dtype.kind not in "iu":
            raise DeepSeekError(f"batch: ids must be integer token ids, got dtype {ids.dtype}")
        V, limit = self.cfg.vocab_size, self.cfg.max_position_embeddings
        bad = (ids < 0) | (ids >= V)
        if bad.any():
            b, t = np.argwhere(bad)[0]
            raise DeepSeekError(f"batch: token id {int(ids[b, t])} at [{b}, {t}] is outside the vocab [0, {V})")
        if ids.shape[1] > limit:
            raise DeepSeekError(f"batch: length {ids.shape[1]} is over max_position_embeddings {limit}")
        if mask.dtype.kind not in "biuf" or not np.isfinite(mask.astype(np.float32)).all():
            raise DeepSeekError("batch: loss_mask must hold finite numbers (1 where a token is a target)")
        if (mask < 0).any():   # (a negative weight makes the step raise that token's loss)
            raise DeepSeekError("batch: loss_mask must be >= 0 (1 where a token is a target, 0 elsewhere)")
        if valid.dtype.kind not in "biuf" or not np.isin(valid, (0, 1)).all():
            raise DeepSeekError(f"batch: valid must be booleans (or 0/1), got dtype {valid.dtype}"
                                + ("" if valid.dtype.kind not in "biuf" else " with values other than 0 and 1"))
        return Batch(ids.astype(np.int32), mask.astype(np.float32), valid.astype(bool))

    def _batch(self, batch):
        b = self._host_batch(batch)
        if self.mesh is not None:
            n = self.mesh.shape[self.axis]
            if b.ids.shape[0] % n:
                raise DeepSeekError(f"batch size {b.ids.shape[0]} is not a multiple of the {n} devices "
                                    f"of mesh axis {self.axis!r}")
            rows = NamedSharding(self.mesh, P(self.axis))
            return jax.tree.map(lambda x: _put(x, rows), b)
        return jax.device_put(b, jax.devices()[0])

    def _kw(self):
        return dict(key=self.key, tie=self.tie, mesh=self.mesh, axis=self.axis, specs=self._specs)

    # ---- steps ----------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        """Number of steps done (the index of the next batch)."""
        return int(self.state.step)

    def train_step(self, batch) -> dict[str, jax.Array]:
        """One optimizer step on ``batch``; returns device scalars (loss, ce, mtp_ce, balance,
        imbalance, acc, exact, tokens, targets, lr, grad_norm).

        With ``grad_accum = k`` the batch runs as ``k`` microbatches of its rows, one forward and
        backward at a time, each weighted by its share of the batch's targets (and of its rows,
        for the balance term), so the summed gradient is the whole batch's; then one update."""
        k = self.tcfg.grad_accum
        coefs = self.tcfg._hyper()
        if k == 1:
            batch = self._batch(batch)
            loss, aux, grads = _loss_and_grads(self.state, self.state.params, batch, coefs, **self._kw())
        else:
            loss, aux, grads = self._accumulated(batch, coefs, k)
        self.state, metrics = _apply(self.state, grads, loss, aux, coefs, self._masks, static=self.tcfg._static(),
                                     mesh=self.mesh, frozen=self.frozen_routers, specs=self._specs)
        return metrics

    def _accumulated(self, batch, coefs, k: int):
        """``(loss, aux, grads)`` of ``batch`` summed over ``k`` microbatches (see :meth:`train_step`)."""
        from deepseek_jax.tasks import Batch
        ids, mask, valid = self._host_batch(batch)
        B = ids.shape[0]
        if B % k:
            raise DeepSeekError(f"batch size {B} is not a multiple of grad_accum {k}")
        n = self.mesh.shape[self.axis] if self.mesh is not None else 1
        if (B // k) % n:
            raise DeepSeekError(f"batch size {B} / grad_accum {k} = microbatches of {B // k} rows, not a multiple "
                                f"of the {n} devices of mesh axis {self.axis!r}")
        has = mask[:, 1:].sum(1) > 0
        totals = (max(mask[:, 1:].sum(), 1.0), max(mask[:, 2:].sum(), 1.0), float(B), max(float(has.sum()), 1.0))
        total = None
        for i in range(k):
            rows = slice(i * B // k, (i + 1) * B // k)
            part = Batch(ids[rows], mask[rows], valid[rows])
            m = mask[rows]
            w = np.array([max(m[:, 1:].sum(), 0.0) / totals[0], m[:, 2:].sum() / totals[1], (B // k) / totals[2],
                          has[rows].sum() / totals[3]], np.float32)
            out = _loss_and_grads(self.state, self.state.params, self._batch(part), {**coefs, "scales": w[:3]},
                                  **self._kw())
            total = _accumulate(total, *out, w)
        return total

    def loss_and_grads(self, batch, params=None):
        """``(loss, aux, grads)`` at the current (or the given) parameters, without stepping."""
        params = self.state.params if params is None else params
        return _loss_and_grads(self.state, params, self._batch(batch), self.tcfg._hyper(), **self._kw())

    def evaluate(self, dataset, n_batches: int = 4, start: int = 0) -> dict[str, float]:
        """Mean loss terms, token accuracy and exact match over ``n_batches`` batches of ``dataset``
        (anything with ``batch_at(i)``, as :mod:`deepseek_jax.tasks`' datasets), from batch ``start``."""
        n_batches, start = check_int("n_batches", n_batches, 1), check_int("start", start, 0)
        if not callable(getattr(dataset, "batch_at", None)):
            raise DeepSeekError(f"evaluate: dataset must have batch_at(i) (a deepseek_jax.tasks dataset), "
                                f"got {type(dataset).__name__}")
        sums: dict[str, float] = {}
        for s in range(start, start + n_batches):
            loss, aux = _loss_only(self.state, self._batch(dataset.batch_at(s)), self.tcfg._hyper(), key=self.key,
                                       tie=self.tie, mesh=self.mesh, axis=self.axis)
            loads = _all_loads(aux)
            vals = {"loss": loss, "ce": aux["ce"], "mtp_ce": aux["mtp_ce"], "acc": aux["acc"],
                    "exact": aux["exact"], "imbalance": load_imbalance(loads) if loads is not None else 1.0}
            for k, v in vals.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        return {k: v / n_batches for k, v in sums.items()}

    def model(self) -> DeepSeekV3:
        """A copy of the current model (MTP copies tied), independent of later steps."""
        s = jax.tree.map(lambda x: jnp.array(x, copy=True), self.state)
        model = _merge(self.key, s)
        model.remat = False
        return model

    # ---- checkpoints ---------------------------------------------------------------------------
    def _manager(self, directory, max_to_keep=3):
        import orbax.checkpoint as ocp
        return ocp.CheckpointManager(os.path.abspath(os.fspath(directory)), options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False))

    def save(self, directory, metadata: dict | None = None, max_to_keep: int = 3, frozen: bool = False) -> int:
        """Saves the train state as Orbax step ``self.step`` under ``directory``, with JSON
        ``metadata`` next to it; returns the step. The frozen parameters (those ``trainable``
        leaves out: with LoRA over DeepSeek-V3, the whole base model) are not saved unless
        ``frozen``: they never change, and :meth:`restore` keeps the Trainer's own, which must be
        the same model's."""
        import orbax.checkpoint as ocp
        metadata = dict(metadata or {}) if isinstance(metadata, (Mapping, type(None))) else None
        if metadata is None:
            raise DeepSeekError("save: metadata must be a mapping of JSON values or None")
        taken = sorted(set(metadata) & {"step", "train_config", "frozen_saved"})
        if taken:   # (they would replace the recorded step / config that restore reads back)
            raise DeepSeekError(f"save: metadata key {taken[0]!r} is the checkpoint's own: use another name")
        try:   # (checked here: Orbax's writer thread failed late, leaving a half-written step behind)
            json.dumps(metadata)   # (NaN is taken, as Orbax writes it: a diverged loss, say)
        except (TypeError, ValueError) as e:
            raise DeepSeekError(f"save: metadata is not JSON: {e}") from None
        keys, leaves, _ = _flat_keys(self.state)
        step = self.step
        meta = {"step": step, "train_config": dataclasses.asdict(self.tcfg), **metadata,
                "frozen_saved": bool(frozen)}
        saved = {k: x for k, x in zip(keys, leaves) if frozen or not _frozen_key(k)}
        with self._manager(directory, max_to_keep) as mngr:
            mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(saved),
                                                     meta=ocp.args.JsonSave(meta)), force=True)
            mngr.wait_until_finished()
        return step

    @staticmethod
    def latest_step(directory) -> int | None:
        import orbax.checkpoint as ocp
        directory = os.path.abspath(os.fspath(directory))
        if not os.path.isdir(directory):
            return None
        with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False)) as mngr:
            return mngr.latest_step()

    @staticmethod
    def read_metadata(directory, step: int | None = None) -> dict:
        import orbax.checkpoint as ocp
        directory = os.path.abspath(os.fspath(directory))
        if not os.path.isdir(directory):
            raise DeepSeekError(f"no checkpoint in {directory}: not a directory")
        with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False)) as mngr:
            step = _checkpoint_step(mngr, step, directory)
            return dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

    def restore(self, directory, step: int | None = None) -> dict:
        """Replaces the train state by checkpoint ``step`` (default: the latest) of ``directory``;
        returns its metadata."""
        import orbax.checkpoint as ocp
        directory = os.path.abspath(os.fspath(directory))
        keys, leaves, treedef = _flat_keys(self.state)
        if not os.path.isdir(directory):
            raise DeepSeekError(f"no checkpoint to resume in {directory}: not a directory")
        with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False)) as mngr:
            step = _checkpoint_step(mngr, step, directory)
            # (checkpoints written before the frozen parameters were left out hold them too)
            frozen = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta.get(
                "frozen_saved", True)
            abstract = {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                        for k, x in zip(keys, leaves) if frozen or not _frozen_key(k)}
            try:
                got = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                 meta=ocp.args.JsonRestore()))
            except (ValueError, KeyError, FileNotFoundError) as e:
                raise DeepSeekError(f"checkpoint {directory} step {step} does not fit this model / "
                                    f"optimizer: {' '.join(str(e).split())[:300]}") from None
        self.state = self._place(jax.tree_util.tree_unflatten(
            treedef, [got.state[k] if k in abstract else x for k, x in zip(keys, leaves)]))
        return dict(got.meta)


# --------------------------------------------------------------------------------------------
# Hub layout in and out
# --------------------------------------------------------------------------------------------


def export_hub(model: DeepSeekV3, out_dir, fp8: bool = False, *, tokenizer_dir=None,
               max_shard_bytes: int = 5 * 2**30) -> str:
    """Writes ``model`` as a Hub-layout checkpoint directory; returns it.

    Tensor names, shapes and dtypes are exactly :func:`deepseek_jax.hub.hub_tensor_specs` of the
    model's config: BF16 everywhere but the router bias (F32); with ``fp8`` every linear weight the
    spec marks ``F8_E4M3`` is block-quantized from the float32 values with its ``weight_scale_inv``
    and ``config.json`` gets the ``quantization_config``. The tokenizer files of ``tokenizer_dir``
    (the model's own: a checkpoint directory, or ``TINY_TOKENIZER_DIR`` for the synthetic tasks;
    default None: none) are copied next to it.

    On several processes (a model sharded over a multi-host mesh) every process must call it:
    each tensor is gathered by all of them, and process 0 writes.

    ``model`` may hold FP8 weights and LoRA adapters (:mod:`deepseek_jax.lora`): they are merged
    tensor by tensor (one layer's, or one expert's, matrix on the host at a time: the FP8 weight
    dequantized, ``scale * B @ A`` added), never as a whole float copy of the model. An FP8 weight
    without an adapter is written as it is (its e4m3 bytes and scales) with ``fp8``, and
    dequantized to BF16 without.
    """
    from deepseek_jax.lora import _adapted   # noqa: PLC0415 (lora imports the model)

    out_dir = os.fspath(out_dir)
    cfg = model.cfg
    hub_cfg = cfg.replace(fp8=bool(fp8)).to_hub_dict()
    hub_cfg["torch_dtype"] = "bfloat16"
    specs = hub_tensor_specs(hub_cfg, include_mtp=model.mtp is not None, fp8=bool(fp8))
    block = tuple(cfg.weight_block_size)
    adapters = {path + ("weight",): lin for path, lin in _adapted(model)}
    params = dict(iter_params(model))

    def host(a, idx):   # one slice of a (possibly stacked) array, on the host
        if a.is_fully_addressable:
            return np.asarray(jax.device_get(a[idx]))
        # spread over hosts: every process gathers the slice (the same calls in the same order)
        got = _gathered_slice(a, np.asarray(idx, np.int32), NamedSharding(a.sharding.mesh, P()))
        return np.asarray(got.addressable_data(0))

    main = jax.process_index() == 0   # on several processes, process 0 writes
    if main:
        os.makedirs(out_dir, exist_ok=True)
    written: set[str] = set()
    with (HubWriter(out_dir, max_shard_bytes=max_shard_bytes, metadata={"format": "pt"}) if main
          else _Discard()) as writer:
        for path, var in params.items():
            if path[-1] in ("lora_a", "lora_b", "weight_scale_inv"):   # written with their weight
                continue
            slot = hub_slot(path, cfg)
            arr = var[...]
            scale = params[path[:-1] + ("weight_scale_inv",)][...] if arr.dtype == jnp.float8_e4m3fn else None
            lin = adapters.get(path)
            for idx in np.ndindex(*slot.stack):
                name = slot.names[idx]
                spec = specs.get(name)
                if spec is None:
                    raise DeepSeekError(f"export_hub: parameter {'.'.join(path)} maps to {name}, "
                                        "which the Hub layout does not have")
                if tuple(arr.shape[len(slot.stack):]) != spec.shape:
                    raise DeepSeekError(f"export_hub: {name} has shape {list(arr.shape[len(slot.stack):])}, "
                                        f"expected {list(spec.shape)}")
                if scale is not None and lin is None and spec.dtype_name == "F8_E4M3":
                    writer.add(name, host(arr, idx))                 # as it is: bit-exact
                    writer.add(name + "_scale_inv", host(scale, idx).astype(np.float32))
                    written.update((name, name + "_scale_inv"))
                    continue
                t = (dequantize_block_fp8_np(host(arr, idx), host(scale, idx), block) if scale is not None
                     else host(arr, idx).astype(np.float32))
                if lin is not None:
                    t = t + lin.lora_scale * (host(lin.lora_b[...], idx).astype(np.float32)
                                              @ host(lin.lora_a[...], idx).astype(np.float32))
                if spec.dtype_name == "F8_E4M3":
                    try:
                        wq, s = quantize_block_fp8_np(t, block)
                    except DeepSeekError as e:
                        raise DeepSeekError(f"export: {name}: {e}") from None
                    writer.add(name, wq)
                    writer.add(name + "_scale_inv", s)
                    written.update((name, name + "_scale_inv"))
                else:
                    writer.add(name, t.astype(ml_dtypes.bfloat16 if spec.dtype_name == "BF16" else np.float32))
                    written.add(name)
        missing = sorted(set(specs) - written)
        if missing:
            raise DeepSeekError(f"export_hub: the model has no values for {missing[:3]} ({len(missing)} tensors)")
    if main:
        write_config(out_dir, hub_cfg)
    if main and tokenizer_dir is not None:
        for f in TOKENIZER_FILES:
            src = os.path.join(os.fspath(tokenizer_dir), f)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(out_dir, f))
    if jax.process_count() > 1:   # the files are complete when any process returns
        from jax.experimental import multihost_utils   # noqa: PLC0415
        multihost_utils.sync_global_devices("deepseek_jax.export_hub")
    return out_dir


@partial(jax.jit, static_argnames=("whole",))
def _gathered_slice(a, idx, whole: NamedSharding):
    """``a[idx]`` (``idx``: leading indices, traced: one program per array shape) on every device."""
    return jax.lax.with_sharding_constraint(a[tuple(idx[k] for k in range(idx.shape[0]))], whole)


class _Discard:
    """A :class:`HubWriter` stand-in for the processes that do not write."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add(self, name, array) -> None:
        pass


def bf16_snapshot(params, max_elements: int = 1 << 26) -> list[np.ndarray] | None:
    """The trained parameters (``Trainer.state.params``) rounded to bfloat16, on the host: what
    :func:`bf16_unchanged` compares the exported ones with. None when they hold more than
    ``max_elements`` or are spread over processes (not checked then)."""
    leaves = jax.tree.leaves(params)
    if sum(x.size for x in leaves) > max_elements or not all(x.is_fully_addressable for x in leaves):
        return None
    return [np.asarray(x).astype(ml_dtypes.bfloat16) for x in leaves]


def bf16_unchanged(snapshot: list[np.ndarray] | None, params) -> tuple[int, int]:
    """``(unchanged, all)``: how many trained arrays round to the same bfloat16 values as in
    ``snapshot``, whose updates a BF16 export therefore drops (a norm weight near 1.0 moves in
    steps of 2**-7: smaller updates vanish). ``(0, 0)`` without a snapshot."""
    if snapshot is None:
        return 0, 0
    now = [np.asarray(x).astype(ml_dtypes.bfloat16) for x in jax.tree.leaves(params)]
    return sum(np.array_equal(a, b) for a, b in zip(snapshot, now, strict=True)), len(now)


def load_float_model(path, *, prec: Precision = Precision(), param_dtype=jnp.float32,
                     with_mtp: bool | None = None, cfg: DeepSeekConfig | None = None, mesh: Mesh | None = None,
                     rules: Any = "ep_tp") -> DeepSeekV3:
    """Loads a checkpoint, in the Hub layout or converted to Orbax (``deepseek-jax convert``), as
    a trainable float model (FP8 weights dequantized, parameters in ``param_dtype``): the starting
    point of fine-tuning. With a ``mesh`` every parameter is made directly in its shards by the
    rules, each process reading (and dequantizing) only the layers / experts its devices hold, one
    matrix at a time: no host holds the whole model."""
    from deepseek_jax import orbax_ckpt, sharding   # noqa: PLC0415

    path = os.fspath(path)
    reader = orbax_ckpt.HubView(path) if orbax_ckpt.is_orbax_checkpoint(path) else HubReader(path)
    try:
        cfg = cfg or DeepSeekConfig.from_hub_dict(reader.config)
        with_mtp = hub_layout(reader, cfg, with_mtp)
        block = tuple(cfg.weight_block_size)
        cfg = cfg.replace(fp8=False)
        abstract = abstract_model(cfg, prec, with_mtp)
        graphdef, state = nnx.split(abstract)
        flat_state = list(nnx.to_flat_state(state))
        table = sharding.resolve_rules(rules, mesh) if mesh is not None else None
        mesh = sharding.auto_mesh(mesh)
        specs = sharding.model_param_specs(abstract, dict(mesh.shape), table) if mesh is not None else None

        def matrix(name: str, want: tuple) -> np.ndarray:   # one Hub tensor, as float32
            if name not in reader:
                raise DeepSeekError(f"checkpoint: missing tensor {name}")
            a = reader.get(name)
            if a.dtype == np.dtype(ml_dtypes.float8_e4m3fn):
                if name + "_scale_inv" not in reader:
                    raise DeepSeekError(f"checkpoint: missing tensor {name}_scale_inv")
                a = dequantize_block_fp8_np(a, reader.get(name + "_scale_inv"), block)
            if tuple(a.shape) != want:
                raise DeepSeekError(f"checkpoint: tensor {name} has shape {list(a.shape)}, "
                                    f"the config implies {list(want)}")
            return np.asarray(a, np.float32)

        flat = []
        for p, var in flat_state:
            path_s = tuple(str(x) for x in p)
            slot = hub_slot(path_s, cfg)
            ns, inner_shape = len(slot.stack), tuple(var.shape[len(slot.stack):])
            for idx in np.ndindex(*slot.stack):   # names and shapes checked before any placement
                if slot.names[idx] not in reader:
                    raise DeepSeekError(f"checkpoint: missing tensor {slot.names[idx]}")
            dtype = jnp.dtype(param_dtype if isinstance(var, nnx.Param) else var.dtype)

            def read(index, slot=slot, ns=ns, inner_shape=inner_shape, dtype=dtype, shape=tuple(var.shape)):
                index = tuple(index) + (slice(None),) * (len(shape) - len(index))
                ranges = [range(*sl.indices(n)) for sl, n in zip(index[:ns], slot.stack)]
                rows = [np.asarray(matrix(slot.names[ids], inner_shape)[index[ns:]], dtype)
                        for ids in itertools.product(*ranges)]
                return np.stack(rows).reshape(tuple(len(r) for r in ranges) + rows[0].shape)

            if mesh is None:
                value = jnp.asarray(read(()))
            else:
                value = jax.make_array_from_callback(tuple(var.shape), NamedSharding(mesh, specs[path_s]), read)
            flat.append((p, var.replace(value)))
        model = nnx.merge(graphdef, nnx.from_flat_state(flat))
        if mesh is not None:
            sharding.attach_mesh(model, mesh, table)
        return model
    finally:
        reader.close()