"""The real-width model lowers for an H200, on this CPU-only host.

``kernels_pallas.backend.export_for_gpu`` exports a jitted function for CUDA with an abstract
H200 as the target device: every Pallas kernel is lowered (Triton kernels to Triton IR for
compute capability 9.0; Mosaic GPU kernels through their layout inference, shared-memory and TMA
checks) inside the whole program, so a kernel that rejects a real shape, a routing mistake (the
wrong kernel picked for a call), or a model change that breaks GPU lowering shows up here, not
in a GPU session's 15 minutes. Shapes are DeepSeek-V3's own (hidden 7168, 128 heads, 256 experts,
a 4096-token latent cache), at two layers (one dense, one MoE); the final PTX compile is the one
thing left for the GPU.
"""

from __future__ import annotations

import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax.cache import LatentCache
from deepseek_jax.checkpoint import abstract_model
from deepseek_jax.config import load_config
from deepseek_jax.quant import Precision
from kernels_pallas.backend import export_for_gpu, exported_kernels

CONTEXT = 4096


@pytest.fixture(scope="module")
def cfg():
    return load_config("deepseek-v3-671b").replace(num_hidden_layers=2, first_k_dense_replace=1,
                                                    num_nextn_predict_layers=0)


@pytest.fixture
def on_gpu(monkeypatch):
    """``impl="auto"`` resolves as on a GPU host (what the model picks there)."""
    monkeypatch.setenv("DEEPSEEK_JAX_KERNELS", "pallas_gpu")
    for var in ("DEEPSEEK_JAX_GROUPED_GPU", "DEEPSEEK_JAX_W8A8_GPU", "DEEPSEEK_JAX_MLA_GPU"):
        monkeypatch.delenv(var, raising=False)
    jax.clear_caches()
    yield monkeypatch
    jax.clear_caches()


def _export(cfg, prec, batch, tokens, decode):
    graphdef, state = nnx.split(abstract_model(cfg, prec))
    cache = jax.eval_shape(lambda: LatentCache.zeros(cfg, batch, CONTEXT, jnp.bfloat16))
    ids = jax.ShapeDtypeStruct((batch, tokens), jnp.int32)

    def run(state, cache, ids):
        m = nnx.merge(graphdef, state)
        if decode:
            pos = jnp.full(ids.shape, CONTEXT - 1, jnp.int32)
            out = m(ids, pos, cache=cache, absorbed=True)
            return out.logits, out.cache
        return m(ids, cache=cache, logits=False).hidden[:, -1]

    return export_for_gpu(run, state, cache, ids)


@pytest.mark.parametrize("batch,fp8_mode", [(1, "w8a16"), (16, "w8a16"), (16, "w8a8")])
def test_decode_step_lowers_with_the_gpu_kernels(cfg, on_gpu, batch, fp8_mode):
    """One absorbed decode step over the 4096-token cache: the dense and attention projections on
    the FP8 GEMM kernel, the routed experts on the Triton grouped kernel (in W8A8 too: the Mosaic
    GPU kernel's scale expansion is for prefill-sized calls), attention on the MLA decode kernel
    (split-T at these batch sizes)."""
    exp = _export(cfg, Precision(dtype=jnp.bfloat16, fp8_mode=fp8_mode), batch, 1, decode=True)
    k = exported_kernels(exp)
    assert k.get("grouped_gemm_gpu") == 3 and k.get("mla_decode_gpu_split") == 2, k
    assert k.get(f"{fp8_mode}_gemm_gpu", 0) >= 10 and k["mosaic_gpu"] == 0, k
    assert exp.out_avals[0].shape == (batch, 1, cfg.vocab_size)


def test_decode_step_lowers_with_the_mosaic_gpu_mla_kernel(cfg, on_gpu):
    """``$DEEPSEEK_JAX_MLA_GPU=mosaic_gpu`` at batch 64: attention on the Mosaic GPU wgmma kernel
    (the cache stack read in place), one call per layer, no Triton MLA kernel left."""
    on_gpu.setenv("DEEPSEEK_JAX_MLA_GPU", "mosaic_gpu")
    exp = _export(cfg, Precision(dtype=jnp.bfloat16), 64, 1, decode=True)
    k = exported_kernels(exp)
    assert k["mosaic_gpu"] == 2 and not any(name.startswith("mla_decode_gpu") for name in k), k


PREFILL_VARIANTS = {
    # (Precision changes, environment, expected kernel counts)
    "default": ({}, {}, {"grouped_gemm_gpu": 3}),
    "flash": (dict(prefill_attention="flash"), {}, {"grouped_gemm_gpu": 3, "mha_forward": 1}),
    "mosaic_grouped": ({}, {"DEEPSEEK_JAX_GROUPED_GPU": "mosaic_gpu"}, {"mosaic_gpu": 3}),
    "w8a8_mosaic": (dict(fp8_mode="w8a8"), {"DEEPSEEK_JAX_W8A8_GPU": "mosaic_gpu"}, {"mosaic_gpu": 15}),
}


@pytest.mark.parametrize("variant", list(PREFILL_VARIANTS))
def test_prefill_4k_lowers_with_the_gpu_kernels(cfg, on_gpu, variant):
    """A 4096-token prefill as ``benchmarks/e2e_gpu.py`` runs it, and each of its side-by-side
    variants: flash attention, the routed experts on the Mosaic GPU grouped kernel (W8A16), and
    W8A8 with the Mosaic GPU e4m3 kernels for the experts and for every dense projection they tile
    (the rest on the Triton W8A8 kernel)."""
    changes, env, expect = PREFILL_VARIANTS[variant]
    for var, value in env.items():
        on_gpu.setenv(var, value)
    exp = _export(cfg, Precision(dtype=jnp.bfloat16, **changes), 1, CONTEXT, decode=False)
    k = exported_kernels(exp)
    for name, count in expect.items():
        assert k.get(name, 0) == count, (name, k)
    if variant == "w8a8_mosaic":
        assert k.get("grouped_gemm_gpu", 0) == 0 and k.get("w8a8_gemm_gpu", 0) >= 1, k
    assert exp.out_avals[0].shape == (1, cfg.hidden_size)


def test_generator_chunked_prefill_lowers(cfg, on_gpu):
    """The generator's prefill of a 4096-token prompt into an 8192-position cache in chunks of 512
    (what ``prefill_chunk="auto"`` picks at 128 heads): a naive first chunk, then the absorbed
    multi-token form over the cache in a loop; and the continuation of a cached prefix
    (``reuse_prefix``, what ``chat`` runs)."""
    import numpy as np

    from deepseek_jax import generate as G
    graphdef, state = nnx.split(abstract_model(cfg, Precision(dtype=jnp.bfloat16)))
    S, P = 2 * CONTEXT, CONTEXT
    sds = jax.ShapeDtypeStruct
    knobs = G._Knobs(*(sds((), np.asarray(v).dtype) for v in (np.int32(1), np.bool_(True), *G.GREEDY.traced())))
    row = (sds((1,), jnp.int32), sds((1,), jnp.int32), sds((1,), jnp.bool_), sds((), jnp.uint32))
    assert G.prefill_chunk_for(1, P, S, cfg.num_attention_heads, "auto") == 512
    pre = lambda st, ids, *a: G._prefill(graphdef, True, False, S, G.Weights(st), ids, *a, chunk=512)  # noqa: E731
    exp = export_for_gpu(pre, state, sds((1, P), jnp.int32), *row, knobs)
    assert exported_kernels(exp).get("grouped_gemm_gpu", 0) == 6     # naive chunk + the loop body
    cache = jax.eval_shape(lambda: LatentCache.zeros(cfg, 1, CONTEXT, jnp.bfloat16))
    cont = lambda st, c, sfx, k, ids, *a: G._prefill_continue(graphdef, True, False, S, G.Weights(st), c, sfx, k,  # noqa: E731
                                                              ids, *a, chunk=None)
    exp = export_for_gpu(cont, state, cache, sds((1, 256), jnp.int32), sds((), jnp.int32), sds((1, P), jnp.int32),
                         *row, knobs)
    assert exp.out_avals[0].shape == (1, 1, S, cfg.latent_dim)   # the dense layer's cache, resized to S
