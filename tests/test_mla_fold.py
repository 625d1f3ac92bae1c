"""The MLA decode kernel's split-T merge folded into the ``o_lat @ W_UV`` absorb kernel.

At small batches the GPU decode kernel splits the cache into ``S`` chunks and writes partial
softmax states (``kernels_pallas.mla_decode.SplitT``); ``mla_decode(..., merge=False)`` hands them
back unmerged and ``kernels_pallas.mla_absorb(SplitT, part="v")`` merges them in its prologue (GPU;
the TPU kernel and the reference merge in XLA first), instead of 3 XLA launches per layer merging
them and writing ``o_lat`` for the absorb kernel to read back. Checked here:

* the absorb product of a ``SplitT`` (S = 3 and 16, 1 and 5 rows, chunks and rows with no token)
  against that of ``combine_splits(parts).astype(dtype)``, for the GPU and TPU kernels (interpreted)
  and the reference; bad inputs are one-line errors;
* the decode kernel's own unmerged partials through it against the unfused path;
* the model's decode step takes the fold (``deepseek_jax.mla``, GPU kernels interpreted) and
  computes what the reference computes;
* compiled for an H200 (``kernels_pallas.aot``, in a subprocess with the CUDA plugin): decode then
  absorb at batch 1, 128 heads, a 4096-token cache is two Pallas launches and nothing else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from kernels_pallas.mla_absorb import mla_absorb
from kernels_pallas.mla_decode import SplitT, combine_splits, mla_decode, mla_decode_gpu, mla_decode_ref

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGINS = os.environ.get("DEEPSEEK_JAX_GPU_AOT", os.path.join(ROOT, ".gpu_aot"))

H, NOPE, V, LAT = 4, 128, 128, 256   # the smallest widths the absorb kernel takes (128-multiples)
EMPTY = -1e30                        # the running max the decode kernel writes for a chunk with no token


def rel_err(a, b) -> float:
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    denom = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (denom if denom > 0 else 1.0))


def kvb_weight(rng, h=H, nope=NOPE, v=V, lat=LAT):
    """A kv_b weight ``[H (N + A), L]`` e4m3 with float32 block scales."""
    rows = h * (nope + v)
    w = rng.standard_normal((rows, lat)).astype(np.float32) * 64.0
    wq = jnp.asarray(np.clip(w, -448, 448)).astype(jnp.float8_e4m3fn)
    ws = jnp.asarray((rng.uniform(0.5, 2.0, (rows // 128, lat // 128)) / 64.0).astype(np.float32))
    return wq, ws


def partials(rng, s, rows):
    """Partial states ``[S, rows, 1, H, ...]`` (the model's shape) spanning e^±10 between chunks,
    with empty chunks (m = -1e30, sum 0, acc 0, as the kernel writes them): in row 0 head 1 every
    chunk, in row 0 head 2 the last chunk (as -inf), and with 5 rows all of row 3 and every chunk
    of row 4 head 0 as -inf."""
    acc = rng.standard_normal((s, rows, 1, H, LAT)).astype(np.float32) * 4
    m = (rng.standard_normal((s, rows, 1, H)) * 4).astype(np.float32)
    l = rng.uniform(0.5, 8.0, (s, rows, 1, H)).astype(np.float32)
    empty = np.zeros(m.shape, bool)
    empty[:, 0, 0, 1] = True
    empty[-1, 0, 0, 2] = True
    if rows > 4:
        empty[:, 3] = True
        empty[:, 4, 0, 0] = True
    m[empty], l[empty], acc[empty] = EMPTY, 0.0, 0.0
    m[-1, 0, 0, 2] = -np.inf
    if rows > 4:
        m[:, 4, 0, 0] = -np.inf
    return SplitT(jnp.asarray(acc), jnp.asarray(m), jnp.asarray(l))


@pytest.mark.parametrize("impl", ["interpret_gpu", "interpret_tpu", "ref"])
@pytest.mark.parametrize("s,rows,dtype", [(3, 1, jnp.bfloat16), (16, 5, jnp.float32)],
                         ids=["S3_1row_bf16", "S16_5rows_f32"])
def test_absorb_of_split_t_matches_merged(impl, s, rows, dtype):
    """``mla_absorb(SplitT, dtype=d)`` == ``mla_absorb(combine_splits(parts).astype(d))``, same
    ``impl``; rows whose chunks are all empty give zeros, nothing is NaN. On the GPU the merge is
    in the kernel: its program has no XLA max-reduction of the partials."""
    rng = np.random.default_rng(7 + s)
    wq, ws = kvb_weight(rng)
    parts = partials(rng, s, rows)
    fused = jax.jit(lambda p, wq, ws: mla_absorb(p, wq, ws, part="v", nope=NOPE, dtype=dtype, impl=impl))
    y = fused(parts, wq, ws)
    want = mla_absorb(combine_splits(parts).astype(dtype), wq, ws, part="v", nope=NOPE, impl=impl)
    assert y.shape == (rows, 1, H, V) and y.dtype == dtype
    assert np.isfinite(np.asarray(y, np.float32)).all()
    assert rel_err(y, want) <= (1e-6 if dtype == jnp.float32 else 2e-3)
    assert not np.asarray(y[0, 0, 1], np.float32).any()          # every chunk empty: 0, as combine_splits
    if rows > 4:
        assert not np.asarray(y[3], np.float32).any() and not np.asarray(y[4, 0, 0], np.float32).any()
    if impl == "interpret_gpu":
        jaxpr = str(jax.make_jaxpr(fused)(parts, wq, ws))
        assert "mla_absorb_v_gpu" in jaxpr and "reduce_max" not in jaxpr


@pytest.mark.parametrize("impl", ["interpret_gpu", "interpret_tpu", "ref"])
def test_absorb_casts_a_float32_o_lat_as_it_loads(impl):
    """The merged path (batch 64 and up, and meshes) hands the decode kernel's float32 ``o_lat`` to
    the absorb with ``dtype=bf16``: the same numbers as casting it first (that the compiled GPU
    program then has no convert of it is checked in ``tests/test_aot_compile.py``, batch 64)."""
    rng = np.random.default_rng(11)
    wq, ws = kvb_weight(rng)
    # magnitudes whose bf16 rounding matters: a float32 product would differ from the bf16 one
    o_lat = jnp.asarray(rng.standard_normal((5, 1, H, LAT)) * (1 + 1e-3 * rng.standard_normal((5, 1, H, LAT))),
                        jnp.float32)
    fused = jax.jit(lambda x, wq, ws: mla_absorb(x, wq, ws, part="v", nope=NOPE, dtype=jnp.bfloat16, impl=impl))
    y = fused(o_lat, wq, ws)
    want = mla_absorb(o_lat.astype(jnp.bfloat16), wq, ws, part="v", nope=NOPE, impl=impl)
    assert y.dtype == jnp.bfloat16
    assert rel_err(y, want) == 0.0


def test_split_t_bad_inputs_are_one_line_errors():
    rng = np.random.default_rng(3)
    wq, ws = kvb_weight(rng)
    parts = partials(rng, 2, 1)
    for impl in ("interpret_gpu", "ref"):
        with pytest.raises(ValueError, match="for part='v'") as e:
            mla_absorb(parts, wq, ws, part="k", nope=NOPE, impl=impl)
        assert "\n" not in str(e.value)
        with pytest.raises(ValueError, match=r"SplitT must be acc \[S, \.\.\., H, L\]") as e:
            mla_absorb(parts._replace(m=parts.m[:, :, :, :2]), wq, ws, part="v", nope=NOPE, impl=impl)
        assert "\n" not in str(e.value)
        with pytest.raises(ValueError, match=r"takes x \[\.\.\., 4, 256\]"):   # L != the weight's latent
            mla_absorb(SplitT(parts.acc[..., :128], parts.m, parts.l), wq, ws, part="v", nope=NOPE, impl=impl)


def test_decode_partials_through_absorb_match_unfused():
    """The GPU decode kernel's own partials (4 chunks of a 100-token cache; a row with no token,
    rows whose tokens fill only the first chunks), unmerged through the absorb kernel, equal the
    unfused path: decode merged, cast to bf16, absorb. ``merge=False`` without a split (and on
    the reference) returns the merged ``o_lat``."""
    rng = np.random.default_rng(11)
    b, r, t = 5, 64, 100
    ql = jnp.asarray(rng.standard_normal((b, H, LAT)), jnp.bfloat16)
    qp = jnp.asarray(rng.standard_normal((b, H, r)), jnp.bfloat16)
    cache = jnp.asarray(rng.standard_normal((b, t, LAT + r)), jnp.bfloat16)
    lens = jnp.asarray([100, 0, 37, 5, 64], jnp.int32)
    wq, ws = kvb_weight(rng)
    kw = dict(scale=0.06, kv_lora_rank=LAT, interpret=True, block_t=16)
    parts = mla_decode_gpu(ql, qp, cache, lens, splits=4, merge=False, **kw)
    assert isinstance(parts, SplitT) and parts.acc.shape == (4, b, H, LAT) and parts.m.shape == (4, b, H)
    merged = combine_splits(parts)   # what merge=True returns
    assert rel_err(merged, mla_decode_ref(ql, qp, cache, lens, scale=0.06, kv_lora_rank=LAT)) < 1e-2
    as_model = SplitT(*(a[:, :, None] for a in parts))   # [S, B, 1, H, ...]: the model's T axis
    absorb = dict(part="v", nope=NOPE, out_dtype=jnp.bfloat16, impl="interpret_gpu")
    y = mla_absorb(as_model, wq, ws, dtype=jnp.bfloat16, **absorb)
    want = mla_absorb(merged[:, None].astype(jnp.bfloat16), wq, ws, **absorb)
    assert rel_err(y, want) <= 2e-3 and not np.asarray(y[1], np.float32).any()
    one = mla_decode_gpu(ql, qp, cache, lens, splits=1, merge=False, **kw)
    assert not isinstance(one, SplitT) and one.shape == (b, H, LAT)
    ref = mla_decode(ql, qp, cache, lens, scale=0.06, kv_lora_rank=LAT, impl="ref", merge=False)
    assert not isinstance(ref, SplitT) and ref.shape == (b, H, LAT)


def test_model_decode_step_takes_the_fold(monkeypatch):
    """``MLA.__call__``'s one-token decode with the GPU kernels (interpreted) over a 600-token
    cache (two chunks by ``default_splits``) hands the absorb kernel the unmerged partials, and its
    output is the reference's (same weights); two new tokens (speculative verification) hand it
    both tokens' partials stacked, each merged as plain decoding merges it; the reference merges
    in the decode."""
    from flax import nnx

    import kernels_pallas
    from deepseek_jax.config import DeepSeekConfig
    from deepseek_jax.mla import MLA
    from deepseek_jax.quant import Precision
    from deepseek_jax.rope import Rope
    from deepseek_jax.synthetic import tiny_config

    cfg = DeepSeekConfig.from_hub_dict(tiny_config(
        hidden_size=128, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=None, kv_lora_rank=LAT,
        qk_nope_head_dim=NOPE, qk_rope_head_dim=16, v_head_dim=V, max_position_embeddings=1024,
        rope_scaling=None)).replace(fp8=True)
    seen = []
    absorb = kernels_pallas.mla_absorb

    def spy(x, *a, part, **kw):
        if part == "v":
            seen.append("SplitT" if isinstance(x, SplitT) else "array")
        return absorb(x, *a, part=part, **kw)

    monkeypatch.setattr(kernels_pallas, "mla_absorb", spy)
    rng = np.random.default_rng(5)
    s_len = 600
    cache = jnp.asarray(rng.standard_normal((1, s_len, cfg.latent_dim)) * 0.5, jnp.float32)
    x = jnp.asarray(rng.standard_normal((1, 2, cfg.hidden_size)), jnp.float32)
    rope = Rope(cfg)
    gpu = nnx.jit(lambda: MLA(cfg, prec=Precision(kernels="interpret_gpu"), rngs=nnx.Rngs(0)))()
    ref = nnx.eval_shape(lambda: MLA(cfg, prec=Precision(kernels="ref"), rngs=nnx.Rngs(0)))
    nnx.update(ref, nnx.state(gpu))

    def step(m, x):
        t = x.shape[1]
        return m(x, jnp.arange(s_len - t, s_len, dtype=jnp.int32)[None], rope, cache_BSC=cache, absorbed=True)[0]

    got, want = nnx.jit(step)(gpu, x[:, :1]), nnx.jit(step)(ref, x[:, :1])
    assert seen == ["SplitT", "array"], seen
    assert rel_err(got, want) <= 1e-5
    got, want = nnx.jit(step)(gpu, x), nnx.jit(step)(ref, x)      # T=2
    assert seen[2:] == ["SplitT", "array", "array"], seen   # the reference runs one token at a time
    assert rel_err(got, want) <= 1e-5


_AOT_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    from kernels_pallas import aot
    from kernels_pallas.mla_absorb import mla_absorb
    from kernels_pallas.mla_decode import mla_decode
    if not aot.available("gpu"):
        print(json.dumps(None)); sys.exit(0)
    B, H, L, R, T, N = 1, 128, 512, 64, 4096, 128
    bf16, sds = jnp.bfloat16, jax.ShapeDtypeStruct

    def step(q, qp, c, n, wq, ws, lay):
        o = mla_decode(q, qp, c, n, scale=0.07, kv_lora_rank=L, impl="pallas_gpu", layer=lay, merge=False)
        return mla_absorb(o, wq, ws, part="v", nope=N, layer=lay, dtype=bf16, out_dtype=bf16, impl="pallas_gpu")

    compiled = aot.compile_for_gpu(step, sds((B, H, L), bf16), sds((B, H, R), bf16), sds((3, B, T, L + R), bf16),
                                   sds((B,), jnp.int32), sds((3, H * (N + 128), L), jnp.float8_e4m3fn),
                                   sds((3, H * (N + 128) // 128, L // 128), jnp.float32), sds((), jnp.int32))
    print(json.dumps([(i.kind, i.count, i.read) for i in aot.launches(compiled.as_text())]))
""")


@pytest.mark.skipif(not os.path.isdir(os.path.join(PLUGINS, "jax_plugins")),
                    reason=f"no CUDA plugin wheels in {PLUGINS} (see kernels_pallas/aot.py)")
def test_h200_decode_then_absorb_is_two_kernels():
    """Compiled for an H200: the batch-1 decode (16 chunks of a 4096-token cache, one layer of a
    stack) and the ``W_UV`` product launch the two Pallas kernels and nothing else: no XLA fusion
    reads the partials (the merge had 3: exp, reduce, convert)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPSEEK_JAX_") and k != "XLA_FLAGS"}
    env.update(PYTHONPATH=os.pathsep.join([PLUGINS, ROOT]), JAX_SKIP_CUDA_CONSTRAINTS_CHECK="1")
    r = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    items = json.loads(r.stdout.strip().splitlines()[-1])
    if items is None:
        pytest.skip("the CUDA plugin does not load here (aot.available('gpu') is False)")
    kinds = sorted(k for k, _, _ in items)
    assert kinds == ["pallas:mla_absorb_v_gpu", "pallas:mla_decode_gpu_split"], items
    assert all(n == 1 for _, n, _ in items), items
