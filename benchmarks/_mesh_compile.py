"""The real-width decode step compiled for several GPUs or TPU chips (``gpu_compile.py`` and
``tpu_compile.py --meshes``): does it compile on that mesh, and what collectives does it hold. Also
what both scripts read from a compiled program: the bytes XLA's own ops move, by the model's
named scopes."""

from __future__ import annotations

import collections
import re
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from benchmarks.e2e_gpu import bench_config
from deepseek_jax import sharding
from deepseek_jax.cache import LatentCache
from deepseek_jax.checkpoint import abstract_model
from deepseek_jax.quant import Precision
from kernels_pallas import aot


#: The model's named scopes (``jax.named_scope`` in ``deepseek_jax``), innermost wins.
SCOPES = ("embed", "qkv", "cache_write", "attn", "o_proj", "mlp", "router", "dispatch", "experts", "combine",
          "shared_experts", "moe_stats", "moe", "lm_head")


def xla_traffic(items: list, per: float, top: int = 8) -> dict:
    """From :func:`kernels_pallas.aot.launches` of a program: the MB per ``per`` (decode steps) that
    XLA's own ops (not the Pallas kernels) move by scope, the MB they write, and the ``top`` ops
    moving the most."""
    xla = [i for i in items if not i.kind.startswith(("pallas:", "mosaic_gpu"))]
    mb = collections.defaultdict(float)
    for i in xla:
        mb[aot.scope_of(i.op_name, SCOPES)] += i.count * (i.read + i.written) / per / 1e6
    biggest = sorted(xla, key=lambda i: -i.count * (i.read + i.written))[:top]
    return dict(xla_mb=dict(sorted(mb.items(), key=lambda kv: -kv[1])),
                xla_written_mb=sum(i.count * i.written for i in xla) / per / 1e6,
                xla_top=[dict(name=i.name, kind=i.kind, scope=aot.scope_of(i.op_name, SCOPES), per_step=i.count / per,
                              read_mb=i.read / 1e6, written_mb=i.written / 1e6) for i in biggest])


def sharded_decode(platform: str, mesh_text: str, n: int, *, topology: str = "v5p:2x2x1", layers: int = 3,
                   batch: int = 8, context: int = 4096) -> dict:
    """One absorbed decode step of ``layers`` real-width layers (1 dense) at ``batch`` rows over a
    ``context``-token cache, the model placed on ``n`` devices by ``mesh_text`` and the ``ep_tp``
    rules, with the kernels the model picks on ``platform``. Returns whether it compiled (or the
    error's first line), the temporary bytes per device, and the all-gathers and Pallas kernels
    in the program."""
    devices, abstract_device = aot.devices(platform, n, topology)
    sizes = sharding.parse_mesh(mesh_text, n)
    mesh = sharding.make_mesh(sizes, devices)
    rules = sharding.RULES["ep_tp"]
    cfg = bench_config(layers, small=False)
    model = abstract_model(cfg, Precision(dtype=jnp.bfloat16), with_mtp=False)
    specs = sharding.model_param_specs(model, sizes, rules)
    sharding.attach_mesh(model, mesh, "ep_tp")
    graphdef, state = nnx.split(model)
    sds = jax.ShapeDtypeStruct
    state = nnx.from_flat_state([(p, v.replace(sds(v.shape, v.dtype, sharding=NamedSharding(
        mesh, specs[tuple(str(x) for x in p)])))) for p, v in nnx.to_flat_state(state)])
    cache = jax.tree.map(lambda a: sds(a.shape, a.dtype, sharding=NamedSharding(
        mesh, sharding.cache_spec(sizes, rules, a.shape))),
        jax.eval_shape(lambda: LatentCache.zeros(cfg, batch, context, jnp.bfloat16)))
    ids = sds((batch, 1), jnp.int32, sharding=NamedSharding(
        mesh, sharding.resolve(("batch", "seq"), (batch, 1), sizes, rules)))

    def decode(state, cache, ids):
        out = nnx.merge(graphdef, state)(ids, jnp.full(ids.shape, context - 1, jnp.int32), cache=cache,
                                         absorbed=True)
        return out.logits, out.cache

    row = dict(mesh=mesh_text, devices=n)
    t = time.perf_counter()
    try:
        c = aot.compile_sharded(decode, (state, cache, ids), mesh, abstract_device)
    except Exception as e:  # noqa: BLE001 - the table reports it
        return dict(row, compiled=False, error=f"{type(e).__name__}: {' '.join(str(e).split())[:200]}",
                    compile_s=time.perf_counter() - t)
    text = c.as_text()
    return dict(row, compiled=True, error="", compile_s=time.perf_counter() - t,
                temp_gib=c.memory_analysis().temp_size_in_bytes / 2**30,
                all_gathers=len(re.findall(r"\ball-gather(?:-start)?\(", text)),
                kernels=len(re.findall(r'custom_call_target="(?:__gpu\$xla\.gpu\.triton|tpu_custom_call|mosaic_gpu)', text)))


def add_arguments(ap) -> None:
    """``--meshes`` and ``--mesh-devices`` for ``gpu_compile.py`` / ``tpu_compile.py``."""
    ap.add_argument("--meshes", default="", help="';'-separated meshes to compile the real-width decode step on "
                    "(e.g. 'data=4;model=4;expert=4'), --mesh-devices devices each")
    ap.add_argument("--mesh-devices", type=int, default=4)


def print_rows(rows: list[dict], target: str) -> None:
    print(f"\n{'decode step on a mesh (' + target + ')':44s} {'result':>8s} {'temp GiB':>9s} {'all-gathers':>12s} "
          f"{'kernels':>8s}")
    for r in rows:
        label = f"{r['mesh']} ({r['devices']} devices)"
        if r["compiled"]:
            print(f"{label:44s} {'compiled':>8s} {r['temp_gib']:9.2f} {r['all_gathers']:12d} {r['kernels']:8d}")
        else:
            print(f"{label:44s} {'failed':>8s}  {r['error']}")
