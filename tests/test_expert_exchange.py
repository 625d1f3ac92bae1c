"""The expert-parallel all-to-all on 8 fake CPU devices: buffers of ``ep_capacity`` x the balanced
share, several rounds when routing is skewed, and the same outputs and gradients as one device."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import expert_parallel, sharding
from deepseek_jax.moe import sorted_moe
from deepseek_jax.quant import Precision

E, K, D, F, M = 16, 4, 32, 24, 64   # 64 tokens: 16 per shard on expert=4 (8 on data=2 x expert=4)


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.fixture(autouse=True)
def _rounds_at_any_size(monkeypatch):
    """These exchanges are small (128-256 rows in the worst-case buffer): rounds all the same."""
    monkeypatch.setattr(expert_parallel, "ROUNDS_MIN_ROWS", 0)


@pytest.fixture(scope="module")
def inputs():
    if len(jax.devices()) < 8:
        pytest.skip("needs JAX_NUM_CPU_DEVICES=8")
    rng = np.random.default_rng(0)
    arrays = tuple((jnp.asarray(rng.normal(0, 0.2, s), jnp.float32), None)
                   for s in ((E, F, D), (E, F, D), (E, D, F)))
    x = jnp.asarray(rng.normal(0, 1, (M, D)), jnp.float32)
    w = jnp.asarray(rng.uniform(0.1, 1, (M, K)), jnp.float32)
    balanced = np.stack([rng.permutation(E)[:K] for _ in range(M)])
    # Skewed: every token picks experts 0-3, all on the first of 4 expert shards: that pair gets
    # 4x its balanced share from each sender.
    skewed = np.tile(np.arange(K), (M, 1))
    return arrays, x, w, {"balanced": jnp.asarray(balanced, jnp.int32), "skewed": jnp.asarray(skewed, jnp.int32)}


def _moe(arrays, x, idx, w, prec, mesh):
    return expert_parallel.moe_apply(arrays, x, idx, w, prec, mesh, sharding.RULES["ep_tp"], n_experts=E)


def _loss(fn):
    r = jnp.asarray(np.random.default_rng(1).normal(0, 1, (M, D)), jnp.float32)
    return lambda arrays, x, w: jnp.sum(fn(arrays, x, w) * r)


DP, TP = "data=2,expert=4,model=1", "data=1,expert=4,model=2"


@pytest.mark.parametrize("capacity,routing,mesh_text", [
    (None, "skewed", DP),                                  # one worst-case round
    (2.0, "balanced", DP), (2.0, "balanced", TP),          # one round of 2x buffers
    (2.0, "skewed", DP), (2.0, "skewed", TP),              # two rounds
    (0.5, "balanced", DP), (0.5, "skewed", TP)])           # 2-8 rounds
def test_exchange_equals_one_device(inputs, mesh_text, routing, capacity):
    """Outputs within 1e-6 and gradients (experts' weights, rows, combine weights) within 1e-5 of
    the sorted MoE on one device, for one worst-case round and for 1-8 rounds of smaller buffers."""
    arrays, x, w, routes = inputs
    idx = routes[routing]
    prec = Precision(ep_capacity=capacity)
    mesh = sharding.make_mesh(sharding.parse_mesh(mesh_text, 8))
    want = sorted_moe(arrays, x, idx, w, prec, E)
    want_g = jax.grad(_loss(lambda a, xx, ww: sorted_moe(a, xx, idx, ww, prec, E)), argnums=(0, 1, 2))(arrays, x, w)
    with jax.set_mesh(mesh):
        fn = jax.jit(lambda a, xx, ww: _moe(a, xx, idx, ww, prec, mesh))
        got = fn(arrays, x, w)
        got_g = jax.jit(jax.grad(_loss(fn), argnums=(0, 1, 2)))(arrays, x, w)
    assert rel(got, want) < 1e-6
    for g, h in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        assert rel(g, h) < 1e-5


def test_buffers_shrink_and_rounds_follow_the_routing(inputs):
    """The compiled exchange's all-to-all moves ``[n_expert * C, D]`` rows: C = 32 at the default
    capacity (2 x 16 tokens x 4 choices / 4 shards = 32 rounded to 8 -> 32; the worst case is 16 x
    min(4, 4) = 64), and the skewed routing (64 rows for one pair) takes 2 rounds of 32."""
    arrays, x, w, routes = inputs
    mesh = sharding.make_mesh(sharding.parse_mesh("data=1,expert=4,model=2", 8))
    assert expert_parallel.exchange_capacity(16, K, 4, E // 4, 2.0) == 32
    assert expert_parallel.exchange_capacity(16, K, 4, E // 4, None) == 64
    assert expert_parallel.exchange_capacity(16, K, 4, E // 4, 100.0) == 64
    # what the benchmark reports is the program's: under ROUNDS_MIN_ROWS one worst-case round
    assert expert_parallel.round_capacity(16, K, 4, E // 4, 2.0) == 32
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(expert_parallel, "ROUNDS_MIN_ROWS", 4 * 64 + 1)
        assert expert_parallel.round_capacity(16, K, 4, E // 4, 2.0) == 64
    rows = {}
    for cap in (None, 2.0):
        prec = Precision(ep_capacity=cap)
        with jax.set_mesh(mesh):
            hlo = jax.jit(lambda xx, ii: _moe(arrays, xx, ii, w, prec, mesh)).lower(x, routes["skewed"]).as_text()
        rows[cap] = set(re.findall(r"all_to_all.*: \(tensor<(\d+)x32xf32>\)", hlo))
        assert ("stablehlo.while" in hlo) == (cap is not None)
    assert rows == {None: {"256"}, 2.0: {"128"}}
    with jax.set_mesh(mesh):   # a decode step: one worst-case round whatever the capacity
        hlo = jax.jit(lambda xx, ii: expert_parallel.moe_apply(
            arrays, xx, ii, w, Precision(ep_capacity=0.5), mesh, sharding.RULES["ep_tp"], n_experts=E,
            decode=True)).lower(x, routes["skewed"]).as_text()
    assert "stablehlo.while" not in hlo and set(re.findall(r"all_to_all.*: \(tensor<(\d+)x32xf32>\)", hlo)) == {"256"}


def test_rows_gradients_with_frozen_experts(inputs):
    """Gradients for the rows and combine weights only (the experts frozen, as with LoRA over FP8
    weights): the rounds' backward skips the experts' gradient and still equals one device's."""
    arrays, x, w, routes = inputs
    idx = routes["skewed"]
    prec = Precision(ep_capacity=0.5)
    mesh = sharding.make_mesh(sharding.parse_mesh(TP, 8))
    want = jax.grad(_loss(lambda a, xx, ww: sorted_moe(a, xx, idx, ww, prec, E)), argnums=(1, 2))(arrays, x, w)
    with jax.set_mesh(mesh):
        fn = lambda a, xx, ww: _moe(a, xx, idx, ww, prec, mesh)   # noqa: E731
        got = jax.jit(jax.grad(_loss(fn), argnums=(1, 2)))(arrays, x, w)
    for g, h in zip(got, want):
        assert rel(g, h) < 1e-5
