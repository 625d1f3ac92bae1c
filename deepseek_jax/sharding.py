"""Logical axis names for every weight, cache and activation, and the one table that maps them
onto a ``jax.sharding.Mesh`` with axes ``data``, ``expert``, ``model``.

Every parameter gets logical axis names from its path (``param_axes``); a rules preset says which
mesh axis each logical axis goes to; ``resolve`` turns both into a ``PartitionSpec`` for a concrete
shape, leaving a dimension replicated when it does not divide evenly (and, for FP8 block scales,
when the weight's shard would cut a 128x128 block), so any config runs on any mesh.

Presets:
  ``ep_tp`` (default): routed experts over ``expert``, attention heads / MLP hidden / expert
    hidden / vocab over ``model``, batch over ``data``.
  ``ep_dp``: as ``ep_tp`` but the batch (attention, cache) is split over ``data`` *and*
    ``expert``: data-parallel MLA across the expert axis, as serving engines run MLA, so the
    latent cache is not replicated across expert-parallel ranks.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from deepseek_jax.errors import DeepSeekError, check_int

MESH_AXES = ("data", "expert", "model")

# Logical axis -> mesh axis (or tuple of mesh axes, or None: replicated).
RULES: dict[str, dict[str, str | tuple[str, ...] | None]] = {
    "ep_tp": {
        "batch": "data", "seq": None, "cache_seq": None, "latent": None,
        "layers": None, "embed": None, "embed2": None, "norm": None,
        "vocab": "model", "heads": "model", "q_lora": None, "kv_lora": None,
        "mlp": "model", "experts": "expert", "expert_mlp": "model", "router": None,
    },
}
RULES["ep_dp"] = dict(RULES["ep_tp"], batch=("data", "expert"))
#: logical axes only one mesh axis can take (or none): the MoE layer's exchange is written for them
_FIXED = {"experts": "expert", "expert_mlp": "model"}


def resolve_rules(rules, mesh=None) -> dict[str, str | tuple[str, ...] | None]:
    """The rules table for ``rules``: a preset name (a key of :data:`RULES`) or a mapping
    ``{logical axis: mesh axis | tuple of mesh axes | None}`` (axes left out are replicated).
    With a ``mesh``, also checks it is a ``jax.sharding.Mesh`` that has every mesh axis the
    rules name. Anything else is a one-line :class:`DeepSeekError`, raised before any work."""
    presets = ", ".join(repr(k) for k in RULES)
    if isinstance(rules, str):
        if rules not in RULES:
            raise DeepSeekError(f"rules {rules!r}: unknown preset (expected one of {presets}, "
                                "or a mapping of logical axis -> mesh axis)")
        table = RULES[rules]
    elif isinstance(rules, Mapping):
        table = {}
        for k, v in rules.items():
            if not isinstance(k, str):
                raise DeepSeekError(f"rules: logical axis {k!r} must be a string")
            if isinstance(v, list):
                v = tuple(v)
            if not (v is None or isinstance(v, str)
                    or (isinstance(v, tuple) and v and all(isinstance(a, str) for a in v))):
                raise DeepSeekError(f"rules[{k!r}] = {v!r}: expected a mesh axis name, a tuple of them, or None")
            if k not in RULES["ep_tp"]:   # a misspelt name ("expert" for "experts") split nothing
                raise DeepSeekError(f"rules: unknown logical axis {k!r} (axes: {', '.join(RULES['ep_tp'])})")
            for a in (v,) if isinstance(v, str) else v or ():
                if a not in MESH_AXES:
                    raise DeepSeekError(f"rules[{k!r}] = {v!r}: unknown mesh axis {a!r} "
                                        f"(axes: {', '.join(MESH_AXES)})")
            if isinstance(v, tuple) and len(set(v)) != len(v):
                raise DeepSeekError(f"rules[{k!r}] = {v!r}: a mesh axis can split a dimension only once")
            if k in _FIXED and v not in (_FIXED[k], None):
                raise DeepSeekError(f"rules[{k!r}] = {v!r}: must be {_FIXED[k]!r} or None (the expert-parallel "
                                    f"exchange runs over the 'expert' axis, the experts' hidden dim over 'model')")
            table[k] = v
    else:
        raise DeepSeekError(f"rules: expected a preset name ({presets}) or a mapping of logical axis -> "
                            f"mesh axis, got {type(rules).__name__}")
    if mesh is not None:
        if not isinstance(mesh, Mesh):
            raise DeepSeekError(f"mesh: expected a jax.sharding.Mesh (see sharding.make_mesh), "
                                f"got {type(mesh).__name__}")
        names = tuple(mesh.axis_names)
        for k, v in table.items():
            for a in (v,) if isinstance(v, str) else v or ():
                if a not in names:
                    raise DeepSeekError(f"mesh: has no axis {a!r}, which rules[{k!r}] uses "
                                        f"(mesh axes: {', '.join(map(str, names))}; make it with sharding.make_mesh)")
    return table


# Parameter name (last two path parts, or one for a bare leaf) -> logical axes of the
# unstacked tensor in the Hub's [out, in] layout.
_PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed_tokens.weight": ("vocab", "embed"),
    "lm_head.weight": ("vocab", "embed"),
    "head.weight": ("vocab", "embed"),
    "eh_proj.weight": ("embed", "embed2"),
    "q_a_proj.weight": ("q_lora", "embed"),
    "q_b_proj.weight": ("heads", "q_lora"),
    "q_proj.weight": ("heads", "embed"),
    "kv_a_proj_with_mqa.weight": ("kv_lora", "embed"),
    "kv_b_proj.weight": ("heads", "kv_lora"),
    "o_proj.weight": ("embed", "heads"),
    "gate_proj.weight": ("mlp", "embed"),
    "up_proj.weight": ("mlp", "embed"),
    "down_proj.weight": ("embed", "mlp"),
    "gate.weight": ("router", "embed"),
    "gate.e_score_correction_bias": ("router",),
}

# Activations and caches.
ACT_AXES = {
    "x_BTD": ("batch", "seq", "embed"),
    "logits_BTV": ("batch", "seq", "vocab"),
    "ids_BT": ("batch", "seq"),
    "cache_LBSC": ("layers", "batch", "cache_seq", "latent"),
}


def param_axes(path: tuple[str, ...]) -> tuple[str, ...]:
    """Logical axes of a model parameter (incl. the stacked layer and expert axes)."""
    leaf = path[-1]
    is_scale = leaf == "weight_scale_inv"
    key = ".".join(path[-2:-1] + ("weight",)) if is_scale else ".".join(path[-2:])
    if key.endswith("norm.weight") or path[-2].endswith("layernorm") or path[-2] in ("enorm", "hnorm"):
        axes: tuple[str, ...] = ("norm",)
    elif key in _PARAM_AXES:
        axes = _PARAM_AXES[key]
    else:
        raise KeyError(f"no logical axes for parameter {'.'.join(path)}")
    experts = "experts" in path and "shared_experts" not in path
    if experts:
        mlp_map = {"mlp": "expert_mlp"}
        axes = ("experts",) + tuple(mlp_map.get(a, a) for a in axes)
    if path[0] in ("dense_layers", "moe_layers"):
        axes = ("layers",) + axes
    return axes


def resolve(axes: tuple[str, ...], shape: tuple[int, ...], mesh_shape: Mapping[str, int],
            rules: Mapping[str, object], *, block_scale: bool = False,
            weight_shape: tuple[int, ...] | None = None) -> P:
    """``PartitionSpec`` for one array; dims that do not divide evenly stay replicated.

    For an FP8 block-scale array (``block_scale=True``), a dim is split only if the weight's
    corresponding dim splits into whole 128-blocks, so each shard's scales match its weights.
    """
    spec, used = [], set()
    for i, (name, dim) in enumerate(zip(axes, shape)):
        axis = rules.get(name)
        flat = (axis,) if isinstance(axis, str) else tuple(axis or ())
        # a tuple of axes that does not divide: its leading axes, as the MoE exchange and the
        # kernels' shard_map take them (ep_dp's batch over data x expert falls back to data)
        for k in range(len(flat), 0, -1):
            n = math.prod(mesh_shape[a] for a in flat[:k])
            ok = n > 1 and dim % n == 0 and not (set(flat[:k]) & used)
            if ok and block_scale and weight_shape is not None and i >= len(shape) - 2:
                ok = weight_shape[i] % (n * 128) == 0
            if ok:
                spec.append(axis if k == len(flat) else (flat[0] if k == 1 else flat[:k]))
                used.update(flat[:k])
                break
        else:
            spec.append(None)
    return P(*spec)


def param_spec(path: tuple[str, ...], shape: tuple[int, ...], mesh_shape: Mapping[str, int],
               rules: Mapping[str, object], fp8_weight_shape: tuple[int, ...] | None = None) -> P:
    """Spec of one parameter. For an FP8 weight and its ``weight_scale_inv`` pass the weight's
    shape as ``fp8_weight_shape``: both then split only where whole 128x128 blocks go to each
    shard, so every shard holds exactly the scales of its weights."""
    return resolve(param_axes(path), shape, mesh_shape, rules, block_scale=fp8_weight_shape is not None,
                   weight_shape=fp8_weight_shape)


def model_param_specs(model, mesh_shape: Mapping[str, int], rules: Mapping[str, object]) -> dict:
    """{path: PartitionSpec} for every parameter/state leaf of a (possibly abstract) model."""
    from flax import nnx

    _, state = nnx.split(model)
    flat = [(tuple(str(p) for p in path), v) for path, v in nnx.to_flat_state(state)]
    shapes = {p: tuple(v.shape) for p, v in flat}
    out = {}
    for p, v in flat:
        if p[-1] in ("lora_a", "lora_b"):   # LoRA adapters (deepseek_jax.lora): small, replicated
            out[p] = P()
            continue
        if p[-1] == "weight_scale_inv":
            wshape = shapes[p[:-1] + ("weight",)]
        elif p[-1] == "weight" and p[:-1] + ("weight_scale_inv",) in shapes:
            wshape = tuple(v.shape)
        else:
            wshape = None
        out[p] = param_spec(p, tuple(v.shape), mesh_shape, rules, wshape)
    return out


# ---- meshes -----------------------------------------------------------------------------------
def parse_mesh(text: str | None, n_devices: int) -> dict[str, int]:
    """``"data=2,expert=4,model=1"`` -> sizes; missing axes are 1; ``None``: a default layout."""
    if not text:
        return default_mesh_shape(n_devices)
    sizes = {a: 1 for a in MESH_AXES}
    seen = set()
    for part in text.split(","):
        if "=" not in part:
            raise DeepSeekError(f"--mesh: {part!r} is not AXIS=SIZE (axes: data, expert, model)")
        k, v = (s.strip() for s in part.split("=", 1))
        if k not in sizes:
            raise DeepSeekError(f"--mesh: unknown axis {k!r} (axes: data, expert, model)")
        if k in seen:
            raise DeepSeekError(f"--mesh: axis {k} given twice in {text!r}")
        seen.add(k)
        if not (v.isascii() and v.isdigit()) or int(v) < 1:   # (not '²' or other Unicode digits)
            raise DeepSeekError(f"--mesh: size of {k} must be a positive integer, got {v!r}")
        sizes[k] = int(v)
    if math.prod(sizes.values()) > n_devices:
        raise DeepSeekError(f"--mesh: {text} needs {math.prod(sizes.values())} devices, "
                            f"but {n_devices} are available")
    return sizes


def default_mesh_shape(n_devices: int) -> dict[str, int]:
    """All devices on the expert axis (routed experts dominate the weights)."""
    return {"data": 1, "expert": n_devices, "model": 1}


def make_mesh(sizes: Mapping[str, int], devices=None) -> Mesh:
    """A ``data`` x ``expert`` x ``model`` mesh of ``devices`` (default: all); an axis left out
    of ``sizes`` has size 1. ``{"expert": 8}`` is 8-way expert parallelism."""
    if not isinstance(sizes, Mapping):
        raise DeepSeekError(f"mesh: expected a mapping of axis sizes such as {{'expert': 8}}, "
                            f"got {type(sizes).__name__}")
    unknown = [a for a in sizes if a not in MESH_AXES]
    if unknown:
        raise DeepSeekError(f"mesh: unknown axis {unknown[0]!r} (axes: {', '.join(MESH_AXES)})")
    shape = tuple(check_int(f"mesh: size of {a}", sizes.get(a, 1), 1) for a in MESH_AXES)
    devices = list(devices) if devices is not None else jax.devices()
    if len(set(devices)) != len(devices):
        raise DeepSeekError("mesh: a device is listed more than once")
    if math.prod(shape) != len(devices):
        raise DeepSeekError(f"mesh {dict(sizes)} needs {math.prod(shape)} devices, have {len(devices)}")
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def named(mesh: Mesh, spec: P) -> NamedSharding:
    return NamedSharding(mesh, spec)


def attach_mesh(model, mesh: Mesh | None, rules: Mapping[str, object] | str = "ep_tp"):
    """Tells the MoE layers which mesh and rules their expert-parallel dispatch runs on, and the
    FP8 linears and attention where their kernel operands live, so that their Pallas calls run
    per shard (:mod:`deepseek_jax.kernel_mesh`; on a one-device mesh or ``None``, unset)."""
    from flax import nnx

    from deepseek_jax.kernel_mesh import Placement
    from deepseek_jax.mla import MLA
    from deepseek_jax.moe import MoE
    from deepseek_jax.norm import RMSNorm
    from deepseek_jax.quant import Linear

    rules = resolve_rules(rules, mesh)
    mesh = auto_mesh(mesh)
    items = tuple(sorted(rules.items()))
    sharded = mesh is not None and mesh.size > 1
    specs = model_param_specs(model, dict(mesh.shape), rules) if sharded else {}
    for path, m in nnx.iter_modules(model):
        p = tuple(str(x) for x in path)
        if isinstance(m, MoE):
            m.mesh = mesh
            m.rules = items if mesh is not None else None
        elif isinstance(m, Linear):
            m.placement = (Placement(mesh, items, specs[p + ("weight",)], specs[p + ("weight_scale_inv",)])
                           if sharded and m.fp8 else None)
        elif isinstance(m, (MLA, RMSNorm)):
            m.placement = Placement(mesh, items) if sharded else None
    return model


def auto_mesh(mesh: Mesh | None) -> Mesh | None:
    """``mesh`` with every axis Auto (the model places its arrays by sharding constraints; an
    Explicit axis, ``jax.make_mesh``'s default, makes JAX ask each gather for its output sharding)."""
    if mesh is None or all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def check_context_mesh(model=None) -> None:
    """A one-line error when the current mesh (``jax.set_mesh``) has Explicit axes, or is not the
    mesh ``model`` was loaded on: the model's programs would fail deep inside JAX (a gather asking
    for ``out_sharding=``; ``shard_map`` refusing a context mesh other than its own)."""
    ctx = jax.sharding.get_abstract_mesh()
    if ctx.empty:
        return
    if any(t == AxisType.Explicit for t in ctx.axis_types):
        raise DeepSeekError("the current mesh (jax.set_mesh) has Explicit axes, jax.make_mesh's default: run under "
                            "one with Auto axes (deepseek_jax.sharding.make_mesh, or sharding.auto_mesh(mesh))")
    placement = getattr(getattr(model, "norm", None), "placement", None)
    if placement is not None and ctx != placement.mesh.abstract_mesh:
        def shape(m) -> str:
            return ",".join(f"{k}={v}" for k, v in m.shape.items())
        raise DeepSeekError(f"the current mesh (jax.set_mesh: {shape(ctx)}) is not the one the model was loaded on "
                            f"({shape(placement.mesh)}): run under that mesh, or without jax.set_mesh")


def cache_spec(mesh_shape: Mapping[str, int], rules: Mapping[str, object], shape: tuple[int, ...]) -> P:
    return resolve(ACT_AXES["cache_LBSC"], shape, mesh_shape, rules)


def constrain(x: jax.Array, axes: tuple[str, ...], placement) -> jax.Array:
    """``x`` (an activation or the cache, inside a jitted function) split as the rules split its
    logical ``axes`` on ``placement``'s mesh (a :class:`deepseek_jax.kernel_mesh.Placement`;
    ``None``: unchanged). Without it XLA placed the batch and the latent cache whole on every
    device of the mesh: ``data`` split nothing at inference."""
    if placement is None:
        return x
    from deepseek_jax.kernel_mesh import shard_map_mesh
    spec = resolve(axes[-x.ndim:], x.shape, dict(placement.mesh.shape), placement.rule)
    return jax.lax.with_sharding_constraint(x, NamedSharding(shard_map_mesh(placement.mesh), spec))


def constrain_cache(cache, placement):
    """Every array of a :class:`deepseek_jax.cache.LatentCache` (stacked ``[L, B, S, C]`` or a
    tuple of per-layer ``[B, S, C]``) split by the ``cache_LBSC`` rule."""
    return jax.tree.map(lambda a: constrain(a, ACT_AXES["cache_LBSC"], placement), cache)


def bytes_per_device(arrays) -> np.ndarray:
    """Bytes each device holds of a pytree of sharded arrays (for reports and ``plan``)."""
    devs = {}
    for a in jax.tree.leaves(arrays):
        for sh in a.addressable_shards:
            devs[sh.device] = devs.get(sh.device, 0) + sh.data.nbytes
    return np.array(list(devs.values()))
