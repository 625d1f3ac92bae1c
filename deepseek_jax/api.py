"""The public entry points: load a checkpoint, score token ids."""

from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx

from deepseek_jax.checkpoint import load_hub
from deepseek_jax.config import DeepSeekConfig, load_config
from deepseek_jax.errors import DeepSeekError
from deepseek_jax.model import DeepSeekV3
from deepseek_jax.quant import Precision
from deepseek_jax.scoring import logits, mtp_logits, perplexity, token_logprobs

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

__all__ = ["load", "load_config", "init_random", "logits", "mtp_logits", "token_logprobs", "perplexity",
           "precision"]


def precision(dtype: str = "float32", fp8_mode: str = "w8a16", kernels: str = "auto") -> Precision:
    if dtype not in DTYPES:
        raise DeepSeekError(f"dtype {dtype!r} unsupported (float32|bfloat16)")
    if fp8_mode not in ("w8a16", "w8a8"):
        raise DeepSeekError(f"fp8 mode {fp8_mode!r} unsupported (w8a16|w8a8)")
    return Precision(dtype=DTYPES[dtype], fp8_mode=fp8_mode, kernels=kernels)


def load(path: str | os.PathLike[str], *, dtype: str = "float32", fp8_mode: str = "w8a16",
         kernels: str = "auto", mtp: bool | None = None) -> DeepSeekV3:
    """Loads a checkpoint directory: the Hub layout (config.json + safetensors).

    ``mtp=None`` loads the MTP module when the checkpoint has it; ``True`` requires it.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise DeepSeekError(f"checkpoint: {path} is not a directory")
    model = load_hub(path, prec=precision(dtype, fp8_mode, kernels), with_mtp=mtp)
    if mtp and model.mtp is None:
        raise DeepSeekError(f"checkpoint: {path} has no MTP layer")
    return model


def init_random(cfg: DeepSeekConfig, *, seed: int = 0, dtype: str = "float32", with_mtp: bool = True) -> DeepSeekV3:
    """A randomly initialised model (compiled initialisation: seconds even for deep configs)."""
    prec = precision(dtype)

    @nnx.jit
    def make():
        return DeepSeekV3(cfg, prec=prec, rngs=nnx.Rngs(seed), with_mtp=with_mtp)

    return make()
