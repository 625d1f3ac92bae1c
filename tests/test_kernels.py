"""Tests of kernels_pallas: references against float64 numpy, Pallas kernels (interpret mode on CPU)
against the references.

Tolerances (relative Frobenius error, ``||a - b|| / ||b||``):

* references vs float64 numpy with float32 inputs: 1e-5 (float32 accumulation of the same products).
* kernels vs references, bf16 activations and outputs: 1e-2 (a few bf16 ulps, 2^-8 = 3.9e-3 per
  element; the W8A16 kernels also skip the reference's bf16 rounding of the dequantized weights).
* kernels vs references, float32 activations and outputs: 1e-5.
* W8A8 kernel vs W8A8 reference: 1e-5 in float32 (identical quantization, same block products).

Interpret mode is slow, so shapes are small; anything slower is ``@pytest.mark.slow``.
"""

from __future__ import annotations

import functools
import math

import ml_dtypes
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from kernels_pallas import backend
from kernels_pallas.fp8_gemm import (quantize_act_1x128, w8a8_matmul, w8a8_matmul_ref, w8a16_matmul,
                                     w8a16_matmul_ref)
from kernels_pallas.grouped_gemm import grouped_matmul, grouped_matmul_ref
from kernels_pallas.mla_decode import mla_decode, mla_decode_ref

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

F8 = jnp.float8_e4m3fn
BF16_TOL = 1e-2
F32_TOL = 1e-5


def rel_err(a, b) -> float:
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    denom = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (denom if denom > 0 else 1.0))


def make_fp8_weight(rng, n, k, *, scale=1.0, zero_blocks=()):
    """Random e4m3 weight [n, k] and float32 block scales [ceil(n/128), ceil(k/128)]."""
    w = rng.standard_normal((n, k)).astype(np.float32) * 64.0
    wq = np.array(jnp.asarray(np.clip(w, -448, 448)).astype(F8))
    ws = (rng.uniform(0.5, 2.0, (-(-n // 128), -(-k // 128))) * scale / 64.0).astype(np.float32)
    for nb, kb in zero_blocks:
        wq[nb * 128:(nb + 1) * 128, kb * 128:(kb + 1) * 128] = 0
    return jnp.asarray(wq), jnp.asarray(ws)


def np_dequant(wq, ws):
    wq = np.asarray(jnp.asarray(wq, jnp.float32), np.float64)
    n, k = wq.shape[-2:]
    s = np.repeat(np.repeat(np.asarray(ws, np.float64), 128, axis=-2), 128, axis=-1)
    return wq * s[..., :n, :k]


def np_quantize_1x128(x):
    x = np.asarray(x, np.float32)
    m, k = x.shape
    kb = -(-k // 128)
    xq = np.zeros_like(x)
    xs = np.zeros((m, kb), np.float32)
    for b in range(kb):
        blk = x[:, b * 128:(b + 1) * 128]
        s = np.maximum(np.abs(blk).max(axis=1), np.float32(1e-4)) / np.float32(448.0)
        xs[:, b] = s
        xq[:, b * 128:(b + 1) * 128] = np.clip(blk / s[:, None], -448, 448).astype(
            ml_dtypes.float8_e4m3fn).astype(np.float32)
    return xq, xs


# -------------------------------------------------------------------------------------------------
# backend selection
# -------------------------------------------------------------------------------------------------


def test_backend_selection(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    native = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(jax.default_backend())
    assert backend.default_impl() == (native or "ref")  # CPU: the reference
    assert backend.resolve_impl("auto") == (native or "ref")
    assert backend.resolve_impl("interpret") == "interpret_tpu"
    assert backend.resolve_impl("pallas") == (native or "interpret_tpu")  # CPU: the interpreter
    assert backend.split_impl("interpret_gpu") == ("gpu", True)
    assert backend.split_impl("pallas_tpu") == ("tpu", False)
    monkeypatch.setenv(backend.ENV_VAR, "interpret")
    assert backend.resolve_impl("auto") == "interpret_tpu"
    assert backend.resolve_impl("ref") == "ref"  # an explicit impl wins over the variable
    monkeypatch.setenv(backend.ENV_VAR, "ref")
    assert backend.default_impl() == "ref"
    with pytest.raises(ValueError):
        backend.resolve_impl("cuda")


def test_model_kernel_choice_by_shape(monkeypatch):
    """On a GPU, FP8 linears with many rows (prefill) take dequantize-then-dot (measured 2.5x faster
    than the Pallas W8A16 kernel at 4096 rows), decode-sized calls the kernel; the experts of a
    scanned MoE stack are read in place by compiled kernels; explicit choices are left alone."""
    from deepseek_jax.quant import GPU_DEQUANT_MIN_ROWS, Precision, _dense_impl
    monkeypatch.setenv(backend.ENV_VAR, "pallas_gpu")  # what "auto" means on a GPU
    auto = Precision(dtype=jnp.bfloat16)
    assert _dense_impl(auto, GPU_DEQUANT_MIN_ROWS) == "ref"
    assert backend.resolve_impl(_dense_impl(auto, 64)) == "pallas_gpu"
    assert _dense_impl(Precision(fp8_mode="w8a8"), 4096) == "auto"  # W8A8 keeps its kernel
    assert _dense_impl(Precision(kernels="pallas_gpu"), 4096) == "pallas_gpu"
    from deepseek_jax.config import DeepSeekConfig
    from deepseek_jax.model import DeepSeekV3, weights_in_place
    from deepseek_jax.synthetic import tiny_config
    cfg = DeepSeekConfig.from_hub_dict(dict(tiny_config(), quantization_config={"quant_method": "fp8"}))
    assert weights_in_place(DeepSeekV3(cfg, prec=auto, with_mtp=False).moe_layers)
    assert not weights_in_place(DeepSeekV3(cfg, prec=Precision(weights_in_place=False), with_mtp=False).moe_layers)
    monkeypatch.setenv(backend.ENV_VAR, "ref")
    assert _dense_impl(auto, 4096) == "auto"
    assert not weights_in_place(DeepSeekV3(cfg, prec=auto, with_mtp=False).moe_layers)


# -------------------------------------------------------------------------------------------------
# references vs float64 numpy
# -------------------------------------------------------------------------------------------------


def test_quantize_act_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 300)).astype(np.float32)
    x[:, 128:256] *= 1e3
    x[:, 256:] *= 1e-3
    x[3, :128] = 0.0  # all-zero block: scale 1e-4/448, zeros
    xq, xs = quantize_act_1x128(jnp.asarray(x))
    assert xq.dtype == F8 and xq.shape == (7, 300)
    assert xs.dtype == jnp.float32 and xs.shape == (7, 3)
    ref_q, ref_s = np_quantize_1x128(x)
    np.testing.assert_allclose(np.asarray(xs), ref_s, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(xq.astype(jnp.float32)), ref_q)
    assert np.all(np.isfinite(np.asarray(xq.astype(jnp.float32))))
    # batch dims
    xq3, xs3 = quantize_act_1x128(jnp.asarray(x).reshape(7, 1, 300))
    assert xq3.shape == (7, 1, 300) and xs3.shape == (7, 1, 3)


@pytest.mark.parametrize("m,n,k", [(5, 300, 333), (1, 128, 128), (9, 576, 256)])
def test_w8a16_ref_matches_numpy(m, n, k):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((m, k)).astype(np.float32)
    wq, ws = make_fp8_weight(rng, n, k)
    y = w8a16_matmul_ref(jnp.asarray(x), wq, ws)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    expect = x.astype(np.float64) @ np_dequant(wq, ws).T
    assert rel_err(y, expect) < F32_TOL
    # bf16 input → bf16 output, out_dtype override, leading batch dims
    yb = w8a16_matmul_ref(jnp.asarray(x, jnp.bfloat16).reshape(m, 1, k), wq, ws, out_dtype=jnp.float32)
    assert yb.shape == (m, 1, n) and yb.dtype == jnp.float32
    assert rel_err(yb.reshape(m, n), expect) < BF16_TOL


@pytest.mark.parametrize("m,n,k", [(5, 300, 333), (3, 128, 384)])
def test_w8a8_ref_matches_numpy(m, n, k):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0] *= 1e3
    x[1] *= 1e-3
    wq, ws = make_fp8_weight(rng, n, k)
    y = w8a8_matmul_ref(jnp.asarray(x), wq, ws)
    xq, xs = np_quantize_1x128(x)
    wqf = np.asarray(wq.astype(jnp.float32), np.float64)
    wsf = np.asarray(ws, np.float64)
    expect = np.zeros((m, n))
    for b in range(-(-k // 128)):
        sl = slice(b * 128, (b + 1) * 128)
        part = xq[:, sl].astype(np.float64) @ wqf[:, sl].T
        s_w = np.repeat(wsf[:, b], 128)[:n]
        expect += part * xs[:, b:b + 1] * s_w[None, :]
    assert rel_err(y, expect) < F32_TOL
    # and W8A8 is close to (but not equal to) the W8A16 numbers: e4m3 activations, ~2^-4 per element
    full = x.astype(np.float64) @ np_dequant(wq, ws).T
    assert rel_err(y, full) < 0.1


def _groups(rng, m, e, kind):
    if kind == "random":
        cuts = np.sort(rng.integers(0, m + 1, e - 1))
        sizes = np.diff(np.concatenate([[0], cuts, [m]]))
    elif kind == "one_group":
        sizes = np.zeros(e, np.int64)
        sizes[e // 2] = m
    elif kind == "empty_and_short":  # zeros and a sum below m (tail rows must be 0)
        sizes = np.zeros(e, np.int64)
        sizes[1] = m // 3
        sizes[e - 1] = m // 4
    else:
        raise ValueError(kind)
    return jnp.asarray(sizes, jnp.int32)


def np_grouped(x, w_ENK, sizes):
    """float64 numpy grouped product: row r uses w[g] for the group holding it, zeros past them."""
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    w = np.asarray(jnp.asarray(w_ENK, jnp.float32), np.float64)
    out = np.zeros((x.shape[0], w.shape[1]))
    start = 0
    for g, s in enumerate(np.asarray(sizes).tolist()):
        out[start:start + s] = x[start:start + s] @ w[g].T
        start += s
    return out


@pytest.mark.parametrize("kind", ["random", "one_group", "empty_and_short"])
def test_grouped_ref_matches_numpy(kind):
    rng = np.random.default_rng(3)
    m, e, n, k = 37, 5, 40, 24
    sizes = _groups(rng, m, e, kind)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((e, n, k)).astype(np.float32)
    y = grouped_matmul_ref(jnp.asarray(x), jnp.asarray(w), sizes)
    assert y.shape == (m, n)
    expect = np_grouped(x, w, sizes)
    assert rel_err(y, expect) < F32_TOL
    tail = int(np.asarray(sizes).sum())
    assert np.all(np.asarray(y)[tail:] == 0)


def test_grouped_ref_fp8_matches_numpy():
    rng = np.random.default_rng(4)
    m, e, n, k = 20, 3, 200, 136
    sizes = jnp.asarray([7, 0, 13], jnp.int32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    wqs = [make_fp8_weight(rng, n, k) for _ in range(e)]
    wq = jnp.stack([a for a, _ in wqs])
    ws = jnp.stack([b for _, b in wqs])
    y = grouped_matmul_ref(jnp.asarray(x), wq, sizes, w_scale=ws)
    expect = np_grouped(x, np_dequant(wq, ws), sizes)
    assert rel_err(y, expect) < F32_TOL


def test_grouped_ref_grad():
    rng = np.random.default_rng(5)
    m, e, n, k = 12, 3, 8, 6
    sizes = jnp.asarray([5, 0, 6], jnp.int32)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((e, n, k)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    dx, dw = jax.grad(lambda a, b: jnp.sum(grouped_matmul_ref(a, b, sizes) * ct), argnums=(0, 1))(x, w)
    xn, wn, ctn = (np.asarray(v, np.float64) for v in (x, w, ct))
    dx_e = np.zeros_like(xn)
    dw_e = np.zeros_like(wn)
    start = 0
    for g, s in enumerate(np.asarray(sizes)):
        dx_e[start:start + s] = ctn[start:start + s] @ wn[g]
        dw_e[g] = ctn[start:start + s].T @ xn[start:start + s]
        start += s
    assert rel_err(dx, dx_e) < F32_TOL
    assert rel_err(dw, dw_e) < F32_TOL


# -------------------------------------------------------------------------------------------------
# Pallas kernels in interpret mode vs the references
# -------------------------------------------------------------------------------------------------

from kernels_pallas.fp8_gemm import (GpuConfig, TpuConfig, scaled_matmul_gpu,  # noqa: E402
                                     scaled_matmul_tpu)
from kernels_pallas.grouped_gemm import (GpuGroupedConfig, TpuGroupedConfig,  # noqa: E402
                                         _gpu_tile_schedule, _tpu_gmm_schedule, gmm_gpu, gmm_tpu)

ON_GPU = jax.default_backend() == "gpu"
INTERPRETERS = ["interpret_gpu", "interpret_tpu"]
#: the interpreters everywhere, plus the compiled GPU kernels where a GPU is present
KERNEL_IMPLS = INTERPRETERS + [pytest.param("pallas_gpu", marks=pytest.mark.skipif(
    not ON_GPU, reason="compiled GPU kernels need a GPU"))]
COMPILED = [pytest.param(True, id="interpret"), pytest.param(False, id="compiled", marks=pytest.mark.skipif(
    not ON_GPU, reason="compiled GPU kernels need a GPU"))]


def _assert_close(y, ref, dtype):
    y = np.asarray(jnp.asarray(y, jnp.float32))
    assert np.all(np.isfinite(y)), "NaN/inf in kernel output"
    tol = F32_TOL if jnp.dtype(dtype) == jnp.float32 else BF16_TOL
    err = rel_err(y, ref)
    assert err < tol, f"relative error {err:.3g} >= {tol}"


def _activations(rng, m, k, dtype, magnitude="normal"):
    x = rng.standard_normal((m, k)).astype(np.float32)
    if magnitude == "mixed":  # large and tiny rows, an all-zero 128-block, an all-zero row
        x[0] *= 1e3
        x[1 % m] *= 1e-3
        x[:, :min(k, 128)][2 % m] = 0.0
        x[m - 1] = 0.0
    elif magnitude == "large":
        x *= 1e3
    elif magnitude == "tiny":
        x *= 1e-3
    return jnp.asarray(x, dtype)


# M not a multiple of the tile, N and K with partial 128 blocks, zero weight blocks
FP8_CASES = [
    # (m, n, k, dtype, magnitude, zero weight blocks)
    (5, 300, 333, jnp.float32, "mixed", ((0, 1),)),
    (37, 256, 384, jnp.bfloat16, "normal", ((1, 2),)),
    (19, 200, 136, jnp.bfloat16, "large", ()),
    (3, 130, 256, jnp.float32, "tiny", ((1, 0), (1, 1))),
]


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("case", FP8_CASES, ids=lambda c: f"{c[0]}x{c[2]}to{c[1]}_{jnp.dtype(c[3]).name}_{c[4]}")
def test_fp8_kernels_match_ref(impl, case):
    m, n, k, dtype, magnitude, zero_blocks = case
    rng = np.random.default_rng(10)
    x = _activations(rng, m, k, dtype, magnitude)
    wq, ws = make_fp8_weight(rng, n, k, zero_blocks=zero_blocks)
    y16 = w8a16_matmul(x, wq, ws, impl=impl)
    assert y16.shape == (m, n) and y16.dtype == dtype
    _assert_close(y16, w8a16_matmul_ref(x, wq, ws, out_dtype=jnp.float32), dtype)
    y8 = w8a8_matmul(x, wq, ws, impl=impl)
    assert y8.shape == (m, n) and y8.dtype == dtype
    _assert_close(y8, w8a8_matmul_ref(x, wq, ws, out_dtype=jnp.float32), dtype)


@pytest.mark.parametrize("impl", ["ref"] + KERNEL_IMPLS)
def test_fp8_layer_of_a_stack_read_in_place(impl):
    """``layer=`` picks one [N, K] weight of an [L, N, K] stack (the other layers are NaN: never read)."""
    rng = np.random.default_rng(12)
    m, n, k, layers = 7, 200, 136, 3
    x = _activations(rng, m, k, jnp.float32)
    pairs = [make_fp8_weight(rng, n, k) for _ in range(layers)]
    wq = jnp.stack([p[0] for p in pairs]).at[0].set(jnp.nan).at[2].set(jnp.nan)
    ws = jnp.stack([p[1] for p in pairs])
    for fn, ref in ((w8a16_matmul, w8a16_matmul_ref), (w8a8_matmul, w8a8_matmul_ref)):
        y = jax.jit(lambda a, b, c, l, fn=fn: fn(a, b, c, impl=impl, layer=l))(x, wq, ws, jnp.int32(1))
        _assert_close(y, ref(x, *pairs[1], out_dtype=jnp.float32), jnp.float32)
    with pytest.raises(ValueError, match="with layer="):
        w8a16_matmul(x, wq[0], ws[0], impl=impl, layer=0)


def test_fp8_kernels_batch_dims_and_out_dtype():
    rng = np.random.default_rng(11)
    x = _activations(rng, 6, 256, jnp.bfloat16).reshape(2, 3, 256)
    wq, ws = make_fp8_weight(rng, 128, 256)
    for impl in INTERPRETERS + (["pallas_gpu"] if ON_GPU else []):
        y = w8a16_matmul(x, wq, ws, out_dtype=jnp.float32, impl=impl)
        assert y.shape == (2, 3, 128) and y.dtype == jnp.float32
        _assert_close(y, w8a16_matmul_ref(x, wq, ws, out_dtype=jnp.float32), jnp.bfloat16)


@pytest.mark.parametrize("cfg", [
    GpuConfig(bm=16, bn=32, splits=3, num_warps=4, num_stages=2),   # split-K, narrow column tiles
    GpuConfig(bm=16, bn=256, splits=1, num_warps=4, num_stages=2),  # column tile over 2 scale blocks
    GpuConfig(bm=16, bn=32, splits=3, num_warps=4, num_stages=2, prescale=True),
    GpuConfig(bm=32, bn=256, splits=2, num_warps=4, num_stages=2, prescale=True),
], ids=["splitk_bn32", "bn256", "prescale_bn32", "prescale_bn256"])
@pytest.mark.parametrize("interpret", COMPILED)
def test_fp8_gpu_kernel_tilings(cfg, interpret):
    rng = np.random.default_rng(12)
    m, n, k = 20, 300, 333
    x = _activations(rng, m, k, jnp.float32, "mixed")
    wq, ws = make_fp8_weight(rng, n, k, zero_blocks=((2, 0),))
    y = scaled_matmul_gpu(x, None, wq, ws, out_dtype=jnp.float32, interpret=interpret, config=cfg)
    _assert_close(y, w8a16_matmul_ref(x, wq, ws), jnp.float32)
    xq, xs = quantize_act_1x128(x)
    y8 = scaled_matmul_gpu(xq, xs, wq, ws, out_dtype=jnp.float32, interpret=interpret, config=cfg)
    _assert_close(y8, w8a8_matmul_ref(x, wq, ws), jnp.float32)


@pytest.mark.parametrize("interpret", COMPILED)
def test_fp8_gpu_prefill_default_tiles(interpret):
    """M >= 256 takes the prefill defaults (W8A16: prescaled 128x128 tiles; W8A8: 64x128), with a
    ragged last row tile and partial 128 blocks in N and K."""
    from kernels_pallas.fp8_gemm import default_gpu_config
    assert default_gpu_config(300, 200, 300, "w8a16").prescale
    assert not default_gpu_config(300, 200, 300, "w8a8").prescale
    rng = np.random.default_rng(14)
    m, n, k = 300, 200, 300
    x = _activations(rng, m, k, jnp.float32, "mixed")
    wq, ws = make_fp8_weight(rng, n, k, zero_blocks=((1, 1),))
    y = scaled_matmul_gpu(x, None, wq, ws, out_dtype=jnp.float32, interpret=interpret)
    _assert_close(y, w8a16_matmul_ref(x, wq, ws), jnp.float32)
    xq, xs = quantize_act_1x128(x)
    y8 = scaled_matmul_gpu(xq, xs, wq, ws, out_dtype=jnp.float32, interpret=interpret)
    _assert_close(y8, w8a8_matmul_ref(x, wq, ws), jnp.float32)


@pytest.mark.parametrize("cfg_kw", [{}, {"bm": 128}, {"bn": 64, "max_concurrent_steps": 2},
                                    {"warp_specialized": True}],
                         ids=["default", "bm128", "bn64", "warp_specialized"])
@pytest.mark.parametrize("interpret", COMPILED)
def test_fp8_mosaic_gpu_kernel_matches_ref(cfg_kw, interpret):
    """The Mosaic GPU W8A8 kernel (wgmma, per-K-block promotion; JAX's Mosaic GPU interpreter on
    CPU) against the W8A8 reference: M not a multiple of the row tile (70 and 1 rows), large,
    tiny and all-zero activation blocks, zero weight blocks, several tiles in both directions."""
    from kernels_pallas.fp8_gemm_mgpu import MgpuConfig, w8a8_matmul_mgpu
    cfg = MgpuConfig(**cfg_kw)
    rng = np.random.default_rng(15)
    n, k = 256, 384
    wq, ws = make_fp8_weight(rng, n, k, zero_blocks=((1, 2),))
    for m in (70, 1):
        x = _activations(rng, m, k, jnp.float32, "mixed" if m > 2 else "normal")
        xq, xs = quantize_act_1x128(x)
        y = w8a8_matmul_mgpu(xq, xs, wq, ws, out_dtype=jnp.float32, cfg=cfg, interpret=interpret)
        assert y.shape == (m, n) and y.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(y)))
        _assert_close(y, w8a8_matmul_ref(x, wq, ws), jnp.float32)
    y16 = w8a8_matmul_mgpu(xq, xs, wq, ws, cfg=cfg, interpret=interpret)   # bf16 out by default
    assert y16.dtype == jnp.bfloat16
    _assert_close(y16, w8a8_matmul_ref(x, wq, ws), jnp.bfloat16)


def test_fp8_mosaic_gpu_kernel_rejects_shapes_it_does_not_tile():
    from kernels_pallas.fp8_gemm_mgpu import supported, w8a8_matmul_mgpu
    rng = np.random.default_rng(16)
    wq, ws = make_fp8_weight(rng, 200, 333)
    xq, xs = quantize_act_1x128(_activations(rng, 4, 333, jnp.float32))
    assert not supported(4, 200, 333) and supported(4, 256, 384)
    with pytest.raises(ValueError, match="unsupported shape M=4 N=200 K=333"):
        w8a8_matmul_mgpu(xq, xs, wq, ws, interpret=True)


def test_w8a8_takes_the_mosaic_gpu_kernel_when_asked(monkeypatch):
    """``$DEEPSEEK_JAX_W8A8_GPU=mosaic_gpu``: the GPU W8A8 path (what ``Precision(fp8_mode="w8a8")``
    calls) runs the wgmma kernel where it tiles the shape and the Triton kernel elsewhere."""
    rng = np.random.default_rng(17)
    wq, ws = make_fp8_weight(rng, 256, 384)
    x = _activations(rng, 5, 384, jnp.float32, "mixed")
    call = lambda a, b, c: w8a8_matmul(a, b, c, impl="interpret_gpu")  # noqa: E731
    assert "wgmma" not in str(jax.make_jaxpr(call)(x, wq, ws))       # default: Triton
    monkeypatch.setenv("DEEPSEEK_JAX_W8A8_GPU", "mosaic_gpu")
    jax.clear_caches()   # (read when tracing: a process sets it before its first call)
    assert "wgmma" in str(jax.make_jaxpr(call)(x, wq, ws))
    _assert_close(call(x, wq, ws), w8a8_matmul_ref(x, wq, ws, out_dtype=jnp.float32), jnp.float32)
    wq2, ws2 = make_fp8_weight(rng, 200, 333)                           # not tiled: Triton
    x2 = _activations(rng, 5, 333, jnp.float32)
    assert "wgmma" not in str(jax.make_jaxpr(call)(x2, wq2, ws2))
    monkeypatch.setenv("DEEPSEEK_JAX_W8A8_GPU", "cutlass")
    jax.clear_caches()
    with pytest.raises(ValueError, match="DEEPSEEK_JAX_W8A8_GPU='cutlass': expected triton or mosaic_gpu"):
        call(x, wq, ws)


@pytest.mark.parametrize("ws", [False, True], ids=["pipelined", "warp_specialized"])
@pytest.mark.parametrize("m", [4096, 64])
def test_fp8_mosaic_gpu_kernel_lowers_for_the_gpu(m, ws):
    """Lowering for CUDA runs on a CPU-only host (``jax.export``): Pallas → Mosaic GPU, with its
    layout inference, shared-memory transforms and pipeline, at the model's shapes. What it
    cannot check is the final PTX compile, which needs a GPU."""
    from jax import export

    from kernels_pallas.fp8_gemm_mgpu import MgpuConfig, w8a8_matmul_mgpu
    n, k = 2048, 7168
    args = (jax.ShapeDtypeStruct((m, k), F8), jax.ShapeDtypeStruct((m, k // 128), jnp.float32),
            jax.ShapeDtypeStruct((n, k), F8), jax.ShapeDtypeStruct((n // 128, k // 128), jnp.float32))
    fn = functools.partial(w8a8_matmul_mgpu, cfg=MgpuConfig(warp_specialized=ws))
    exp = export.export(jax.jit(fn), platforms=["cuda"])(*args)
    text = exp.mlir_module()
    assert "mosaic_gpu" in text and exp.out_avals[0].shape == (m, n)


def test_fp8_tpu_kernel_multi_tile():
    rng = np.random.default_rng(13)
    m, n, k = 40, 300, 512
    x = _activations(rng, m, k, jnp.float32)
    wq, ws = make_fp8_weight(rng, n, k)
    cfg = TpuConfig(bm=32, bn=128, bk=256)  # 2 row tiles, ragged column tile, 2 K steps of 2 blocks
    y = scaled_matmul_tpu(x, None, wq, ws, out_dtype=jnp.float32, interpret=True, config=cfg)
    _assert_close(y, w8a16_matmul_ref(x, wq, ws), jnp.float32)


def test_tpu_default_tiles():
    """Decode shapes get weight tiles up to 2048 x 2048 (multiples of 128 dividing the dims: 7168
    -> 1792), >= 2 output tiles; prefill 1024 x 1024; a dim with no such divisor is one tile."""
    from kernels_pallas.fp8_gemm import default_tpu_config
    from kernels_pallas.grouped_gemm import default_tpu_grouped_config
    assert default_tpu_config(1, 7168, 16384) == TpuConfig(bm=32, bn=1792, bk=2048)    # o_proj
    assert default_tpu_config(1, 2048, 7168) == TpuConfig(bm=32, bn=1024, bk=1792)     # shared gate
    assert default_tpu_config(1, 576, 7168).bn == 576                                  # kv_a: 4.5 x 128
    assert default_tpu_config(4096, 7168, 2048) == TpuConfig(bm=256, bn=1024, bk=1024)
    assert default_tpu_grouped_config(8, 2048, 7168) == TpuGroupedConfig(tm=16, tk=1792, tn=1024)
    assert default_tpu_grouped_config(32768, 4096, 7168) == TpuGroupedConfig(tm=128, tk=1024, tn=1024)


def test_fp8_tpu_kernel_default_decode_tiles():
    """The TPU kernel with its default tiles at a decode shape: 1792-wide K steps (14 scale blocks
    each, two steps) and 1024-wide column tiles."""
    rng = np.random.default_rng(14)
    m, n, k = 3, 2048, 3584
    x = _activations(rng, m, k, jnp.float32)
    wq, ws = make_fp8_weight(rng, n, k)
    y = scaled_matmul_tpu(x, None, wq, ws, out_dtype=jnp.float32, interpret=True)
    _assert_close(y, w8a16_matmul_ref(x, wq, ws), jnp.float32)


# grouped GEMM ----------------------------------------------------------------------------------


def np_dequant_stack(wq, ws):
    return np.stack([np_dequant(np.asarray(wq[g]), np.asarray(ws[g])) for g in range(wq.shape[0])])


def _expert_weights(rng, e, n, k, fp8, dtype):
    if not fp8:
        return jnp.asarray(rng.standard_normal((e, n, k)) / np.sqrt(k), dtype), None
    pairs = [make_fp8_weight(rng, n, k, zero_blocks=((0, 0),) if g == 0 else ()) for g in range(e)]
    return jnp.stack([p[0] for p in pairs]), jnp.stack([p[1] for p in pairs])


GROUPED_CASES = [
    # (m, e, n, k, group kind, fp8, dtype)
    (50, 6, 200, 136, "random", False, jnp.float32),
    (50, 6, 200, 136, "empty_and_short", True, jnp.float32),
    (33, 4, 128, 256, "one_group", True, jnp.bfloat16),
    (40, 5, 96, 128, "random", False, jnp.bfloat16),
]


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("case", GROUPED_CASES,
                         ids=lambda c: f"m{c[0]}e{c[1]}_{c[4]}_{'fp8' if c[5] else 'dense'}_{jnp.dtype(c[6]).name}")
def test_grouped_kernel_matches_ref(impl, case):
    m, e, n, k, kind, fp8, dtype = case
    rng = np.random.default_rng(20)
    sizes = _groups(rng, m, e, kind)
    x = _activations(rng, m, k, dtype, "mixed")
    w, ws = _expert_weights(rng, e, n, k, fp8, dtype)
    y = grouped_matmul(x, w, sizes, w_scale=ws, impl=impl)
    assert y.shape == (m, n) and y.dtype == dtype
    _assert_close(y, grouped_matmul_ref(x, w, sizes, w_scale=ws, out_dtype=jnp.float32), dtype)
    tail = int(np.asarray(sizes).sum())
    assert np.all(np.asarray(y[tail:], np.float32) == 0.0)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("fp8", [False, True], ids=["dense", "fp8"])
def test_grouped_kernel_backward(impl, fp8):
    rng = np.random.default_rng(21)
    m, e, n, k = 30, 4, 136, 128
    sizes = jnp.asarray([9, 0, 17, 2], jnp.int32)  # an empty expert, a sum below m
    x = _activations(rng, m, k, jnp.float32)
    w, ws = _expert_weights(rng, e, n, k, fp8, jnp.float32)
    ct = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)

    def loss(which):
        return lambda a, b: jnp.sum(grouped_matmul(a, b, sizes, w_scale=ws, impl=which) * ct)

    if fp8:
        dx = jax.grad(loss(impl))(x, w)
        dx_ref = jax.grad(loss("ref"))(x, w)
    else:
        dx, dw = jax.grad(loss(impl), argnums=(0, 1))(x, w)
        dx_ref, dw_ref = jax.grad(loss("ref"), argnums=(0, 1))(x, w)
        _assert_close(dw, dw_ref, jnp.float32)
        assert np.all(np.asarray(dw[1]) == 0.0)  # empty expert: zero gradient
    _assert_close(dx, dx_ref, jnp.float32)


@pytest.mark.parametrize("impl", ["ref"] + KERNEL_IMPLS)
@pytest.mark.parametrize("fp8", [False, True], ids=["dense", "fp8"])
def test_grouped_expert_offset_reads_a_larger_stack(impl, fp8):
    """``expert_offset`` into an [L*E, N, K] stack equals the sliced layer, forward and backward; the
    other layers' weights get zero gradient and are never read (poisoned with NaN here)."""
    rng = np.random.default_rng(23)
    layers, e, m, n, k = 3, 4, 29, 136, 128
    sizes = jnp.asarray([9, 0, 17, 2], jnp.int32)
    x = _activations(rng, m, k, jnp.float32)
    stack = [_expert_weights(rng, e, n, k, fp8, jnp.float32) for _ in range(layers)]
    w_all = jnp.concatenate([w for w, _ in stack])
    ws_all = jnp.concatenate([s for _, s in stack]) if fp8 else None
    layer = 1
    poison = jnp.zeros((layers * e, 1, 1), jnp.float32).at[:e].set(jnp.nan).at[2 * e:].set(jnp.nan)
    w_all = (w_all.astype(jnp.float32) + poison).astype(w_all.dtype)
    ct = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)

    def loss(a, b, off):
        return jnp.sum(grouped_matmul(a, b, sizes, w_scale=ws_all, impl=impl, expert_offset=off) * ct)

    off = jnp.int32(layer * e)
    y = jax.jit(lambda a, b, o: grouped_matmul(a, b, sizes, w_scale=ws_all, impl=impl, expert_offset=o))(
        x, w_all, off)
    w1, s1 = stack[layer]
    _assert_close(y, grouped_matmul_ref(x, w1, sizes, w_scale=s1, out_dtype=jnp.float32), jnp.float32)
    if fp8:
        return
    dx, dw = jax.grad(loss, argnums=(0, 1))(x, w_all, off)
    dx_ref, dw_ref = jax.grad(lambda a, b: jnp.sum(grouped_matmul_ref(a, b, sizes) * ct), argnums=(0, 1))(x, w1)
    _assert_close(dx, dx_ref, jnp.float32)
    _assert_close(dw[e:2 * e], dw_ref, jnp.float32)
    assert np.all(np.asarray(dw[:e]) == 0.0) and np.all(np.asarray(dw[2 * e:]) == 0.0)


@pytest.mark.parametrize("interpret", COMPILED)
def test_grouped_gpu_tilings(interpret):
    rng = np.random.default_rng(22)
    m, e, n, k = 45, 5, 300, 200
    sizes = jnp.asarray([0, 20, 0, 24, 1], jnp.int32)
    x = _activations(rng, m, k, jnp.float32, "mixed")
    for fp8 in (False, True):
        w, ws = _expert_weights(rng, e, n, k, fp8, jnp.float32)
        for cfg in (GpuGroupedConfig(bm=16, bn=256, bk=32), GpuGroupedConfig(bm=32, bn=32, bk=64),
                    GpuGroupedConfig(bm=16, bn=256, bk=64, prescale=True),
                    GpuGroupedConfig(bm=32, bn=64, bk=128, prescale=True),
                    GpuGroupedConfig(bm=16, bn=64, bk=128, splits=2),  # split-K (decode variant)
                    GpuGroupedConfig(bm=16, bn=64, bk=64, prescale=True, splits=4)):
            y = gmm_gpu(x, w, sizes, w_scale=ws, out_dtype=jnp.float32, interpret=interpret,
                        config=cfg)
            _assert_close(y, grouped_matmul_ref(x, w, sizes, w_scale=ws), jnp.float32)
            if cfg.splits > 1:  # rows past sum(group_sizes) stay zero in every partial sum
                y_tail = gmm_gpu(x, w, sizes.at[3].set(10), w_scale=ws, out_dtype=jnp.float32,
                                 interpret=interpret, config=cfg)
                assert np.all(np.asarray(y_tail[31:]) == 0.0)
                _assert_close(y_tail, grouped_matmul_ref(x, w, sizes.at[3].set(10), w_scale=ws),
                              jnp.float32)
            if fp8 and cfg.prescale:  # the dx orientation ([E, C, O] reads) with prescaling
                dy = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
                dx = gmm_gpu(dy, w, sizes, w_scale=ws, w_co=True, out_dtype=jnp.float32,
                             interpret=interpret, config=cfg)
                w_t = jnp.swapaxes(jnp.asarray(np_dequant_stack(w, ws)), 1, 2)
                _assert_close(dx, grouped_matmul_ref(dy, w_t, sizes), jnp.float32)


def test_grouped_tpu_tilings():
    rng = np.random.default_rng(23)
    m, e, n, k = 45, 5, 300, 256
    sizes = jnp.asarray([0, 20, 0, 24, 1], jnp.int32)
    x = _activations(rng, m, k, jnp.float32, "mixed")
    w, ws = _expert_weights(rng, e, n, k, True, jnp.float32)
    cfg = TpuGroupedConfig(tm=16, tk=128, tn=128)
    y = gmm_tpu(x, w, sizes, w_scale=ws, out_dtype=jnp.float32, interpret=True, config=cfg)
    _assert_close(y, grouped_matmul_ref(x, w, sizes, w_scale=ws), jnp.float32)


def test_grouped_tpu_default_decode_tiles():
    """The grouped TPU kernel with its default tiles at a decode shape (8 rows over 6 experts, two
    with none): a 1792-wide contraction tile of 14 scale blocks, two 1024-wide output tiles."""
    rng = np.random.default_rng(24)
    m, e, n, k = 8, 6, 2048, 3584
    sizes = jnp.asarray([3, 0, 2, 1, 0, 2], jnp.int32)
    x = _activations(rng, m, k, jnp.float32)
    w, ws = _expert_weights(rng, e, n, k, True, jnp.float32)
    y = gmm_tpu(x, w, sizes, w_scale=ws, out_dtype=jnp.float32, interpret=True)
    _assert_close(y, grouped_matmul_ref(x, w, sizes, w_scale=ws), jnp.float32)


def test_grouped_schedules_skip_empty_experts():
    """Decode: tiles (GPU) and weight block indices (TPU) name only experts that got rows."""
    sizes = jnp.asarray([0, 2, 0, 0, 3, 0, 0, 1], jnp.int32)
    m = 8  # two tail rows
    g, r0, r1 = _gpu_tile_schedule(sizes, m, 16)
    used = set(np.asarray(g)[np.asarray(r1) > np.asarray(r0)].tolist())
    assert used == {1, 4, 7, 8}  # 8 = the zero tail
    g_t, mt, wg, valid, _, _ = _tpu_gmm_schedule(sizes, m, 16, 16)
    assert set(np.asarray(wg).tolist()) <= {1, 4, 7}
    assert set(np.asarray(g_t)[np.asarray(valid) == 1].tolist()) == {1, 4, 7, 8}


@pytest.mark.parametrize("sizes,m,bm", [
    ([0, 2, 0, 0, 3, 0, 0, 1], 8, 16),            # decode: two tail rows
    ([0, 20, 0, 24, 1, 0, 0, 0], 45, 16),         # no tail; empty experts first and last
    ([16, 0, 17, 0, 0, 0, 0, 31], 70, 16),        # whole tiles, a tail of 6
    ([0] * 8, 5, 16),                             # every row in the tail
    ([3] * 16, 48, 32),                           # every expert, partial tiles
])
def test_gpu_kernel_computes_the_tile_schedule_as_xla_does(sizes, m, bm):
    """The GPU grouped kernel's programs compute their own row tile from the group sizes
    (``_kernel_tile``); in the Pallas interpreter that equals ``_gpu_tile_schedule`` (XLA's) for
    every used tile, and an unused tile has no rows."""
    from jax.experimental import pallas as pl
    from kernels_pallas.grouped_gemm import _kernel_tile, _num_row_tiles

    sizes = jnp.asarray(sizes, jnp.int32)
    e = sizes.shape[0]
    want_g, want_r0, want_r1 = (np.asarray(a) for a in _gpu_tile_schedule(sizes, m, bm))
    n = _num_row_tiles(m, e, bm)

    def kernel(gs_ref, o_ref):
        t = pl.program_id(0)
        g, r0, r1 = _kernel_tile(gs_ref, t, e=e, m=m, bm=bm)
        o_ref[t, 0], o_ref[t, 1], o_ref[t, 2] = g, r0, r1

    got = np.asarray(pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((n, 3), jnp.int32), grid=(n,),
                                    interpret=True)(sizes))
    used = want_r1 > want_r0
    assert (got[:, 2] > got[:, 1]).tolist() == used.tolist()
    assert (got[used] == np.stack([want_g, want_r0, want_r1], 1)[used]).all()
    assert (got[~used][:, 0] > e).all()


def test_grouped_decode_schedules_are_bounded_by_rows():
    """Fewer rows than experts (decode): the static schedules are sized by the rows, not by the 256
    experts (a GPU call at 8 rows launches 10 row tiles, not 258; a TPU call runs 9 row-tile visits
    per weight tile, not 17 as when bounded by the padded rows)."""
    sizes = jnp.zeros((256,), jnp.int32).at[jnp.asarray([3, 40, 41, 200, 255])].set(
        jnp.asarray([2, 1, 1, 3, 1]))
    assert _gpu_tile_schedule(sizes, 8, 16)[0].shape[0] == 1 + 8 + 1
    assert _tpu_gmm_schedule(sizes, 8, 16, 16)[0].shape[0] == 1 + 8


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_grouped_kernel_fewer_rows_than_experts(impl, fp8):
    """Decode shape: 5 rows over 12 experts (most empty, one with 2 rows, one zero tail row)."""
    rng = np.random.default_rng(44)
    e, n, k = 12, 136, 200
    sizes = jnp.zeros((e,), jnp.int32).at[jnp.asarray([1, 7, 11])].set(jnp.asarray([2, 1, 1]))
    x = jnp.asarray(rng.standard_normal((5, k)), jnp.float32)
    w, ws = _expert_weights(rng, e, n, k, fp8, jnp.float32)
    y = grouped_matmul(x, w, sizes, w_scale=ws, impl=impl)
    _assert_close(y, grouped_matmul_ref(x, w, sizes, w_scale=ws), jnp.float32)
    assert np.all(np.asarray(y[4]) == 0.0)  # the row past sum(group_sizes)


# Grouped GEMM on Mosaic GPU ------------------------------------------------------------------------


MGPU_GROUPED_CASES = [
    # (m, sizes, n, k): ragged row blocks, empty experts, a zero tail, one expert with every row
    (150, [40, 0, 70, 30, 0], 256, 256),
    (64, [0, 0, 64], 128, 384),
    (5, [0, 2, 0, 1, 0, 0], 128, 256),  # decode-like: fewer rows than one tile, most experts empty
]


@pytest.mark.parametrize("case", MGPU_GROUPED_CASES, ids=["ragged", "one_group", "decode"])
@pytest.mark.parametrize("interpret", COMPILED)
def test_grouped_mosaic_gpu_kernel_matches_ref(case, interpret):
    """The Mosaic GPU grouped kernel (block-aligned tiles, ladder of TMA stores), bf16 against
    float64 numpy and W8A8 against its jnp reference, which is itself checked against numpy on
    the dequantized operands; both with the weights in a larger stack (``expert_offset``)."""
    from kernels_pallas.grouped_gemm_mgpu import gmm_mgpu, grouped_w8a8_ref
    m, sizes, n, k = case
    rng = np.random.default_rng(31)
    e = len(sizes)
    sizes = jnp.asarray(sizes, jnp.int32)
    x = _activations(rng, m, k, jnp.float32, "mixed" if m > 4 else "normal")
    w = jnp.asarray(rng.standard_normal((e + 2, n, k)) / np.sqrt(k), jnp.float32)
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    y = gmm_mgpu(xb, wb, sizes, expert_offset=2, out_dtype=jnp.float32, interpret=interpret)
    want = np_grouped(xb, wb[2:], sizes)
    assert y.shape == (m, n) and bool(jnp.all(jnp.isfinite(y)))
    assert rel_err(y, want) < F32_TOL
    assert np.all(np.asarray(y[int(sizes.sum()):]) == 0.0)  # rows past the groups
    pairs = [make_fp8_weight(rng, n, k, zero_blocks=((0, 0),) if g == 1 else ()) for g in range(e + 2)]
    wq, ws = jnp.stack([p[0] for p in pairs]), jnp.stack([p[1] for p in pairs])
    xq, xs = quantize_act_1x128(x)
    y8 = gmm_mgpu(xq, wq, sizes, x_scale=xs, w_scale=ws, expert_offset=2, out_dtype=jnp.float32,
                  interpret=interpret)
    ref8 = grouped_w8a8_ref(xq, xs, wq, ws, sizes, expert_offset=2)
    _assert_close(y8, ref8, jnp.float32)
    # W8A16 (the model's FP8 experts): the weight tile dequantized in the kernel, as the reference
    # dequantizes it, then a bf16 wgmma
    y16 = gmm_mgpu(xb, wq, sizes, w_scale=ws, expert_offset=2, out_dtype=jnp.float32, interpret=interpret)
    _assert_close(y16, grouped_matmul_ref(xb, wq[2:], sizes, w_scale=ws[2:], out_dtype=jnp.float32), jnp.float32)
    x_deq = np.asarray(xq, np.float32) * np.repeat(np.asarray(xs), 128, axis=1)[:, :k]
    w_deq = np.stack([np_dequant(wq[g], ws[g]) for g in range(2, e + 2)])
    assert rel_err(ref8, np_grouped(x_deq, w_deq, sizes)) < F32_TOL


def test_grouped_mosaic_gpu_block_schedule():
    """Tiles are (row block, group) pairs: every row of a group is in exactly one tile of that
    group and that block, empty experts get none, and the static count stays at its bound."""
    from kernels_pallas.grouped_gemm_mgpu import _block_tile_schedule
    sizes = jnp.zeros((256,), jnp.int32).at[jnp.asarray([3, 40, 41, 200])].set(jnp.asarray([70, 1, 1, 50]))
    m, bm = 130, 64   # 122 grouped rows, 8 tail rows
    g, blk, r0, r1 = map(np.asarray, _block_tile_schedule(sizes, m, bm))
    assert g.shape[0] == -(-m // bm) + min(256, m) + 1
    owner = np.full(m, -1)
    for gi, b, a, z in zip(g, blk, r0, r1):
        if z > a:
            assert b * bm <= a < z <= b * bm + bm and (owner[a:z] == -1).all()
            owner[a:z] = gi
    ends = np.cumsum(np.asarray(sizes))
    assert (owner == np.searchsorted(ends, np.arange(m), side="right")).all()  # 256 = the tail


def test_grouped_mosaic_gpu_kernel_rejects_what_it_does_not_take():
    from kernels_pallas.grouped_gemm_mgpu import gmm_mgpu
    sizes = jnp.asarray([2, 3], jnp.int32)
    x = jnp.ones((5, 200), jnp.bfloat16)
    with pytest.raises(ValueError, match="unsupported shape M=5 N=128 K=200"):
        gmm_mgpu(x, jnp.ones((2, 128, 200), jnp.bfloat16), sizes, interpret=True)
    with pytest.raises(ValueError, match="e4m3 weights need w_scale"):
        gmm_mgpu(x, jnp.ones((2, 128, 256), F8), sizes, interpret=True)
    with pytest.raises(ValueError, match="unsupported operands x float8_e4m3fn, w float8_e4m3fn"):
        gmm_mgpu(x.astype(F8), jnp.ones((2, 128, 200), F8), sizes, w_scale=jnp.ones((2, 1, 2)), interpret=True)


def test_grouped_matmul_takes_the_mosaic_gpu_kernel_when_asked(monkeypatch):
    """``$DEEPSEEK_JAX_GROUPED_GPU=mosaic_gpu``: the grouped forward on a GPU runs the wgmma kernel
    (gradients still come from the Triton backward kernels), for FP8 experts only from
    ``MGPU_FP8_MIN_ROWS`` rows on."""
    rng = np.random.default_rng(33)
    sizes = jnp.asarray([30, 0, 40], jnp.int32)
    x = jnp.asarray(rng.standard_normal((70, 128)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((3, 128, 128)) / np.sqrt(128), jnp.bfloat16)
    call = lambda a, b: grouped_matmul(a, b, sizes, impl="interpret_gpu", out_dtype=jnp.float32)  # noqa: E731
    assert "wgmma" not in str(jax.make_jaxpr(call)(x, w))
    monkeypatch.setenv("DEEPSEEK_JAX_GROUPED_GPU", "mosaic_gpu")
    jax.clear_caches()
    assert "wgmma" in str(jax.make_jaxpr(call)(x, w))
    assert rel_err(call(x, w), np_grouped(x, w, sizes)) < F32_TOL
    loss = lambda a, b: jnp.sum(call(a, b) ** 2)  # noqa: E731
    ref_loss = lambda a, b: jnp.sum(grouped_matmul_ref(a, b, sizes, out_dtype=jnp.float32) ** 2)  # noqa: E731
    for got, want in zip(jax.grad(loss, (0, 1))(x, w), jax.grad(ref_loss, (0, 1))(x, w)):
        _assert_close(got, want, jnp.bfloat16)
    # FP8 experts (W8A16): the wgmma kernel from MGPU_FP8_MIN_ROWS rows on (decode keeps Triton)
    wq, ws = _expert_weights(rng, 3, 128, 128, True, jnp.float32)
    call8 = lambda a: grouped_matmul(a, wq, sizes, w_scale=ws, impl="interpret_gpu", out_dtype=jnp.float32)  # noqa: E731
    assert "wgmma" not in str(jax.make_jaxpr(call8)(x))              # 70 rows < 1024
    import kernels_pallas.grouped_gemm as gg
    monkeypatch.setattr(gg, "MGPU_FP8_MIN_ROWS", 64)
    jax.clear_caches()
    assert "wgmma" in str(jax.make_jaxpr(call8)(x))
    _assert_close(call8(x), grouped_matmul_ref(x, wq, sizes, w_scale=ws, out_dtype=jnp.float32), jnp.float32)


def test_grouped_matmul_w8a8_quantizes_the_rows(monkeypatch):
    """``quantize_x=True`` (the model's experts with ``fp8_mode="w8a8"``): the reference, the GPU
    path (the Mosaic GPU e4m3 wgmma kernel from ``MGPU_FP8_MIN_ROWS`` rows on where it tiles the
    shape; Triton on the fake-quantized rows below that, where it does not tile, or with
    ``$DEEPSEEK_JAX_GROUPED_GPU=triton``) and the TPU path all equal the W8A8 block GEMM of the
    quantized operands (``grouped_w8a8_ref``), read at an expert offset; the gradient w.r.t. ``x``
    is the W8A16 one (straight-through)."""
    import kernels_pallas.grouped_gemm as gg
    from kernels_pallas.grouped_gemm_mgpu import grouped_w8a8_ref
    rng = np.random.default_rng(34)
    sizes = jnp.asarray([30, 0, 40], jnp.int32)
    x = _activations(rng, 72, 256, jnp.float32, "mixed")
    pairs = [make_fp8_weight(rng, 128, 256) for _ in range(4)]
    wq, ws = jnp.stack([p[0] for p in pairs]), jnp.stack([p[1] for p in pairs])
    want = grouped_w8a8_ref(*quantize_act_1x128(x), wq, ws, sizes, expert_offset=1)
    w16 = grouped_matmul_ref(x, wq[1:], sizes, w_scale=ws[1:], out_dtype=jnp.float32)
    assert rel_err(want, w16) > 1e-3                               # the quantization is visible
    call = lambda a, impl: grouped_matmul(a, wq, sizes, w_scale=ws, impl=impl,  # noqa: E731
                                          out_dtype=jnp.float32, expert_offset=1, quantize_x=True)
    assert rel_err(call(x, "ref"), want) < F32_TOL
    assert "wgmma" not in str(jax.make_jaxpr(lambda a: call(a, "interpret_gpu"))(x))  # 72 < 1024 rows
    assert rel_err(call(x, "interpret_gpu"), want) < F32_TOL
    monkeypatch.setattr(gg, "MGPU_FP8_MIN_ROWS", 64)
    jax.clear_caches()
    assert "wgmma" in str(jax.make_jaxpr(lambda a: call(a, "interpret_gpu"))(x))
    assert rel_err(call(x, "interpret_gpu"), want) < F32_TOL
    assert rel_err(call(x, "interpret_tpu"), want) < F32_TOL
    monkeypatch.setenv("DEEPSEEK_JAX_GROUPED_GPU", "triton")
    jax.clear_caches()
    assert "wgmma" not in str(jax.make_jaxpr(lambda a: call(a, "interpret_gpu"))(x))
    assert rel_err(call(x, "interpret_gpu"), want) < F32_TOL
    for impl in ("ref", "interpret_gpu"):
        g = jax.grad(lambda a: jnp.sum(call(a, impl) * w16))(x)
        g16 = jax.grad(lambda a: jnp.sum(grouped_matmul_ref(a, wq[1:], sizes, w_scale=ws[1:],
                                                            out_dtype=jnp.float32) * w16))(x)
        _assert_close(g, g16, jnp.float32)
    monkeypatch.setenv("DEEPSEEK_JAX_GROUPED_GPU", "cutlass")
    jax.clear_caches()
    with pytest.raises(ValueError, match="DEEPSEEK_JAX_GROUPED_GPU='cutlass': expected triton or mosaic_gpu"):
        call(x, "interpret_gpu")
    with pytest.raises(ValueError, match="quantize_x \\(W8A8\\) needs float8_e4m3fn weights"):
        grouped_matmul(x, wq[1:].astype(jnp.float32), sizes, quantize_x=True, impl="ref")


@pytest.mark.parametrize("impl", ["ref", "interpret_gpu", "interpret_tpu"])
def test_gemm_operands_are_checked_alike_by_every_impl(impl):
    """What the kernels took without a word: a grouped w_scale too short for its weights (read
    past its end; the reference refused it only on its ragged path), negative or over-full group
    sizes (kernels and reference differed by up to 62.7), and FP8 GEMM operands of other dtypes
    (an int32 ``x`` gave the reference int32-truncated weights: 0.51 relative from the kernels)."""
    rng = np.random.default_rng(0)
    wq, ws = zip(*(make_fp8_weight(rng, 130, 200) for _ in range(4)))
    wq, ws = jnp.stack(wq), jnp.stack(ws)
    x = jnp.ones((6, 200), jnp.bfloat16)
    sizes = jnp.array([3, 1, 2, 0], jnp.int32)
    cases = [(lambda: grouped_matmul(x, wq, sizes, w_scale=ws[:, :1], impl=impl), r"need w_scale \(4, 2, 2\), got shape \(4, 1, 2\)"),
             (lambda: grouped_matmul(x, wq, sizes, w_scale=ws[:3], impl=impl), r"got shape \(3, 2, 2\)"),
             (lambda: grouped_matmul(x, wq.astype(jnp.bfloat16), sizes, w_scale=ws, impl=impl), "w_scale is for float8"),
             (lambda: grouped_matmul(x, wq, jnp.array([3, -1, 2, 2]), w_scale=ws, impl=impl), r"got \[3, -1, 2, 2\]"),
             (lambda: grouped_matmul(x, wq, np.array([3, 3, 2, 0]), w_scale=ws, impl=impl), "sum to at most the 6 rows"),
             (lambda: grouped_matmul(x, wq, sizes.astype(jnp.float32), w_scale=ws, impl=impl), "group_sizes must be integers"),
             (lambda: grouped_matmul(x.astype(jnp.int32), wq, sizes, w_scale=ws, impl=impl), "x must be .* got int32"),
             (lambda: w8a16_matmul(x.astype(jnp.int32), wq[0], ws[0], impl=impl), "x must be .* got int32"),
             (lambda: w8a16_matmul(x, wq[0].astype(jnp.bfloat16), ws[0], impl=impl), "must be float8_e4m3fn, got bfloat16"),
             (lambda: w8a8_matmul(x, wq[0], ws[0].astype(jnp.bfloat16), impl=impl), "scales must be float32")]
    for call, needle in cases:
        with pytest.raises(ValueError, match=needle):
            call()
    # traced sizes are the caller's contract (not checked); valid ones still run
    y = jax.jit(lambda g: grouped_matmul(x, wq, g, w_scale=ws, impl=impl))(sizes)
    assert y.shape == (6, 130) and bool(jnp.isfinite(y).all())


@pytest.mark.parametrize("mode", ["bf16", "w8a16", "w8a8"])
@pytest.mark.parametrize("m", [32768, 512])
def test_grouped_mosaic_gpu_kernel_lowers_for_the_gpu(mode, m):
    """Lowered for CUDA on the CPU host (``jax.export``) at SPEC §11's grouped shapes: Mosaic's
    layout inference and TMA limits are checked here (in-kernel row offsets, 16-byte strides and
    at most 256 elements per copied dimension each failed here before this kernel's layout)."""
    from jax import export

    from kernels_pallas.grouped_gemm_mgpu import gmm_mgpu
    e, n, k = 256, 4096, 7168
    xdt, wdt = {"bf16": (jnp.bfloat16,) * 2, "w8a16": (jnp.bfloat16, F8), "w8a8": (F8, F8)}[mode]
    args = [jax.ShapeDtypeStruct((m, k), xdt), jax.ShapeDtypeStruct((e, n, k), wdt),
            jax.ShapeDtypeStruct((e,), jnp.int32)]
    ws = jax.ShapeDtypeStruct((e, n // 128, k // 128), jnp.float32)
    if mode == "w8a8":
        args += [jax.ShapeDtypeStruct((m, k // 128), jnp.float32), ws]
        fn = lambda x, w, g, xs, ws: gmm_mgpu(x, w, g, x_scale=xs, w_scale=ws)  # noqa: E731
    elif mode == "w8a16":
        args += [ws]
        fn = lambda x, w, g, ws: gmm_mgpu(x, w, g, w_scale=ws)  # noqa: E731
    else:
        fn = gmm_mgpu
    exp = export.export(jax.jit(fn), platforms=["cuda"])(*args)
    assert "mosaic_gpu" in exp.mlir_module() and exp.out_avals[0].shape == (m, n)


# MLA decode ------------------------------------------------------------------------------------


def np_mla(ql, qp, cache, lens, scale, l):
    ql, qp, cache = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (ql, qp, cache))
    o = np.zeros(ql.shape)
    for b, n in enumerate(np.asarray(lens)):
        if n == 0:
            continue
        c, kpe = cache[b, :n, :l], cache[b, :n, l:]
        s = (ql[b] @ c.T + qp[b] @ kpe.T) * scale
        p = np.exp(s - s.max(axis=1, keepdims=True))
        o[b] = (p / p.sum(axis=1, keepdims=True)) @ c
    return o


def _mla_inputs(rng, b, h, l, r, t, dtype, lens):
    ql = jnp.asarray(rng.standard_normal((b, h, l)), dtype)
    qp = jnp.asarray(rng.standard_normal((b, h, r)), dtype)
    cache = jnp.asarray(rng.standard_normal((b, t, l + r)), dtype)
    return ql, qp, cache, jnp.asarray(lens, jnp.int32)


def test_mla_ref_matches_numpy():
    rng = np.random.default_rng(30)
    ql, qp, cache, lens = _mla_inputs(rng, 3, 4, 32, 16, 21, jnp.float32, [21, 0, 7])
    o = mla_decode_ref(ql, qp, cache, lens, scale=0.2, kv_lora_rank=32)
    assert o.shape == (3, 4, 32) and o.dtype == jnp.float32
    assert rel_err(o, np_mla(ql, qp, cache, lens, 0.2, 32)) < F32_TOL
    assert np.all(np.asarray(o[1]) == 0.0)  # empty sequence


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_mla_kernel_matches_ref(impl, dtype):
    """Ragged lengths (full, empty, one token, mid-block), T = 70 not a multiple of the block."""
    rng = np.random.default_rng(31)
    ql, qp, cache, lens = _mla_inputs(rng, 4, 16, 128, 64, 70, dtype, [70, 0, 1, 33])
    cache = cache.at[3, 5:9].multiply(1e3)  # a few large scores: softmax must not overflow
    o = mla_decode(ql, qp, cache, lens, scale=0.05, kv_lora_rank=128, impl=impl)
    assert o.shape == (4, 16, 128) and o.dtype == jnp.float32
    want = mla_decode_ref(ql, qp, cache, lens, scale=0.05, kv_lora_rank=128)
    if dtype == jnp.float32:
        # row 3's large scores (~700) carry float32 rounding of ~4e-5 into their exponentials,
        # whichever order a backend sums in (1.05e-5 on one CPU here, under 1e-5 on another)
        assert rel_err(o, want) < 5 * F32_TOL
    else:
        _assert_close(o, want, dtype)
    assert np.all(np.asarray(o[1]) == 0.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_mla_tpu_kernel_blocks(dtype):
    """The TPU kernel over several 128-token blocks of the transposed cache: T = 300 (a partial
    last block), lengths on a block boundary, mid-block, one token and empty; every entry past a
    row's length NaN (never read into the result)."""
    from kernels_pallas.mla_decode import mla_decode_tpu
    rng = np.random.default_rng(34)
    lens = [300, 128, 129, 1, 0, 257]
    ql, qp, cache, lens_B = _mla_inputs(rng, 6, 16, 128, 64, 300, dtype, lens)
    past = np.arange(300)[None, :, None] >= np.asarray(lens)[:, None, None]
    poisoned = jnp.where(past, jnp.nan, cache).astype(dtype)
    o = mla_decode_tpu(ql, qp, poisoned, lens_B, scale=0.05, kv_lora_rank=128, interpret=True, block_t=128)
    _assert_close(o, mla_decode_ref(ql, qp, cache, lens_B, scale=0.05, kv_lora_rank=128), dtype)
    assert np.all(np.asarray(o[4]) == 0.0)
    # a length past the cache is the whole cache, as in the reference: the partial last block's
    # padded tail (20 lanes of it here) is not read as tokens
    over = jnp.asarray([301, 300, 305, 129, 0, 257], jnp.int32)
    o = mla_decode_tpu(ql, qp, cache, over, scale=0.05, kv_lora_rank=128, interpret=True, block_t=128)
    _assert_close(o, mla_decode_ref(ql, qp, cache, over, scale=0.05, kv_lora_rank=128), dtype)
    with pytest.raises(ValueError, match="multiple of 128"):
        mla_decode_tpu(ql, qp, cache, lens_B, scale=0.05, kv_lora_rank=128, interpret=True, block_t=96)


@pytest.mark.parametrize("impl", ["ref"] + KERNEL_IMPLS)
def test_mla_layer_of_a_cache_stack(impl):
    """``layer=``: attend over one layer of an [L, B, S, C] cache (the others NaN: never read)."""
    rng = np.random.default_rng(33)
    ql, qp, cache, lens = _mla_inputs(rng, 3, 8, 128, 64, 40, jnp.float32, [40, 0, 17])
    stack = jnp.stack([jnp.full_like(cache, jnp.nan), cache, jnp.full_like(cache, jnp.nan)])
    o = jax.jit(lambda a, b, c, d, l: mla_decode(a, b, c, d, scale=0.05, kv_lora_rank=128, impl=impl,
                                                 layer=l))(ql, qp, stack, lens, jnp.int32(1))
    _assert_close(o, mla_decode_ref(ql, qp, cache, lens, scale=0.05, kv_lora_rank=128), jnp.float32)
    with pytest.raises(ValueError, match="with layer="):
        mla_decode(ql, qp, cache, lens, scale=0.05, kv_lora_rank=128, impl=impl, layer=0)


@pytest.mark.parametrize("impl", ["ref"] + KERNEL_IMPLS)
@pytest.mark.parametrize("splits", [None, 3])
def test_mla_length_offset_takes_query_positions(impl, splits):
    """``length_offset=1`` with query positions (what the model's decode passes): lengths
    ``min(pos + 1, S)``; a position at or past the cache's end sees the whole cache, -1 sees
    nothing. The GPU kernel (split-T or not) adds and clamps them itself."""
    from kernels_pallas.mla_decode import mla_decode_gpu
    rng = np.random.default_rng(34)
    ql, qp, cache, _ = _mla_inputs(rng, 4, 12, 128, 64, 70, jnp.float32, [70, 0, 1, 33])
    pos = jnp.asarray([69, -1, 100, 32], jnp.int32)
    want = mla_decode_ref(ql, qp, cache, jnp.asarray([70, 0, 70, 33], jnp.int32), scale=0.05, kv_lora_rank=128)
    if splits is None:
        o = mla_decode(ql, qp, cache, pos, scale=0.05, kv_lora_rank=128, impl=impl, length_offset=1)
    elif impl in ("interpret_gpu", "pallas_gpu"):
        o = mla_decode_gpu(ql, qp, cache, pos, scale=0.05, kv_lora_rank=128, interpret=impl == "interpret_gpu",
                           block_h=8, block_t=16, splits=splits, length_offset=1)
    else:
        pytest.skip("split-T is the GPU kernel's")
    _assert_close(o, want, jnp.float32)
    assert np.all(np.asarray(o[1]) == 0.0)


@pytest.mark.parametrize("interpret", COMPILED)
@pytest.mark.parametrize("splits,block_h", [(3, 16), (5, 8)])
def test_mla_gpu_split_t_matches_ref(interpret, splits, block_h):
    """Flash-decoding variant: chunks of the cache per program, merged after; ragged lengths that
    leave whole chunks empty, an empty sequence, heads not a multiple of the head block (12 / 8)."""
    from kernels_pallas.mla_decode import mla_decode_gpu
    rng = np.random.default_rng(32)
    ql, qp, cache, lens = _mla_inputs(rng, 4, 12, 128, 64, 70, jnp.float32, [70, 0, 1, 33])
    cache = cache.at[0, 60:64].multiply(1e3)  # large scores in one chunk only
    o = mla_decode_gpu(ql, qp, cache, lens, scale=0.05, kv_lora_rank=128, interpret=interpret,
                       block_h=block_h, block_t=16, splits=splits)
    _assert_close(o, mla_decode_ref(ql, qp, cache, lens, scale=0.05, kv_lora_rank=128), jnp.float32)
    assert np.all(np.asarray(o[1]) == 0.0)


def test_mla_gpu_default_splits():
    """Split-T only when batch x head blocks leaves most SMs idle (decode at batch 1 or 16)."""
    from kernels_pallas.mla_decode import default_splits
    assert default_splits(64, 2, 4096) == 1  # 128 programs on 132 SMs: no split
    assert default_splits(1, 2, 4096) == 16  # batch 1: 2 programs -> 32
    assert default_splits(16, 2, 4096) == 9  # 32 programs -> 288
    assert default_splits(1, 2, 300) == 1  # chunks stay >= 256 tokens


@pytest.mark.parametrize("interpret", COMPILED)
def test_mla_gpu_batch1_splits_by_default(interpret):
    """Batch 1 of a layer stack (the decode path at batch 1) takes the split-T path by default and
    matches the reference, with the length ending mid-chunk and the other layer NaN."""
    from kernels_pallas.mla_decode import mla_decode_gpu
    rng = np.random.default_rng(34)
    ql, qp, cache, lens = _mla_inputs(rng, 1, 16, 128, 64, 530, jnp.float32, [301])
    stack = jnp.stack([cache, jnp.full_like(cache, jnp.nan)])
    o = mla_decode_gpu(ql, qp, stack, lens, scale=0.05, kv_lora_rank=128, interpret=interpret, layer=0)
    _assert_close(o, mla_decode_ref(ql, qp, cache, lens, scale=0.05, kv_lora_rank=128), jnp.float32)


# -------------------------------------------------------------------------------------------------
# MLA's absorbed products through kv_b_proj's FP8 weight
# -------------------------------------------------------------------------------------------------


def _kvb_stack(rng, layers, h, nope, v_dim, lat):
    """``layers`` kv_b weights ``[H (N + A), L]`` e4m3 with block scales: layer 1 holds huge and
    tiny blocks and an all-zero block, the others NaN scales (a kernel that reads them fails)."""
    rows = h * (nope + v_dim)
    wq, ws = zip(*(make_fp8_weight(rng, rows, lat, zero_blocks=[(1, 0)]) for _ in range(layers)))
    ws = jnp.stack(ws)
    ws = ws.at[1, 0].multiply(1e4).at[1, -1].multiply(1e-4)
    ws = ws.at[0].set(jnp.nan).at[2:].set(jnp.nan)
    return jnp.stack(wq), ws


def np_absorb(x, wq, ws, part, nope):
    """float64 per-head products (the module doc of kernels_pallas.mla_absorb)."""
    w = np_dequant(wq, ws)
    h = x.shape[-2]
    w = w.reshape(h, -1, w.shape[-1])
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    if part == "k":
        return np.einsum("...hn,hnl->...hl", x, w[:, :nope])
    return np.einsum("...hl,hal->...ha", x, w[:, nope:])


@pytest.mark.parametrize("part", ["k", "v"])
def test_mla_absorb_ref_matches_numpy(part):
    from kernels_pallas.mla_absorb import mla_absorb_ref
    rng = np.random.default_rng(40)
    wq, ws = _kvb_stack(rng, 3, 3, 128, 128, 256)
    x = jnp.asarray(rng.standard_normal((2, 3, 3, 128 if part == "k" else 256)), jnp.float32)
    y = mla_absorb_ref(x, wq, ws, part=part, nope=128, layer=1)
    assert y.shape == (2, 3, 3, 256 if part == "k" else 128)
    assert rel_err(y, np_absorb(x, wq[1], ws[1], part, 128)) < F32_TOL


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("part", ["k", "v"])
@pytest.mark.parametrize("m,dtype", [(1, jnp.bfloat16), (5, jnp.float32), (70, jnp.bfloat16)],
                         ids=["1_bf16", "5_f32", "70_bf16"])
def test_mla_absorb_kernels_match_ref(impl, part, m, dtype):
    """The GPU and TPU kernels against the float64 product: rows not a multiple of the row tile
    (GPU 16 / 64, TPU 16), one layer of a stack read in place (the others NaN), huge, tiny and
    all-zero scale blocks, N = A = 128 with two 128-blocks of the latent, 3 heads."""
    from kernels_pallas import mla_absorb
    rng = np.random.default_rng(41 + m)
    wq, ws = _kvb_stack(rng, 3, 3, 128, 128, 256)
    x = jnp.asarray(rng.standard_normal((m, 1, 3, 128 if part == "k" else 256)), dtype)
    fn = jax.jit(lambda x, wq, ws, l: mla_absorb(x, wq, ws, part=part, nope=128, layer=l, out_dtype=jnp.float32,
                                                 impl=impl))
    assert f"mla_absorb_{part}_" in str(jax.make_jaxpr(fn)(x, wq, ws, jnp.int32(1)))   # the kernel, not the ref
    y = fn(x, wq, ws, jnp.int32(1))
    assert y.shape == (m, 1, 3, 256 if part == "k" else 128)
    _assert_close(y, np_absorb(x, wq[1], ws[1], part, 128), dtype)


@pytest.mark.parametrize("part", ["k", "v"])
@pytest.mark.parametrize("h,m,dtype", [(32, 5, jnp.float32), (24, 70, jnp.bfloat16)], ids=["32h_f32", "24h_bf16"])
def test_mla_absorb_tpu_heads_per_step(part, h, m, dtype):
    """The TPU kernel's several heads per grid step (16 of 32 heads, or 8 of 24: the largest
    divisor of H up to 16), N = A = 128, a layer of a stack in place (the others NaN), huge,
    tiny and all-zero scale blocks, against float64."""
    from kernels_pallas.mla_absorb import mla_absorb_tpu
    rng = np.random.default_rng(44 + h)
    wq, ws = _kvb_stack(rng, 3, h, 128, 128, 256)
    x = jnp.asarray(rng.standard_normal((m, 1, h, 128 if part == "k" else 256)), dtype)
    fn = jax.jit(lambda x, wq, ws, l: mla_absorb_tpu(x, wq, ws, part=part, nope=128, layer=l,
                                                     out_dtype=jnp.float32, interpret=True))
    grids = [e.params["grid_mapping"].grid for e in jax.make_jaxpr(fn)(x, wq, ws, jnp.int32(1)).jaxpr.eqns[0]
             .params["jaxpr"].eqns if e.primitive.name == "pallas_call"]
    assert grids == [(1, h // math.gcd(h, 16))], grids
    y = fn(x, wq, ws, jnp.int32(1))
    assert y.shape == (m, 1, h, 256 if part == "k" else 128)
    _assert_close(y, np_absorb(x, wq[1], ws[1], part, 128), dtype)


@pytest.mark.parametrize("impl", [*KERNEL_IMPLS, "ref"])
def test_mla_absorb_k_takes_the_whole_query(impl):
    """``part="k"`` given the query as projected, ``[..., H, N + R]``: the product of its first N
    columns per head (the GPU kernel reads them in place); the rope columns (NaN here) are not
    touched. 5 rows (a partial row tile), 3 heads, one layer of a stack."""
    from kernels_pallas import mla_absorb
    rng = np.random.default_rng(43)
    wq, ws = _kvb_stack(rng, 3, 3, 128, 128, 256)
    q = rng.standard_normal((5, 1, 3, 128 + 64)).astype(np.float32)
    q[..., 128:] = np.nan
    y = jax.jit(lambda x, wq, ws, l: mla_absorb(x, wq, ws, part="k", nope=128, layer=l, out_dtype=jnp.float32,
                                                impl=impl))(jnp.asarray(q), wq, ws, jnp.int32(1))
    assert y.shape == (5, 1, 3, 256)
    _assert_close(y, np_absorb(q[..., :128], wq[1], ws[1], "k", 128), jnp.float32)


def test_mla_absorb_dispatch_and_errors():
    """``impl`` picks a kernel only where it applies (FP8, 128-multiple widths); other shapes and
    unquantized weights take the reference; bad shapes are one-line errors."""
    from kernels_pallas import mla_absorb, mla_absorb_ref
    rng = np.random.default_rng(42)
    x = jnp.asarray(rng.standard_normal((2, 1, 4, 16)), jnp.float32)
    wq, ws = make_fp8_weight(rng, 4 * (16 + 32), 64)
    for impl in ("interpret_gpu", "interpret_tpu", "ref"):  # N = 16: no kernel, no error
        got = mla_absorb(x, wq, ws, part="k", nope=16, impl=impl)
        assert np.array_equal(np.asarray(got), np.asarray(mla_absorb_ref(x, wq, ws, part="k", nope=16)))
    dense = jnp.asarray(rng.standard_normal((4 * 48, 64)), jnp.float32)
    assert rel_err(mla_absorb(x, dense, None, part="k", nope=16, impl="interpret_gpu"),
                   np.einsum("bthn,hnl->bthl", np.asarray(x, np.float64),
                             np.asarray(dense, np.float64).reshape(4, 48, 64)[:, :16])) < F32_TOL
    with pytest.raises(ValueError, match="part must be"):
        mla_absorb(x, wq, ws, part="q", nope=16)
    with pytest.raises(ValueError, match=r"takes x \[\.\.\., 4, 64\]"):
        mla_absorb(x, wq, ws, part="v", nope=16)
    with pytest.raises(ValueError, match=r"takes q_nope \[\.\.\., 4, 20\]"):
        mla_absorb(x, wq, ws, part="k", nope=20)
    with pytest.raises(ValueError, match="are not 4 heads"):
        mla_absorb(x, wq, ws, part="k", nope=60)
    with pytest.raises(ValueError, match=r"layers, R, L\]"):
        mla_absorb(x, wq, ws, part="k", nope=16, layer=0)


def np_cached_attention(qn, qp, kv, kp, pos, scale):
    """float64: each query over the keys up to its position (MLA: one rope key per token)."""
    qn, qp, kv, kp = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (qn, qp, kv, kp))
    kn, v = kv[..., :qn.shape[-1]], kv[..., qn.shape[-1]:]
    s = (np.einsum("bthn,bshn->bths", qn, kn) + np.einsum("bthr,bsr->bths", qp, kp)) * scale
    visible = np.arange(kn.shape[1])[None, None, None, :] <= np.asarray(pos)[:, :, None, None]
    s = np.where(visible, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bths,bsha->btha", p / p.sum(-1, keepdims=True), v)


def _cached_inputs(rng, dtype, b=2, t=21, h=3, s=70):
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)  # noqa: E731
    # row 0: a chunk at positions 40..60 (the cache ends mid-block at 70); row 1 right-padded
    # (positions 3..17, then pads at position 2: they see 3 keys)
    pos = jnp.asarray([np.arange(t) + 40, np.r_[np.arange(15) + 3, np.full(t - 15, 2)]], jnp.int32)
    return f(b, t, h, 32), f(b, t, h, 16), f(b, s, h, 32 + 64), f(b, s, 16), pos


@pytest.mark.parametrize("impl", ["ref"] + KERNEL_IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_cached_attention_matches_numpy(impl, dtype):
    """A prefill chunk over the cache by position: T = 21 queries (not a multiple of the query
    block), S = 70 keys (not a multiple of the key block), a right-padded row, large scores."""
    from kernels_pallas import cached_attention
    rng = np.random.default_rng(50)
    qn, qp, kv, kp, pos = _cached_inputs(rng, dtype)
    kv = kv.at[0, 44:46, :, :32].multiply(30.0)   # a few large scores: the online softmax must rescale
    o = jax.jit(lambda *a: cached_attention(*a, scale=0.1, impl=impl))(qn, qp, kv, kp, pos)
    assert o.shape == (2, 21, 3, 64) and o.dtype == dtype
    _assert_close(o, np_cached_attention(qn, qp, kv, kp, pos, 0.1), dtype)


def test_cached_attention_kernel_blocks_and_errors():
    """Smaller blocks than the defaults (several query and key blocks per row), and bad shapes
    as one-line errors."""
    from kernels_pallas import cached_attention
    from kernels_pallas.flash_prefill import cached_attention_gpu, cached_attention_tpu
    rng = np.random.default_rng(51)
    qn, qp, kv, kp, pos = _cached_inputs(rng, jnp.float32)
    o = cached_attention_gpu(qn, qp, kv, kp, pos, scale=0.1, interpret=True, block_q=16, block_k=16)
    _assert_close(o, np_cached_attention(qn, qp, kv, kp, pos, 0.1), jnp.float32)
    # the TPU kernel: 2 query blocks of 16, 3 key blocks of 128 over a 300-token cache; row 0's
    # first query block ends at position 256, the first key of the third block (an off-by-one in
    # the skip or the fetch clamp loses it); row 1 never reaches the third block
    qn, qp, kv, kp, _ = _cached_inputs(rng, jnp.float32, s=300)
    pos = jnp.asarray([np.arange(21) + 241, np.r_[np.arange(15) + 150, np.full(6, -1)]], jnp.int32)
    o = cached_attention_tpu(qn, qp, kv, kp, pos, scale=0.1, interpret=True, block_q=16, block_k=128)
    with np.errstate(invalid="ignore"):   # row 1's padded queries: NaN in float64, compared below
        want = np_cached_attention(qn, qp, kv, kp, pos, 0.1)
    _assert_close(o[1, :15], want[1, :15], jnp.float32)
    _assert_close(o[0], want[0], jnp.float32)
    assert not np.asarray(o[1, 15:]).any()   # queries that see no key: zeros, not NaN
    with pytest.raises(ValueError, match="cached_attention: expected q_nope"):
        cached_attention(qn, qp, kv, kp[:, :, None], pos, scale=0.1)
    with pytest.raises(ValueError, match=r"expected q_pos \[2, 21\]"):
        cached_attention(qn, qp, kv, kp, pos[:, :3], scale=0.1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_cached_attention_tpu_backward_kernels(dtype):
    """The TPU kernel's own backward (``kernels_pallas.attention_bwd``, two kernels, in the TPU
    interpreter) against its reference with the same signature, the blocked jnp backward (which
    equals ``jax.grad`` of the plain form: the tests below). The shapes of the forward's test
    above: 2 query blocks of 16 and 3 key blocks of 128 over a 300-token cache; row 0's first
    query block ends on the first key of the third block (an off-by-one in a skip or a clamped
    fetch loses it), row 1 never reaches the third block and its padded queries see no key.
    Also the forward's log-sum-exp, against float64 numpy."""
    from kernels_pallas.attention_bwd import cached_attention_bwd_tpu
    from kernels_pallas.blocked_attention import cached_attention_bwd_ref
    from kernels_pallas.flash_prefill import cached_attention_tpu
    rng = np.random.default_rng(54)
    qn, qp, kv, kp, _ = _cached_inputs(rng, dtype, s=300)
    kv = kv.at[0, 250:253, :, :32].multiply(8.0)   # large scores in the block both row-0 query blocks share
    pos = jnp.asarray([np.arange(21) + 241, np.r_[np.arange(15) + 150, np.full(6, -1)]], jnp.int32)
    o, lse = cached_attention_tpu(qn, qp, kv, kp, pos, scale=0.1, interpret=True, block_q=16, block_k=128,
                                  with_lse=True)
    q64 = [np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (qn, qp, kv, kp)]
    sc = (np.einsum("bthn,bshn->bths", q64[0], q64[2][..., :32]) + np.einsum("bthr,bsr->bths", q64[1], q64[3])) * 0.1
    sc = np.where(np.arange(300)[None, None, None, :] <= np.asarray(pos)[:, :, None, None], sc, -np.inf)
    with np.errstate(divide="ignore"):
        want_lse = np.log(np.exp(sc - sc.max(-1, keepdims=True)).sum(-1)) + sc.max(-1)
    assert lse.shape == (2, 21, 3) and lse.dtype == jnp.float32
    assert np.isinf(np.asarray(lse)[1, 15:]).all() and np.isfinite(np.asarray(lse)[:, :15]).all()
    np.testing.assert_allclose(np.asarray(lse)[0], want_lse[0], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(lse)[1, :15], want_lse[1, :15], rtol=1e-5)

    g = jnp.asarray(rng.standard_normal(o.shape), dtype).at[1, 15:].set(0)
    got = cached_attention_bwd_tpu(qn, qp, kv, kp, pos, o, lse, g, scale=0.1, interpret=True, block_q=16,
                                   block_k=128)
    want = cached_attention_bwd_ref(qn, qp, kv, kp, pos, o, lse, g, scale=0.1, block_k=64)
    for x, w, arg in zip(got, want, (qn, qp, kv, kp)):
        assert x.shape == arg.shape and x.dtype == arg.dtype
        _assert_close(x, np.asarray(jnp.asarray(w, jnp.float32), np.float64), dtype)
    # keys after the last one any query sees (row 1: position 164) get exactly zero gradient
    assert not np.asarray(got[2][1, 165:]).any() and not np.asarray(got[3][1, 165:]).any()
    with pytest.raises(ValueError, match=r"expected o and g \[2, 21, 3, 64\]"):
        cached_attention_bwd_tpu(qn, qp, kv, kp, pos, o, lse, g[:, :3], scale=0.1, interpret=True)


@pytest.mark.parametrize("impl", ["ref"] + KERNEL_IMPLS)
def test_cached_attention_grad_is_the_references(impl):
    """``cached_attention``'s gradient, as training with ``prefill_attention="flash"`` takes it,
    equals ``jax.grad`` of the plain reference: through the TPU kernel's own backward kernels,
    the GPU kernel's blocked jnp backward, and "ref" (the blocked form itself)."""
    from kernels_pallas import cached_attention, cached_attention_ref
    qn, qp, kv, kp, pos = _cached_inputs(np.random.default_rng(52), jnp.float32)
    pos = jnp.maximum(pos, 0)

    def loss(fn, **kw):
        return lambda *a: jnp.sum(jnp.sin(fn(*a, pos, scale=0.1, **kw)))

    want = jax.grad(loss(cached_attention_ref), argnums=(0, 1, 2, 3))(qn, qp, kv, kp)
    got = jax.grad(loss(cached_attention, impl=impl), argnums=(0, 1, 2, 3))(qn, qp, kv, kp)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_blocked_attention_matches_the_reference(dtype):
    """``cached_attention_blocked`` in 16-key blocks over 70 keys (5 blocks, the last partial):
    a chunk at positions 40..60 and a right-padded row that sees 3 keys, large scores in a
    middle block (the online softmax rescales). Forward against float64 numpy; its custom
    backward against ``jax.grad`` of the plain reference, for every input."""
    from kernels_pallas import cached_attention_blocked, cached_attention_ref
    rng = np.random.default_rng(53)
    qn, qp, kv, kp, pos = _cached_inputs(rng, dtype)
    kv = kv.at[0, 44:46, :, :32].multiply(30.0)
    blocked = functools.partial(cached_attention_blocked, scale=0.1, block_k=16)
    o = jax.jit(blocked)(qn, qp, kv, kp, pos)
    assert o.shape == (2, 21, 3, 64) and o.dtype == dtype
    _assert_close(o, np_cached_attention(qn, qp, kv, kp, pos, 0.1), dtype)
    if dtype != jnp.float32:
        return
    w = jnp.asarray(rng.standard_normal(o.shape), jnp.float32)   # a cotangent with no structure
    grads = {}
    for name, fn in (("blocked", blocked), ("ref", functools.partial(cached_attention_ref, scale=0.1))):
        grads[name] = jax.jit(jax.grad(lambda *a, fn=fn: jnp.sum(w * fn(*a, pos)), argnums=(0, 1, 2, 3)))(
            qn, qp, kv, kp)
    for g, want, name in zip(grads["blocked"], grads["ref"], ("q_nope", "q_pe", "kv", "k_pe")):
        # atol against the gradient's scale: where the large scores' terms cancel, float32 sums
        # in another order differ by ~1e-5 of the largest entries
        want = np.asarray(want)
        np.testing.assert_allclose(np.asarray(g), want, rtol=1e-4, atol=1e-5 * np.abs(want).max(), err_msg=name)
    # keys no query reaches (row 1 sees 18 of 70) get exactly zero gradient
    assert not np.asarray(grads["blocked"][2][1, 18:]).any()
    with pytest.raises(ValueError, match="block_k must be >= 1"):
        cached_attention_blocked(qn, qp, kv, kp, pos, scale=0.1, block_k=0)


def test_blocked_attention_backward_holds_a_block_of_scores():
    """What the blocked form is for: compiled, the gradient of a 1024-token causal attention
    (4 heads) needs a fraction of the plain reference's temporaries, which hold several
    ``[B, T, H, T]`` float32 arrays (16 MiB each here); the blocked form holds 128 keys' worth."""
    from kernels_pallas import cached_attention_blocked, cached_attention_ref
    b, t, h = 1, 1024, 4
    S = jax.ShapeDtypeStruct
    args = (S((b, t, h, 32), jnp.float32), S((b, t, h, 16), jnp.float32), S((b, t, h, 64), jnp.float32),
            S((b, t, 16), jnp.float32))
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

    def temps(fn):
        grad = jax.grad(lambda *a: jnp.sum(fn(*a, pos, scale=0.1)), argnums=(0, 1, 2, 3))
        return jax.jit(grad).lower(*args).compile().memory_analysis().temp_size_in_bytes

    plain = temps(cached_attention_ref)
    blocked = temps(functools.partial(cached_attention_blocked, block_k=128))
    assert plain > 2 * b * t * h * t * 4, plain   # the reference: more than two [B, T, H, T] float32
    assert blocked < plain / 4, (blocked, plain)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_flash_prefill_matches_ref(impl, dtype):
    """Causal attention for the naive prefill: head sizes 24 (q, k) and 16 (v), T = 21 not a
    multiple of the 8-token blocks, a few large scores."""
    from kernels_pallas import causal_attention, causal_attention_ref
    rng = np.random.default_rng(40)
    q, k = (jnp.asarray(rng.standard_normal((2, 21, 3, 24)), dtype) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((2, 21, 3, 16)), dtype)
    k = k.at[1, 4].multiply(30.0)
    o = causal_attention(q, k, v, scale=0.3, impl=impl, block=8)
    assert o.shape == (2, 21, 3, 16) and o.dtype == dtype
    _assert_close(o, causal_attention_ref(q, k, v, scale=0.3), dtype)
    f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    s = np.einsum("bthk,bshk->bhts", f64(q), f64(k)) * 0.3  # an independent check of the reference
    s = np.where(np.tril(np.ones((21, 21), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    want = np.einsum("bhts,bsha->btha", p / p.sum(-1, keepdims=True), f64(v))
    _assert_close(causal_attention_ref(q, k, v, scale=0.3), want, dtype)
    # MLA-like head sizes past 128 (the default block drops to 64), T = 70 not a multiple of it
    q, k = (jnp.asarray(rng.standard_normal((1, 70, 1, 160)), dtype) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((1, 70, 1, 128)), dtype)
    _assert_close(causal_attention(q, k, v, scale=0.08, impl=impl),
                  causal_attention_ref(q, k, v, scale=0.08), dtype)


# -------------------------------------------------------------------------------------------------
# the kernels lower for the real backends (Pallas → Triton IR / Mosaic TPU IR; no hardware needed)
# -------------------------------------------------------------------------------------------------


def _abstract_mesh(kind, platform):
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType

    dev = AbstractDevice(device_kind=kind, num_cores=1 if platform == "tpu" else 132,
                         platform=platform)
    return AbstractMesh((1,), ("x",), (AxisType.Auto,), abstract_device=dev)


@pytest.mark.parametrize("platform,impl,kind", [("cuda", "pallas_gpu", "NVIDIA H200"),
                                                ("tpu", "pallas_tpu", "TPU v6 lite")],
                         ids=["h200", "tpu_v6e"])
def test_kernels_lower_for_hardware(platform, impl, kind):
    S = jax.ShapeDtypeStruct
    cases = [(4096, 7168, 2048), (64, 2048, 7168), (7, 7168, 576)]  # prefill, decode, kv_a (N=576)

    def dense(x, wq, ws):
        return w8a16_matmul(x, wq, ws, impl=impl), w8a8_matmul(x, wq, ws, impl=impl)

    def grouped(x, w, wq, ws, gs):
        loss = lambda a, b: jnp.sum(grouped_matmul(a, b, gs, impl=impl).astype(jnp.float32))
        return (grouped_matmul(x, wq, gs, w_scale=ws, impl=impl),
                jax.grad(lambda a: jnp.sum(grouped_matmul(a, wq, gs, w_scale=ws, impl=impl)
                                           .astype(jnp.float32)))(x),
                jax.grad(loss, argnums=(0, 1))(x, w))

    def mla(ql, qp, cache, lens):
        return mla_decode(ql, qp, cache, lens, scale=0.1, kv_lora_rank=512, impl=impl)

    with jax.sharding.use_abstract_mesh(_abstract_mesh(kind, platform)):
        b, h, t = 64, 128, 4096  # SPEC §11's decode attention shape
        jax.jit(mla).trace(S((b, h, 512), jnp.bfloat16), S((b, h, 64), jnp.bfloat16),
                           S((b, t, 576), jnp.bfloat16), S((b,), jnp.int32)
                           ).lower(lowering_platforms=(platform,))
        if platform == "cuda":
            from kernels_pallas import causal_attention
            flash = lambda q, k, v: causal_attention(q, k, v, scale=0.1, impl=impl)
            jax.jit(flash).trace(S((1, 4096, h, 192), jnp.bfloat16), S((1, 4096, h, 192), jnp.bfloat16),
                                 S((1, 4096, h, 128), jnp.bfloat16)).lower(lowering_platforms=(platform,))
            from kernels_pallas.mla_decode import mla_decode_gpu
            split = lambda ql, qp, c, lens: mla_decode_gpu(ql, qp, c, lens, scale=0.1, kv_lora_rank=512,
                                                           splits=4)
            stacked = lambda ql, qp, c, lens, l: mla_decode(ql, qp, c, lens, scale=0.1, kv_lora_rank=512,
                                                            impl=impl, layer=l)
            for bb in (b, 1):  # batch 1 takes split-T by default
                jax.jit(stacked).trace(S((bb, h, 512), jnp.bfloat16), S((bb, h, 64), jnp.bfloat16),
                                       S((3, bb, t, 576), jnp.bfloat16), S((bb,), jnp.int32),
                                       S((), jnp.int32)).lower(lowering_platforms=(platform,))
            jax.jit(split).trace(S((b, h, 512), jnp.bfloat16), S((b, h, 64), jnp.bfloat16),
                                 S((b, t, 576), jnp.bfloat16), S((b,), jnp.int32)
                                 ).lower(lowering_platforms=(platform,))
        from kernels_pallas import mla_absorb
        for bb, part in ((1, "k"), (64, "v")):  # MLA's absorbed products, kv_b_proj read in place
            absorb = lambda x, wq, ws, l, part=part: mla_absorb(x, wq, ws, part=part, nope=128, layer=l,
                                                                impl=impl)
            jax.jit(absorb).trace(S((bb, 1, h, 128 if part == "k" else 512), jnp.bfloat16),
                                  S((3, h * 256, 512), F8), S((3, h * 2, 4), jnp.float32),
                                  S((), jnp.int32)).lower(lowering_platforms=(platform,))
        for m, k, n in cases:
            args = (S((m, k), jnp.bfloat16), S((n, k), F8), S((-(-n // 128), -(-k // 128)), jnp.float32))
            jax.jit(dense).trace(*args).lower(lowering_platforms=(platform,))
            if platform == "cuda":  # the prescaled W8A16 variant
                pre = lambda x, wq, ws: scaled_matmul_gpu(x, None, wq, ws, out_dtype=jnp.bfloat16,
                                                          config=GpuConfig(64, 128, 2, 4, 4, prescale=True))
                jax.jit(pre).trace(*args).lower(lowering_platforms=(platform,))
            stacked = lambda x, wq, ws, l: w8a16_matmul(x, wq, ws, impl=impl, layer=l)
            jax.jit(stacked).trace(args[0], S((3, n, k), F8), S((3, *args[2].shape), jnp.float32),
                                   S((), jnp.int32)).lower(lowering_platforms=(platform,))
        for m, e, n, k in [(512, 256, 2048, 7168), (300, 8, 576, 200)]:
            args = (S((m, k), jnp.bfloat16), S((e, n, k), jnp.bfloat16), S((e, n, k), F8),
                    S((e, -(-n // 128), -(-k // 128)), jnp.float32), S((e,), jnp.int32))
            jax.jit(grouped).trace(*args).lower(lowering_platforms=(platform,))
            if platform == "cuda":  # the prescaled FP8 variant, both orientations
                for w_co in (False, True):
                    pre = lambda x, wq, ws, gs, w_co=w_co: gmm_gpu(
                        x, wq, gs, w_scale=ws, w_co=w_co, out_dtype=jnp.bfloat16,
                        config=GpuGroupedConfig(bm=64, bn=128, bk=64, prescale=True))
                    jax.jit(pre).trace(S((m, n if w_co else k), jnp.bfloat16), *args[2:]
                                       ).lower(lowering_platforms=(platform,))
                split = lambda x, wq, ws, gs: gmm_gpu(x, wq, gs, w_scale=ws, out_dtype=jnp.bfloat16,
                                                      config=GpuGroupedConfig(bm=16, bn=64, bk=128, splits=4))
                jax.jit(split).trace(S((m, k), jnp.bfloat16), *args[2:]).lower(lowering_platforms=(platform,))
            # all layers' experts read in place at an offset (Precision.weights_in_place)
            in_place = lambda x, wq, ws, gs, off: grouped_matmul(x, wq, gs, w_scale=ws, impl=impl,
                                                                 expert_offset=off)
            jax.jit(in_place).trace(S((m, k), jnp.bfloat16), S((3 * e, n, k), F8),
                                    S((3 * e, -(-n // 128), -(-k // 128)), jnp.float32), S((e,), jnp.int32),
                                    S((), jnp.int32)).lower(lowering_platforms=(platform,))


@pytest.mark.parametrize("seed", range(6))
def test_expert_of_rows_is_searchsorted(seed):
    from kernels_pallas.grouped_gemm import _expert_of_rows
    rng = np.random.default_rng(seed)
    E = int(rng.integers(1, 20))
    M = int(rng.integers(1, 4 * E + 1))
    sizes = rng.multinomial(int(rng.integers(0, M + 1)), np.ones(E) / E).astype(np.int32)
    sizes[rng.random(E) < 0.3] = 0                    # empty groups, also first and last
    want = np.searchsorted(np.cumsum(sizes), np.arange(M), side="right")  # E for rows past the sum
    got = np.asarray(jax.jit(_expert_of_rows, static_argnums=1)(jnp.asarray(sizes), M))
    np.testing.assert_array_equal(got, want)


def test_grouped_ref_gather_path_edge_groups():
    """Few-row path: leading/trailing empty experts, all rows in one expert, no rows at all."""
    rng = np.random.default_rng(7)
    E, N, K, M = 6, 5, 7, 9
    x = rng.normal(size=(M, K)).astype(np.float32)
    w = rng.normal(size=(E, N, K)).astype(np.float32)
    for sizes in ([0, 0, 4, 0, 3, 0], [0, 0, 0, 0, 0, 9], [9, 0, 0, 0, 0, 0], [0] * 6, [1, 1, 1, 1, 1, 1]):
        got = np.asarray(grouped_matmul_ref(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes, jnp.int32)))
        np.testing.assert_allclose(got, np_grouped(x, w, sizes), rtol=2e-5, atol=2e-5)
        assert np.all(got[sum(sizes):] == 0.0)


def test_grouped_ref_gather_path_is_capped(monkeypatch):
    """The few-row gather holds ``[M, N, K]`` weights: past ``_GATHER_MAX_ELEMENTS`` the reference
    takes ``ragged_dot`` instead (same numbers), so a large model's decode does not gather GBs."""
    import importlib
    gg = importlib.import_module("kernels_pallas.grouped_gemm")
    rng = np.random.default_rng(8)
    E, N, K, M = 4, 8, 16, 6
    x, w = jnp.asarray(rng.normal(size=(M, K)), jnp.float32), jnp.asarray(rng.normal(size=(E, N, K)), jnp.float32)
    sizes = jnp.asarray([2, 0, 3, 1], jnp.int32)
    call = lambda a, b: grouped_matmul_ref(a, b, sizes)  # noqa: E731
    assert "ragged_dot" not in str(jax.make_jaxpr(call)(x, w))
    small = np.asarray(call(x, w))
    monkeypatch.setattr(gg, "_GATHER_MAX_ELEMENTS", M * N * K - 1)
    jax.clear_caches()   # (make_jaxpr reuses its trace of the same function otherwise)
    assert "ragged_dot" in str(jax.make_jaxpr(call)(x, w))
    np.testing.assert_allclose(np.asarray(call(x, w)), small, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [6, 31, 32, 33, 90])  # around the gather / ragged_dot switch (M <= 4E)
@pytest.mark.parametrize("fp8", [False, True])
def test_grouped_ref_paths_agree_with_numpy(m, fp8):
    from kernels_pallas import grouped_matmul_ref
    from kernels_pallas._common import dequantize_blocks
    rng = np.random.default_rng(m)
    E, N, K = 8, 24, 136
    x = rng.normal(size=(m, K)).astype(np.float32)
    sizes = rng.multinomial(max(m - 3, 0), np.ones(E) / E).astype(np.int32)  # 3 rows past the sum
    sizes[2] = 0
    w = rng.normal(size=(E, N, K)).astype(np.float32)
    scale = None
    if fp8:
        wq = jnp.asarray(w).astype(jnp.float8_e4m3fn)
        scale = jnp.asarray(rng.uniform(0.5, 2, size=(E, 1, 2)).astype(np.float32))
        w_use, w_np = wq, np.asarray(dequantize_blocks(wq, scale))
    else:
        w_use, w_np = jnp.asarray(w), w
    got = np.asarray(grouped_matmul_ref(jnp.asarray(x), w_use, jnp.asarray(sizes), w_scale=scale))
    np.testing.assert_allclose(got, np_grouped(x, w_np, sizes), rtol=2e-5, atol=2e-4)


@pytest.mark.parametrize("impl", ["interpret_gpu", "interpret_tpu"])
@pytest.mark.parametrize("layer", [None, 1])
def test_fp8_gemm_gradient_for_x(impl, layer):
    """The Pallas FP8 GEMMs' backward (a custom_vjp: ``dx = dy @ dequant(W)``, the weights frozen):
    W8A16 equal to differentiating its reference; W8A8 the straight-through gradient on every
    backend, the reference included. Partial 128-blocks, leading batch dims, a layer stack."""
    from kernels_pallas._common import dequantize_blocks
    from deepseek_jax.quant import quantize
    wq, ws = quantize(jax.random.normal(jax.random.PRNGKey(0), (2, 200, 300)) * 0.1)
    W, S = (wq[1], ws[1]) if layer is None else (wq, ws)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 300))
    r = jax.random.normal(jax.random.PRNGKey(2), (3, 5, 200))

    def grad(fn, kernels):
        return np.asarray(jax.grad(lambda x: jnp.sum(fn(x, W, S, impl=kernels, layer=layer) * r))(x))

    ref = grad(w8a16_matmul, "ref")
    np.testing.assert_allclose(grad(w8a16_matmul, impl), ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    ste = np.asarray(jnp.einsum("...n,nk->...k", r, dequantize_blocks(wq[1], ws[1])))
    for kernels in ("ref", impl):
        np.testing.assert_allclose(grad(w8a8_matmul, kernels), ste, rtol=0, atol=1e-6 * np.abs(ste).max())


@pytest.mark.parametrize("layer", [None, 1])
def test_fp8_gemm_split_k_partials_gradient(layer):
    """With few rows the W8A16 GPU kernel splits K and ``sum_splits=False`` returns the unsummed
    partials (``SplitK``) for the next norm kernel to sum: MLA's ``q_a_proj`` and ``o_proj``. A train
    step differentiates through them where those linears carry no LoRA adapter (``--lora-targets
    q_b_proj``, ``--trainable norm`` over FP8 weights), which raised NotImplementedError: partial
    ``s`` is ``x[..., K_s] @ W[:, K_s].T``, so ``dx[..., K_s] = dy_s @ W[:, K_s]``. Checked with a
    consumer that weighs each partial differently, and through the RMSNorm kernel that sums them."""
    from kernels_pallas import SplitK, rms_norm
    from kernels_pallas._common import dequantize_blocks
    from kernels_pallas.fp8_gemm import _k_splits, default_gpu_config
    from deepseek_jax.quant import quantize
    m, n, k = 3, 128, 600
    wq, ws = quantize(jax.random.normal(jax.random.PRNGKey(0), (2, n, k)) * 0.1)
    W, S = (wq[1], ws[1]) if layer is None else (wq, ws)
    x = jax.random.normal(jax.random.PRNGKey(1), (1, m, k))
    per, splits = _k_splits(k, default_gpu_config(m, n, k, "w8a16"))
    assert splits > 1
    step = per * 128
    w = dequantize_blocks(wq[1], ws[1])
    c = jax.random.normal(jax.random.PRNGKey(2), (splits, 1, m, n))

    def by_kernel(x):
        y = w8a16_matmul(x, W, S, impl="interpret_gpu", layer=layer, sum_splits=False)
        assert isinstance(y, SplitK) and y.parts.shape == (splits, 1, m, n)
        return jnp.sum(y.parts * c)

    def by_hand(x):
        return sum(jnp.sum((x[..., s * step:(s + 1) * step] @ w[:, s * step:(s + 1) * step].T) * c[s])
                   for s in range(splits))

    want = np.asarray(jax.grad(by_hand)(x))
    np.testing.assert_allclose(np.asarray(jax.grad(by_kernel)(x)), want, rtol=0, atol=1e-5 * np.abs(want).max())
    # as the model uses them: summed by the RMSNorm kernel, against the references
    g = jax.random.normal(jax.random.PRNGKey(3), (n,))
    r = jax.random.normal(jax.random.PRNGKey(4), (1, m, n))

    def normed(kernels, sum_splits):
        def f(x):
            y = w8a16_matmul(x, W, S, impl=kernels, layer=layer, sum_splits=sum_splits)
            return jnp.sum(rms_norm(y, g, eps=1e-6, impl=kernels) * r)
        return np.asarray(jax.grad(f)(x))

    want = normed("ref", True)
    np.testing.assert_allclose(normed("interpret_gpu", False), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_flash_prefill_gradient_is_the_references():
    """``causal_attention``'s GPU flash kernel (jax's Triton ``mha``) under ``jax.grad``: its
    backward is a Triton kernel that needs its own block sizes, which were unset, so a train step
    with ``Precision(prefill_attention="flash")`` on a GPU failed to trace ("Backward block sizes
    must all be set"). T = 21 and 70 pad to the blocks; MLA-like 160 / 128 head sizes."""
    from kernels_pallas import causal_attention
    rng = np.random.default_rng(41)
    for t, kd, a, block in ((21, 24, 16, 8), (70, 160, 128, None)):
        q, k = (jnp.asarray(rng.standard_normal((2, t, 2, kd)), jnp.float32) for _ in range(2))
        v = jnp.asarray(rng.standard_normal((2, t, 2, a)), jnp.float32)
        c = jnp.asarray(rng.standard_normal((2, t, 2, a)), jnp.float32)
        kw = {} if block is None else {"block": block}

        def grads(impl):
            f = lambda q, k, v: jnp.sum(causal_attention(q, k, v, scale=0.3, impl=impl, **kw) * c)  # noqa: E731
            return jax.grad(f, argnums=(0, 1, 2))(q, k, v)

        for got, want in zip(grads("interpret_gpu"), grads("ref")):
            want = np.asarray(want)
            np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("impl", ["ref"] + KERNEL_IMPLS)
def test_cached_attention_bf16_gradient_where_the_softmax_is_peaked(impl):
    """bfloat16 gradients against float32 ones where one key takes nearly all of a query's
    attention: the backward's ``delta = g · o`` is taken from the forward's float32 output. From
    the output rounded to bfloat16, ``ds = p · (dp - delta)`` cancelled into an 18% error here (0.3%
    now), on every path: the blocked backward ("ref", and the GPU kernel's) and the TPU kernels."""
    from kernels_pallas import cached_attention, cached_attention_ref
    rng = np.random.default_rng(4)
    worst = 0.0
    for _ in range(5):
        qn, qp = rng.standard_normal((1, 1, 2, 32)), rng.standard_normal((1, 1, 2, 8))
        kv, kp = rng.standard_normal((1, 128, 2, 48)) * 6.0, rng.standard_normal((1, 128, 8))
        ct = jnp.asarray(rng.standard_normal((1, 1, 2, 16)), jnp.float32)
        pos = jnp.asarray([[19]], jnp.int32)
        args = [jnp.asarray(x, jnp.bfloat16) for x in (qn, qp, kv, kp)]

        def loss(fn, **kw):
            return lambda *a: jnp.sum(fn(*a, pos, scale=0.3, **kw).astype(jnp.float32) * ct)

        want = jax.grad(loss(cached_attention_ref), argnums=(0, 1, 2, 3))(*[x.astype(jnp.float32) for x in args])
        got = jax.grad(loss(cached_attention, impl=impl), argnums=(0, 1, 2, 3))(*args)
        for g, w in zip(got, want):
            w = np.asarray(w, np.float64)
            worst = max(worst, float(np.linalg.norm(np.asarray(g, np.float64) - w) / np.linalg.norm(w)))
    assert worst < 1e-2, worst
