"""Mesh sharding and expert parallelism on 8 fake CPU devices: same numbers as one device."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from deepseek_jax import scoring, sharding
from deepseek_jax.api import load
from deepseek_jax.checkpoint import load_hub
from deepseek_jax.errors import DeepSeekError

MESHES = ["data=1,expert=1,model=8", "data=1,expert=8,model=1", "data=2,expert=4,model=1",
          "data=2,expert=2,model=2"]


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


PROMPTS = [[0, 5, 17, 33, 2], [0, 9]]


def _greedy(model):
    from deepseek_jax.generate import Generator
    from deepseek_jax.sampling import SamplingParams
    res = Generator(model).generate(PROMPTS, max_new_tokens=6, sampling=SamplingParams(temperature=0),
                                    stop_at_eos=False)
    return [r.output_ids for r in res]


@pytest.fixture(scope="module")
def orbax_a(ckpt_a, tmp_path_factory):
    from deepseek_jax.orbax_ckpt import convert
    out = str(tmp_path_factory.mktemp("orbax_a") / "ck")
    convert(ckpt_a, out, progress=False)
    return out


@pytest.fixture(scope="module")
def single(orbax_a):
    if len(jax.devices()) < 8:
        pytest.skip("needs JAX_NUM_CPU_DEVICES=8")
    ids = np.random.default_rng(5).integers(0, 256, (4, 12)).astype(np.int32)
    m = load(orbax_a)
    return ids, scoring.logits(m, ids), scoring.logits(m, ids, mode="decode", prefill=4), _greedy(m)


@pytest.mark.parametrize("mesh_text,rules", [(m, "ep_tp") for m in MESHES] + [(MESHES[2], "ep_dp")])
def test_mesh_shapes_give_single_device_results(orbax_a, single, mesh_text, rules):
    """From the same Orbax checkpoint: logits (prefill and decode) and greedy tokens."""
    ids, ref, ref_dec, ref_tokens = single
    mesh = sharding.make_mesh(sharding.parse_mesh(mesh_text, 8))
    model = load(orbax_a, mesh=mesh, rules=rules)
    with jax.set_mesh(mesh):
        got = scoring.logits(model, ids)
        dec = scoring.logits(model, ids, mode="decode", prefill=4)
        tokens = _greedy(model)
    assert rel(got, ref) < 1e-5 and rel(dec, ref_dec) < 1e-5
    assert (got.argmax(-1) == ref.argmax(-1)).all() and (dec.argmax(-1) == ref_dec.argmax(-1)).all()
    assert tokens == ref_tokens


def test_weights_are_placed_sharded(ckpt_a):
    mesh = sharding.make_mesh(sharding.parse_mesh("data=1,expert=8,model=1", 8))
    model = load_hub(ckpt_a, mesh=mesh)
    w = model.moe_layers.mlp.experts.gate_proj.weight[...]   # [layers, E=16, F, D]
    assert w.sharding.spec[1] == "expert"
    assert {s.data.shape[1] for s in w.addressable_shards} == {2}


def test_expert_hidden_split_over_model_bf16(ckpt_a_bf16):
    """bf16 experts split their hidden dim over `model` (partial sums reduced): same logits."""
    ids = np.random.default_rng(1).integers(0, 256, (2, 8)).astype(np.int32)
    ref = scoring.logits(load_hub(ckpt_a_bf16), ids)
    mesh = sharding.make_mesh(sharding.parse_mesh("data=1,expert=4,model=2", 8))
    model = load_hub(ckpt_a_bf16, mesh=mesh)
    assert model.moe_layers.mlp.experts.gate_proj.weight[...].sharding.spec[1:3] == ("expert", "model")
    with jax.set_mesh(mesh):
        got = scoring.logits(model, ids)
    assert rel(got, ref) < 1e-5


def test_fp8_scales_follow_their_weights():
    """A shard boundary inside a 128-block would separate weights from their scale: replicate."""
    rules = sharding.RULES["ep_tp"]
    ms = {"data": 1, "expert": 1, "model": 8}
    path = ("moe_layers", "self_attn", "q_b_proj", "weight")
    spl = sharding.param_spec(path, (2, 24576, 1536), ms, rules, (2, 24576, 1536))
    assert spl[1] == "model"                   # 24576 / 8 = 3072 = 24 whole blocks
    odd = sharding.param_spec(path, (2, 1000, 64), ms, rules, (2, 1000, 64))
    assert odd[1] is None                      # 1000 does not split into whole blocks
    assert sharding.param_spec(path, (2, 1000, 64), ms, rules)[1] == "model"  # a bf16 weight may split


@pytest.mark.parametrize("text,needle", [("data=3,model=3", "devices"), ("foo=8", "unknown axis"),
                                         ("data=x", "positive integer"), ("data", "AXIS=SIZE")])
def test_mesh_flag_errors(text, needle):
    with pytest.raises(DeepSeekError, match=needle):
        sharding.parse_mesh(text, 8)


def test_every_parameter_has_logical_axes(ckpt_a):
    model = load_hub(ckpt_a)
    specs = sharding.model_param_specs(model, {"data": 2, "expert": 2, "model": 2}, sharding.RULES["ep_tp"])
    from deepseek_jax.checkpoint import iter_params
    for path, var in iter_params(model):
        assert len(sharding.param_axes(path)) == var.ndim, path
        assert len(specs[path]) == var.ndim
