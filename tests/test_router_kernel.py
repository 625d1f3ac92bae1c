"""The MoE router's selection kernel (``kernels_pallas.moe_route``): the GPU kernel in the Pallas
interpreter against the jnp reference (``deepseek_jax.moe.route``'s math), in the model, per
shard on a mesh, and compiled for an H200."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import kernels_pallas as kp
from kernels_pallas import aot
from kernels_pallas.moe_router import moe_route_gpu

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGINS = os.environ.get("DEEPSEEK_JAX_GPU_AOT", os.path.join(ROOT, ".gpu_aot"))
#: DeepSeek-V3's routing: 256 experts in 8 groups, 4 groups kept, 8 experts, normalised, x 2.5
V3 = dict(n_group=8, topk_group=4, top_k=8, norm_topk_prob=True, scaling=2.5)
TINY = dict(n_group=4, topk_group=2, top_k=4, norm_topk_prob=True, scaling=2.5)


def _inputs(seed, T, E, bias=(-0.05, 0.05)):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(T, E)).astype(np.float32)),
            jnp.asarray(rng.uniform(*bias, size=E).astype(np.float32)))


def _assert_same(got, want):
    idx, w, s = (np.asarray(a) for a in got)
    np.testing.assert_array_equal(idx, np.asarray(want[0]))
    assert idx.dtype == np.int32 and w.dtype == s.dtype == np.float32
    np.testing.assert_allclose(w, np.asarray(want[1]), rtol=1e-6)
    np.testing.assert_allclose(s, np.asarray(want[2]), rtol=1e-6)


@pytest.mark.parametrize("T,E,kw,block_t,bias", [
    (5, 256, V3, 1, (-0.05, 0.05)),                                  # DeepSeek-V3's shape, decode
    (9, 16, TINY, 4, (-0.05, 0.05)),                                 # the tiny config
    (37, 16, TINY, 8, (-0.05, 0.05)),                                # 37 rows: a partial last tile
    (6, 16, dict(TINY, top_k=3, norm_topk_prob=False, scaling=1.5), 2, (-0.05, 0.05)),  # K=3, no norm
    (12, 16, TINY, 4, (-1.0, 0.0)),                                  # large negative biases
], ids=["v3", "tiny", "ragged_tile", "k3_unnormalised", "negative_bias"])
def test_kernel_matches_reference(T, E, kw, block_t, bias):
    x, b = _inputs(T * E, T, E, bias)
    want = kp.moe_route_ref(x, b, **kw)
    _assert_same(moe_route_gpu(x, b, interpret=True, block_t=block_t, **kw), want)
    if bias[1] <= 0:   # the biases do change the selection here (so they are tested)
        assert not np.array_equal(np.asarray(kp.moe_route_ref(x, jnp.zeros_like(b), **kw)[0]), np.asarray(want[0]))


def test_kernel_reads_a_layer_of_a_bias_stack():
    """``layer=``: the bias is all scanned layers' ``[L, E]`` (``Precision.weights_in_place``) and
    the kernel reads that layer's row in place; the other rows differ enough to change the choice."""
    x, b = _inputs(7, 5, 256)
    stack = jnp.stack([b - 1.0, b, b + jnp.linspace(1.0, 0.0, 256)])
    want = kp.moe_route_ref(x, b, **V3)
    _assert_same(moe_route_gpu(x, stack, layer=jnp.int32(1), interpret=True, **V3), want)
    _assert_same(kp.moe_route(x, stack, layer=jnp.int32(1), impl="ref", **V3), want)
    other = moe_route_gpu(x, stack, layer=jnp.int32(2), interpret=True, **V3)[0]
    assert not np.array_equal(np.asarray(other), np.asarray(want[0]))


def test_kernel_ties_go_to_the_lower_index():
    """Logits from {0, 1, 2}: equal scores within groups, equal group scores, equal candidates;
    ``lax.top_k`` (the reference) takes the lower index each time, so must the kernel."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.integers(0, 3, size=(24, 16)).astype(np.float32))
    x = x.at[0].set(0.0).at[1, :8].set(1.0)   # a row all equal; a row with two equal groups
    b = jnp.zeros(16, jnp.float32)
    _assert_same(moe_route_gpu(x, b, interpret=True, block_t=8, **TINY), kp.moe_route_ref(x, b, **TINY))
    np.testing.assert_array_equal(np.asarray(moe_route_gpu(x[:1], b, interpret=True, **TINY)[0]), [[0, 1, 2, 3]])


def test_scores_that_underflow_give_zero_weights_not_nan():
    """sigmoid(-100) is 0 in float32 (XLA flushes it below -88): the chosen scores sum to 0, and
    normalising divided 0 by 0, a NaN that attention then spreads along the row. As HF (which
    adds 1e-20 to the sum), the weights are 0; ordinary rows are unchanged to the last bit."""
    x, b = _inputs(3, 6, 16)
    x = x.at[2].set(-100.0 - jnp.arange(16.0))
    for got in (kp.moe_route_ref(x, b, **TINY), moe_route_gpu(x, b, interpret=True, block_t=4, **TINY)):
        w = np.asarray(got[1])
        assert np.isfinite(w).all() and (w[2] == 0).all()
    ordinary = np.asarray(x[:2])
    w = np.asarray(kp.moe_route_ref(x, b, **TINY)[1])[:2]
    idx = np.asarray(kp.moe_route_ref(x, b, **TINY)[0])[:2]
    s = 1 / (1 + np.exp(-ordinary.astype(np.float64)))
    chosen = np.take_along_axis(s, idx, 1)
    np.testing.assert_allclose(w, 2.5 * chosen / chosen.sum(1, keepdims=True), rtol=1e-6)


def test_kernel_keeps_only_the_best_groups():
    """Expert 0 has the highest score of all, but its group (0: one high and three low scores)
    ranks below groups 1 and 2 (four good scores each): only experts of groups 1 and 2 may be
    chosen. A kernel ignoring the group mask would pick expert 0."""
    x = jnp.full((1, 16), -4.0).at[0, 0].set(5.0).at[0, 4:12].set(jnp.linspace(1.0, 2.0, 8))
    b = jnp.zeros(16, jnp.float32)
    idx = np.asarray(moe_route_gpu(x, b, interpret=True, **TINY)[0])
    assert np.asarray(jax.lax.top_k(x, 4)[1])[0, 0] == 0        # ungrouped, expert 0 would win
    assert sorted(idx[0].tolist()) == [8, 9, 10, 11]            # the best of the kept groups 1, 2
    np.testing.assert_array_equal(idx, np.asarray(kp.moe_route_ref(x, b, **TINY)[0]))


def test_kernel_gradient_is_the_reference_gradient():
    """The kernel's backward (a custom VJP) is the reference's: weights and scores as functions of
    the logits at the chosen experts; the bias gets none."""
    x, b = _inputs(3, 6, 16)

    def loss(route):
        def f(x, b):
            _, w, s = route(x, b)
            return jnp.sum(w * jnp.arange(4.0)) + jnp.sum(s ** 2)
        return jax.grad(f, argnums=(0, 1))(x, b)

    gx, gb = loss(lambda x, b: moe_route_gpu(x, b, interpret=True, **TINY))
    rx, rb = loss(lambda x, b: kp.moe_route_ref(x, b, **TINY))
    np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), rtol=1e-5, atol=1e-7)
    assert not np.any(np.asarray(gb)) and not np.any(np.asarray(rb))


def test_dispatch_and_errors():
    x, b = _inputs(4, 3, 16)
    for impl in ("ref", "interpret_tpu", "interpret_gpu"):
        _assert_same(kp.moe_route(x, b, impl=impl, **TINY), kp.moe_route_ref(x, b, **TINY))
    x24, b24 = _inputs(5, 3, 24)   # 24 experts, not a power of two: the reference on a GPU target
    jaxpr = jax.make_jaxpr(lambda x, b: kp.moe_route(x, b, impl="interpret_gpu", **TINY))
    assert "pallas_call" not in str(jaxpr(x24, b24)) and "pallas_call" in str(jaxpr(x, b))
    bad = [((x[0], b), TINY, "tokens, experts"), ((x, b[:8]), TINY, "bias shape"),
           ((x, b), dict(TINY, n_group=3), "does not divide"), ((x, b), dict(TINY, topk_group=5), "topk_group=5"),
           ((x, b), dict(TINY, top_k=17), "top_k=17"), ((x, b), dict(TINY, top_k=9), "kept groups")]
    for args, kw, msg in bad:
        for fn in (kp.moe_route_ref, moe_route_gpu):
            with pytest.raises(ValueError, match=msg) as e:
                fn(*args, **kw)
            assert "\n" not in str(e.value)


def test_kernel_per_shard_on_a_mesh():
    """``kernel_mesh.moe_route``: the tokens split over ``data`` x ``expert`` (rules ``ep_dp``),
    the interpreted kernel per shard, equals the reference on the whole arrays."""
    from deepseek_jax import kernel_mesh, sharding

    if len(jax.devices()) < 8:
        pytest.skip("needs JAX_NUM_CPU_DEVICES=8")
    mesh = sharding.make_mesh(sharding.parse_mesh("data=2,expert=2,model=2", 8))
    pl = kernel_mesh.Placement(mesh, tuple(sorted(sharding.RULES["ep_dp"].items())))
    x, b = _inputs(6, 8, 16)
    with jax.set_mesh(mesh):
        fn = jax.jit(lambda x, b: kernel_mesh.moe_route(kp.moe_route, x, b, pl=pl, impl="interpret_gpu", **TINY))
        assert "shard_map" in str(jax.make_jaxpr(fn)(x, b))
        got = fn(x, b)
    _assert_same(got, kp.moe_route_ref(x, b, **TINY))


def test_moe_layer_with_the_kernel_matches_the_reference(monkeypatch):
    """A tiny MoE layer (config A's routing: 16 experts, 4 groups, 2 kept, top-4, with negative and
    positive biases) with ``Precision(kernels="interpret_gpu")``: its router runs the kernel, and
    it chooses the same experts and gives the same output as the reference path. Given a mesh
    (``sharding.attach_mesh`` sets ``MoE.mesh``), the router's kernel runs per shard."""
    from flax import nnx

    from deepseek_jax import kernel_mesh, sharding
    from deepseek_jax.config import DeepSeekConfig
    from deepseek_jax.moe import MoE
    from deepseek_jax.quant import Precision
    from tests.conftest import CONFIG_A

    cfg = DeepSeekConfig.from_hub_dict(CONFIG_A)
    ref = MoE(cfg, prec=Precision(kernels="ref"), rngs=nnx.Rngs(0))
    ref.gate.e_score_correction_bias[...] = jnp.asarray(
        np.random.default_rng(7).uniform(-0.3, 0.3, cfg.n_routed_experts), jnp.float32)
    graphdef, state = nnx.split(ref)
    ker = nnx.merge(graphdef, state)
    ker.prec = Precision(kernels="interpret_gpu")
    x = jnp.asarray(np.random.default_rng(8).normal(size=(2, 3, cfg.hidden_size)), jnp.float32)
    assert "moe_route_gpu" in str(jax.make_jaxpr(lambda x: ker(x)[0])(x))
    run = nnx.jit(lambda m, x: m(x))
    y_ref, st_ref = run(ref, x)
    y, st = run(ker, x)
    np.testing.assert_array_equal(np.asarray(st.idx_BTK), np.asarray(st_ref.idx_BTK))
    np.testing.assert_allclose(np.asarray(st.balance), np.asarray(st_ref.balance), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-6)

    if len(jax.devices()) < 8:
        return
    calls = []
    monkeypatch.setattr(kernel_mesh, "moe_route", lambda kernel, *a, pl, **kw: calls.append(pl) or kernel(*a, **kw))
    ker.mesh = sharding.make_mesh(sharding.parse_mesh("data=2,expert=2,model=2", 8))
    ker.rules = tuple(sorted(sharding.RULES["ep_tp"].items()))
    with jax.set_mesh(ker.mesh):
        jax.make_jaxpr(lambda x: ker(x)[0])(x)
    assert [(c.mesh, c.rules) for c in calls] == [(ker.mesh, ker.rules)]


_AOT_SCRIPT = """
import jax, jax.numpy as jnp
from kernels_pallas import aot
import kernels_pallas as kp
for T in (1, 256):
    c = aot.compile_for_gpu(lambda x, b: kp.moe_route(x, b, impl="pallas_gpu", n_group=8, topk_group=4, top_k=8,
                                                      norm_topk_prob=True, scaling=2.5),
                            jax.ShapeDtypeStruct((T, 256), jnp.float32), jax.ShapeDtypeStruct((256,), jnp.float32))
    names = [i.op_name for i in aot.launches(c.as_text())]
    assert len(names) == 1 and "moe_route_gpu" in names[0], names
print("ok")
"""


def test_kernel_compiles_for_the_h200():
    """Triton → PTX for sm_90 at T=1 and T=256 with 256 experts: one launch each. In this process
    when the CUDA plugin is loaded, else in a subprocess with the plugin wheels (``.gpu_aot``)."""
    if aot.available("gpu"):
        exec(_AOT_SCRIPT, {})
        return
    if not os.path.isdir(os.path.join(PLUGINS, "jax_plugins")):
        pytest.skip(f"no GPU compiler: no CUDA plugin wheels in {PLUGINS} (see kernels_pallas/aot.py)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPSEEK_JAX_") and k != "XLA_FLAGS"}
    env.update(PYTHONPATH=os.pathsep.join([PLUGINS, ROOT]), JAX_SKIP_CUDA_CONSTRAINTS_CHECK="1")
    env.pop("JAX_NUM_CPU_DEVICES", None)
    r = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-3000:]
