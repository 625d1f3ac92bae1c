"""Random DeepSeek-V3-shaped Hub checkpoints for tests (numpy only, no jax, no torch).

:func:`tiny_config` gives a small but complete DeepSeek-V3 ``config.json`` dict (MLA with
q-LoRA, YaRN, a dense layer then MoE layers with grouped routing, one MTP layer), and
:func:`random_hub_checkpoint` writes a checkpoint holding exactly the tensors of
:func:`deepseek_jax.hub.hub_tensor_specs` for any such config, FP8 block-quantized or BF16.

Generation is streamed tensor by tensor through :class:`deepseek_jax.hub.HubWriter`, each
tensor drawn from its own numpy Generator seeded from ``(seed, tensor name)``, so the output
is reproducible byte for byte and independent of shard size or tensor order.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
from typing import Any

import ml_dtypes
import numpy as np

from deepseek_jax.hub import (
    HubWriter,
    TensorSpec,
    hub_tensor_specs,
    quantize_block_fp8_np,
    write_config,
)

__all__ = ["FP8_QUANTIZATION_CONFIG", "random_hub_checkpoint", "tiny_config"]

#: The ``quantization_config`` of the published DeepSeek-V3 checkpoint.
FP8_QUANTIZATION_CONFIG: dict[str, Any] = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}

_TINY_CONFIG: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_routed_experts": 16,
    "n_shared_experts": 1,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "q_lora_rank": 48,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 4,
        "original_max_position_embeddings": 32,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "attention_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "num_nextn_predict_layers": 1,
    "torch_dtype": "bfloat16",
}


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """A small, valid DeepSeek-V3 Hub config dict (no ``quantization_config``).

    Keyword arguments replace top-level fields (``tiny_config(num_hidden_layers=2)``).
    """
    cfg = copy.deepcopy(_TINY_CONFIG)
    cfg.update(copy.deepcopy(overrides))
    return cfg


def _rng(seed: int, name: str) -> np.random.Generator:
    """A Generator determined by ``seed`` and ``name`` alone (stable across runs and machines)."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


# The MTP layer's embedding and head are copies of the main ones in the real checkpoint
# (SPEC section 6): draw them from the same seed so they are copies here too.
_MTP_COPIES = (
    (re.compile(r"model\.layers\.\d+\.embed_tokens\.weight"), "model.embed_tokens.weight"),
    (re.compile(r"model\.layers\.\d+\.shared_head\.head\.weight"), "lm_head.weight"),
)


def _seed_name(name: str) -> str:
    for pattern, source in _MTP_COPIES:
        if pattern.fullmatch(name):
            return source
    return name


def _random_values(
    name: str, shape: tuple[int, ...], *, seed: int, hidden: int, bias_range: tuple[float, float],
    dtype_float: Any,
) -> np.ndarray:
    """The float values of tensor ``name`` (before casting/quantizing), by its role."""
    rng = _rng(seed, _seed_name(name))
    dtype = np.dtype(dtype_float)

    def normal(std: float) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=dtype) * dtype.type(std)).astype(dtype)

    if name.endswith("e_score_correction_bias"):
        return rng.uniform(bias_range[0], bias_range[1], shape).astype(dtype)
    if name.endswith("mlp.gate.weight"):
        return normal(1.0 / np.sqrt(hidden))
    if name.endswith("norm.weight"):  # all RMSNorm weights, incl. enorm/hnorm/shared_head.norm
        return (1.0 + 0.1 * rng.standard_normal(shape, dtype=dtype)).astype(dtype)
    if name.endswith(("embed_tokens.weight", "lm_head.weight", "shared_head.head.weight")):
        return normal(1.0)
    if len(shape) == 2:  # a linear weight [out, in] (incl. eh_proj)
        return normal(1.0 / np.sqrt(shape[1]))
    raise ValueError(f"no initializer for tensor {name!r} of shape {shape}")


def random_hub_checkpoint(
    out_dir: str | os.PathLike[str],
    cfg: dict[str, Any],
    *,
    seed: int = 0,
    fp8: bool = True,
    include_mtp: bool = True,
    max_shard_bytes: int = 2**30,
    bias_range: tuple[float, float] = (0.0, 0.5),
    dtype_float: Any = np.float32,
) -> str:
    """Write a random Hub checkpoint of ``cfg`` into ``out_dir``; return ``out_dir``.

    ``config.json`` is ``cfg`` with :data:`FP8_QUANTIZATION_CONFIG` added (``fp8=True``) or any
    ``quantization_config`` removed.  Tensors are exactly ``hub_tensor_specs(cfg)``: linear
    weights ``normal(0, 1/sqrt(in_features))``, embeddings and heads ``normal(0, 1)``, norm
    weights ``1 + 0.1 * normal``, router gate ``normal(0, 1/sqrt(hidden))``, router bias
    ``uniform(bias_range)``; drawn in ``dtype_float``, then stored as BF16/F32 or
    block-quantized to FP8 (the ``weight_scale_inv`` being the per-block multiplier).
    ``include_mtp=False`` leaves out the MTP layers (config kept as given).
    """
    out_dir = os.fspath(out_dir)
    cfg = copy.deepcopy(cfg)
    if fp8:
        cfg["quantization_config"] = copy.deepcopy(FP8_QUANTIZATION_CONFIG)
    else:
        cfg.pop("quantization_config", None)
    specs: dict[str, TensorSpec] = hub_tensor_specs(cfg, include_mtp=include_mtp, fp8=fp8)
    block = tuple(cfg["quantization_config"]["weight_block_size"]) if fp8 else (128, 128)
    hidden = cfg["hidden_size"]

    write_config(out_dir, cfg)
    with HubWriter(out_dir, max_shard_bytes=max_shard_bytes, metadata={"format": "pt"}) as writer:
        for name, spec in specs.items():
            if name.endswith("_scale_inv"):
                continue  # written together with its weight
            values = _random_values(
                name, spec.shape, seed=seed, hidden=hidden, bias_range=bias_range,
                dtype_float=dtype_float,
            )
            if spec.dtype_name == "F8_E4M3":
                wq, scale = quantize_block_fp8_np(values, block)
                writer.add(name, wq)
                writer.add(name + "_scale_inv", scale)
            elif spec.dtype_name == "BF16":
                writer.add(name, values.astype(ml_dtypes.bfloat16))
            elif spec.dtype_name == "F32":
                writer.add(name, values.astype(np.float32))
            else:  # pragma: no cover - hub_tensor_specs only uses the three above
                raise ValueError(f"unexpected dtype {spec.dtype_name} for {name!r}")
    return out_dir
