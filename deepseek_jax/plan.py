"""Memory plan: per-device bytes of weights, latent cache and temporaries for a config on a mesh.

Weights and cache are counted from the sharding rules (exact: the bytes each device's shard
holds). Temporaries come from XLA: the prefill and decode steps are lowered and compiled for a
fake CPU mesh with the same number of devices, and ``memory_analysis()`` of each executable is
read. (CPU lowering: the GPU/TPU kernels' temporaries differ; treat that column as an estimate.)
"""

from __future__ import annotations

import dataclasses
import math

from deepseek_jax.config import DeepSeekConfig
from deepseek_jax.errors import DeepSeekError

GiB = 1024 ** 3
# Usable accelerator memory per device (bytes): HBM capacity as the vendors state it.
DEVICES = {
    "h200": 141e9, "h100": 80e9, "h800": 80e9, "a100": 80e9, "b200": 192e9, "mi300x": 192e9,
    "v5p": 95e9, "v6e": 32e9, "v5e": 16e9, "v4": 32e9, "cpu": 64e9,
}


@dataclasses.dataclass
class Plan:
    mesh: dict[str, int]
    weights: int            # bytes per device (max over devices)
    weights_total: int      # bytes of the whole model
    cache: int              # latent cache bytes per device
    decode_temp: int | None   # XLA temporaries of one decode step (None: not compiled)
    prefill_temp: int | None  # XLA temporaries of the prefill (None: not compiled)
    decode_args: int | None   # what XLA counts as the decode step's arguments (weights+cache+inputs)
    device: str
    capacity: float
    prefill_tokens: int = 0         # the prompt bucket the prefill was compiled for
    prefill_chunk: int | None = None  # its chunk (the generator's policy), None: one pass
    rows: int = 1                   # the decode batch as the generator allocates it (generate.batch_bucket)
    positions: int = 0              # the cache length as the generator allocates it (its length bucket)

    @property
    def peak(self) -> int:
        """Weights + cache + the larger temporaries (none counted when not compiled)."""
        return self.weights + self.cache + max(self.decode_temp or 0, self.prefill_temp or 0)

    @property
    def fits(self) -> bool:
        return self.peak <= self.capacity

    @property
    def compiled(self) -> bool:
        return self.decode_temp is not None

    def table(self) -> str:
        rows = [("mesh", " x ".join(f"{k}={v}" for k, v in self.mesh.items())),
                ("weights / device", _fmt(self.weights)),
                ("weights, whole model", _fmt(self.weights_total)),
                ("latent cache / device", _fmt(self.cache)),
                ("prefill temporaries / device", _fmt(self.prefill_temp)
                 + (f"  ({self.prefill_tokens} tokens in chunks of {self.prefill_chunk})"
                    if self.prefill_chunk else "")),
                ("decode temporaries / device", _fmt(self.decode_temp)),
                ("peak / device" + (" (no temporaries)" if self.decode_temp is None else ""), _fmt(self.peak)),
                (f"{self.device} memory", _fmt(int(self.capacity))),
                ("fits", ("yes" if self.fits else "NO") + ("" if self.compiled else " (weights + cache only)"))]
        w = max(len(r[0]) for r in rows)
        return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def _fmt(n: int | None) -> str:
    return "not computed (--no-compile)" if n is None else f"{n / GiB:10.2f} GiB  ({n:,} B)"


def shard_bytes(shape, dtype, spec, mesh_shape) -> int:
    """Bytes of one device's shard of an array with a PartitionSpec."""
    import numpy as np

    n = 1
    for dim, ax in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if ax is None:
            n *= dim
        else:
            axes = (ax,) if isinstance(ax, str) else ax
            n *= dim // math.prod(mesh_shape[a] for a in axes)
    return n * np.dtype(dtype).itemsize


def make_plan(cfg: DeepSeekConfig, mesh_shape: dict[str, int], *, rules: str = "ep_tp", batch: int = 1,
              max_len: int = 4096, prompt_len: int | None = None, prefill_batch: int = 1, device: str = "h200",
              compile_steps: bool = True, prefill_chunk: int | str | None = "auto",
              prefill_attention: str = "plain", dtype: str = "bfloat16", mtp: bool = False) -> Plan:
    """The decode batch and cache as the :class:`~deepseek_jax.generate.Generator` allocates
    them: ``batch`` rounded up to a power of two, ``max_len`` to its length bucket (batch 5 holds
    8 rows; 4097 positions, 6144). ``dtype``: the compute dtype (``generate --dtype``), which is
    the latent cache's. ``prefill_chunk``: as the Generator takes it; the prefill is compiled the
    way the generator runs it (``prefill_batch`` prompts padded to their length bucket, in chunks
    when the policy chunks it; ``generate`` prefills its whole batch at once). ``prefill_attention``:
    as ``Precision`` takes it ("flash" compiles here, on CPU, as the blocked jnp form: its memory,
    not a GPU or TPU kernel's). ``mtp``: count the MTP layer's weights and its latent cache,
    which ``generate --speculative mtp`` loads and allocates (its draft step's temporaries are not
    compiled); without it the MTP layer is not counted."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding

    from deepseek_jax import sharding
    from deepseek_jax.cache import LatentCache
    from deepseek_jax.checkpoint import abstract_model
    from deepseek_jax.generate import (Weights, _prompt_pass, _runner, batch_bucket, length_bucket,
                                       prefill_chunk_for)
    from deepseek_jax.quant import Precision

    if device not in DEVICES:
        raise DeepSeekError(f"--device {device!r} unknown (one of: {', '.join(sorted(DEVICES))})")
    if max_len > cfg.max_position_embeddings:
        raise DeepSeekError(f"--max-len {max_len} exceeds max_position_embeddings {cfg.max_position_embeddings}")
    if mtp and cfg.num_nextn_predict_layers < 1:
        raise DeepSeekError("--speculative mtp: the config has no MTP layer (num_nextn_predict_layers is 0)")
    n = math.prod(mesh_shape.values())
    if jax.device_count() < n:
        raise DeepSeekError(f"plan needs {n} (fake) devices, this process has {jax.device_count()}")
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[:n])
    rule_table = sharding.resolve_rules(rules)
    if dtype not in ("bfloat16", "float32"):
        raise DeepSeekError(f"plan: compute dtype {dtype!r} unknown (bfloat16 or float32)")
    act = jnp.dtype(dtype)
    prec = Precision(dtype=act, prefill_attention=prefill_attention)
    model = abstract_model(cfg, prec, with_mtp=mtp)
    specs = sharding.model_param_specs(model, mesh_shape, rule_table)
    graphdef, state = nnx.split(model)
    flat = list(nnx.to_flat_state(state))
    weights = total = 0
    for p, v in flat:
        path = tuple(str(x) for x in p)
        weights += shard_bytes(v.shape, v.dtype, specs[path], mesh_shape)
        total += math.prod(v.shape) * np.dtype(v.dtype).itemsize
    data = int(mesh_shape.get("data", 1))
    rows, S = batch_bucket(batch, data), min(length_bucket(max_len), cfg.max_position_embeddings)
    cache_abs = jax.eval_shape(lambda: LatentCache.zeros(cfg, rows, S, act))
    cache = sum(shard_bytes(a.shape, a.dtype, sharding.cache_spec(mesh_shape, rule_table, a.shape), mesh_shape)
                for a in jax.tree.leaves(cache_abs))
    if mtp:   # the MTP layer's own latent cache [rows, S, C], split as one layer of the main one's
        one = (1, rows, S, cfg.latent_dim)
        cache += shard_bytes(one, act, sharding.cache_spec(mesh_shape, rule_table, one), mesh_shape)
    decode_temp = prefill_temp = decode_args = None
    T = min(length_bucket(prompt_len or min(max_len - 1, 4096)), S)   # (a prompt leaves room for a token)
    Bp = batch_bucket(min(prefill_batch, batch), data)
    chunk = prefill_chunk_for(Bp, T, S, cfg.num_attention_heads, prefill_chunk)
    if compile_steps:
        sharding.attach_mesh(model, mesh, rules)
        graphdef, state = nnx.split(model)
        st_sh = nnx.from_flat_state([(p, v.replace(NamedSharding(mesh, specs[tuple(str(x) for x in p)])))
                                     for p, v in flat])
        c_sh = jax.tree.map(lambda a: NamedSharding(mesh, sharding.cache_spec(mesh_shape, rule_table, a.shape)),
                            cache_abs)
        tok_sh = NamedSharding(mesh, sharding.resolve(("batch", "seq"), (rows, 1), mesh_shape, rule_table))

        def decode(st, c, ids, pos):
            out = nnx.merge(graphdef, st)(ids, pos, cache=c, absorbed=True)
            return out.logits, out.cache

        def prefill(st, c, ids):   # as the generator's prefill runs it (generate._prefill)
            run = _runner(nnx.merge(graphdef, st), Weights(st), ids)
            cache, h, _ = _prompt_pass(run, c, T, chunk, jnp.full((ids.shape[0],), T - 1, jnp.int32), False)
            return h, cache

        # FP8 leaves enter as raw bytes (the layer scan bitcasts them back per layer), so XLA's
        # CPU backend does not widen the whole stacked f8 weights to f16: a CPU-only artefact.
        state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.uint8)
                             if a.dtype == jnp.float8_e4m3fn else a, state)
        ids_sds = jax.ShapeDtypeStruct((rows, 1), jnp.int32)
        with jax.set_mesh(mesh):
            dec = jax.jit(decode, in_shardings=(st_sh, c_sh, tok_sh, tok_sh), donate_argnums=(1,)).lower(
                state, cache_abs, ids_sds, ids_sds).compile()
            # Prefill: ``prefill_batch`` prompts of ``T`` tokens into the batch-``batch`` cache's rows.
            cache_pre = jax.eval_shape(lambda: LatentCache.zeros(cfg, Bp, S, act))
            cp_sh = jax.tree.map(lambda a: NamedSharding(mesh, sharding.cache_spec(mesh_shape, rule_table, a.shape)),
                                 cache_pre)
            pre_sh = NamedSharding(mesh, sharding.resolve(("batch", "seq"), (Bp, T), mesh_shape, rule_table))
            pre = jax.jit(prefill, in_shardings=(st_sh, cp_sh, pre_sh), donate_argnums=(1,)).lower(
                state, cache_pre, jax.ShapeDtypeStruct((Bp, T), jnp.int32)).compile()
        dm, pm = dec.memory_analysis(), pre.memory_analysis()
        decode_temp, prefill_temp = int(dm.temp_size_in_bytes), int(pm.temp_size_in_bytes)
        decode_args = int(dm.argument_size_in_bytes)
    return Plan(dict(mesh_shape), weights, total, cache, decode_temp, prefill_temp, decode_args, device,
                DEVICES[device], T, chunk, rows, S)


# ---- training -------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainPlan:
    """Per-device bytes of one training step on a mesh (:func:`make_train_plan`)."""
    mesh: dict[str, int]
    mode: str                  # "full" or "lora"
    trained_params: int        # parameters trained (count, whole model)
    trained: int               # bytes / device: the trained parameters
    frozen: int                # bytes / device: the other weights (FP8 ones for LoRA), router biases
    moments: int               # bytes / device: AdamW's two moments (the parameters' dtype)
    grads: int                 # bytes / device: the gradients (as the trained parameters; twice that with
                               # gradient accumulation: the running sum and one microbatch's)
    step_temp: int | None      # XLA temporaries of forward + backward (None: not compiled)
    apply_temp: int | None     # XLA temporaries of the optimizer step
    device: str
    capacity: float

    @property
    def state(self) -> int:
        return self.trained + self.frozen + self.moments

    @property
    def peak(self) -> int:
        """Train state + gradients + the larger temporaries (none counted when not compiled)."""
        return self.state + self.grads + max(self.step_temp or 0, self.apply_temp or 0)

    @property
    def fits(self) -> bool:
        return self.peak <= self.capacity

    def table(self) -> str:
        rows = [("mesh", " x ".join(f"{k}={v}" for k, v in self.mesh.items())),
                ("trained parameters", f"{self.trained_params:,} ({self.mode})"),
                ("trained weights / device", _fmt(self.trained)),
                ("frozen weights + router biases / device", _fmt(self.frozen)),
                ("AdamW moments / device", _fmt(self.moments)),
                ("gradients / device", _fmt(self.grads)),
                ("forward+backward temporaries / device", _fmt(self.step_temp)),
                ("optimizer temporaries / device", _fmt(self.apply_temp)),
                ("peak / device" + (" (no temporaries)" if self.step_temp is None else ""), _fmt(self.peak)),
                (f"{self.device} memory", _fmt(int(self.capacity))),
                ("fits", "yes" if self.fits else "NO")]
        w = max(len(r[0]) for r in rows)
        return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "state": self.state, "peak": self.peak, "fits": self.fits}


def abstract_trainer(cfg: DeepSeekConfig, prec, tcfg, *, lora_rank: int = 0, lora_targets=None, mesh=None,
                     rules="ep_tp", param_dtype=None):
    """``(trainer, state)``: a :class:`~deepseek_jax.train.Trainer` built under ``jax.eval_shape``
    (nothing allocated: its static settings are real, its own ``state`` is not to be used) and
    its train state as ``ShapeDtypeStruct``s, on ``mesh`` each carrying the ``NamedSharding``
    the Trainer gives that leaf. ``lora_rank``: LoRA adapters (``lora.add_lora``) over the
    model as built; ``param_dtype``: the parameters cast to it (:func:`~deepseek_jax.train.cast_params`).
    ``trainer.trained_slices``: :func:`~deepseek_jax.train.trained_slices` of that model."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding

    from deepseek_jax import lora
    from deepseek_jax import train as T
    from deepseek_jax.model import DeepSeekV3

    box = {}

    def build():
        model = DeepSeekV3(cfg, prec=prec, rngs=nnx.Rngs(0), with_mtp=cfg.num_nextn_predict_layers > 0)
        if param_dtype is not None:
            model = T.cast_params(model, param_dtype)
        if lora_rank:
            lora.add_lora(model, rank=lora_rank, targets=lora_targets)
        box["trainer"] = trainer = T.Trainer(model, tcfg, mesh=mesh, rules=rules)
        box["slices"] = T.trained_slices(tcfg.trainable, model)   # (numpy: from the names alone)
        return trainer.state

    state = jax.eval_shape(build)
    trainer = box["trainer"]
    trainer.trained_slices = box["slices"]
    if trainer.mesh is not None and trainer._specs is not None:
        leaves, treedef = jax.tree.flatten(state)
        state = treedef.unflatten([jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(trainer.mesh, s))
                                   for x, s in zip(leaves, trainer._specs.state, strict=True)])
    return trainer, state


def step_programs(trainer, state, batch: int, seq: int):
    """``[(name, fn, args, donate)]``: the Trainer's two jitted programs of one step
    (``loss_and_grads``: forward, loss, backward; ``apply``: the optimizer, state donated) with
    its static arguments, over abstract arguments (on its mesh, sharded as it shards them)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from deepseek_jax import train as T
    from deepseek_jax.tasks import Batch

    sds = jax.ShapeDtypeStruct
    rows = None if trainer.mesh is None else NamedSharding(trainer.mesh, P(trainer.axis))
    b = Batch(sds((batch, seq), jnp.int32, sharding=rows), sds((batch, seq), jnp.float32, sharding=rows),
              sds((batch, seq), jnp.bool_, sharding=rows))
    coefs = jax.eval_shape(trainer.tcfg._hyper)
    kw = trainer._kw()

    def loss_and_grads(state, params, b, coefs):
        return T._loss_and_grads(state, params, b, coefs, **kw)

    loss, aux, grads = jax.eval_shape(loss_and_grads, state, state.params, b, coefs)
    if trainer.mesh is not None and trainer._specs is not None:   # as the step leaves them
        leaves, treedef = jax.tree.flatten(grads)
        grads = treedef.unflatten([sds(x.shape, x.dtype, sharding=NamedSharding(trainer.mesh, s))
                                   for x, s in zip(leaves, trainer._specs.params, strict=True)])

    def apply(state, grads, loss, aux, coefs):
        return T._apply(state, grads, loss, aux, coefs, static=trainer.tcfg._static(), mesh=trainer.mesh,
                        frozen=trainer.frozen_routers, specs=trainer._specs)

    return [("loss_and_grads", loss_and_grads, (state, state.params, b, coefs), ()),
            ("apply", apply, (state, grads, loss, aux, coefs), (0,))]


def make_train_plan(cfg: DeepSeekConfig, mesh_shape: dict[str, int], *, mode: str = "full", rules: str = "ep_tp",
                    batch: int = 1, seq_len: int = 4096, lora_rank: int = 16, lora_targets=None,
                    trainable: str | None = None, param_dtype: str = "float32", remat: bool = False,
                    grad_accum: int = 1, device: str = "h200", compile_steps: bool = True,
                    prefill_attention: str = "plain") -> TrainPlan:
    """Per-device memory of training ``cfg`` on a mesh as ``deepseek-jax train`` shards it.

    ``mode="full"``: every parameter (or those ``trainable`` matches) trained in ``param_dtype``,
    the config's FP8 ignored, as ``train --config``; ``"lora"``: adapters of ``lora_rank`` over the
    config's weights as they are (FP8 kept, frozen), as ``train --init CKPT --lora-rank R``;
    ``remat``: layers rematerialised in the backward pass (``train --remat``); ``grad_accum``: the
    batch in that many microbatches (``train --grad-accum``: one microbatch's activations, and a
    second copy of the gradients, the running sum). Every
    count comes from the Trainer's shardings of its state (exact); with ``compile_steps`` the
    step's two programs are compiled for the fake CPU mesh and their temporaries read (an estimate
    for a GPU or TPU, as in :func:`make_plan`). ``batch`` x ``seq_len``: the tokens of one step.
    ``prefill_attention``: as in :func:`make_plan` (``train --prefill-attention``)."""
    import jax
    import jax.numpy as jnp

    from deepseek_jax import lora, sharding
    from deepseek_jax import train as T
    from deepseek_jax.quant import Precision

    if device not in DEVICES:
        raise DeepSeekError(f"--device {device!r} unknown (one of: {', '.join(sorted(DEVICES))})")
    if mode not in ("full", "lora"):
        raise DeepSeekError(f"--train must be full or lora, got {mode!r}")
    if seq_len > cfg.max_position_embeddings:
        raise DeepSeekError(f"--seq-len {seq_len} exceeds max_position_embeddings {cfg.max_position_embeddings}")
    n = math.prod(mesh_shape.values())
    if jax.device_count() < n:
        raise DeepSeekError(f"plan needs {n} (fake) devices, this process has {jax.device_count()}")
    if batch % grad_accum:
        raise DeepSeekError(f"--batch {batch} must be a multiple of --grad-accum {grad_accum}")
    micro = batch // grad_accum
    if micro % mesh_shape.get("data", 1):
        raise DeepSeekError(f"--batch {batch}" + (f" / --grad-accum {grad_accum}" if grad_accum > 1 else "")
                            + f" must be a multiple of the mesh's data axis ({mesh_shape['data']})")
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[:n])
    prec = Precision(dtype=jnp.bfloat16, prefill_attention=prefill_attention)
    if mode == "lora":
        pattern = lora.LORA_PATTERN if trainable is None else f"{lora.LORA_PATTERN}|{trainable}"
        tcfg = T.TrainConfig(trainable=pattern, remat=remat)
        trainer, state = abstract_trainer(cfg, prec, tcfg, lora_rank=lora_rank, lora_targets=lora_targets,
                                          mesh=mesh, rules=rules)
    else:
        tcfg = T.TrainConfig(trainable=trainable, remat=remat)
        trainer, state = abstract_trainer(cfg.replace(fp8=False), prec, tcfg, mesh=mesh, rules=rules,
                                          param_dtype=jnp.dtype(param_dtype))

    def per_device(tree) -> int:
        return sum(shard_bytes(x.shape, x.dtype, x.sharding.spec, mesh_shape) for x in jax.tree.leaves(tree))

    trained = per_device(state.params)
    frozen = per_device((state.tied, state.biases, state.rest))
    moments = sum(shard_bytes(x.shape, x.dtype, x.sharding.spec, mesh_shape)
                  for x in jax.tree.leaves(state.opt_state) if x.ndim)   # (the scalar step counts aside)
    flat = jax.tree_util.tree_flatten_with_path(state.params)[0]   # (as Trainer.parameter_counts)
    count = T.trained_count([x for _, x in flat], [trainer.trained_slices.get(T._key_parts(p)) for p, _ in flat])
    step_temp = apply_temp = None
    if compile_steps:
        temps = {}
        with jax.set_mesh(mesh):
            for name, fn, args, donate in step_programs(trainer, state, micro, seq_len):
                temps[name] = int(jax.jit(fn, donate_argnums=donate).lower(*args).compile()
                                  .memory_analysis().temp_size_in_bytes)
        step_temp, apply_temp = temps["loss_and_grads"], temps["apply"]
    return TrainPlan(dict(mesh_shape), mode, count, trained, frozen, moments, trained * (2 if grad_accum > 1 else 1),
                     step_temp, apply_temp, device, DEVICES[device])
