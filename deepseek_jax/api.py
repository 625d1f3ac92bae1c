"""The public entry points: load a checkpoint, score token ids."""

from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx

from deepseek_jax import orbax_ckpt
from deepseek_jax.checkpoint import abstract_model, load_hub
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
         kernels: str = "auto", mtp: bool | None = None, mesh=None, rules: str = "ep_tp") -> DeepSeekV3:
    """Loads a checkpoint directory: the Hub layout (config.json + safetensors) or an Orbax
    checkpoint written by ``deepseek-jax convert`` (detected by its files).

    ``mtp=None`` loads the MTP module when the checkpoint has it; ``True`` requires it.
    ``mesh``: a ``jax.sharding.Mesh`` (see ``sharding.make_mesh``); parameters are then created
    directly sharded by the ``rules`` preset, each process reading only what its devices hold.
    """
    from deepseek_jax import sharding

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise DeepSeekError(f"checkpoint: {path} is not a directory")
    prec = precision(dtype, fp8_mode, kernels)
    if orbax_ckpt.is_orbax_checkpoint(path):
        shardings = None
        if mesh is not None:
            cfg = DeepSeekConfig.from_json_file(path)
            specs = sharding.model_param_specs(abstract_model(cfg, prec, True), dict(mesh.shape),
                                               sharding.RULES[rules])
            shardings = lambda p: sharding.named(mesh, specs[tuple(p)])  # noqa: E731
        model = orbax_ckpt.restore(path, prec=prec, with_mtp=mtp, shardings=shardings)
        if mesh is not None:
            sharding.attach_mesh(model, mesh, rules)
    else:
        model = load_hub(path, prec=prec, with_mtp=mtp, mesh=mesh, rules=rules)
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
