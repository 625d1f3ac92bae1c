"""LoRA adapters: fine-tuning with the checkpoint's weights frozen (FP8 ones kept in FP8).

``add_lora`` attaches ``y += (alpha / r) * (x Aᵀ) Bᵀ`` to the chosen linear layers of every
layer (``A [r, in]`` random, ``B [out, r]`` zero, so the model is unchanged until trained; stacked
layers get stacked adapters). ``Linear.__call__`` adds the delta on every path that calls it
(prefill, decode, the MTP layer). ``TrainConfig(trainable=LORA_PATTERN)`` then trains the adapters
alone, and ``train.export_hub`` writes the model with them merged, tensor by tensor
(:func:`merge_lora` makes the merged float model in memory)::

    model = dj.load(ckpt)                         # FP8 weights stay e4m3
    n = lora.add_lora(model, rank=8)
    trainer = Trainer(model, TrainConfig(trainable=lora.LORA_PATTERN))
    ...
    export_hub(trainer.model(), out_dir, fp8=True, tokenizer_dir=ckpt)   # the tokenizer too

Targets are names of ``Linear`` modules: by default MLA's projections but ``kv_b_proj`` (the
absorbed decode path reads its weight in place, not through ``__call__``); ``gate_proj``,
``up_proj`` and ``down_proj`` add the dense MLPs and shared experts. Routed experts run through
the grouped GEMM and take no adapter.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax.errors import DeepSeekError
from deepseek_jax.model import DeepSeekV3
from deepseek_jax.quant import Linear, dequantize

#: The adapters' parameter names, as ``TrainConfig.trainable`` matches them.
LORA_PATTERN = r"/lora_[ab]$"
#: MLA's projections that go through ``Linear.__call__`` (``q_proj`` where ``q_lora_rank`` is null).
DEFAULT_TARGETS = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "o_proj")
TARGET_NAMES = DEFAULT_TARGETS + ("gate_proj", "up_proj", "down_proj")


def _targets(model: DeepSeekV3, targets) -> list[tuple[tuple, Linear]]:
    return [(tuple(str(p) for p in path), node) for path, node in nnx.iter_graph(model)
            if isinstance(node, Linear) and path and path[-1] in targets and "experts" != str(path[-2])]


def add_lora(model: DeepSeekV3, *, rank: int = 8, alpha: float | None = None, targets=None,
             seed: int = 0) -> int:
    """Attaches float32 LoRA adapters of rank ``rank`` (scale ``alpha / rank``, ``alpha`` defaulting
    to ``2 * rank``) to the ``targets`` linears of every layer, in place; returns how many weight
    matrices got one (a stacked weight of L layers counts L). ``targets``: names of
    :data:`TARGET_NAMES` (default :data:`DEFAULT_TARGETS`, those of them the model has); a name
    given explicitly must exist in the model. Everything is checked before anything is attached."""
    if not isinstance(model, DeepSeekV3):
        raise DeepSeekError(f"add_lora: expected a DeepSeekV3, got {type(model).__name__}")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise DeepSeekError(f"add_lora: rank must be an integer >= 1, got {rank!r}")
    alpha = 2.0 * rank if alpha is None else alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)) \
            or not math.isfinite(alpha) or alpha <= 0:
        raise DeepSeekError(f"add_lora: alpha must be a positive number, got {alpha!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise DeepSeekError(f"add_lora: seed must be an integer, got {seed!r}")
    explicit = targets is not None
    if isinstance(targets, str) or (explicit and not all(isinstance(t, str) for t in targets)):
        raise DeepSeekError(f"add_lora: targets must be a list of names, got {targets!r}")
    targets = tuple(targets) if explicit else DEFAULT_TARGETS
    if not targets:
        raise DeepSeekError("add_lora: targets is empty")
    bad = sorted(set(targets) - set(TARGET_NAMES))
    if bad:
        raise DeepSeekError(f"add_lora: no adapter for {', '.join(bad)} (choose from {', '.join(TARGET_NAMES)}; "
                            "kv_b_proj and the routed experts are not called as plain linears)")
    if _adapted(model):
        raise DeepSeekError("add_lora: the model already has LoRA adapters")
    found = _targets(model, targets)
    present = {path[-1] for path, _ in found}
    missing = [t for t in targets if t not in present]
    if not found or (explicit and missing):
        raise DeepSeekError(f"add_lora: this model has no {', '.join(missing or targets)} to adapt")
    for path, lin in found:
        *stack, n, k = lin.weight[...].shape
        if rank > min(n, k):
            raise DeepSeekError(f"add_lora: rank {rank} exceeds the {n}x{k} weight of {'/'.join(path)}")
    key = jax.random.PRNGKey(int(seed))
    count = 0
    for i, (_, lin) in enumerate(found):
        *stack, n, k = lin.weight[...].shape
        a = jax.random.normal(jax.random.fold_in(key, i), (*stack, rank, k), jnp.float32) / math.sqrt(k)
        lin.lora_a = nnx.Param(a)
        lin.lora_b = nnx.Param(jnp.zeros((*stack, n, rank), jnp.float32))
        lin.lora_scale = float(alpha) / rank
        count += int(np.prod(stack, dtype=np.int64))
    return count


def adapted_names(model: DeepSeekV3) -> list[str]:
    """The linear names that carry adapters (``["q_a_proj", "o_proj", ...]``), in target order."""
    names = {path[-1] for path, _ in _adapted(model)}
    return [t for t in TARGET_NAMES if t in names]


def lora_signature(model: DeepSeekV3) -> tuple:
    """What distinguishes this model's graph from the same config without (or with other)
    adapters: ``((path, rank, scale), ...)``, empty without adapters."""
    if not isinstance(model, DeepSeekV3):
        raise DeepSeekError(f"lora_signature: expected a DeepSeekV3, got {type(model).__name__}")
    return tuple((path, int(node.lora_a[...].shape[-2]), node.lora_scale) for path, node in _adapted(model))


def lora_deltas(model: DeepSeekV3) -> dict[tuple[str, ...], jax.Array]:
    """``{weight path: scale * B @ A}`` (float32, stacked like the weight) of every adapter."""
    return {path + ("weight",): lin.lora_scale * jnp.einsum("...nr,...rk->...nk", lin.lora_b[...].astype(jnp.float32),
                                                            lin.lora_a[...].astype(jnp.float32))
            for path, lin in _adapted(model)}


def _adapted(model) -> list[tuple[tuple[str, ...], Linear]]:
    return [(tuple(str(p) for p in path), node) for path, node in nnx.iter_graph(model)
            if isinstance(node, Linear) and getattr(node, "lora_a", None) is not None]


def merge_lora(model: DeepSeekV3) -> DeepSeekV3:
    """A float copy of ``model`` with every adapter folded into its weight (``W + scale * B A``,
    FP8 weights dequantized first) and no adapters. Parameters come out float32: the whole model
    in float32 in memory (``train.export_hub`` merges tensor by tensor instead)."""
    from deepseek_jax.checkpoint import abstract_model   # noqa: PLC0415 (checkpoint imports the model)
    if not isinstance(model, DeepSeekV3):
        raise DeepSeekError(f"merge_lora: expected a DeepSeekV3, got {type(model).__name__}")
    cfg = model.cfg.replace(fp8=False)
    graphdef, want = nnx.split(abstract_model(cfg, model.prec, with_mtp=model.mtp is not None))
    src = {tuple(str(p) for p in path): v[...] for path, v in nnx.to_flat_state(nnx.state(model))}
    deltas = lora_deltas(model)
    flat = []
    for path, var in nnx.to_flat_state(want):
        key = tuple(str(p) for p in path)
        a = src[key]
        if a.dtype == jnp.float8_e4m3fn:
            a = dequantize(a, src[key[:-1] + ("weight_scale_inv",)], jnp.float32)
        elif jnp.issubdtype(a.dtype, jnp.floating):
            a = a.astype(jnp.float32)
        if key in deltas:
            a = a + deltas[key]
        flat.append((path, var.replace(a)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
