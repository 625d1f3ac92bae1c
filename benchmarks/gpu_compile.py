"""Compile for an H200 on this host: the real-width decode step's kernel launches, and every
Pallas GPU kernel at the SPEC §11 shapes.

    pip install --no-deps --target .gpu_aot jax-cuda13-pjrt==0.11.2 jax-cuda13-plugin==0.11.2   # once
    PYTHONPATH=. python benchmarks/gpu_compile.py                       # decode B=1 and 16, kernels
    PYTHONPATH=. python benchmarks/gpu_compile.py --batches 1 --prefill 4096 --by kind --no-kernels
    PYTHONPATH=. python benchmarks/gpu_compile.py --by traffic --no-kernels     # MB moved per step
    PYTHONPATH=. python benchmarks/gpu_compile.py --batches "" --prefill 4096 --prefill-attention plain,flash --by traffic

No GPU needed: XLA compiles the programs ``benchmarks/e2e_gpu.py`` times (the reduced-depth model
at real width, ``--layers`` 4 = 1 dense + 3 MoE; the decode steps in an on-device loop; a prefill
in chunks) for the H200 of :data:`kernels_pallas.aot.H200_TARGET` (see :mod:`kernels_pallas.aot`),
with the GPU kernels the model picks there. For each program it prints the kernel launches per
decode step (or per prefill) by the model's named scopes (``--by scope``: router, dispatch,
experts, attn, ...) or by kind (``--by kind``: Pallas kernels by name, XLA fusions by kind,
copies), the launches per MoE layer, and the compiled program's temporary memory. ``--by traffic``
prints instead the megabytes per step that XLA's own kernels (fusions, copies, cuBLAS) move, by
scope, and the launches moving the most (bytes from the HLO's shapes, see
:func:`kernels_pallas.aot.launches`): where a step moves more than its weights and cache need.

A batch-1 decode step is launch-bound: on the 2026-11-28 H200 run its 338 kernels left the GPU
idle 14% of the step and ~300 of them were small XLA fusions (``docs/benchmarks.md``). This count
is how a change to the decode step is judged without a GPU.

The kernel table (``--no-kernels`` skips it) compiles each Pallas GPU kernel the model uses, with
the configuration it picks, at the shapes of ``benchmarks/kernels.py`` (and the grouped GEMM's
backward), through XLA's Triton-to-PTX compile for sm_90: a tile that asks for more shared memory
than the H200 has fails here, as it failed on the lent GPU (the MLA kernel's 128-head, 32-token
blocks, the table's last row, a configuration that must fail). ``--json FILE`` saves both tables
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

plugins_first("gpu", sys.argv[1:])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.e2e_gpu import DECODE_STEPS, bench_config, decode_loop, prefill_chunks  # noqa: E402
from deepseek_jax.cache import LatentCache  # noqa: E402
from deepseek_jax.checkpoint import abstract_model  # noqa: E402
from deepseek_jax.errors import DeepSeekError  # noqa: E402
from deepseek_jax.quant import Precision  # noqa: E402
from benchmarks import _mesh_compile as mesh_compile  # noqa: E402
from kernels_pallas import aot  # noqa: E402

SCOPES = mesh_compile.SCOPES


def program_launches(name: str, fn, args, per: int, layer_loop: str | None, n_moe: int,
                     donate: tuple[int, ...] = ()) -> dict:
    """Compile ``fn(*args)`` (``donate``: its donated arguments) for the H200 and count its
    launches, per ``per`` (decode steps);
    ``layer_loop``: the loop path of the MoE layers' scan body (``"while8/while3"``), for the
    launches per MoE layer (everything inside it, loops within a layer included)."""
    t = time.perf_counter()
    compiled = aot.compile_for_gpu(fn, *args, donate=donate)
    seconds = time.perf_counter() - t
    items = aot.launches(compiled.as_text())
    total = sum(i.count for i in items) / per
    scopes = {k: v / per for k, v in aot.tally(items, lambda i: aot.scope_of(i.op_name, SCOPES)).items()}
    kinds = {k: v / per for k, v in aot.tally(items, lambda i: i.kind).items()}
    moe_body = (sum(i.count for i in items if (i.loops + "/").startswith(layer_loop + "/")) / per / n_moe
                if layer_loop else None)
    loops = sorted({i.loops for i in items})
    mem = compiled.memory_analysis()
    return dict(program=name, launches=total, per_moe_layer=moe_body, scopes=scopes, kinds=kinds, loops=loops,
                temp_gib=mem.temp_size_in_bytes / 2**30, compile_s=seconds, **mesh_compile.xla_traffic(items, per))


def generator_decode(cfg, graphdef, state, batch: int, context: int) -> dict:
    """The :class:`~deepseek_jax.generate.Generator`'s own decode loop (greedy, the default
    sampling), as it runs after a prompt: a ``while_loop`` until the budget or every row's stop.
    Its trip count is not known to XLA, so the count is one iteration's launches (and its
    condition's), i.e. per decode step."""
    import numpy as np

    from deepseek_jax import generate as G
    from deepseek_jax.sampling import row_keys

    sds = jax.ShapeDtypeStruct
    cache = jax.eval_shape(lambda: LatentCache.zeros(cfg, batch, context, jnp.bfloat16))
    keys = jax.eval_shape(lambda: row_keys(jnp.uint32(0), batch))
    i32, b = jnp.int32, sds((batch,), jnp.bool_)
    dstate = G.DecodeState(cache, sds((batch, context), i32), sds((batch,), i32), sds((batch,), i32), b, keys,
                           sds((), i32))
    knobs = G._Knobs(*(sds((), np.asarray(v).dtype) for v in (np.int32(1), np.bool_(True), *G.GREEDY.traced())))

    def decode(params, dstate, limit, knobs):
        return G._decode(graphdef, True, False, G.Weights(params), dstate, limit, knobs)

    # the loop state (the cache) donated, as Generator compiles it: otherwise the program copies the
    # cache on entry, a per-call copy that this count would report as per step
    return program_launches(f"generator B={batch} ctx={context}", decode, (state, dstate, sds((), i32), knobs), 1,
                            "while?/while" + str(cfg.num_moe_layers), cfg.num_moe_layers, donate=(1,))


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plugins", default=".gpu_aot", help="directory holding the CUDA plugin wheels' files")
    ap.add_argument("--layers", type=int, default=4, help="1 dense + (layers-1) MoE layers at real width (>= 3)")
    ap.add_argument("--batches", type=int_list(empty=True), default="1,16",
                    help="decode batch sizes, comma-separated ('' for none)")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--prefill", type=int, default=0, help="also a prefill of this many tokens (0: none)")
    ap.add_argument("--generator", action="store_true",
                    help="also the Generator's own decode loop (greedy) at each batch size")
    ap.add_argument("--chunk", type=int, default=1024, help="prefill chunk (as benchmarks/e2e_gpu.py)")
    ap.add_argument("--fp8-mode", default="w8a16", choices=("w8a16", "w8a8"))
    ap.add_argument("--prefill-attention", default="plain",
                    help="Precision.prefill_attention of the prefill rows, comma-separated: plain, flash "
                         "(the flash kernels, the chunks' over the cache too)")
    ap.add_argument("--by", default="scope", choices=("scope", "kind", "traffic"),
                    help="launches by named scope or by kind, or the MB XLA's own kernels move by scope")
    ap.add_argument("--no-kernels", action="store_true", help="skip the kernel compile table")
    mesh_compile.add_arguments(ap)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    try:
        aot.require("gpu")
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    batches = a.batches
    if a.layers < 3 or a.prefill < 0 or any(b < 1 for b in batches):
        raise DeepSeekError("--layers must be >= 3 (two MoE layers make a loop), --prefill >= 0, batches >= 1")

    cfg = bench_config(a.layers, small=False)
    modes = [m.strip() for m in a.prefill_attention.split(",") if m.strip()]
    if not modes or any(m not in ("plain", "flash") for m in modes):
        raise DeepSeekError(f"--prefill-attention: plain and/or flash, got {a.prefill_attention!r}")
    graphdef, state = nnx.split(abstract_model(cfg, Precision(dtype=jnp.bfloat16, fp8_mode=a.fp8_mode)))
    sds = jax.ShapeDtypeStruct
    rows = []
    for b in batches:
        cache = jax.eval_shape(lambda b=b: LatentCache.zeros(cfg, b, a.context, jnp.bfloat16))
        rows.append(program_launches(f"decode B={b} ctx={a.context}", decode_loop(graphdef, cfg, b, a.context),
                                     (state, cache, sds((b, 1), jnp.int32)), DECODE_STEPS,
                                     f"while{DECODE_STEPS}/while{cfg.num_moe_layers}", cfg.num_moe_layers,
                                     donate=(1,)))
    if a.generator:
        rows += [generator_decode(cfg, graphdef, state, b, a.context) for b in batches]
    for mode in modes if a.prefill else ():
        chunk = min(a.chunk, a.prefill)
        cache = jax.eval_shape(lambda: LatentCache.zeros(cfg, 1, a.prefill, jnp.bfloat16))
        gd = nnx.graphdef(abstract_model(cfg, Precision(dtype=jnp.bfloat16, fp8_mode=a.fp8_mode,
                                                        prefill_attention=mode)))
        rows.append(program_launches(f"prefill T={a.prefill}" + (" flash" if mode == "flash" else ""),
                                     prefill_chunks(gd, a.prefill, chunk), (state, cache, sds((1, a.prefill), jnp.int32)),
                                     1, None, cfg.num_moe_layers))

    print(f"# jax {jax.__version__}, compiled for {aot.DEVICE_KIND} on {jax.devices()[0].platform} "
          f"(no GPU), {a.layers} layers (1 dense), fp8_mode {a.fp8_mode}; launches per decode step / per prefill")
    print(f"{'program':24s} {'launches':>9s} {'per MoE layer':>14s} {'temp GiB':>9s} {'compile s':>10s}")
    for r in rows:
        per_layer = "" if r["per_moe_layer"] is None else f"{r['per_moe_layer']:.1f}"
        print(f"{r['program']:24s} {r['launches']:9.1f} {per_layer:>14s} {r['temp_gib']:9.2f} "
              f"{r['compile_s']:10.1f}")
    key = {"scope": "scopes", "kind": "kinds", "traffic": "xla_mb"}[a.by]
    names = list(dict.fromkeys(k for r in rows for k in r[key]))
    title = "MB by XLA kernels, scope" if a.by == "traffic" else a.by
    print(f"\n{title:28s} " + " ".join(f"{r['program'][:16]:>16s}" for r in rows))
    for n in names:
        print(f"{n:28s} " + " ".join(f"{r[key].get(n, 0.0):16.1f}" for r in rows))
    if a.by == "traffic":
        for r in rows:
            print(f"\n{r['program']}: the XLA launches moving the most bytes (MB per launch)")
            print(f"{'launch':32s} {'kind':16s} {'scope':14s} {'per step':>8s} {'read':>8s} {'written':>8s}")
            for t in r["xla_top"]:
                print(f"{t['name'][:32]:32s} {t['kind'][:16]:16s} {t['scope']:14s} {t['per_step']:8.2f} "
                      f"{t['read_mb']:8.1f} {t['written_mb']:8.1f}")
    kernels = [] if a.no_kernels else aot.compile_kernels("gpu")
    if kernels:
        aot.print_kernels(kernels, "sm_90")
    meshes = [mesh_compile.sharded_decode("gpu", m.strip(), a.mesh_devices) for m in a.meshes.split(";") if m.strip()]
    if meshes:
        mesh_compile.print_rows(meshes, f"{a.mesh_devices} x {aot.DEVICE_KIND}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(jax=jax.__version__, device=aot.DEVICE_KIND, layers=a.layers, rows=rows,
                           kernels=kernels, meshes=meshes), f, indent=1)
    return 1 if any(k["must_fail"] == k["compiled"] for k in kernels) or not all(m["compiled"] for m in meshes) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DeepSeekError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
