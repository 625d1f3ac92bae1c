"""Hub checkpoint <-> model parameters.

The model's parameter paths mirror the Hub's tensor names; this module owns the one mapping
between them: a parameter of ``dense_layers`` / ``moe_layers`` is the stack over its layers of
``model.layers.{i}.<rest>``, a parameter under ``mlp.experts`` is additionally stacked over the
experts ``mlp.experts.{e}.<rest>``, and ``mtp.<rest>`` is ``model.layers.{num_hidden_layers}.<rest>``.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepseek_jax.config import DeepSeekConfig
from deepseek_jax.errors import DeepSeekError
from deepseek_jax.hub import HubReader, dtype_name_of, hub_tensor_specs, missing_extent
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


def _check_slot(reader: HubReader, slot: HubSlot, want_shape: tuple[int, ...], want_dtype) -> None:
    """Checks names, shapes and dtypes of one parameter's tensors from the headers alone."""
    per_shape = want_shape[len(slot.stack):]
    want_dtype = np.dtype(want_dtype)
    for idx in np.ndindex(*slot.stack):
        name = slot.names[idx]
        if name not in reader:
            hint = " (FP8 weights need their block scales)" if name.endswith("weight_scale_inv") else ""
            raise DeepSeekError(f"checkpoint: missing tensor {name}{hint}")
        info = reader.info(name)
        if tuple(info.shape) != per_shape:
            raise DeepSeekError(f"checkpoint: tensor {name} has shape {list(info.shape)}, "
                                f"the config implies {list(per_shape)}")
        if info.dtype != want_dtype and not (info.dtype in _FLOATS and want_dtype in _FLOATS):
            raise DeepSeekError(f"checkpoint: tensor {name} is {dtype_name_of(info.dtype)}, "
                                f"expected {dtype_name_of(want_dtype)}")


def hub_layout(reader: HubReader, cfg: DeepSeekConfig, with_mtp: bool | None) -> bool:
    """Checks that the checkpoint's tensors are those of ``cfg``'s model and returns whether
    to load its MTP layer (``with_mtp=None``: when it has one). A tensor the config has no place
    for is an error: with a ``num_hidden_layers`` too small, the loader would otherwise take the
    first layers and run a different model, and with one too large take the MTP layer for a
    decoder layer (each expected tensor's shape is checked per slot, :func:`_check_slot`)."""
    n = cfg.num_hidden_layers
    lacking = missing_extent(reader, cfg)
    if lacking is not None:
        raise DeepSeekError(f"checkpoint: missing tensor {lacking}: the config ({n} layers, {cfg.n_routed_experts} "
                            "routed experts) disagrees with the weights")
    mtp_in_files = f"model.layers.{n}.eh_proj.weight" in reader
    has_mtp = bool(cfg.num_nextn_predict_layers) and mtp_in_files
    if with_mtp and not has_mtp:
        raise DeepSeekError(f"checkpoint: {reader.path} has no MTP layer"
                            + ("" if cfg.num_nextn_predict_layers else " (num_nextn_predict_layers is 0)"))
    # (an MTP layer in the files is allowed when the config sets num_nextn_predict_layers to 0; the
    # files' FP8 layout is theirs: a caller may pass the config of the float model it makes of them)
    names = reader.names()
    fp8_files = any(name.endswith("_scale_inv") for name in names)
    known = hub_tensor_specs({**cfg.replace(fp8=fp8_files).to_hub_dict(),
                              "num_nextn_predict_layers": max(cfg.num_nextn_predict_layers, 1)},
                             include_mtp=mtp_in_files, fp8=fp8_files)
    extra = [name for name in names if name not in known]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise DeepSeekError(f"checkpoint: {reader.path} holds tensor {extra[0]}{more}, which the config "
                            f"({n} layers, {cfg.n_routed_experts} routed experts, "
                            f"{cfg.num_nextn_predict_layers} MTP) has no place for: the config disagrees "
                            f"with the weights")
    return has_mtp if with_mtp is None else with_mtp


def _slot_reader(reader: HubReader, slot: HubSlot, want_shape: tuple[int, ...], want_dtype):
    """``read(index) -> np.ndarray``: the block ``index`` (a tuple of slices over the stacked
    parameter) read from the memory-mapped tensors; only the touched layers/experts/rows are read."""
    want_dtype = np.dtype(want_dtype)
    ns = len(slot.stack)

    def read(index: tuple[slice, ...]) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(want_shape) - len(index))
        ranges = [range(*sl.indices(n)) for sl, n in zip(index[:ns], slot.stack)]
        inner = index[ns:]
        out = None
        for pos, ids in zip(np.ndindex(*[len(r) for r in ranges]), itertools.product(*ranges)):
            name = slot.names[ids]
            a = reader.get(name)[inner]
            if name.endswith("weight_scale_inv") and not np.all(np.isfinite(a)):
                raise DeepSeekError(f"checkpoint: tensor {name} has non-finite scales")
            if out is None:
                out = np.empty(tuple(len(r) for r in ranges) + a.shape, want_dtype)
            out[pos] = a
        return out

    return read


def load_hub(path: str | os.PathLike[str], *, prec: Precision = Precision(), with_mtp: bool | None = None,
             cfg: DeepSeekConfig | None = None, mesh=None, rules="ep_tp") -> DeepSeekV3:
    """Loads a Hub-layout directory (config.json + safetensors, FP8 or BF16) into a model.

    ``with_mtp=None`` loads the MTP module when the checkpoint has it. With a ``mesh``, every
    parameter is created directly sharded by the rules (``sharding.py``): each process reads
    only the slices its devices hold, no host ever materialises the whole model.
    """
    from deepseek_jax import sharding

    rules = sharding.resolve_rules(rules, mesh)
    mesh = sharding.auto_mesh(mesh)
    reader = HubReader(os.fspath(path))
    try:
        cfg = cfg or DeepSeekConfig.from_hub_dict(reader.config)
        with_mtp = hub_layout(reader, cfg, with_mtp)
        abstract = abstract_model(cfg, prec, with_mtp)
        specs = sharding.model_param_specs(abstract, dict(mesh.shape), rules) \
            if mesh is not None else None
        graphdef, state = nnx.split(abstract)
        flat = nnx.to_flat_state(state)
        slots = []
        for p, var in flat:  # validate everything before reading any data
            path = tuple(str(x) for x in p)
            slot = hub_slot(path, cfg)
            _check_slot(reader, slot, tuple(var.shape), var.dtype)
            slots.append((path, slot, var))
        leaves = []
        for path, slot, var in slots:
            read = _slot_reader(reader, slot, tuple(var.shape), var.dtype)
            if mesh is None:
                leaves.append(jnp.asarray(read(())))
            else:
                sh = sharding.named(mesh, specs[path])
                leaves.append(jax.make_array_from_callback(tuple(var.shape), sh, read))
        model = nnx.merge(graphdef, nnx.from_flat_state([(p, v.replace(val)) for (p, v), val in zip(flat, leaves)]))
        if mesh is not None:
            sharding.attach_mesh(model, mesh, rules)
        return model
    finally:
        reader.close()
