"""``kernels_pallas.rms_norm``: the GPU kernel (in the Triton interpreter) against float64 and the
reference, with and without the residual add, a layer's weight of a stack, its gradient, and the
decoder layer using it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.rms_norm import rms_norm, rms_norm_gpu, rms_norm_ref


def _np_norm(h, w, eps):
    h = np.asarray(jnp.asarray(h, jnp.float32), np.float64)
    return np.asarray(jnp.asarray(w, jnp.float32), np.float64) * h / np.sqrt((h * h).mean(-1, keepdims=True) + eps)


@pytest.mark.parametrize("shape,dtype", [((1, 1, 7168), jnp.bfloat16), ((37, 1000), jnp.float32),
                                         ((2, 3, 24), jnp.float32)], ids=["deepseek-row", "ragged-cols", "tiny"])
@pytest.mark.parametrize("residual", [False, True])
def test_kernel_matches_float64(shape, dtype, residual):
    """Widths off the 1024-column block (1000, 24: the last block masked), DeepSeek's 7168 (7
    whole blocks), rows 1 / 37 / 6; the residual sum rounded to x's dtype as ``x + r`` is."""
    rng = np.random.default_rng(sum(shape))
    x = jnp.asarray(rng.standard_normal(shape) * 3, dtype)
    r = jnp.asarray(rng.standard_normal(shape), dtype) if residual else None
    w = jnp.asarray(rng.standard_normal(shape[-1]), jnp.bfloat16)
    out = rms_norm(x, w, eps=1e-6, residual=r, impl="interpret_gpu")
    h = x + r if residual else x
    if residual:
        h_got, out = out
        assert h_got.dtype == dtype and (np.asarray(h_got, np.float32) == np.asarray(h, np.float32)).all()
    assert out.shape == shape and out.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(out, np.float64), _np_norm(h, w, 1e-6), rtol=tol, atol=tol)


def test_layer_of_a_stack_zero_rows_and_errors():
    """The weight of one layer of a ``[L, D]`` stack (the others NaN: reading them shows), an
    all-zero row (finite: rsqrt(eps)), ``out_dtype``, and one-line errors for bad shapes."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((4, 300)), jnp.float32).at[2].set(0.0)
    w = jnp.full((3, 300), jnp.nan, jnp.float32).at[1].set(jnp.asarray(rng.standard_normal(300), jnp.float32))
    got = rms_norm(x, w, eps=1e-6, layer=jnp.int32(1), out_dtype=jnp.bfloat16, impl="interpret_gpu")
    want = rms_norm_ref(x, w[1], eps=1e-6, out_dtype=jnp.bfloat16)
    assert got.dtype == jnp.bfloat16 and np.isfinite(np.asarray(got, np.float32)).all()
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    with pytest.raises(ValueError, match=r"expected a \[D\] weight"):
        rms_norm(x, w, eps=1e-6)
    with pytest.raises(ValueError, match="residual shape"):
        rms_norm_gpu(x, w[0], eps=1e-6, residual=x[:2], interpret=True)


def test_kernel_gradient_is_the_references():
    rng = np.random.default_rng(4)
    x, r = (jnp.asarray(rng.standard_normal((5, 40)), jnp.float32) for _ in range(2))
    w = jnp.asarray(rng.standard_normal(40), jnp.float32)

    def loss(impl):
        def f(x, w, r):
            h, y = rms_norm(x, w, eps=1e-6, residual=r, impl=impl)
            return jnp.sum(jnp.sin(y)) + jnp.sum(h * h)
        return f

    want = jax.grad(loss("ref"), argnums=(0, 1, 2))(x, w, r)
    got = jax.grad(loss("interpret_gpu"), argnums=(0, 1, 2))(x, w, r)
    for g, v in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(v), rtol=1e-5, atol=1e-6)


def test_split_k_partials_summed_in_the_kernel():
    """A one-row W8A16 GEMM that splits K hands back its float32 partials (``sum_splits=False``),
    and the norm kernel sums them, as ``x`` and as the residual, like the summed GEMM output."""
    import kernels_pallas as kp
    from kernels_pallas import SplitK
    from deepseek_jax.quant import quantize

    rng = np.random.default_rng(5)
    wq, ws = quantize(jnp.asarray(rng.standard_normal((256, 2048)), jnp.float32))
    x = jnp.asarray(rng.standard_normal((1, 1, 2048)), jnp.bfloat16)
    parts = kp.w8a16_matmul(x, wq, ws, out_dtype=jnp.bfloat16, impl="interpret_gpu", sum_splits=False)
    assert isinstance(parts, SplitK) and parts.parts.shape[0] > 1 and parts.parts.shape[1:] == (1, 1, 256)
    y = kp.w8a16_matmul(x, wq, ws, out_dtype=jnp.bfloat16, impl="interpret_gpu")
    np.testing.assert_array_equal(np.asarray(jnp.sum(parts.parts, 0).astype(jnp.bfloat16), np.float32),
                                  np.asarray(y, np.float32))
    w = jnp.asarray(rng.standard_normal(256), jnp.bfloat16)
    h0 = jnp.asarray(rng.standard_normal((1, 1, 256)), jnp.bfloat16)
    f = lambda a: np.asarray(a, np.float32)  # noqa: E731
    for impl in ("interpret_gpu", "ref"):
        got = rms_norm(parts, w, eps=1e-6, out_dtype=jnp.bfloat16, impl=impl)
        np.testing.assert_array_equal(f(got), f(rms_norm_ref(y, w, eps=1e-6)))
        h, n = rms_norm(h0, w, eps=1e-6, residual=parts, impl=impl)
        h_want, n_want = rms_norm_ref(h0, w, eps=1e-6, residual=y)
        np.testing.assert_array_equal(f(h), f(h_want))
        np.testing.assert_array_equal(f(n), f(n_want))


def test_decoder_layer_runs_its_norms_on_the_kernel(monkeypatch):
    """A decoder layer with ``Precision(kernels="interpret_gpu")`` at batch-1 decode shapes where
    the GPU GEMMs split K (``q_a_proj``, ``o_proj``): the kernel runs its input norm, MLA's
    ``q_a_layernorm`` on ``q_a_proj``'s unsummed partials, and the post-attention add + norm with
    ``o_proj``'s partials as the residual; the layer's output is the reference layer's."""
    import sys

    from flax import nnx

    from deepseek_jax.config import DeepSeekConfig
    from deepseek_jax.model import DecoderLayer
    from deepseek_jax.quant import Precision
    from deepseek_jax.rope import Rope
    from deepseek_jax.synthetic import tiny_config
    from kernels_pallas import SplitK

    cfg = DeepSeekConfig.from_hub_dict(dict(tiny_config(hidden_size=512, q_lora_rank=256, num_attention_heads=2,
                                                         num_key_value_heads=2, v_head_dim=128, intermediate_size=256),
                                            quantization_config={"quant_method": "fp8"}))
    R = sys.modules["kernels_pallas.rms_norm"]
    seen = []
    real = R.rms_norm_gpu

    def spy(x, *a, residual=None, **k):
        seen.append((isinstance(x, SplitK), isinstance(residual, SplitK)))
        return real(x, *a, residual=residual, **k)

    monkeypatch.setattr(R, "rms_norm_gpu", spy)
    outs = []
    for kernels in ("ref", "interpret_gpu"):
        layer = DecoderLayer(cfg, moe=False, prec=Precision(kernels=kernels), rngs=nnx.Rngs(0))
        x = jax.random.normal(jax.random.key(1), (1, 1, cfg.hidden_size))
        cache = jax.random.normal(jax.random.key(2), (1, 8, cfg.latent_dim)) * 0.5
        outs.append(np.asarray(layer(x, jnp.full((1, 1), 3), Rope(cfg), cache, absorbed=True)[0]))
    assert sorted(seen) == [(False, False), (False, True), (True, False)], seen
    np.testing.assert_allclose(outs[1], outs[0], rtol=2e-5, atol=2e-5)
