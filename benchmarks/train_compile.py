"""Compile one training step for an H200 or a TPU chip on this host: full fine-tuning of a BF16
model and LoRA on a frozen FP8 one, with the Pallas kernels (and their backwards) the step uses.

    PYTHONPATH=. python benchmarks/train_compile.py --platform gpu        # sm_90 (.gpu_aot)
    PYTHONPATH=. python benchmarks/train_compile.py --platform tpu        # one v5p chip (.tpu_aot)
    PYTHONPATH=. python benchmarks/train_compile.py --platform gpu --width real --cases lora
    PYTHONPATH=. python benchmarks/train_compile.py --platform gpu --kernels ref   # no Pallas kernels

No GPU or TPU needed (``kernels_pallas.aot``: XLA's whole compiler for a device that is not there,
Triton's PTX compile for sm_90, Mosaic's for the TPU). A step is the two programs
:class:`deepseek_jax.train.Trainer` compiles, with its static arguments: ``loss_and_grads``
(forward, loss, backward) and ``apply`` (global-norm clip, AdamW, the routing-bias update; the
train state donated). The train state is built abstractly (a ``Trainer`` over a fresh model under
``jax.eval_shape``): nothing is allocated, so ``--width real`` (hidden 7168, 128 heads, 256
experts, vocabulary 129,280) compiles too, only slower.

Cases (``--cases``): ``full``, every parameter of a BF16 model trained (the routed experts through
the grouped GEMM and its ``dx`` and ``dw`` kernels); ``lora``, FP8 weights (frozen) with LoRA
adapters (``lora.add_lora``; ``--lora-targets``, default ``lora.DEFAULT_TARGETS``) trained alone
(``lora.LORA_PATTERN``, plus ``--trainable``): gradients reach the adapters through the FP8 GEMMs
(their backward for ``x`` is XLA's ``dy @ dequant(W)``) and the FP8 grouped GEMM's ``dx`` kernel.
Default shapes: 1 dense + 2 MoE layers and the MTP layer (``--layers``, ``--no-mtp``) at the small
width below, 2 x 128 tokens. ``--kernels`` sets ``Precision(kernels=...)`` (default ``auto``: what
the device picks; ``ref``: the jnp references, no Pallas kernel). ``--prefill-attention flash``,
``--fp8-mode w8a8`` and ``--remat`` compile those variants.

Per program it prints and saves (``--json FILE``) a row: whether it compiled (else the error),
the compile time, memory from ``compiled.memory_analysis()`` (arguments, outputs, temporaries,
donated aliases; ``peak_gib``: XLA's peak where it reports one, else their sum less the aliases),
the Pallas kernels in the compiled HLO by name, the forward's and the backward's apart (an op
whose source path has ``transpose(``), the other custom calls, and ``xla_mb``: the MB that XLA's
own ops (not the Pallas kernels) read and write per step, by the model's named scopes (``attn``,
``experts``, ...; bytes from the HLO's shapes, :func:`kernels_pallas.aot.launches`). The HLO holds a scanned
layer's body once, so a count is per program, not per executed layer. Exit status 1 if a
program failed to compile (or trace).
"""

from __future__ import annotations

import os
import sys


def _platform(argv: list[str]) -> str:
    for i, a in enumerate(argv):
        if a == "--platform" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--platform="):
            return a.split("=", 1)[1]
    return "gpu"


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._plugins import PLATFORMS, plugins_first  # noqa: E402  (os and sys only)

if _platform(sys.argv[1:]) in PLATFORMS:
    plugins_first(_platform(sys.argv[1:]), sys.argv[1:])

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from deepseek_jax import lora, sharding  # noqa: E402
from deepseek_jax import train as T  # noqa: E402
from deepseek_jax.config import load_config  # noqa: E402
from deepseek_jax.plan import abstract_trainer, step_programs  # noqa: E402
from deepseek_jax.quant import Precision  # noqa: E402
from benchmarks import _mesh_compile as mesh_compile  # noqa: E402
from kernels_pallas import aot, backend  # noqa: E402

#: ``--width small``: DeepSeek-V3's head shapes (128 + 64 / 128, latent 512) and block structure
#: (1 dense + MoE layers, shared expert, grouped routing, MTP) at a width that compiles in seconds
#: on a 2-core host; every weight dimension a multiple of 128 (the FP8 block).
SMALL = dict(vocab_size=4096, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=256,
             num_attention_heads=8, q_lora_rank=512, kv_lora_rank=512,
             n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)


def train_config(width: str, layers: int, fp8: bool, mtp: bool = True):
    cfg = load_config("deepseek-v3-671b").replace(num_hidden_layers=layers, first_k_dense_replace=1,
                                                   num_nextn_predict_layers=int(mtp), fp8=fp8)
    return cfg.replace(**SMALL) if width == "small" else cfg


_KERNEL = re.compile(r'custom_call_target="([^"]*)"')


def kernel_counts(hlo: str) -> tuple[dict, dict, dict]:
    """``(forward, backward, other custom calls)``: Pallas kernels by name in the compiled HLO
    (Triton and Mosaic GPU / Mosaic TPU custom calls; backward: the op's source path has a
    ``transpose(``), and every other custom-call target."""
    fwd, bwd, other = collections.Counter(), collections.Counter(), collections.Counter()
    for line in hlo.splitlines():
        if " custom-call(" not in line:
            continue
        target = _KERNEL.search(line)
        target = target.group(1) if target else "?"
        src = re.search(r'op_name="([^"]*)"', line)
        src = src.group(1) if src else ""
        if "triton" in target or target == "tpu_custom_call" or target.startswith("mosaic_gpu"):
            m = re.search(r"/(\w+)/pallas_call", src)
            name = m.group(1) if m else ("mosaic_gpu" if target.startswith("mosaic_gpu") else "?")
            (bwd if "transpose(" in src else fwd)[name] += 1
        else:
            other[target] += 1
    return dict(fwd), dict(bwd), dict(other)


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:600]}"


def compile_program(platform: str, topology: str, name: str, fn, args, donate, mesh=None) -> dict:
    """Compiles ``fn(*args)`` (``donate``: its donated arguments) for the device, or for every
    device of ``mesh`` (``(mesh, abstract_device)``): a report row (memory per device)."""
    t = time.perf_counter()
    row = dict(program=name)
    try:
        if mesh is not None:
            c = aot.compile_sharded(fn, args, *mesh, donate=donate)
        elif platform == "gpu":
            c = aot.compile_for_gpu(fn, *args, donate=donate)
        else:
            c = aot.compile_for_tpu(fn, *args, topology=topology, donate=donate)
    except Exception as e:  # noqa: BLE001 - the report says why
        row.update(compiled=False, compile_s=round(time.perf_counter() - t, 2), error=_error(e))
        return row
    row.update(compiled=True, compile_s=round(time.perf_counter() - t, 2), error="")
    fwd, bwd, other = kernel_counts(c.as_text())
    row.update(kernels_fwd=fwd, kernels_bwd=bwd, custom_calls=other)
    # MB moved by XLA's own ops (not the Pallas kernels) per step, by the model's named scopes
    traffic = mesh_compile.xla_traffic(aot.launches(c.as_text()), 1)
    row.update(xla_mb={k: round(v, 1) for k, v in traffic["xla_mb"].items()}, xla_top=traffic["xla_top"])
    mem = c.memory_analysis()
    if mem is not None:
        def g(n):
            return round(n / 2 ** 30, 4)

        total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                 - mem.alias_size_in_bytes)
        xla_peak = getattr(mem, "peak_memory_in_bytes", 0) or 0   # 0 where the compiler reports none
        row.update(argument_gib=g(mem.argument_size_in_bytes), output_gib=g(mem.output_size_in_bytes),
                   temp_gib=g(mem.temp_size_in_bytes), alias_gib=g(mem.alias_size_in_bytes),
                   peak_gib=g(xla_peak or total), peak_from="xla" if xla_peak else "sum")
    return row


def run_case(case: str, a) -> list[dict]:
    """The rows of one case (``full`` or ``lora``): one per program, or one ``setup`` row saying
    why the step could not be traced."""
    fp8 = case == "lora"
    cfg = train_config(a.width, a.layers, fp8=fp8, mtp=not a.no_mtp)
    prec = Precision(dtype=jnp.bfloat16, kernels=a.kernels, fp8_mode=a.fp8_mode,
                     prefill_attention=a.prefill_attention)
    trainable = a.trainable
    if fp8:   # as `train --lora-rank`: the adapters, plus what --trainable adds
        trainable = lora.LORA_PATTERN if a.trainable is None else f"{lora.LORA_PATTERN}|{a.trainable}"
    tcfg = T.TrainConfig(trainable=trainable, remat=a.remat)
    targets = [t.strip() for t in a.lora_targets.split(",") if t.strip()] if a.lora_targets else None
    t = time.perf_counter()
    mesh = None
    try:
        if a.mesh:
            devices, abstract_device = aot.devices(a.platform, a.mesh_devices, a.topology)
            mesh = (sharding.make_mesh(sharding.parse_mesh(a.mesh, a.mesh_devices), devices), abstract_device)
        trainer, state = abstract_trainer(cfg, prec, tcfg, lora_rank=a.lora_rank if fp8 else 0,
                                          lora_targets=targets, mesh=None if mesh is None else mesh[0])
        programs = step_programs(trainer, state, a.batch, a.seq)
    except Exception as e:  # noqa: BLE001 - a step that does not even trace is a row too
        return [dict(case=case, program="setup", compiled=False, compile_s=round(time.perf_counter() - t, 2),
                     error=_error(e))]
    trained = sum(int(x.size) for x in jax.tree.leaves(state.params))
    rows = []
    for name, fn, args, donate in programs:
        rows.append(dict(case=case, **compile_program(a.platform, a.topology, name, fn, args, donate, mesh),
                         trained_params=trained))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--platform", default="gpu", choices=sorted(PLATFORMS))
    ap.add_argument("--plugins", default=None, help="directory holding the plugin (default .gpu_aot / .tpu_aot)")
    ap.add_argument("--topology", default="v5p:2x2x1", help="TPU topology; one chip of it is compiled for")
    ap.add_argument("--cases", default="full,lora", help="comma-separated: full, lora")
    ap.add_argument("--width", default="small", choices=("small", "real"))
    ap.add_argument("--layers", type=int, default=3, help="1 dense + (layers-1) MoE layers, plus the MTP layer")
    ap.add_argument("--no-mtp", action="store_true", help="without the MTP layer")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--lora-targets", default=None, help="comma-separated Linear names (default: lora.DEFAULT_TARGETS)")
    ap.add_argument("--trainable", default=None,
                    help="TrainConfig.trainable of full (default: all); lora: added to the adapters' pattern")
    ap.add_argument("--prefill-attention", default="plain", choices=("plain", "flash"))
    ap.add_argument("--kernels", default="auto", choices=backend.IMPLS,
                    help="Precision.kernels (auto: the device's Pallas kernels; ref: none)")
    ap.add_argument("--fp8-mode", default="w8a16", choices=("w8a16", "w8a8"))
    ap.add_argument("--remat", action="store_true", help="TrainConfig.remat")
    ap.add_argument("--mesh", default=None, help="compile for a mesh of --mesh-devices devices, e.g. "
                    "expert=8 or data=2,expert=4 (the Trainer's sharding: parameters and moments by the ep_tp "
                    "rules, the batch over data); memory is then per device")
    ap.add_argument("--mesh-devices", type=int, default=8)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    if not cases or any(c not in ("full", "lora") for c in cases):
        ap.error(f"--cases: full and/or lora, got {a.cases!r}")
    if a.layers < 2 or a.batch < 1 or a.seq < 3 or a.lora_rank < 1:
        ap.error("--layers >= 2 (1 dense + MoE), --batch >= 1, --seq >= 3, --lora-rank >= 1")
    try:
        aot.require(a.platform, a.topology)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    target = aot.DEVICE_KIND if a.platform == "gpu" else f"one chip of {a.topology}"
    if a.mesh:
        target = f"{a.mesh_devices} x {aot.DEVICE_KIND if a.platform == 'gpu' else 'chips of ' + a.topology}, mesh {a.mesh}"
    rows = [r for c in cases for r in run_case(c, a)]
    report = dict(jax=jax.__version__, platform=a.platform, target=target, mesh=a.mesh, width=a.width, layers=a.layers,
                  mtp=not a.no_mtp, batch=a.batch, seq=a.seq, kernels=a.kernels, fp8_mode=a.fp8_mode,
                  prefill_attention=a.prefill_attention, remat=a.remat, trainable=a.trainable,
                  lora_rank=a.lora_rank, lora_targets=a.lora_targets, rows=rows)
    head = json.dumps({k: v for k, v in report.items() if k != "rows"})
    print(head[:-1] + ', "rows": [\n' + ",\n".join(json.dumps(r) for r in rows) + "\n]}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if all(r["compiled"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
