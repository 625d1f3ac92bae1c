"""Mesh sharding and expert parallelism on 8 fake CPU devices: same numbers as one device."""

from __future__ import annotations

import re

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


def test_shared_prefix_on_a_mesh(orbax_a, single):
    """A batch whose prompts share 32 leading tokens, on a data x expert x model mesh: the
    prefix's batch-1 cache is copied to rows split over ``data``, and the greedy tokens are those
    of whole prompts on one device."""
    from deepseek_jax.generate import Generator
    prompts = [[0] + list(range(3, 35)) + [7], [0] + list(range(3, 35)) + [9, 11, 12]]
    kw = dict(max_new_tokens=6, stop_at_eos=False)
    want = [r.output_ids for r in Generator(load(orbax_a), share_prefix=False).generate(prompts, **kw)]
    mesh = sharding.make_mesh(sharding.parse_mesh(MESHES[3], 8))
    with jax.set_mesh(mesh):
        gen = Generator(load(orbax_a, mesh=mesh))
        got = [r.output_ids for r in gen.generate(prompts, **kw)]
    assert gen.last_stats.shared_prefix == 32 and got == want


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


def test_flash_attention_on_a_mesh(orbax_a, single, monkeypatch):
    """``prefill_attention="flash"`` on CPU (the blocked attention, in 4-key blocks: 3 per row)
    with the heads split over ``model`` and the rows over ``data``: the one-device plain logits,
    prefill and decode."""
    from kernels_pallas import blocked_attention
    monkeypatch.setattr(blocked_attention, "BLOCK_K", 4)
    ids, ref, ref_dec, _ = single
    mesh = sharding.make_mesh(sharding.parse_mesh("data=2,expert=2,model=2", 8))
    model = load(orbax_a, mesh=mesh, prefill_attention="flash")
    with jax.set_mesh(mesh):
        got = scoring.logits(model, ids)
        dec = scoring.logits(model, ids, mode="decode", prefill=4)
    assert rel(got, ref) < 1e-5 and rel(dec, ref_dec) < 1e-5


def test_kernels_run_per_shard_and_give_single_device_results(orbax_a, single):
    """The Pallas kernels (here the Pallas interpreter; on a TPU, Mosaic, which refuses to be
    partitioned) inside ``shard_map``s (``deepseek_jax.kernel_mesh``): the FP8 linears split by
    column or by row (a float32 sum over ``model``), the MLA decode kernel by rows and heads, the
    grouped GEMM in the expert-parallel map reading all layers' experts in place. Same logits as
    one device without kernels: a 6-token prefill (naive form) then two decode steps (absorbed,
    the MLA kernel)."""
    import dataclasses

    from flax import nnx

    from deepseek_jax.kernel_mesh import Placement
    from deepseek_jax.mla import MLA
    from deepseek_jax.quant import Linear

    mesh = sharding.make_mesh(sharding.parse_mesh("data=2,expert=2,model=2", 8))
    model = load(orbax_a, mesh=mesh, kernels="interpret")
    for _, m in nnx.iter_modules(model):   # the layers' weights whole + a layer index, as on a GPU/TPU
        if hasattr(m, "prec"):
            m.prec = dataclasses.replace(m.prec, weights_in_place=True)
    mods = [m for _, m in nnx.iter_modules(model) if isinstance(m, MLA) or (isinstance(m, Linear) and m.fp8)]
    assert mods and all(isinstance(m.placement, Placement) for m in mods)
    ids = single[0][:2, :8]
    with jax.set_mesh(mesh):
        got = scoring.logits(model, ids, mode="decode", prefill=6)
    assert rel(got, scoring.logits(load(orbax_a), ids, mode="decode", prefill=6)) < 1e-5


@pytest.mark.parametrize("split", ["column", "row"])
def test_fp8_linear_kernel_per_shard(split):
    """``kernel_mesh.linear`` with the weight's output dim split over ``model`` (each shard its
    columns) or its input dim (partial products summed over ``model`` in float32), rows over
    ``data``: the interpreted FP8 GEMM per shard equals the unsharded reference. The test model
    above is too narrow for whole 128-blocks per shard, so both splits are checked here."""
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import kernels_pallas as kp
    from deepseek_jax import kernel_mesh
    from deepseek_jax.kernel_mesh import Placement
    from deepseek_jax.quant import quantize

    if len(jax.devices()) < 8:
        pytest.skip("needs JAX_NUM_CPU_DEVICES=8")
    mesh = sharding.make_mesh(sharding.parse_mesh("data=2,expert=2,model=2", 8))
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(4, 3, 768)), jnp.float32)
    wq, ws = quantize(jnp.asarray(rng.normal(size=(512, 768)) * 0.05, jnp.float32))
    spec = P("model", None) if split == "column" else P(None, "model")
    pl = Placement(mesh, tuple(sorted(sharding.RULES["ep_tp"].items())), spec, spec)
    with jax.set_mesh(mesh):
        got = jax.jit(lambda x, w, s: kernel_mesh.linear(
            kp.w8a16_matmul, x, w, s, layer=None, out_dtype=jnp.float32, impl="interpret", pl=pl))(x, wq, ws)
    want = kp.w8a16_matmul_ref(x.reshape(-1, 768), wq, ws).reshape(4, 3, 512)
    assert rel(np.asarray(got), np.asarray(want)) < 1e-6


@pytest.mark.parametrize("split", ["heads", "heads_and_latent"])
@pytest.mark.parametrize("part", ["k", "v"])
def test_mla_absorb_kernel_per_shard(part, split):
    """``kernel_mesh.mla_absorb``: the interpreted GPU kernel per shard with ``kv_b_proj``'s heads
    over ``model`` (and its latent dim over ``expert``: ``q_lat``'s columns split, or ``o``'s
    partial products summed), rows over ``data``, a layer of a stack read in place; equals the
    reference on the whole arrays."""
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import kernels_pallas as kp
    from deepseek_jax import kernel_mesh
    from deepseek_jax.kernel_mesh import Placement
    from deepseek_jax.quant import quantize

    if len(jax.devices()) < 8:
        pytest.skip("needs JAX_NUM_CPU_DEVICES=8")
    mesh = sharding.make_mesh(sharding.parse_mesh("data=2,expert=2,model=2", 8))
    rng = np.random.default_rng(5)
    H, N, A, L = 4, 128, 128, 256
    wq, ws = quantize(jnp.asarray(rng.normal(size=(2, H * (N + A), L)) * 0.05, jnp.float32))
    x = jnp.asarray(rng.normal(size=(4, 1, H, N if part == "k" else L)), jnp.float32)
    spec = P(None, "model", "expert" if split == "heads_and_latent" else None)
    pl = Placement(mesh, tuple(sorted(sharding.RULES["ep_tp"].items())), spec, spec)
    with jax.set_mesh(mesh):
        got = jax.jit(lambda x, w, s: kernel_mesh.mla_absorb(
            kp.mla_absorb, x, w, s, part=part, nope=N, layer=1, out_dtype=jnp.float32,
            impl="interpret_gpu", pl=pl))(x, wq, ws)
    want = kp.mla_absorb_ref(x, wq, ws, part=part, nope=N, layer=1)
    assert rel(np.asarray(got), np.asarray(want)) < 1e-6


@pytest.mark.parametrize("impl", ["interpret_gpu", "interpret_tpu"])
def test_cached_attention_kernel_per_shard(impl):
    """``kernel_mesh.cached_attention``: a prefill chunk over the cache, rows over ``data``, heads
    over ``model`` (the rope key shared by the heads whole on each), the interpreted GPU or TPU
    kernel per shard (the TPU one takes each shard's heads as columns of ``[B, S, H * W]``);
    equals the reference on the whole arrays."""
    import jax.numpy as jnp

    import kernels_pallas as kp
    from deepseek_jax.kernel_mesh import Placement, cached_attention

    if len(jax.devices()) < 8:
        pytest.skip("needs JAX_NUM_CPU_DEVICES=8")
    mesh = sharding.make_mesh(sharding.parse_mesh("data=2,expert=2,model=2", 8))
    rng = np.random.default_rng(6)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    B, T, H, S = 2, 9, 4, 40
    args = (f(B, T, H, 32), f(B, T, H, 16), f(B, S, H, 64), f(B, S, 16),
            jnp.asarray([np.arange(T) + 20, np.arange(T) + 31], jnp.int32))
    pl = Placement(mesh, tuple(sorted(sharding.RULES["ep_tp"].items())))
    with jax.set_mesh(mesh):
        got = jax.jit(lambda *a: cached_attention(kp.cached_attention, *a, pl=pl, scale=0.1,
                                                  impl=impl))(*args)
    want = kp.cached_attention_ref(*args, scale=0.1)
    assert rel(np.asarray(got), np.asarray(want)) < 1e-5


def test_mla_decode_kernel_per_shard():
    """``kernel_mesh.mla_decode``: rows as the stacked latent cache's batch (``data``), heads over
    ``model``, the layer read in place; equals the reference on the whole arrays."""
    import jax.numpy as jnp

    import kernels_pallas as kp
    from deepseek_jax.kernel_mesh import Placement, mla_decode

    if len(jax.devices()) < 8:
        pytest.skip("needs JAX_NUM_CPU_DEVICES=8")
    mesh = sharding.make_mesh(sharding.parse_mesh("data=2,expert=2,model=2", 8))
    rng = np.random.default_rng(3)
    B, H, L, R, S = 4, 4, 64, 16, 40
    q = jnp.asarray(rng.normal(size=(B, H, L)), jnp.float32)
    qp = jnp.asarray(rng.normal(size=(B, H, R)), jnp.float32)
    cache = jnp.asarray(rng.normal(size=(3, B, S, L + R)), jnp.float32)
    n = jnp.asarray([40, 1, 17, 33], jnp.int32)
    pl = Placement(mesh, tuple(sorted(sharding.RULES["ep_tp"].items())))
    with jax.set_mesh(mesh):
        got = jax.jit(lambda *a: mla_decode(kp.mla_decode, *a, layer=1, pl=pl, scale=0.1, kv_lora_rank=L,
                                            impl="interpret"))(q, qp, cache, n)
    want = kp.mla_decode_ref(q, qp, cache[1], n, scale=0.1, kv_lora_rank=L)
    assert rel(np.asarray(got), np.asarray(want)) < 1e-5


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
                                         ("data=x", "positive integer"), ("data", "AXIS=SIZE"),
                                         ("data=1,data=1", "given twice"), ("data=\u00b2", "positive integer"),
                                         ("data=\u0663", "positive integer")])
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


@pytest.mark.parametrize("rules,needle", [
    ({"expert": "expert"}, "unknown logical axis 'expert'"),                  # for "experts": split nothing
    ({"batch": ("data", "data")}, "a mesh axis can split a dimension only once"),
    ({"experts": "model"}, "rules['experts'] = 'model': must be 'expert' or None"),   # crashed in the MoE layer
    ({"experts": ("expert", "model")}, "must be 'expert' or None"),
    ({"expert_mlp": "expert"}, "rules['expert_mlp'] = 'expert': must be 'model' or None"),
])
def test_rules_the_model_cannot_honour_are_refused(rules, needle):
    with pytest.raises(DeepSeekError, match=re.escape(needle)) as e:
        sharding.resolve_rules(rules)
    assert "\n" not in str(e.value)


def test_a_tuple_of_axes_that_does_not_divide_keeps_its_leading_axes():
    """ep_dp's batch over data x expert, for a batch that divides data only: split over data (as
    the MoE exchange and the kernels do), not replicated, which held more cache than ep_tp."""
    ms = {"data": 2, "expert": 4, "model": 1}
    shape = (3, 2, 64, 576)   # [L, B, S, C]: B = 2
    assert sharding.cache_spec(ms, sharding.RULES["ep_dp"], shape) == sharding.cache_spec(ms, sharding.RULES["ep_tp"], shape)
    assert sharding.cache_spec(ms, sharding.RULES["ep_dp"], shape)[1] == "data"
    assert sharding.cache_spec(ms, sharding.RULES["ep_dp"], (3, 8, 64, 576))[1] == ("data", "expert")


def test_make_mesh_refuses_a_device_listed_twice():
    d = jax.devices()[0]
    with pytest.raises(DeepSeekError, match="more than once"):
        sharding.make_mesh({"expert": 2}, devices=[d, d])


def test_a_mesh_with_explicit_axes(orbax_a, single):
    """``jax.make_mesh``'s default axes are Explicit: a model loaded on such a mesh failed at its
    first call under it, deep inside JAX (a gather asking for ``out_sharding=``). The loaders take
    it as Auto; under an Explicit mesh context the calls are a one-line error."""
    mesh = jax.make_mesh((2, 2, 2), ("data", "expert", "model"), devices=jax.devices()[:8])
    assert any(t != jax.sharding.AxisType.Auto for t in mesh.axis_types)
    ids, ref = single[0], single[1]
    model = load(orbax_a, mesh=mesh)
    assert rel(scoring.logits(model, ids), ref) < 1e-5
    with jax.set_mesh(sharding.auto_mesh(mesh)):
        assert rel(scoring.logits(model, ids), ref) < 1e-5
    with jax.set_mesh(mesh):
        with pytest.raises(DeepSeekError, match=r"^the current mesh \(jax.set_mesh\) has Explicit axes"):
            scoring.logits(model, ids)


def test_one_prompt_is_split_over_the_data_axis(orbax_a, single, capfd):
    """One prompt on a ``data=2`` mesh: a batch bucket of one row could not be split over
    ``data``, and XLA warned of "involuntary full rematerialization" (gathering the batch to every
    device and splitting it again) at each compile. The batch is now padded to a row per data
    shard; the tokens are one device's, plain and speculative. Scoring's decode mode too."""
    from deepseek_jax.generate import Generator
    sizes = sharding.parse_mesh("data=2,expert=4", 8)
    mesh = sharding.make_mesh(sizes)
    with jax.set_mesh(mesh):
        model = load(orbax_a, mesh=mesh)
        gen = Generator(model)
        capfd.readouterr()
        got = [gen.generate([PROMPTS[1]], max_new_tokens=6, stop_at_eos=False, speculative=spec)[0].output_ids
               for spec in (None, "mtp")]
        decoded = scoring.logits(model, single[0][1:2], mode="decode", prefill=4)   # (so did this)
    assert "rematerialization" not in capfd.readouterr().err
    assert gen.last_stats.buckets[0] == 2
    from deepseek_jax.plan import make_plan
    assert make_plan(gen.model.cfg, sizes, batch=1, max_len=64, compile_steps=False).rows == 2   # (plan agrees)
    assert got == [single[3][1]] * 2
    np.testing.assert_allclose(decoded, single[2][1:2], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mesh_text", ["expert=8", "data=2,expert=4"])
def test_generator_decode_loop_gathers_no_cache(orbax_a, mesh_text):
    """The generator's decode loop on a mesh: XLA split the latent cache carried through the layer
    scan over the experts' axis and all-gathered it whole at every step (two all-gathers of the
    cache per step: temporaries 10.2 and 5.2 MiB against 1.0 and 1.1 now for a tiny config at
    batch 128). The scan's carry now keeps the rules' split."""
    import math
    import re

    from deepseek_jax import generate as G
    mesh = sharding.make_mesh(sharding.parse_mesh(mesh_text, 8))
    with jax.set_mesh(mesh):
        gen = G.Generator(load(orbax_a, mesh=mesh, dtype="bfloat16"), weights="as-is")
        gen.generate([[1, 2, 3]] * 256, max_new_tokens=120, stop_at_eos=False)
        prefill, decode = list(G._EXECUTABLES.values())[-1][:2]
    cache = sum(math.prod(sh.shard_shape(a.shape)) * a.dtype.itemsize for a, sh in
                zip(jax.tree.leaves(prefill.out_info.cache), jax.tree.leaves(prefill.output_shardings.cache)))
    gathered = [line for line in decode.as_text().splitlines() if re.search(r"all-gather\(", line)
                and re.search(r"\[\d+,256,\d+,\d+\]", line.split("all-gather(")[0])]
    assert not gathered, gathered[:2]
    assert decode.memory_analysis().temp_size_in_bytes < cache / 2, (decode.memory_analysis(), cache)


@pytest.mark.parametrize("mesh_text,rules", [("data=8,expert=1,model=1", "ep_tp"), ("data=2,expert=4,model=1", "ep_dp")])
def test_generator_cache_is_split_as_planned(orbax_a, single, mesh_text, rules):
    """The generator's latent cache is split by the rules (its batch over ``data``; ``ep_dp``:
    ``data`` x ``expert``), an eighth of it per device here, and is what ``plan`` counts to the
    byte. It was whole on every device (``data`` split nothing at inference); tokens unchanged."""
    import math

    from deepseek_jax import generate as G
    from deepseek_jax.plan import make_plan
    sizes = sharding.parse_mesh(mesh_text, 8)
    mesh = sharding.make_mesh(sizes)
    prompts = [[0, 5, 17, 33, 2], [0, 9]] * 4
    with jax.set_mesh(mesh):
        model = load(orbax_a, mesh=mesh, rules=rules)
        gen = G.Generator(model)
        got = [r.output_ids for r in gen.generate(prompts, max_new_tokens=6, stop_at_eos=False)]
        prefill = list(G._EXECUTABLES.values())[-1][0]     # (the executables this call compiled)
        spec = gen.generate(prompts, max_new_tokens=6, stop_at_eos=False, speculative="mtp")
        mtp_cache = list(G._EXECUTABLES.values())[-1][0].output_shardings.mtp_cache   # the MTP layer's too
    assert [r.output_ids for r in spec] == got
    want = tuple(sharding.cache_spec(sizes, sharding.resolve_rules(rules), (1, 8, 16, 1)))[1:]
    assert tuple(mtp_cache.spec) + (None,) * (3 - len(mtp_cache.spec)) == want and want[0] is not None
    arrays = jax.tree.leaves(prefill.out_info.cache)
    per_device = sum(math.prod(sh.shard_shape(a.shape)) * a.dtype.itemsize
                     for a, sh in zip(arrays, jax.tree.leaves(prefill.output_shardings.cache)))
    whole = sum(math.prod(a.shape) * a.dtype.itemsize for a in arrays)
    rows, _, positions = gen.last_stats.buckets
    plan = make_plan(model.cfg, sizes, rules=rules, batch=len(prompts), max_len=positions, dtype="float32",
                     compile_steps=False)
    assert rows == 8 and per_device * 8 == whole and per_device == plan.cache
    assert got == single[3] * 4
