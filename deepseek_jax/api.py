"""The public entry points: load a checkpoint, score token ids."""

from __future__ import annotations

import numbers
import os

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax import orbax_ckpt, sharding
from deepseek_jax.checkpoint import abstract_model, load_hub
from deepseek_jax.config import DeepSeekConfig, load_config
from deepseek_jax.errors import DeepSeekError, check_bool, check_int
from deepseek_jax.model import DeepSeekV3
from deepseek_jax.quant import Precision
from deepseek_jax.scoring import logits, mtp_logits, perplexity, token_logprobs

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

__all__ = ["load", "load_config", "init_random", "logits", "mtp_logits", "token_logprobs", "perplexity",
           "precision"]


def check_kernels(kernels: str = "auto") -> str:
    """Validates a ``kernels=`` value and the ``$DEEPSEEK_JAX_KERNELS`` variable (which decides
    what ``"auto"`` means) up front, as one-line :class:`DeepSeekError`s; returns ``kernels``
    normalised. Without this a bad name would surface only when the first call is traced."""
    from kernels_pallas import backend

    if kernels is None:
        raise DeepSeekError(f"kernels None unsupported (expected one of {'|'.join(backend.IMPLS)})")
    try:
        kernels = backend.check_impl(kernels)
    except ValueError:
        raise DeepSeekError(f"kernels {kernels!r} unsupported (expected one of {'|'.join(backend.IMPLS)})") from None
    try:
        backend.env_impl()
    except ValueError as e:
        raise DeepSeekError(str(e)) from None
    return kernels


#: ``prefill_attention=`` values (see :class:`~deepseek_jax.quant.Precision`).
PREFILL_ATTENTION = ("plain", "flash")


def precision(dtype: str = "float32", fp8_mode: str = "w8a16", kernels: str = "auto",
              prefill_attention: str = "plain", ep_capacity: float | None = 2.0) -> Precision:
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise DeepSeekError(f"dtype {dtype!r} unsupported (float32|bfloat16)")
    if not isinstance(fp8_mode, str) or fp8_mode not in ("w8a16", "w8a8"):
        raise DeepSeekError(f"fp8 mode {fp8_mode!r} unsupported (w8a16|w8a8)")
    if not isinstance(prefill_attention, str) or prefill_attention not in PREFILL_ATTENTION:
        raise DeepSeekError(f"prefill attention {prefill_attention!r} unsupported ({'|'.join(PREFILL_ATTENTION)})")
    if ep_capacity is not None and (isinstance(ep_capacity, bool) or not isinstance(ep_capacity, numbers.Real)
                                    or not 0 < ep_capacity < float("inf")):
        raise DeepSeekError(f"ep_capacity must be a finite number > 0 or None (one worst-case exchange), "
                            f"got {ep_capacity!r}")
    return Precision(dtype=DTYPES[dtype], fp8_mode=fp8_mode, kernels=check_kernels(kernels),
                     prefill_attention=prefill_attention,
                     ep_capacity=None if ep_capacity is None else float(ep_capacity))


def load(path: str | os.PathLike[str], *, dtype: str = "float32", fp8_mode: str = "w8a16",
         kernels: str = "auto", mtp: bool | None = None, mesh=None, rules="ep_tp",
         prefill_attention: str = "plain", ep_capacity: float | None = 2.0) -> DeepSeekV3:
    """Loads a checkpoint directory: the Hub layout (config.json + safetensors) or an Orbax
    checkpoint written by ``deepseek-jax convert`` (detected by its files).

    ``mtp=None`` loads the MTP module when the checkpoint has it; ``True`` requires it.
    ``mesh``: a ``jax.sharding.Mesh`` (see ``sharding.make_mesh``); parameters are then created
    directly sharded by the ``rules`` preset, each process reading only what its devices hold.
    ``rules``: a preset name of ``sharding.RULES`` ("ep_tp", "ep_dp") or a mapping of logical
    axis -> mesh axis. ``kernels``: one of ``kernels_pallas.backend.IMPLS``.
    ``prefill_attention``: ``"plain"`` (float32 ``[B, heads, T, T]`` scores among a call's tokens)
    or ``"flash"`` (a flash kernel on a GPU or TPU, which never holds them: long prompts, scoring,
    training; on CPU a blocked jnp form that holds 512 keys' scores at a time, forward and backward). ``ep_capacity``: on a mesh with experts split over
    ``expert``, the all-to-all's buffer per pair of devices in multiples of the balanced share
    (rows past it go in further rounds; None: one round sized for the worst case; see
    :mod:`deepseek_jax.expert_parallel`). Every argument (and ``$DEEPSEEK_JAX_KERNELS``) is
    checked here, before anything is read.
    """
    from deepseek_jax import sharding

    if not isinstance(path, (str, os.PathLike)):
        raise DeepSeekError(f"checkpoint: path must be a string or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise DeepSeekError(f"checkpoint: {path} is not a directory")
    if mtp is not None:
        try:
            mtp = check_bool("mtp", mtp)
        except DeepSeekError:
            raise DeepSeekError(f"mtp must be True, False or None, got {mtp!r}") from None
    prec = precision(dtype, fp8_mode, kernels, prefill_attention, ep_capacity)
    rules = sharding.resolve_rules(rules, mesh)   # a bad preset name / mesh fails here, before any reading
    mesh = sharding.auto_mesh(mesh)
    if orbax_ckpt.is_orbax_checkpoint(path):
        shardings = None
        if mesh is not None:
            cfg = DeepSeekConfig.from_json_file(path)
            specs = sharding.model_param_specs(abstract_model(cfg, prec, True), dict(mesh.shape), rules)
            shardings = lambda p: sharding.named(mesh, specs[tuple(p)])  # noqa: E731
        model = orbax_ckpt.restore(path, prec=prec, with_mtp=mtp, shardings=shardings)
        if mesh is not None:
            sharding.attach_mesh(model, mesh, rules)
    else:
        model = load_hub(path, prec=prec, with_mtp=mtp, mesh=mesh, rules=rules)
    if mtp and model.mtp is None:
        raise DeepSeekError(f"checkpoint: {path} has no MTP layer")
    return model


def init_random(cfg: DeepSeekConfig, *, seed: int = 0, dtype: str = "float32", with_mtp: bool = True,
                prefill_attention: str = "plain", mesh=None, rules="ep_tp",
                ep_capacity: float | None = 2.0) -> DeepSeekV3:
    """A randomly initialised model (compiled initialisation: seconds even for deep configs).
    With a ``mesh`` every parameter is made directly in its shards by the rules (as
    :func:`load` places them; the values do not depend on the mesh), never whole on one device."""
    if not isinstance(cfg, DeepSeekConfig):
        raise DeepSeekError(f"cfg: expected a DeepSeekConfig (dj.load_config, DeepSeekConfig.from_hub_dict), "
                            f"got {type(cfg).__name__}")
    cfg.validate()
    seed = check_int("seed", seed, 0)
    with_mtp = check_bool("with_mtp", with_mtp)
    prec = precision(dtype, prefill_attention=prefill_attention, ep_capacity=ep_capacity)

    def build():
        return DeepSeekV3(cfg, prec=prec, rngs=nnx.Rngs(seed), with_mtp=with_mtp)

    if mesh is None:
        return nnx.jit(build)()
    table = sharding.resolve_rules(rules, mesh)
    mesh = sharding.auto_mesh(mesh)
    abstract = nnx.eval_shape(build)
    specs = sharding.model_param_specs(abstract, dict(mesh.shape), table)
    graphdef, state = nnx.split(abstract)
    out = nnx.from_flat_state([(p, v.replace(sharding.named(mesh, specs[tuple(str(x) for x in p)])))
                               for p, v in nnx.to_flat_state(state)])
    state = jax.jit(lambda: nnx.state(build()), out_shardings=out)()
    model = nnx.merge(graphdef, state)
    sharding.attach_mesh(model, mesh, table)
    return model
