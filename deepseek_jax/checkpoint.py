"""Hub checkpoint <-> model parameters.

The model's parameter paths mirror the Hub's tensor names; this module owns the one mapping
between them: a parameter of ``dense_layers`` / ``moe_layers`` is the stack over its layers of
``model.layers.{i}.<rest>``, a parameter under ``mlp.experts`` is additionally stacked over the
experts ``mlp.experts.{e}.<rest>``, and ``mtp.<rest>`` is ``model.layers.{num_hidden_layers}.<rest>``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax.config import DeepSeekConfig
from deepseek_jax.errors import DeepSeekError
from deepseek_jax.hub import HubReader, dtype_name_of
from deepseek_jax.model import DeepSeekV3
from deepseek_jax.quant import Precision

# Unquantized float tensors may be stored in any of these and are cast on load.
_FLOATS = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(jnp.bfloat16)}
_TOP = {"embed_tokens": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}


@dataclasses.dataclass(frozen=True)
class HubSlot:
    """Where one model parameter comes from: a grid of Hub tensor names.

    ``names`` has shape ``stack`` (layers, then experts; ``()`` for an unstacked tensor); the
    parameter is ``np.stack`` of those tensors in that grid order.
    """

    path: tuple[str, ...]
    names: np.ndarray  # object array of str with shape `stack`

    @property
    def stack(self) -> tuple[int, ...]:
        return self.names.shape


def hub_slot(path: tuple[str, ...], cfg: DeepSeekConfig) -> HubSlot:
    """Maps a model parameter path to its Hub tensor name(s)."""
    head, rest = path[0], path[1:]
    if head in _TOP:
        return HubSlot(path, np.array(".".join((_TOP[head],) + rest), dtype=object))
    nd = cfg.num_dense_layers
    if head == "dense_layers":
        layers = list(range(nd))
    elif head == "moe_layers":
        layers = list(range(nd, cfg.num_hidden_layers))
    elif head == "mtp":
        layers = None
    else:
        raise KeyError(f"no Hub name for parameter {'.'.join(path)}")
    experts = rest[:2] == ("mlp", "experts")

    def name(layer: int, expert: int | None) -> str:
        r = rest if expert is None else ("mlp", "experts", str(expert)) + rest[2:]
        return ".".join(("model", "layers", str(layer)) + r)

    if layers is None:
        ids = [cfg.num_hidden_layers]
    else:
        ids = layers
    if experts:
        grid = [[name(i, e) for e in range(cfg.n_routed_experts)] for i in ids]
    else:
        grid = [name(i, None) for i in ids]
    arr = np.empty(np.shape(grid), dtype=object)
    arr[...] = grid
    if layers is None:
        arr = arr.reshape(arr.shape[1:])
    return HubSlot(path, arr)


def abstract_model(cfg: DeepSeekConfig, prec: Precision = Precision(), with_mtp: bool = True) -> DeepSeekV3:
    """The model with ``jax.ShapeDtypeStruct`` leaves: nothing allocated."""
    return nnx.eval_shape(lambda: DeepSeekV3(cfg, prec=prec, rngs=nnx.Rngs(0), with_mtp=with_mtp))


def iter_params(model: DeepSeekV3) -> Iterator[tuple[tuple[str, ...], nnx.Variable]]:
    """(path, variable) for every parameter/state leaf of the model, in a stable order."""
    _, state = nnx.split(model)
    for path, var in nnx.to_flat_state(state):
        yield tuple(str(p) for p in path), var


def _read_slot(reader: HubReader, slot: HubSlot, want_shape: tuple[int, ...], want_dtype) -> np.ndarray:
    """Reads and stacks one parameter, checking names, shapes and dtypes against the model."""
    per_shape = want_shape[len(slot.stack):]
    want_dtype = np.dtype(want_dtype)
    out = np.empty(want_shape, want_dtype)
    for idx in np.ndindex(*slot.stack):
        name = slot.names[idx]
        if name not in reader:
            hint = " (FP8 weights need their block scales)" if name.endswith("weight_scale_inv") else ""
            raise DeepSeekError(f"checkpoint: missing tensor {name}{hint}")
        a = reader.get(name)
        if tuple(a.shape) != per_shape:
            raise DeepSeekError(f"checkpoint: tensor {name} has shape {list(a.shape)}, "
                                f"config.json implies {list(per_shape)}")
        if a.dtype != want_dtype and not (a.dtype in _FLOATS and want_dtype in _FLOATS):
            raise DeepSeekError(f"checkpoint: tensor {name} is {dtype_name_of(a.dtype)}, "
                                    f"expected {dtype_name_of(want_dtype)}")
        if name.endswith("weight_scale_inv") and not np.all(np.isfinite(a)):
            raise DeepSeekError(f"checkpoint: tensor {name} has non-finite scales")
        out[idx] = a
    return out


def load_hub(path: str | os.PathLike[str], *, prec: Precision = Precision(), with_mtp: bool | None = None,
             cfg: DeepSeekConfig | None = None) -> DeepSeekV3:
    """Loads a Hub-layout directory (config.json + safetensors, FP8 or BF16) into a model.

    ``with_mtp=None`` loads the MTP module when the checkpoint has it.
    """
    reader = HubReader(os.fspath(path))
    try:
        cfg = cfg or DeepSeekConfig.from_hub_dict(reader.config)
        if with_mtp is None:
            with_mtp = bool(cfg.num_nextn_predict_layers) and \
                f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight" in reader
        abstract = abstract_model(cfg, prec, with_mtp)
        graphdef, state = nnx.split(abstract)
        flat = nnx.to_flat_state(state)
        leaves = []
        for p, var in flat:
            path = tuple(str(x) for x in p)
            slot = hub_slot(path, cfg)
            leaves.append(jnp.asarray(_read_slot(reader, slot, tuple(var.shape), var.dtype)))
        return nnx.merge(graphdef, nnx.from_flat_state([(p, v.replace(val)) for (p, v), val in zip(flat, leaves)]))
    finally:
        reader.close()
