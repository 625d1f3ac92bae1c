"""Compile for TPUs on this host: every Pallas TPU kernel at the SPEC §11 shapes, and the real-width
model's decode step and prefill, through libtpu's compiler (Mosaic included).

    pip install --no-deps --target .tpu_aot "libtpu==0.0.48.*"     # once: jax 0.11.2's libtpu
    PYTHONPATH=. python benchmarks/tpu_compile.py                    # v5p, v6e, TPU7x
    PYTHONPATH=. python benchmarks/tpu_compile.py --topologies v5p:2x2x1 --model

No TPU is reachable from this project, so the TPU path's kernels were run only in the Pallas TPU
interpreter. Here XLA compiles them for real TPU generations (``kernels_pallas.aot``): the Mosaic
compiler checks each kernel's tiling, layouts and VMEM use for that chip, so a kernel that a TPU
would reject fails here. Per topology it prints each kernel (``aot.kernel_checks("tpu")``; the last
row is a tile too big for VMEM, which must fail). ``--model`` also compiles the programs
``benchmarks/e2e_gpu.py`` times (1 dense + 3 MoE layers at real width: 8 decode steps at batch 1
and 64 over a 4096-token cache, and a 4096-token prefill in 1024-token chunks, with the plain and
the flash prefill attention) for one chip of the
first topology, with the TPU kernels the model picks there, and prints the Pallas kernels each
program holds, their grid steps per decode step (``aot.grid_steps``: each step of a Mosaic kernel
has a fixed cost besides its DMA and compute, the TPU's analogue of GPU launches), its temporary
memory and the megabytes XLA's own ops move per step (a weight or cache slice copied for a kernel
shows there). ``--attention-backward 1024,4096`` compiles one layer's flash attention forward
and backward at those lengths for one chip of the first topology, with the blocked jnp backward
and with the TPU backward kernels, and prints what XLA's own ops move beside each and the ratios.
``--json FILE`` saves the rows
(``tests/test_aot_compile.py`` checks them).
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._args import ArgumentParser, int_list  # noqa: E402  (argparse only)
from benchmarks._plugins import plugins_first  # noqa: E402  (os and sys only)

plugins_first("tpu", sys.argv[1:])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.e2e_gpu import DECODE_STEPS, bench_config, decode_loop, prefill_chunks  # noqa: E402
from deepseek_jax.cache import LatentCache  # noqa: E402
from deepseek_jax.checkpoint import abstract_model  # noqa: E402
from deepseek_jax.quant import Precision  # noqa: E402
from benchmarks import _mesh_compile as mesh_compile  # noqa: E402
from kernels_pallas import aot  # noqa: E402


def model_programs(topology: str, context: int = 4096, prefill: int = 4096, chunk: int = 1024,
                   prefill_attention: tuple[str, ...] = ("plain", "flash")) -> list[dict]:
    """The e2e programs compiled for one chip of ``topology``: Pallas kernel counts, temp memory;
    the prefill with each ``Precision.prefill_attention``."""
    import collections
    import re

    cfg = bench_config(4, small=False)
    graphdef, state = nnx.split(abstract_model(cfg, Precision(dtype=jnp.bfloat16)))
    sds = jax.ShapeDtypeStruct
    progs = []
    for b in (1, 64):
        cache = jax.eval_shape(lambda b=b: LatentCache.zeros(cfg, b, context, jnp.bfloat16))
        progs.append((f"decode B={b} ctx={context} ({DECODE_STEPS} steps)", decode_loop(graphdef, cfg, b, context),
                      (state, cache, sds((b, 1), jnp.int32))))
    cache = jax.eval_shape(lambda: LatentCache.zeros(cfg, 1, prefill, jnp.bfloat16))
    for mode in prefill_attention:
        gd = nnx.graphdef(abstract_model(cfg, Precision(dtype=jnp.bfloat16, prefill_attention=mode)))
        progs.append((f"prefill T={prefill}{' flash' if mode == 'flash' else ''} (chunks of {chunk})",
                      prefill_chunks(gd, prefill, chunk), (state, cache, sds((1, prefill), jnp.int32))))
    rows = []
    for name, fn, args in progs:
        t = time.perf_counter()
        c = aot.compile_for_tpu(fn, *args, topology=topology, donate=(1,) if name.startswith("decode") else ())
        text = c.as_text()
        kernels = collections.Counter(re.findall(r'custom_call_target="tpu_custom_call".*?op_name="[^"]*/(\w+)/pallas_call',
                                                 text))
        per = DECODE_STEPS if name.startswith("decode") else 1
        steps = aot.grid_steps(fn, *args, topology=topology)
        rows.append(dict(program=name, kernels=dict(kernels), temp_gib=c.memory_analysis().temp_size_in_bytes / 2**30,
                         compile_s=time.perf_counter() - t,
                         grid_steps={k: v[1] / per for k, v in sorted(steps.items())},
                         **mesh_compile.xla_traffic(aot.launches(text), per)))
    return rows


def attention_backward(topology: str, seqs: list[int], heads: int = 128) -> list[dict]:
    """One layer's flash attention (``kernels_pallas.cached_attention``, training by token index:
    ``T`` tokens over themselves, bf16, DeepSeek-V3's head sizes), forward and backward, compiled
    for one chip of ``topology`` twice: the TPU kernel with the blocked jnp backward
    (``blocked_vjp``, what it had before) and with its own backward kernels. Per ``T`` a row each:
    what XLA's own ops move, how many there are, the temporaries."""
    import functools

    from kernels_pallas import flash_prefill
    from kernels_pallas.blocked_attention import blocked_vjp

    sds, bf16 = jax.ShapeDtypeStruct, jnp.bfloat16
    blocked = blocked_vjp(functools.partial(flash_prefill.cached_attention_tpu), 0.07)
    forms = {"blocked jnp": blocked,
             "kernels": functools.partial(flash_prefill.cached_attention, scale=0.07, impl="pallas_tpu")}
    rows = []
    for t in seqs:
        args = (sds((1, t, heads, 128), bf16), sds((1, t, heads, 64), bf16), sds((1, t, heads, 256), bf16),
                sds((1, t, 64), bf16), sds((1, t), jnp.int32))
        for name, attn in forms.items():
            def step(qn, qp, kv, kpe, pos, attn=attn):
                loss = lambda *a: jnp.sum(attn(*a, pos).astype(jnp.float32))  # noqa: E731
                return jax.grad(loss, argnums=(0, 1, 2, 3))(qn, qp, kv, kpe)

            c = aot.compile_for_tpu(step, *args, topology=topology)
            items = aot.launches(c.as_text())
            xla = [i for i in items if not i.kind.startswith(("pallas:", "mosaic_gpu"))]
            rows.append(dict(seq=t, backward=name, xla_gb=sum(i.count * (i.read + i.written) for i in xla) / 1e9,
                             xla_ops=sum(i.count for i in xla), temp_gib=c.memory_analysis().temp_size_in_bytes / 2**30))
    return rows


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plugins", default=".tpu_aot", help="directory holding libtpu's files")
    ap.add_argument("--topologies", default="v5p:2x2x1,v6e:2x2,tpu7x:2x2x1")
    ap.add_argument("--model", action="store_true", help="also the real-width decode and prefill programs")
    ap.add_argument("--attention-backward", type=int_list(empty=True), default="",
                    help="comma-separated sequence lengths: also one layer's flash attention forward+backward, "
                         "the blocked jnp backward against the backward kernels, side by side")
    mesh_compile.add_arguments(ap)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    topologies = [t.strip() for t in a.topologies.split(",") if t.strip()]
    try:
        for t in topologies:
            aot.require("tpu", t)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"# jax {jax.__version__}, compiled on {jax.devices()[0].platform} (no TPU)")
    out = dict(jax=jax.__version__, kernels={}, model=[])
    for t in topologies:
        rows = aot.compile_kernels("tpu", t)
        out["kernels"][t] = rows
        aot.print_kernels(rows, f"{t}, {aot._tpu_meshes(t)[1].device_kind}")
    if a.model:
        out["model"] = model_programs(topologies[0])
        print(f"\n{'program (one chip of ' + topologies[0] + ')':44s} {'temp GiB':>9s} {'compile s':>10s} "
              f"{'XLA MB':>8s} {'written':>8s} {'grid steps':>10s}  Pallas kernels")
        for r in out["model"]:
            ks = ", ".join(f"{k} x{v}" for k, v in sorted(r["kernels"].items()))
            print(f"{r['program']:44s} {r['temp_gib']:9.2f} {r['compile_s']:10.1f} {sum(r['xla_mb'].values()):8.0f} "
                  f"{r['xla_written_mb']:8.0f} {sum(r['grid_steps'].values()):10.0f}  {ks}")
        print("grid steps: the Pallas kernels' grid steps per decode step / per prefill (aot.grid_steps), by kernel:")
        for r in out["model"]:
            print(f"  {r['program']:42s} " + ", ".join(f"{k} {v:.0f}" for k, v in r["grid_steps"].items()))
        print("XLA MB / written: what XLA's own ops (not the Pallas kernels) move and write per decode step / "
              "per prefill, from the HLO's shapes (kernels_pallas.aot.launches); by scope:")
        names = list(dict.fromkeys(k for r in out["model"] for k in r["xla_mb"]))
        print(f"{'scope':16s} " + " ".join(f"{r['program'][:14]:>14s}" for r in out["model"]))
        for n in names:
            print(f"{n:16s} " + " ".join(f"{r['xla_mb'].get(n, 0.0):14.1f}" for r in out["model"]))
    seqs = a.attention_backward
    if seqs:
        out["attention_backward"] = rows = attention_backward(topologies[0], seqs)
        print(f"\none layer's flash attention, forward + backward (one chip of {topologies[0]}, 128 heads, bf16): "
              f"XLA's own ops around the kernels")
        print(f"{'T':>6s} {'backward':12s} {'XLA GB':>8s} {'XLA ops':>8s} {'temp GiB':>9s}")
        for r in rows:
            print(f"{r['seq']:6d} {r['backward']:12s} {r['xla_gb']:8.2f} {r['xla_ops']:8.0f} {r['temp_gib']:9.3f}")
        print(f"{'T':>6s} {'ratio blocked / kernels':>24s}: XLA GB, XLA ops, temporaries")
        for old, new in zip(rows[::2], rows[1::2]):
            print(f"{old['seq']:6d} {'':24s}  {old['xla_gb'] / new['xla_gb']:.1f}x, {old['xla_ops'] / new['xla_ops']:.1f}x, "
                  f"{old['temp_gib'] / new['temp_gib']:.2f}x")
    out["meshes"] = [mesh_compile.sharded_decode("tpu", m.strip(), a.mesh_devices, topology=topologies[0])
                     for m in a.meshes.split(";") if m.strip()]
    if out["meshes"]:
        mesh_compile.print_rows(out["meshes"], f"{a.mesh_devices} chips of {topologies[0]}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    bad = any(k["must_fail"] == k["compiled"] for rows in out["kernels"].values() for k in rows)
    bad = bad or not all(m["compiled"] for m in out["meshes"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
