"""Benchmark the kernels_pallas kernels against XLA baselines at the shapes of SPEC §11.

    PYTHONPATH=. python benchmarks/kernels.py            # full shapes (GPU); sweeps a few tile configs
    PYTHONPATH=. python benchmarks/kernels.py --small    # tiny shapes, a few seconds on CPU (smoke test)

One table per group of shapes; every row is one method at one shape:
time (median), TFLOP/s, effective GB/s (operands read + output written; for grouped GEMMs only the
experts that got rows count), speed ratio to the XLA bf16 dot measured in the same run (>1 = faster),
and the relative Frobenius error against the method's reference.  A baseline that fails (out of
memory, unsupported) prints ``failed: <reason>`` instead of numbers.  An error over its table's
tolerance (``TOLERANCE``) is marked ``FAILED``, never wins a tile sweep, and makes the script exit
1 once everything is printed; so does a kernel row that raised (every tile configuration failed).

Timing: each method is jitted and compiled first; then one jitted call runs the op ``n`` times in a
``fori_loop`` whose carry feeds a 0-weighted element of each result back into the next input (so XLA
cannot hoist or merge the calls, and Python dispatch is not measured), ``block_until_ready``; the
reported time is the median over ``--reps`` such calls divided by ``n``.
On CPU the kernel columns run in the Pallas interpreter: their timings are meaningless there, the
run only checks the plumbing and the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._args import ArgumentParser, positive_int  # noqa: E402  (argparse only)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from kernels_pallas import backend  # noqa: E402
from kernels_pallas._common import dequantize_blocks  # noqa: E402
from kernels_pallas.fp8_gemm import (GpuConfig, _w8a8_from_quantized_ref, quantize_act_1x128,  # noqa: E402
                                     scaled_matmul_gpu, scaled_matmul_tpu, w8a8_matmul_ref,
                                     w8a16_matmul_ref)
from kernels_pallas.grouped_gemm import (GpuGroupedConfig, gmm_gpu,  # noqa: E402
                                         gmm_tpu)
from kernels_pallas.mla_absorb import mla_absorb, mla_absorb_ref  # noqa: E402
from kernels_pallas.mla_decode import mla_decode, mla_decode_gpu, mla_decode_ref  # noqa: E402
from kernels_pallas.moe_router import moe_route, moe_route_gpu, moe_route_ref  # noqa: E402

F8 = jnp.float8_e4m3fn
BF16 = jnp.bfloat16

# Unmeasured shapes first: a GPU step cut off by its time limit loses the shapes after it.
FULL_DENSE = [("decode 1 row", 1, 16384, 7168),  # batch-1 o_proj: the largest one-row FP8 GEMM
              ("decode", 64, 7168, 2048), ("decode", 64, 2048, 7168),
              ("prefill", 4096, 7168, 2048), ("prefill", 4096, 2048, 7168)]
FULL_GROUPED = [("decode", 8, 256, 7168, 2048),  # one token's 8 experts (batch-1 gate_proj)
                ("decode", 512, 256, 7168, 4096), ("prefill", 32768, 256, 7168, 4096)]
FULL_MLA = [("decode", 64, 128, 4096), ("decode", 1, 128, 4096)]  # B, heads, cache length (L=512, R=64)
SMALL_DENSE = [("prefill", 128, 384, 256), ("decode", 8, 256, 384)]
SMALL_MLA = [("decode", 2, 16, 100)]
SMALL_GROUPED = [("prefill", 128, 4, 256, 256), ("decode", 16, 8, 256, 256)]
#: MLA's absorbed products (kernels_pallas.mla_absorb): rows, heads, latent (nope = v = 128), layers
FULL_ABSORB = [("decode", 1, 128, 512, 3), ("decode", 16, 128, 512, 3), ("decode", 64, 128, 512, 3)]
SMALL_ABSORB = [("decode", 3, 4, 256, 2)]
#: the MoE router's selection (kernels_pallas.moe_route): tokens, at DeepSeek-V3's routing config
FULL_ROUTER = [("decode", 1), ("decode", 16), ("decode", 64), ("decode", 256)]
SMALL_ROUTER = [("decode", 1), ("decode", 37)]
ROUTER_V3 = dict(n_group=8, topk_group=4, top_k=8, norm_topk_prob=True, scaling=2.5)
#: The correctness check, per table: a row whose error column exceeds its table's tolerance is
#: marked ``FAILED`` (table and JSON ``check_failed``), is never a sweep's best, and makes the
#: script exit 1 after printing everything. GEMMs, MLA attention and the absorbed products: the
#: relative Frobenius error, bf16-level agreement (kernels measure 1e-3 to 3e-3: bf16 output
#: rounding; W8A8 against the op-by-op reference 2e-5 on the H200). The router: its weights'
#: relative error (float32: ~1e-7), and any index that differs reads 1.0.
TOLERANCE = dict(dense=3e-2, grouped=3e-2, mla=3e-2, absorb=3e-2, router=1e-5)
#: every row (sweep alternatives included) that failed its check: "shape | method: reason"
CHECK_FAILURES: list[str] = []


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------


def _loop(fn, n):
    """jit(x, *rest) → runs fn n times, each input x perturbed by 0 * (previous result's [0, 0])."""

    def run(x, *rest):
        def body(_, carry):
            y = fn(carry, *rest)
            y0 = y[0] if isinstance(y, (tuple, list)) else y
            fb = (y0.reshape(-1)[0].astype(jnp.float32) * 0.0).astype(carry.dtype)
            return carry.at[(0,) * carry.ndim].add(fb)

        return lax.fori_loop(0, n, body, x)

    return jax.jit(run)


def time_fn(fn, args, *, reps, target_s=0.03, max_n=300, quick=False):
    """Median seconds per call of ``fn(*args)`` (see module doc).  ``quick``: one timed plain call
    (for interpreted kernels, whose timing means nothing anyway)."""
    single = jax.jit(fn)
    jax.block_until_ready(single(*args))  # compile + warm up the single call
    t0 = time.perf_counter()
    jax.block_until_ready(single(*args))
    est = max(time.perf_counter() - t0, 1e-6)  # includes dispatch: n comes out a little small
    if quick:
        return est
    n = int(min(max_n, max(1, math.ceil(target_s / est))))
    loop = _loop(fn, n)
    jax.block_until_ready(loop(*args))  # compile + warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(loop(*args))
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


def rel_err(a, b):
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def _short(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".replace("\n", " ")
    return msg[:160]


# ----------------------------------------------------------------------------------------------
# rows
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    shape: str
    method: str
    ms: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    vs_bf16: float | None = None
    err: str = ""
    note: str = ""
    failed: str | None = None
    check_failed: str | None = None   # the error cell over the table's tolerance (see TOLERANCE)


def measure(rows, shape, method, fn, args, *, flops, nbytes, reps, check=None, tol=None, note="", quick=False):
    """Time ``fn(*args)``; ``check(out) -> str`` gives the correctness cell (its first word the
    error), which must be at most ``tol``."""
    row = Row(shape, method, note=note)
    try:
        out = jax.block_until_ready(jax.jit(fn)(*args))
        row.err = check(out) if check is not None else ""
        del out
        if row.err and tol is not None and not float(row.err.split()[0]) <= tol:
            row.check_failed = f"error {row.err.split()[0]} > tolerance {tol:.0e}"
            row.err += f" FAILED (> {tol:.0e})"
            CHECK_FAILURES.append(f"{shape} | {method} {note}: {row.check_failed}")
        t = time_fn(fn, args, reps=reps, quick=quick)
        row.ms = t * 1e3
        row.tflops = flops / t / 1e12
        row.gbps = nbytes / t / 1e9
    except Exception as e:  # noqa: BLE001 - a failed baseline is a result, not a crash
        row.failed = _short(e)
        if os.environ.get("BENCH_TRACEBACK"):
            traceback.print_exc()
    rows.append(row)
    print(f"  row {shape} | {method} | " + (f"failed: {row.failed}" if row.failed else
          f"{row.ms:.4f} ms  {row.tflops:.1f} TFLOP/s  {row.gbps:.0f} GB/s  err {row.err}  {note}"), flush=True)
    return row


def _better(r, best):
    """Whether sweep row ``r`` replaces ``best``: a row that passed its check beats one that did
    not; then the faster (timed) row wins."""
    if best is None:
        return True
    if (r.check_failed is None) != (best.check_failed is None):
        return r.check_failed is None
    return r.ms is not None and (best.ms is None or r.ms < best.ms)


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def print_table(title, rows):
    print(f"\n## {title}\n")
    hdr = ["shape", "method", "ms", "TFLOP/s", "GB/s", "x XLA bf16", "rel err", "note"]
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in rows:
        if r.failed:
            cells = [r.shape, r.method, f"failed: {r.failed}", "", "", "", r.err, r.note]
        else:
            cells = [r.shape, r.method, _fmt(r.ms, ".4f"), _fmt(r.tflops, ".1f"), _fmt(r.gbps, ".0f"),
                     _fmt(r.vs_bf16, ".2f"), r.err, r.note]
        print("| " + " | ".join(cells) + " |")
    sys.stdout.flush()


def _set_ratios(rows, base_method):
    by_shape = {}
    for r in rows:
        if r.method == base_method and r.ms:
            by_shape[r.shape] = r.ms
    for r in rows:
        if r.ms and r.shape in by_shape:
            r.vs_bf16 = by_shape[r.shape] / r.ms


# ----------------------------------------------------------------------------------------------
# dense block-scaled FP8 GEMM
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=1)
def _random_weights(key, shape):
    """Random weights ``[..., N, K]`` (std 0.02): bf16, and e4m3 with float32 block scales.  Jitted so
    that XLA fuses the generation (the 256-expert stacks are 15 GB in bf16)."""
    k1, k2 = jax.random.split(key)
    n, k = shape[-2:]
    w = jax.random.normal(k1, shape, jnp.float32) * 0.02
    ws = jax.random.uniform(k2, (*shape[:-2], -(-n // 128), -(-k // 128)), jnp.float32, 0.5, 2.0) / 64.0
    s_full = jnp.repeat(jnp.repeat(ws, 128, -2), 128, -1)[..., :n, :k]
    wq = (w / s_full).clip(-448, 448).astype(F8)
    return w.astype(BF16), wq, ws


def _kernel_configs(target, m, n, k, sweep, variant="w8a16"):
    """Tile configs to time: the default, plus (``sweep``) the alternatives worth a GPU minute.
    2026-11-28 H200: 128x256 tiles lost at prefill; decode never got to its sweep."""
    if target == "gpu":
        from kernels_pallas.fp8_gemm import default_gpu_config
        default = default_gpu_config(m, n, k, variant)
        cfgs = [default]
        if sweep:
            if m >= 256:  # swept in two runs (session 3: W8A16 prescaled 128x128 won, now its
                # default; W8A8 64x128); the model takes dequantize-then-dot there anyway
                pass
            else:  # wider column tiles: the activation tile is re-read once per column tile
                bm = default.bm  # + the default tile with split-K 4: at one row, o_proj's
                # 224 programs ran unsplit at 1.7 TB/s in the session-3 e2e profile
                cfgs += [GpuConfig(bm, 128, 8, 4, 4), GpuConfig(bm, 128, 14, 4, 3), GpuConfig(bm, 64, 8, 4, 4)]
                cfgs += [c for c in (dataclasses.replace(default, splits=1),  # session 3's o_proj
                                     dataclasses.replace(default, splits=2 * default.splits)) if c != default]
                if variant == "w8a16":
                    cfgs += [GpuConfig(bm, 128, 8, 4, 4, prescale=True), GpuConfig(bm, 256, 4, 8, 3, prescale=True)]
        return cfgs
    if target == "tpu":
        from kernels_pallas.fp8_gemm import default_tpu_config
        return [default_tpu_config(m, n, k)]
    return [None]


def bench_dense(cases, *, impl, reps, sweep, key):
    rows = []
    target, interpret = backend.split_impl(impl)
    swept = set()
    for phase, m, k, n in cases:
        sweep_here = sweep and phase not in swept  # sweep at the first shape of each phase only
        swept.add(phase)
        shape = f"{phase} {m}x{k}->{n}"
        k1, k2, key = jax.random.split(key, 3)
        x = jax.random.normal(k1, (m, k), jnp.float32).astype(BF16)
        _, wq, ws = _random_weights(k2, (n, k))
        w_bf16 = dequantize_blocks(wq, ws).astype(BF16)
        xq, xs = quantize_act_1x128(x)
        flops = 2.0 * m * n * k
        out_b = m * n * 2
        b_bf16 = m * k * 2 + n * k * 2 + out_b
        b_fp8 = m * k * 2 + n * k + ws.size * 4 + out_b  # bf16 x read, e4m3 weights + scales
        ref16 = jax.jit(w8a16_matmul_ref)(x, wq, ws)
        ref8 = jax.jit(w8a8_matmul_ref)(x, wq, ws)
        with jax.disable_jit():  # op by op: no fusion can skip the e4m3 round trip of x
            ref8_eager = w8a8_matmul_ref(x, wq, ws)
        print(f"  check {shape}: W8A8 reference jitted vs op-by-op: rel err {rel_err(ref8, ref8_eager):.1e}")
        chk16 = lambda y: f"{rel_err(y, ref16):.1e}"
        chk8 = lambda y: f"{rel_err(y, ref8_eager):.1e}"

        measure(rows, shape, "XLA bf16 dot", lambda a, b: jnp.dot(a, b.T, preferred_element_type=jnp.float32).astype(BF16),
                (x, w_bf16), flops=flops, nbytes=b_bf16, reps=reps, tol=TOLERANCE["dense"], check=chk16)
        xq_unscaled = x.astype(jnp.float32).clip(-448, 448).astype(F8)
        fp8_ref = jnp.dot(xq_unscaled.astype(jnp.float32), wq.astype(jnp.float32).T,
                          precision=lax.Precision.HIGHEST)
        measure(rows, shape, "XLA fp8 dot, no scales",
                lambda a, b: jnp.dot(a, b.T, preferred_element_type=jnp.float32).astype(BF16),
                (xq_unscaled, wq), flops=flops, nbytes=m * k + n * k + out_b, reps=reps,
                tol=TOLERANCE["dense"], check=lambda y: f"{rel_err(y, fp8_ref):.1e}", note="e4m3 x e4m3, unscaled")
        measure(rows, shape, "dequantize then dot (jnp ref)",
                lambda a, b, c: w8a16_matmul_ref(a, b, c), (x, wq, ws), flops=flops, nbytes=b_fp8,
                reps=reps, tol=TOLERANCE["dense"], check=chk16)
        if target == "ref":
            continue
        for variant in ("w8a8", "w8a16"):
            best = None
            for cfg in _kernel_configs(target, m, n, k, sweep_here, variant):
                fn_k = scaled_matmul_gpu if target == "gpu" else scaled_matmul_tpu

                def run(a, b, c, cfg=cfg, variant=variant, fn_k=fn_k):
                    if variant == "w8a8":
                        aq, as_ = quantize_act_1x128(a)
                        return fn_k(aq, as_, b, c, out_dtype=BF16, interpret=interpret, config=cfg)
                    return fn_k(a, None, b, c, out_dtype=BF16, interpret=interpret, config=cfg)

                tmp = []
                r = measure(tmp, shape, f"kernel {variant}", run, (x, wq, ws), flops=flops,
                            nbytes=b_fp8, reps=reps, tol=TOLERANCE["dense"],
                            check=chk8 if variant == "w8a8" else chk16,
                            note=_cfg_str(cfg) + (" (interpret)" if interpret else ""), quick=interpret)
                if _better(r, best):
                    best = r
                if len(_kernel_configs(target, m, n, k, sweep_here, variant)) > 1:
                    print(f"  sweep {shape} {variant} {r.note}: "
                          f"{'failed: ' + r.failed if r.failed else f'{r.ms:.4f} ms  {r.tflops:.1f} TFLOP/s  {r.gbps:.0f} GB/s'}")
            rows.append(best)
        if target == "gpu" and (not interpret or phase == "prefill"):  # (interpreted: one shape is the smoke test)
            rows += _mgpu_rows(shape, m, n, k, x, wq, ws, chk8, flops, b_fp8, reps, interpret,
                               sweep=sweep_here and m >= 256)
        del x, wq, ws, w_bf16, xq, xs
    _set_ratios(rows, "XLA bf16 dot")
    return rows


def _mgpu_rows(shape, m, n, k, x, wq, ws, chk8, flops, b_fp8, reps, interpret, sweep):
    """The Mosaic GPU W8A8 kernel (kernels_pallas/fp8_gemm_mgpu.py; wgmma, per-K-block scale
    promotion), default tiles and (``sweep``) alternatives; its best row. Not yet run on a GPU
    before the 2026-11-29 session: a failure to compile is a row."""
    from kernels_pallas.fp8_gemm_mgpu import MgpuConfig, supported, w8a8_matmul_mgpu
    cfgs = [MgpuConfig()]
    if sweep:
        cfgs += [MgpuConfig(warp_specialized=True), MgpuConfig(warp_specialized=True, max_concurrent_steps=6),
                 MgpuConfig(warp_specialized=True, grid_tile_width=16),
                 MgpuConfig(bm=128), MgpuConfig(max_concurrent_steps=6), MgpuConfig(bn=64)]
    best = None
    for cfg in cfgs:
        if not supported(m, n, k, cfg):
            continue

        def run(a, b, c, cfg=cfg):
            aq, as_ = quantize_act_1x128(a)
            return w8a8_matmul_mgpu(aq, as_, b, c, out_dtype=BF16, cfg=cfg, interpret=interpret)

        tmp = []
        r = measure(tmp, shape, "kernel w8a8 mosaic_gpu", run, (x, wq, ws), flops=flops, nbytes=b_fp8, reps=reps,
                    tol=TOLERANCE["dense"], check=chk8, note=_cfg_str(cfg) + (" (interpret)" if interpret else ""),
                    quick=interpret)
        if len(cfgs) > 1:
            print(f"  sweep {shape} mosaic_gpu {r.note}: "
                  f"{'failed: ' + r.failed if r.failed else f'{r.ms:.4f} ms  {r.tflops:.1f} TFLOP/s'}")
        if _better(r, best):
            best = r
    return [best] if best is not None else []


def _cfg_str(cfg):
    if cfg is None:
        return ""
    return ",".join(f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg))


# ----------------------------------------------------------------------------------------------
# grouped expert GEMM
# ----------------------------------------------------------------------------------------------


def _group_sizes(key, m, e):
    """Random routing-like group sizes: m rows spread over e experts (multinomial)."""
    ids = jax.random.randint(key, (m,), 0, e)
    return jnp.bincount(ids, length=e).astype(jnp.int32)


def _grouped_check(y, x, w, ws, sizes, n_check=4, w8a8=None):
    """Relative error on a few experts with rows, against x[rows] @ dequant(w[e]).T in float32
    (the full ragged_dot reference does not fit in memory at 256 experts); ``w8a8=(xq, xs)``:
    against the W8A8 block GEMM of those rows instead."""
    sizes_np = np.asarray(sizes)
    starts = np.cumsum(sizes_np) - sizes_np
    nonempty = np.nonzero(sizes_np)[0]
    pick = nonempty[np.linspace(0, len(nonempty) - 1, min(n_check, len(nonempty))).astype(int)]
    num = den = 0.0
    for g in pick:
        s, c = int(starts[g]), int(sizes_np[g])
        if w8a8 is not None:
            ref = _w8a8_from_quantized_ref(w8a8[0][s:s + c], w8a8[1][s:s + c], w[g], ws[g])
            num += float(jnp.sum((y[s:s + c].astype(jnp.float32) - ref) ** 2))
            den += float(jnp.sum(ref ** 2))
            continue
        wg = dequantize_blocks(w[g], ws[g]) if ws is not None else w[g].astype(jnp.float32)
        ref = jnp.dot(x[s:s + c].astype(jnp.float32), wg.astype(x.dtype).astype(jnp.float32).T,
                      precision=lax.Precision.HIGHEST)
        num += float(jnp.sum((y[s:s + c].astype(jnp.float32) - ref) ** 2))
        den += float(jnp.sum(ref ** 2))
    return f"{math.sqrt(num / max(den, 1e-30)):.1e} ({len(pick)} experts)"


def _grouped_configs(target, m, e, n, k, fp8, sweep):
    if target == "gpu":
        from kernels_pallas.grouped_gemm import default_gpu_grouped_config
        cfgs = [default_gpu_grouped_config(m, e, n, k, fp8)]
        if sweep and fp8:  # 2026-11-28 H200: the defaults won the bf16 sweeps; FP8 tries prescaling
            if m // e >= 64:  # session 3: prescaled 128x128, 64-wide K won (now the default);
                # next: wider column tiles, deeper pipelines
                cfgs += [GpuGroupedConfig(bm=128, bn=256, bk=64, num_warps=8, num_stages=3, prescale=True),
                         GpuGroupedConfig(bm=128, bn=128, bk=64, num_warps=8, num_stages=4, prescale=True),
                         GpuGroupedConfig(bm=64, bn=256, bk=64, num_warps=8, num_stages=3, prescale=True)]
            else:  # session 3: per-block scaling beat prescaling at 512 rows; next: split-K (more
                # programs when few experts have rows: 1.3 TB/s at batch 1 in the e2e profile)
                cfgs += [c for c in (GpuGroupedConfig(bm=16, bn=64, bk=128, num_warps=4, num_stages=4, splits=sp)
                                     for sp in (1, 2, 4, 8)) if c != cfgs[0]]
                cfgs += [GpuGroupedConfig(bm=16, bn=128, bk=128, num_warps=4, num_stages=4, splits=4),
                         GpuGroupedConfig(bm=16, bn=32, bk=128, num_warps=4, num_stages=4)]
        return cfgs
    if target == "tpu":
        return [None]
    return [None]


def _ragged_rows(rows, shape, x, w_bf16, wq, ws, sizes, flops, b_bf16, b_fp8, reps):
    """XLA's ragged_dot, on bf16 weights and on weights dequantized at every call."""
    measure(rows, shape, "XLA ragged_dot bf16",
            lambda a, b, s: lax.ragged_dot(a, jnp.swapaxes(b, 1, 2), s,
                                           preferred_element_type=jnp.float32).astype(BF16),
            (x, w_bf16, sizes), flops=flops, nbytes=b_bf16, reps=reps,
            tol=TOLERANCE["grouped"], check=lambda y: _grouped_check(y, x, w_bf16, None, sizes))
    measure(rows, shape, "dequantize then ragged_dot",
            lambda a, b, c, s: lax.ragged_dot(a, jnp.swapaxes(dequantize_blocks(b, c).astype(BF16), 1, 2), s,
                                              preferred_element_type=jnp.float32).astype(BF16),
            (x, wq, ws, sizes), flops=flops, nbytes=b_fp8, reps=reps,
            tol=TOLERANCE["grouped"], check=lambda y: _grouped_check(y, x, wq, ws, sizes))


def bench_grouped(cases, *, impl, reps, sweep, key):
    rows = []
    target, interpret = backend.split_impl(impl)
    for phase, m, e, k, n in cases:
        shape = f"{phase} {m} rows/{e} experts {k}->{n}"
        k1, k2, k4, key = jax.random.split(key, 4)
        sizes = _group_sizes(k4, m, e)
        touched = int(jnp.sum(sizes > 0))
        x = jax.random.normal(k1, (m, k), jnp.float32).astype(BF16)
        w_bf16, wq, ws = _random_weights(k2, (e, n, k))
        flops = 2.0 * m * n * k
        out_b = m * n * 2
        b_bf16 = m * k * 2 + touched * n * k * 2 + out_b
        b_fp8 = m * k * 2 + touched * (n * k + ws[0].size * 4) + out_b
        note_t = f"{touched} experts with rows"

        # XLA baselines: one dense bf16 / fp8 matmul of the same FLOPs, and ragged_dot
        wd = w_bf16[0]
        measure(rows, shape, "XLA bf16 dot", lambda a, b: jnp.dot(a, b.T, preferred_element_type=jnp.float32).astype(BF16),
                (x, wd), flops=flops, nbytes=m * k * 2 + n * k * 2 + out_b, reps=reps,
                note="one dense [K,N] weight, same FLOPs")
        xq_unscaled = x.astype(jnp.float32).clip(-448, 448).astype(F8)
        measure(rows, shape, "XLA fp8 dot, no scales",
                lambda a, b: jnp.dot(a, b.T, preferred_element_type=jnp.float32).astype(BF16),
                (xq_unscaled, wq[0]), flops=flops, nbytes=m * k + n * k + out_b, reps=reps,
                note="one dense [K,N] weight, same FLOPs")
        if m * e * k > 2 ** 35 and target == "gpu":  # 2026-11-28 H200: asks for 112 GiB, then
            # minutes of failing autotuning; not run again
            rows.append(Row(shape, "XLA ragged_dot bf16 / dequantize then ragged_dot",
                            failed="skipped: out of memory on the 2026-11-28 H200 run (112 GiB)"))
        else:
            _ragged_rows(rows, shape, x, w_bf16, wq, ws, sizes, flops, b_bf16, b_fp8, reps)
        if target != "ref":
            for fp8 in (False, True):
                w_arg = wq if fp8 else w_bf16
                best = None
                cfgs = _grouped_configs(target, m, e, n, k, fp8, sweep)
                for cfg in cfgs:
                    fn_k = gmm_gpu if target == "gpu" else gmm_tpu

                    def run(a, b, c, s, cfg=cfg, fp8=fp8, fn_k=fn_k):
                        return fn_k(a, b, s, w_scale=c if fp8 else None, out_dtype=BF16,
                                    interpret=interpret, config=cfg)

                    tmp = []
                    r = measure(tmp, shape, f"kernel {'fp8' if fp8 else 'bf16'}", run,
                                (x, w_arg, ws, sizes), flops=flops, nbytes=b_fp8 if fp8 else b_bf16,
                                reps=reps,
                                tol=TOLERANCE["grouped"], check=lambda y, fp8=fp8, w_arg=w_arg: _grouped_check(
                                    y, x, w_arg, ws if fp8 else None, sizes),
                                note="; ".join(filter(None, [note_t, _cfg_str(cfg)]))
                                + (" (interpret)" if interpret else ""), quick=interpret)
                    if _better(r, best):
                        best = r
                    if len(cfgs) > 1:
                        print(f"  sweep {shape} {r.method} {_cfg_str(cfg)}: "
                              f"{'failed: ' + r.failed if r.failed else f'{r.ms:.4f} ms  {r.tflops:.1f} TFLOP/s  {r.gbps:.0f} GB/s'}")
                rows.append(best)
        if target == "gpu" and (not interpret or phase == "prefill"):
            rows += _mgpu_grouped_rows(shape, m, e, n, k, x, w_bf16, wq, ws, sizes, flops, b_bf16, b_fp8,
                                       reps, interpret, note_t, sweep=sweep and phase == "prefill")
        del x, w_bf16, wq, ws
    _set_ratios(rows, "XLA bf16 dot")
    return rows


def _mgpu_grouped_rows(shape, m, e, n, k, x, w_bf16, wq, ws, sizes, flops, b_bf16, b_fp8, reps, interpret,
                       note_t, sweep):
    """The Mosaic GPU grouped kernel (kernels_pallas/grouped_gemm_mgpu.py) in bf16, W8A16 (the
    model's FP8 experts: weight tiles dequantized in the kernel) and W8A8 (x quantized 1x128 inside
    the timed call); best row of each. Not run on a GPU before 2026-11-29: a failure to compile is
    a row."""
    from kernels_pallas.grouped_gemm_mgpu import MgpuGroupedConfig, gmm_mgpu, grouped_supported
    out = []
    xq, xs = quantize_act_1x128(x)
    for mode in ("bf16", "w8a16", "w8a8"):
        cfgs = [MgpuGroupedConfig()]
        if sweep:
            cfgs += [MgpuGroupedConfig(bm=128), MgpuGroupedConfig(max_concurrent_steps=6),
                     MgpuGroupedConfig(grid_tile_width=16)] + ([] if mode == "w8a8" else [MgpuGroupedConfig(bk=128)])
        best = None
        for cfg in cfgs:
            if not grouped_supported(m, n, k, mode != "bf16", cfg):
                continue
            if mode == "w8a8":
                def run(a, b, c, s, cfg=cfg):
                    aq, as_ = quantize_act_1x128(a)
                    return gmm_mgpu(aq, b, s, x_scale=as_, w_scale=c, out_dtype=BF16, cfg=cfg, interpret=interpret)
                args, nbytes = (x, wq, ws, sizes), b_fp8
                check = lambda y: _grouped_check(y, x, wq, ws, sizes, w8a8=(xq, xs))  # noqa: E731
            elif mode == "w8a16":
                def run(a, b, c, s, cfg=cfg):
                    return gmm_mgpu(a, b, s, w_scale=c, out_dtype=BF16, cfg=cfg, interpret=interpret)
                args, nbytes = (x, wq, ws, sizes), b_fp8
                check = lambda y: _grouped_check(y, x, wq, ws, sizes)  # noqa: E731
            else:
                def run(a, b, s, cfg=cfg):
                    return gmm_mgpu(a, b, s, out_dtype=BF16, cfg=cfg, interpret=interpret)
                args, nbytes = (x, w_bf16, sizes), b_bf16
                check = lambda y: _grouped_check(y, x, w_bf16, None, sizes)  # noqa: E731
            tmp = []
            r = measure(tmp, shape, f"kernel {mode} mosaic_gpu", run, args, flops=flops, nbytes=nbytes,
                        reps=reps, tol=TOLERANCE["grouped"], check=check,
                        note="; ".join([note_t, _cfg_str(cfg)]) + (" (interpret)" if interpret else ""),
                        quick=interpret)
            if len(cfgs) > 1:
                print(f"  sweep {shape} {r.method} {_cfg_str(cfg)}: "
                      f"{'failed: ' + r.failed if r.failed else f'{r.ms:.4f} ms  {r.tflops:.1f} TFLOP/s'}")
            if _better(r, best):
                best = r
        if best is not None:
            out.append(best)
    return out


# ----------------------------------------------------------------------------------------------
# MLA decode attention over the latent cache
# ----------------------------------------------------------------------------------------------


def _mla_jnp_bf16(ql, qp, cache, lens, *, scale, l):
    """What a plain-jnp absorbed decode does: bf16 einsums, float32 softmax."""
    s = (jnp.einsum("bhl,bsl->bhs", ql, cache[..., :l], preferred_element_type=jnp.float32)
         + jnp.einsum("bhr,bsr->bhs", qp, cache[..., l:], preferred_element_type=jnp.float32)) * scale
    s = jnp.where(jnp.arange(cache.shape[1])[None, None, :] < lens[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhs,bsl->bhl", p.astype(cache.dtype), cache[..., :l],
                      preferred_element_type=jnp.float32)


def bench_mla(cases, *, impl, reps, sweep, key):
    rows = []
    target, interpret = backend.split_impl(impl)
    l, r = 512, 64
    for phase, b, h, t in cases:
        shape = f"{phase} B={b} H={h} T={t}"
        k1, k2, k3 = jax.random.split(key, 3)
        ql = jax.random.normal(k1, (b, h, l), jnp.float32).astype(BF16)
        qp = jax.random.normal(k2, (b, h, r), jnp.float32).astype(BF16)
        cache = jax.random.normal(k3, (b, t, l + r), jnp.float32).astype(BF16)
        lens = jnp.full((b,), t, jnp.int32)
        scale = 1.0 / math.sqrt(192)
        ref = jax.jit(functools.partial(mla_decode_ref, scale=scale, kv_lora_rank=l))(ql, qp, cache, lens)
        chk = lambda o: f"{rel_err(o, ref):.1e}"
        flops = 2.0 * b * h * t * (2 * l + r)
        nbytes = cache.size * 2 + (ql.size + qp.size) * 2 + b * h * l * 4
        measure(rows, shape, "plain jnp (bf16 einsums)",
                lambda a, c, d, e: _mla_jnp_bf16(a, c, d, e, scale=scale, l=l),
                (ql, qp, cache, lens), flops=flops, nbytes=nbytes, reps=reps, tol=TOLERANCE["mla"], check=chk)
        if target == "ref":
            continue
        if target == "gpu":  # first: the Mosaic GPU wgmma kernel (kernels_pallas/mla_decode_mgpu.py), where it tiles
            from kernels_pallas.mla_decode_mgpu import mla_decode_mgpu, supported
            if supported(b, h, l, r, t, BF16):
                fn = lambda a, c, d, e: mla_decode_mgpu(a, c, d, e, scale=scale, kv_lora_rank=l,  # noqa: E731
                                                        interpret=interpret)
                measure(rows, shape, "kernel mosaic_gpu", fn, (ql, qp, cache, lens), flops=flops,
                        nbytes=nbytes, reps=reps, tol=TOLERANCE["mla"], check=chk, quick=interpret,
                        note="default" + (" (interpret)" if interpret else ""))
        cfgs = [{}]
        if target == "gpu" and sweep:
            # 2026-11-28 H200: 64-head blocks (now the default) beat 32 and 16; next: split-T,
            # 128-head blocks (one program reads a sequence's cache once), wider token blocks
            if b >= 64:  # session 3: 64-token blocks won (now the default); 128-head blocks
                # ask for 256 KiB of shared memory (227 KiB available); 16-token blocks 4x slower
                cfgs += [dict(block_t=32), dict(block_t=128), dict(num_stages=3), dict(splits=2),
                         dict(num_warps=4)]
            else:  # small batch: the default splits T (default_splits: 16 at B=1); session 3
                # (32-token blocks): no split 10x slower, split 8 1.5x slower than 16; plain jnp
                # 1.7x faster than the kernel
                cfgs += [dict(splits=32), dict(block_t=32), dict(splits=32, block_t=32)]
        for cfg in cfgs:
            if target == "gpu":
                fn = lambda a, c, d, e, cfg=cfg: mla_decode_gpu(a, c, d, e, scale=scale, kv_lora_rank=l,
                                                                interpret=interpret, **cfg)
            else:
                fn = lambda a, c, d, e: mla_decode(a, c, d, e, scale=scale, kv_lora_rank=l, impl=impl)
            measure(rows, shape, "kernel", fn, (ql, qp, cache, lens), flops=flops, nbytes=nbytes,
                    reps=reps, tol=TOLERANCE["mla"], check=chk, quick=interpret,
                    note=(",".join(f"{k}={v}" for k, v in cfg.items()) or "default")
                    + (" (interpret)" if interpret else ""))
    for row in rows:  # the ratio column is against the plain-jnp version here
        base = next((x.ms for x in rows if x.shape == row.shape and x.method.startswith("plain")), None)
        if base and row.ms:
            row.vs_bf16 = base / row.ms
    return rows


# ----------------------------------------------------------------------------------------------
# MLA's absorbed products through kv_b_proj's FP8 weight
# ----------------------------------------------------------------------------------------------


def bench_absorb(cases, *, impl, reps, key):
    """``q_nope -> q_lat`` (W_UK) and ``o_lat -> o`` (W_UV) of one layer of a ``[layers, H * 256, L]``
    e4m3 stack: the kernel against XLA's product of the dequantized weight (the model's path
    before the kernel). GB/s counts the half of the layer's weight a product needs, x and out."""
    rows = []
    nope = 128
    for phase, m, h, lat, layers in cases:
        _, wq, ws = _random_weights(jax.random.fold_in(key, m), (layers, h * 2 * nope, lat))
        for part in ("k", "v"):
            shape = f"{phase} W_U{part.upper()} B={m} H={h} L={lat}"
            width_in, width_out = (nope, lat) if part == "k" else (lat, nope)
            x = jax.random.normal(jax.random.fold_in(key, 7), (m, 1, h, width_in), jnp.float32).astype(BF16)
            lay = jnp.int32(layers - 1)
            ref = jax.jit(functools.partial(mla_absorb_ref, part=part, nope=nope))(
                x.astype(jnp.float32), wq, ws, layer=lay)
            chk = lambda o, ref=ref: f"{rel_err(o, ref):.1e}"  # noqa: E731
            flops = 2.0 * m * h * nope * lat
            nbytes = h * nope * lat + (m * h * (width_in + width_out)) * 2
            measure(rows, shape, "XLA: dequantize + einsum (before)",
                    lambda a, b, c, part=part: mla_absorb_ref(a, b, c, part=part, nope=nope, layer=lay),
                    (x, wq, ws), flops=flops, nbytes=nbytes, reps=reps, tol=TOLERANCE["absorb"], check=chk)
            if backend.split_impl(impl)[0] == "tpu":
                continue
            interpret = backend.split_impl(impl)[1]
            measure(rows, shape, "kernel", lambda a, b, c, part=part: mla_absorb(
                        a, b, c, part=part, nope=nope, layer=lay, impl=impl),
                    (x, wq, ws), flops=flops, nbytes=nbytes, reps=reps, tol=TOLERANCE["absorb"], check=chk, quick=interpret,
                    note="default" + (" (interpret)" if interpret else ""))
    for row in rows:  # the ratio column is against XLA's product here
        base = next((x.ms for x in rows if x.shape == row.shape and x.method.startswith("XLA")), None)
        if base and row.ms:
            row.vs_bf16 = base / row.ms
    return rows


# ----------------------------------------------------------------------------------------------
# the MoE router's selection
# ----------------------------------------------------------------------------------------------


def bench_router(cases, *, impl, reps, sweep, key):
    """The noaux_tc selection on float32 logits ``[T, 256]`` (DeepSeek-V3: 8 groups, 4 kept,
    top-8): the kernel (one launch) against XLA's route (the reference jitted: 8 launches on an
    H200), indices checked equal in the same run (the error column: the weights' relative error
    against XLA's, 1.0 when any index differs). GB/s: logits + bias read, scores + idx + weights
    written."""
    rows = []
    target, interpret = backend.split_impl(impl)
    E, K = 256, ROUTER_V3["top_k"]
    for phase, t in cases:
        shape = f"{phase} router T={t} E={E}"
        k1, k2 = jax.random.split(jax.random.fold_in(key, t))
        x = jax.random.normal(k1, (t, E), jnp.float32)
        b = jax.random.uniform(k2, (E,), jnp.float32, -0.05, 0.05)
        ref = jax.jit(functools.partial(moe_route_ref, **ROUTER_V3))(x, b)
        chk = lambda o, ref=ref: (f"{rel_err(o[1], ref[1]):.1e} idx equal"  # noqa: E731
                                  if np.array_equal(np.asarray(o[0]), np.asarray(ref[0])) else "1.0e+00 IDX DIFFER")
        nbytes = (2 * t * E + E + 2 * t * K) * 4
        flops = 10.0 * t * E   # nominal: a few compares and adds per expert
        measure(rows, shape, "XLA: route (before)", lambda a, c: moe_route_ref(a, c, **ROUTER_V3), (x, b),
                flops=flops, nbytes=nbytes, reps=reps, tol=TOLERANCE["router"], check=chk)
        if target != "gpu":
            continue
        cfgs = [{}]
        if sweep and t == cases[-1][1]:   # the default: one row per program on one warp (see moe_router);
            cfgs.append(dict(block_t=4, num_warps=4))   # one alternative, last (the session step is short)
        for cfg in cfgs:
            fn = (functools.partial(moe_route_gpu, interpret=interpret, **cfg, **ROUTER_V3) if cfg
                  else functools.partial(moe_route, impl=impl, **ROUTER_V3))
            measure(rows, shape, "kernel", fn, (x, b), flops=flops, nbytes=nbytes, reps=reps,
                    tol=TOLERANCE["router"], check=chk,
                    quick=interpret, note=(",".join(f"{k}={v}" for k, v in cfg.items()) or "default")
                    + (" (interpret)" if interpret else ""))
    _set_ratios(rows, "XLA: route (before)")   # the ratio column is against XLA's route here
    return rows


# ----------------------------------------------------------------------------------------------


def _impl(s):
    try:
        return backend.check_impl(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv=None):
    ap = ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--impl", type=_impl, default=None,
                    help="kernel impl (default: the backend's Pallas kernel; on CPU the interpreter)")
    ap.add_argument("--reps", type=positive_int, default=None,
                    help="timed repetitions (median; >= 1, default 3 with --small, else 5)")
    ap.add_argument("--no-sweep", action="store_true", help="only the default tile config")
    ap.add_argument("--only", choices=["dense", "grouped", "mla", "absorb", "router"], default=None)
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)

    platform = jax.default_backend()
    impl = args.impl or ("pallas" if platform in ("gpu", "tpu") else "interpret_gpu")
    reps = args.reps or (3 if args.small else 5)
    sweep = not args.no_sweep and not args.small and platform == "gpu"
    dev = jax.devices()[0]
    print(f"# kernels_pallas benchmark  {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"jax {jax.__version__}, backend {platform}, device {getattr(dev, 'device_kind', dev)}, "
          f"impl {backend.resolve_impl(impl)}, reps {reps}, sweep {sweep}, "
          f"{'small' if args.small else 'full'} shapes")
    key = jax.random.key(0)
    all_rows = []
    if args.only in (None, "dense"):
        rows = bench_dense(SMALL_DENSE if args.small else FULL_DENSE, impl=impl, reps=reps,
                           sweep=sweep, key=key)
        print_table("Block-scaled FP8 GEMM (x bf16 [M,K], W e4m3 [N,K] + 128x128 f32 scales, bf16 out)",
                    rows)
        all_rows += rows
    if args.only in (None, "grouped"):
        rows = bench_grouped(SMALL_GROUPED if args.small else FULL_GROUPED, impl=impl, reps=reps,
                             sweep=sweep, key=jax.random.fold_in(key, 1))
        print_table("Grouped expert GEMM (rows sorted by expert, W [E,N,K], bf16 out)", rows)
        all_rows += rows
    if args.only in (None, "mla"):
        rows = bench_mla(SMALL_MLA if args.small else FULL_MLA, impl=impl, reps=reps, sweep=sweep,
                         key=jax.random.fold_in(key, 2))
        print_table("MLA absorbed decode attention (bf16 latent cache [c | k_pe], L=512, R=64; "
                    "'x XLA bf16' here = vs the plain-jnp version; GB/s = cache + q read, o written)",
                    rows)
        all_rows += rows
    if args.only in (None, "absorb"):
        rows = bench_absorb(SMALL_ABSORB if args.small else FULL_ABSORB, impl=impl, reps=reps,
                            key=jax.random.fold_in(key, 3))
        print_table("MLA's absorbed products, kv_b_proj e4m3 [3 layers, H*256, L] read in place "
                    "('x XLA bf16' here = vs XLA's dequantize + einsum; GB/s = the half weight + x + out)", rows)
        all_rows += rows
    if args.only in (None, "router"):
        rows = bench_router(SMALL_ROUTER if args.small else FULL_ROUTER, impl=impl, reps=reps, sweep=sweep,
                            key=jax.random.fold_in(key, 4))
        print_table("MoE router selection, float32 logits [T, 256], 8 groups / 4 kept / top-8 "
                    "('x XLA bf16' here = vs XLA's route; err: indices equal to XLA's)", rows)
        all_rows += rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in all_rows], f, indent=1)
    print("\nGB/s: operands read + output written (grouped: only experts with rows); "
          "x XLA bf16: time of the XLA bf16 dot at the same shape / this time (>1 = faster).")
    return verdict(all_rows)


def verdict(rows: list[Row]) -> int:
    """The exit status, after everything is printed: 1 when a row failed its correctness check
    or a kernel's row raised (every configuration of a sweep failed): the run's numbers are not
    to be trusted. A baseline that raised (XLA's ragged_dot out of memory) is a result."""
    code = 0
    if CHECK_FAILURES:
        print(f"\nerror: {len(CHECK_FAILURES)} row(s) failed the correctness check (tolerances: "
              f"{', '.join(f'{k} {v:.0e}' for k, v in TOLERANCE.items())}):", file=sys.stderr)
        for line in CHECK_FAILURES:
            print(f"  {line}", file=sys.stderr)
        code = 1
    broken = [r for r in rows if r.method.startswith("kernel") and r.failed]
    if broken:
        print(f"\nerror: {len(broken)} kernel row(s) raised:", file=sys.stderr)
        for r in broken:
            print(f"  {r.shape} | {r.method} {r.note}: {r.failed}", file=sys.stderr)
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
