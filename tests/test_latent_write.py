"""``kernels_pallas.write_latent``: MLA's new cache entries (``kv_a_layernorm``, the rope of
``k_pe``, the write at each row's position) in one GPU kernel, against float64 NumPy and against
its jnp reference, in the Pallas interpreter. The model's decode through it is checked against
HF's logits in ``tests/test_parity.py`` (DeepSeek's head widths), and its launches compiled for an
H200 in ``tests/test_aot_compile.py``."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from kernels_pallas import SplitK, write_latent, write_latent_ref
from kernels_pallas.latent_write import kernel_takes

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

ON_GPU = jax.default_backend() == "gpu"
#: the GPU kernel in the interpreter, and compiled where a GPU is present (benchmarks/gpu_session.sh)
IMPLS = ["interpret_gpu", pytest.param("pallas_gpu", marks=pytest.mark.skipif(
    not ON_GPU, reason="the compiled GPU kernel needs a GPU"))]

LAT, ROPE, S = 32, 16, 12
EPS, MULT = 1e-6, 1.2
INV_FREQ = (1.0 / 10000.0 ** (np.arange(0, ROPE, 2) / ROPE)).astype(np.float32)


def numpy_entries(kv, w, pos):
    """float64: ``[norm(c) | rope(k_pe)]`` per token, the rope over interleaved pairs."""
    kv = np.asarray(kv, np.float64)
    c, k = kv[..., :LAT], kv[..., LAT:]
    c = np.asarray(w, np.float64) * c / np.sqrt(np.mean(c * c, axis=-1, keepdims=True) + EPS)
    ang = np.asarray(pos, np.float64)[..., None] * INV_FREQ.astype(np.float64)
    cos, sin = np.cos(ang) * MULT, np.sin(ang) * MULT
    k0, k1 = k[..., 0::2], k[..., 1::2]
    out = np.empty_like(k)
    out[..., 0::2], out[..., 1::2] = k0 * cos - k1 * sin, k0 * sin + k1 * cos
    return np.concatenate([c, out], axis=-1)


def case(rng, b, t, dtype, layers, splits):
    cache = jnp.asarray(rng.standard_normal((layers or 1, b, S, LAT + ROPE)), dtype)
    cache = cache if layers else cache[0]
    parts = rng.standard_normal((splits or 1, b, t, LAT + ROPE)) * 2.0
    parts[..., 0, :LAT] *= 1e3                                 # a large and a tiny row of latents
    if b > 1:
        parts[..., 1, :, :LAT] *= 1e-3
    kv = SplitK(jnp.asarray(parts, jnp.float32)) if splits else jnp.asarray(parts[0], dtype)
    w = jnp.asarray(rng.uniform(0.5, 1.5, ((layers,) if layers else ()) + (LAT,)), dtype)
    # in range, past the end (dropped), the last slot, and -1 (the last slot, as a NumPy index)
    # (with t = 2, row 1 writes S - 1 and drops S)
    pos = np.array([[3, 4], [S - 1, S], [100, 101]][:b]) if t > 1 else np.array([[3], [S + 4], [S - 1], [-1]][:b])
    return cache, kv, w, jnp.asarray(pos, jnp.int32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("layers,splits", [(None, None), (3, None), (3, 5), (None, 2)],
                         ids=["plain", "stack", "stack_splitk", "splitk"])
@pytest.mark.parametrize("b,t", [(4, 1), (3, 2)], ids=["decode", "verify2"])
@pytest.mark.parametrize("impl", IMPLS)
def test_kernel_matches_numpy_and_reference(impl, dtype, layers, splits, b, t):
    rng = np.random.default_rng(b * 10 + t + (layers or 0) + (splits or 0))
    cache, kv, w, pos = case(rng, b, t, dtype, layers, splits)
    layer = None if layers is None else jnp.int32(1)
    kw = dict(mult=MULT, eps=EPS, dtype=dtype, layer=layer)
    got = jax.jit(lambda c, kv, w, p: write_latent(c, kv, w, p, INV_FREQ, impl=impl, **kw))(cache, kv, w, pos)
    ref = write_latent_ref(cache, kv, w, pos, INV_FREQ, **kw)
    assert got.shape == cache.shape and got.dtype == cache.dtype
    g, r, c0 = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (got, ref, cache))
    if layers:
        g, r, c0 = g[1], r[1], c0[1]
        # other layers untouched
        assert (np.asarray(got[0], np.float32) == np.asarray(cache[0], np.float32)).all()
    # the written slots, as NumPy indexes them; everything else exactly as it was
    kv_rows = np.asarray(jnp.sum(kv.parts, 0).astype(dtype) if splits else kv, np.float64)
    w_row = np.asarray(jnp.asarray(w[1] if layers else w, jnp.float32), np.float64)
    want = numpy_entries(kv_rows, w_row, np.asarray(pos))
    written = np.zeros(c0.shape[:2], bool)
    for i in range(b):
        for j in range(t):
            p = int(pos[i, j])
            if -S <= p < S:
                written[i, p] = True
                tol = 1e-5 if dtype == jnp.float32 else 1e-2
                np.testing.assert_allclose(g[i, p], want[i, j], rtol=tol, atol=tol * np.abs(want[i, j]).max())
    assert (g[~written] == c0[~written]).all() and (r[~written] == c0[~written]).all()
    assert written.sum() < b * t                                 # a position past the end was dropped
    # the kernel against its reference: the same roundings (float32 sums in another order)
    assert np.abs(g - r).max() <= (1e-5 if dtype == jnp.float32 else 2 ** -7) * np.abs(r).max()


def test_kernel_takes_power_of_two_halves_else_reference():
    """L/2 and R/2 must be powers of two for the kernel (DeepSeek-V3: 256 and 32); other widths
    (the 136-wide latent of the test config) take the reference, with the same result."""
    assert kernel_takes(jnp.zeros((1, 4, 576)), jnp.zeros((512,)))
    assert not kernel_takes(jnp.zeros((1, 4, 144)), jnp.zeros((136,)))
    rng = np.random.default_rng(0)
    cache = jnp.asarray(rng.standard_normal((2, S, 136 + 8)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((2, 1, 136 + 8)), jnp.float32)
    w, pos = jnp.ones((136,), jnp.float32), jnp.asarray([[1], [5]], jnp.int32)
    inv = INV_FREQ[:4]
    got = write_latent(cache, kv, w, pos, inv, mult=1.0, eps=EPS, impl="interpret_gpu")
    assert (np.asarray(got) == np.asarray(write_latent_ref(cache, kv, w, pos, inv, mult=1.0, eps=EPS))).all()


@pytest.mark.parametrize("bad,needle", [
    (dict(cache=jnp.zeros((2, S, 48))), "cache"),                     # layer= given, cache unstacked
    (dict(kv=jnp.zeros((2, 1, 40))), "kv width"),
    (dict(pos=jnp.zeros((3, 1), jnp.int32)), "positions"),
    (dict(w=jnp.zeros((LAT,))), "norm weight"),                          # layer= given, weight unstacked
    (dict(inv=np.ones(4, np.float32)), "inv_freq"),
])
def test_bad_inputs_are_one_line_errors(bad, needle):
    args = dict(cache=jnp.zeros((3, 2, S, 48)), kv=jnp.zeros((2, 1, 48)), w=jnp.zeros((3, LAT)),
                pos=jnp.zeros((2, 1), jnp.int32), inv=INV_FREQ)
    args.update(bad)
    for impl in ("interpret_gpu", "ref"):
        with pytest.raises(ValueError, match=needle) as e:
            write_latent(args["cache"], args["kv"], args["w"], args["pos"], args["inv"], mult=1.0, eps=EPS,
                         layer=jnp.int32(0), impl=impl)
        assert "\n" not in str(e.value)


# ---- store_latent: finished entries into the cache (the TPU kernel writes the transposed cache) ----

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("s_len,layers,t", [(384, 3, 1), (384, None, 2), (300, 2, 1), (40, 2, 1)],
                         ids=["blocks_stack", "verify2", "row_block", "short_cache"])
def test_tpu_store_kernel_matches_numpy(dtype, s_len, layers, t):
    """The TPU kernel in the TPU interpreter: S = 384 (three 128-token blocks), 300 (not a multiple
    of 128: whole-row blocks) or 40; positions in each block, the last slot, -1 (the last slot,
    as a NumPy index), and past the end (dropped); a layer of a stack written, the others not."""
    from kernels_pallas.latent_write import tpu_store_block
    assert tpu_store_block(s_len, 48, 4) == (128 if s_len % 128 == 0 else s_len)
    from kernels_pallas import store_latent, store_latent_ref
    rng = np.random.default_rng(s_len + t + (layers or 0))
    b, width = 5, 48
    cache = jnp.asarray(rng.standard_normal(((layers or 1), b, s_len, width)), dtype)
    cache = cache if layers else cache[0]
    new = jnp.asarray(rng.standard_normal((b, t, width)), dtype)
    cols = [[0, 1], [s_len - 1, s_len], [-1, 127 % s_len], [s_len + 5, 2], [129 % s_len, 290 % s_len]]
    pos = jnp.asarray(np.array(cols)[:, :t], jnp.int32)
    layer = None if layers is None else jnp.int32(1)
    got = jax.jit(lambda c, n, p: store_latent(c, n, p, layer=layer, impl="interpret_tpu"))(cache, new, pos)
    want = np.array(cache, np.float32)
    view = want[1] if layers else want
    for i in range(b):
        for j in range(t):
            p = int(pos[i, j])
            if -s_len <= p < s_len:
                view[i, p] = np.asarray(new[i, j], np.float32)
    assert got.shape == cache.shape and got.dtype == cache.dtype
    assert (np.asarray(got, np.float32) == want).all()
    ref = store_latent_ref(cache, new, pos, layer=layer)
    assert (np.asarray(ref, np.float32) == want).all()


@pytest.mark.parametrize("impl", ["interpret_tpu", "ref"])
def test_store_bad_inputs_are_one_line_errors(impl):
    from kernels_pallas import store_latent
    cache = jnp.zeros((2, 2, S, 48))
    for kw, needle in ((dict(new=jnp.zeros((2, 1, 40))), "entries"), (dict(layer=None), "cache")):
        args = dict(new=jnp.zeros((2, 1, 48)), layer=jnp.int32(0))
        args.update(kw)
        with pytest.raises(ValueError, match=needle) as e:
            store_latent(cache, args["new"], jnp.zeros((2, 1), jnp.int32), layer=args["layer"], impl=impl)
        assert "\n" not in str(e.value)


def test_tpu_store_block_sizes():
    """128-token blocks where they divide S (the Generator's caches from 384 tokens on: 384, 512,
    768, ...), whole rows up to 4 MiB otherwise (192, 300), and beyond that XLA's scatter."""
    from kernels_pallas.latent_write import tpu_store_block
    assert tpu_store_block(4096, 576, 2) == 128 and tpu_store_block(163840, 576, 2) == 128
    assert tpu_store_block(192, 576, 2) == 192 and tpu_store_block(16, 576, 2) == 16
    assert tpu_store_block(4100, 576, 2) is None
