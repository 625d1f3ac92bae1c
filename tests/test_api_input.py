"""User-level input validation of the Python API: every mistake a caller can make is a one-line
:class:`DeepSeekError` naming the argument (or config field) and the bad value, raised up front,
never a raw TypeError/KeyError/AttributeError from deep inside (or from inside jit)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

import deepseek_jax as dj
from deepseek_jax import sharding
from deepseek_jax.config import DeepSeekConfig
from deepseek_jax.errors import DeepSeekError
from deepseek_jax.generate import Generator
from deepseek_jax.sampling import SamplingParams
from deepseek_jax.synthetic import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _raises(fn, *needles):
    """Calls ``fn``; asserts a one-line DeepSeekError whose message holds every needle."""
    with pytest.raises(DeepSeekError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


@pytest.fixture(scope="module")
def model_a(ckpt_a):
    return dj.load(ckpt_a)


# ---- config.json: wrong types --------------------------------------------------------------------
@pytest.mark.parametrize("field,value,needle", [
    ("rms_norm_eps", None, "must be a number"),
    ("rms_norm_eps", "1e-6", "must be a number"),
    ("rms_norm_eps", True, "must be a number"),
    ("rms_norm_eps", 0.0, "positive"),
    ("routed_scaling_factor", None, "must be a number"),
    ("routed_scaling_factor", "2.5", "must be a number"),
    ("rope_theta", None, "rope_theta"),
    ("rope_theta", True, "rope_theta"),
    ("norm_topk_prob", None, "true or false"),
    ("tie_word_embeddings", 1, "true or false"),
    ("tie_word_embeddings", True, "tied embeddings are not supported"),   # was "missing tensor lm_head.weight"
    ("bos_token_id", None, "must be an integer"),
    ("eos_token_id", "1", "must be an integer"),
    ("eos_token_id", [None], "must be an integer"),
    ("q_lora_rank", True, "positive integer or null"),
    ("moe_layer_freq", 1.0, "must be an integer"),
    ("max_position_embeddings", None, "must be an integer"),
    ("num_nextn_predict_layers", "1", "must be an integer"),
    ("scoring_func", None, "scoring_func"),
    ("quantization_config", "fp8", "quantization_config"),
    ("quantization_config", {"quant_method": "fp8", "weight_block_size": None}, "weight_block_size"),
])
def test_config_wrong_types_name_the_field(field, value, needle):
    _raises(lambda: DeepSeekConfig.from_hub_dict(tiny_config(**{field: value})), field, needle)


@pytest.mark.parametrize("key,value", [("factor", None), ("beta_fast", "32"), ("original_max_position_embeddings", 3.5),
                                       ("beta_slow", False)])
def test_config_rope_scaling_wrong_types(key, value):
    d = tiny_config()
    d["rope_scaling"] = dict(d["rope_scaling"], **{key: value})
    _raises(lambda: DeepSeekConfig.from_hub_dict(d), f"rope_scaling.{key}")


def test_config_rope_scaling_null_mscale_is_default():
    d = tiny_config()
    d["rope_scaling"] = dict(d["rope_scaling"], mscale=None, mscale_all_dim=None)
    rs = DeepSeekConfig.from_hub_dict(d).rope_scaling
    assert rs.mscale == 1.0 and rs.mscale_all_dim == 0.0


def test_load_rejects_null_scaling_factor_up_front(ckpt_a, tmp_path):
    """routed_scaling_factor: null used to pass validation and fail inside jit at the first call."""
    for name in os.listdir(ckpt_a):
        if name != "config.json":
            os.symlink(os.path.join(ckpt_a, name), tmp_path / name)
    with open(os.path.join(ckpt_a, "config.json")) as f:
        cfg = json.load(f)
    cfg["routed_scaling_factor"] = None
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _raises(lambda: dj.load(tmp_path), "routed_scaling_factor", "None")


def test_load_config_bad_name():
    _raises(lambda: dj.load_config("no-such-preset"), "no-such-preset", "deepseek-v3-671b")
    _raises(lambda: dj.load_config(None), "config")


# ---- dj.load arguments ---------------------------------------------------------------------------
def test_load_rejects_unknown_kernels(ckpt_a):
    _raises(lambda: dj.load(ckpt_a, kernels="bogus"), "kernels", "'bogus'", "ref")
    _raises(lambda: dj.load(ckpt_a, kernels=None), "kernels")


def test_kernels_env_var_checked_at_load(ckpt_a, monkeypatch):
    monkeypatch.setenv("DEEPSEEK_JAX_KERNELS", "bogus")
    _raises(lambda: dj.load(ckpt_a), "DEEPSEEK_JAX_KERNELS", "'bogus'")
    _raises(lambda: dj.api.precision(), "DEEPSEEK_JAX_KERNELS")
    monkeypatch.setenv("DEEPSEEK_JAX_KERNELS", "REF")   # any case, like the kernels themselves
    assert dj.api.precision().kernels == "auto"


def test_load_other_arguments(ckpt_a):
    _raises(lambda: dj.load(ckpt_a, dtype="fp16"), "dtype", "'fp16'")
    _raises(lambda: dj.load(ckpt_a, fp8_mode="w4a16"), "fp8", "'w4a16'")
    _raises(lambda: dj.load(ckpt_a, mtp="yes"), "mtp", "'yes'")
    _raises(lambda: dj.load(ckpt_a, prefill_attention="fast"), "prefill attention", "'fast'", "plain|flash")
    _raises(lambda: dj.load(ckpt_a, ep_capacity=0), "ep_capacity", "0")
    _raises(lambda: dj.load(ckpt_a, ep_capacity="2"), "ep_capacity", "'2'")
    _raises(lambda: dj.load(ckpt_a, ep_capacity=float("inf")), "ep_capacity", "inf")
    _raises(lambda: dj.load(123), "path", "int")
    assert all(m.prec.ep_capacity == 1.5 for _, m in nnx.iter_modules(dj.load(ckpt_a, ep_capacity=1.5))
               if hasattr(m, "prec"))


def test_load_rejects_bad_rules_and_mesh(ckpt_a):
    mesh = sharding.make_mesh({"data": 1, "expert": 1, "model": 1}, jax.devices()[:1])
    msg = _raises(lambda: dj.load(ckpt_a, mesh=mesh, rules="bogus"), "rules", "'bogus'")
    assert "'ep_tp'" in msg and "'ep_dp'" in msg
    _raises(lambda: dj.load(ckpt_a, rules="bogus"), "rules")           # checked without a mesh too
    _raises(lambda: dj.load(ckpt_a, mesh=mesh, rules=3), "rules", "int")
    _raises(lambda: dj.load(ckpt_a, mesh=mesh, rules={"experts": "gpu"}), "rules['experts']", "'gpu'")
    _raises(lambda: dj.load(ckpt_a, mesh={"expert": 1}), "mesh", "dict")


def test_rules_mapping_accepted():
    table = sharding.resolve_rules({"experts": "expert", "batch": ["data", "expert"], "vocab": None})
    assert table == {"experts": "expert", "batch": ("data", "expert"), "vocab": None}
    assert sharding.resolve_rules("ep_dp") is sharding.RULES["ep_dp"]
    other = jax.make_mesh((1,), ("x",), devices=jax.devices()[:1])
    _raises(lambda: sharding.resolve_rules("ep_tp", other), "mesh", "'data'")


# ---- scoring -------------------------------------------------------------------------------------
def test_token_logprobs_checks_shapes():
    V = 10
    lg = np.zeros((1, 3, V), np.float32)
    _raises(lambda: dj.token_logprobs(lg, np.zeros((1, 2), np.int32)), "logits length 3", "ids length 2")
    _raises(lambda: dj.token_logprobs(lg, np.zeros((2, 3), np.int32)), "batch")
    _raises(lambda: dj.token_logprobs(lg[0], np.zeros((1, 3), np.int32)), "logits", "[3, 10]")
    _raises(lambda: dj.token_logprobs(lg, np.zeros((3,), np.int32)), "ids", "[3]")
    _raises(lambda: dj.token_logprobs(lg, np.zeros((1, 3), np.float32)), "ids", "float32")
    _raises(lambda: dj.token_logprobs(lg, np.full((1, 3), V, np.int32)), "token id 10")
    _raises(lambda: dj.token_logprobs(lg, np.zeros((1, 3), np.int32), offset=0), "offset")
    # the main head's T rows with offset 2 gave numbers (each row scored against the token 2 ahead)
    _raises(lambda: dj.token_logprobs(lg, np.zeros((1, 3), np.int32), offset=2), "want 2 positions", "offset=1")
    _raises(lambda: dj.token_logprobs([[[0.0, 1.0], [1.0]]], [[0, 1]]), "rectangular")   # was numpy's ValueError
    assert dj.token_logprobs(lg, np.zeros((1, 3), np.int32)).shape == (1, 2)
    # mtp_logits' T-1 rows with offset 2 (what `deepseek-jax score --mtp` does)
    np.testing.assert_allclose(dj.token_logprobs(lg[:, :2], np.zeros((1, 3), np.int32), offset=2),
                               [[-np.log(V)]], rtol=1e-6)


def test_scoring_messages_are_worded_for_the_api(ckpt_a, model_a):
    no_mtp = dj.load(ckpt_a, mtp=False)
    msg = _raises(lambda: dj.mtp_logits(no_mtp, [[1, 2, 3]]), "mtp=True")
    assert "--" not in msg
    msg = _raises(lambda: dj.logits(model_a, [[1, 2]], mode="decode", prefill=5), "prefill 5")
    assert "--" not in msg
    _raises(lambda: dj.logits(model_a, [[1, 2]], mode="fast"), "mode", "'fast'")
    _raises(lambda: dj.logits(model_a, [[1, 2]], prefill=5), "prefill=5 needs mode='decode'")   # was ignored
    _raises(lambda: dj.sequence_logprobs(model_a, np.array([1, 2, 3])), "one sequence is still a list")
    _raises(lambda: dj.logits(model_a, [[1, 2], [3]]), "ids", "lengths")
    _raises(lambda: dj.logits(ckpt_a, [[1, 2]]), "model", "str")


# ---- Generator -----------------------------------------------------------------------------------
def test_generator_arguments(model_a):
    g = Generator(model_a)
    _raises(lambda: g.generate([[1, 2]], stream_chunk=0), "stream_chunk", "0")
    _raises(lambda: g.generate([[1, 2]], stream_chunk="4"), "stream_chunk")
    _raises(lambda: Generator(model_a, stream_chunk=0), "stream_chunk", "0")
    _raises(lambda: Generator(model_a, max_len="64"), "max_len", "'64'")
    _raises(lambda: g.generate([]), "prompts")
    _raises(lambda: g.generate([[]]), "prompt 0 is empty")
    _raises(lambda: g.generate(None), "prompts")
    _raises(lambda: g.generate([[1, 2]], sampling={"temp": 0.5}), "sampling", "'temp'")
    _raises(lambda: g.generate([[1, 2]], sampling=0.5), "sampling", "float")
    _raises(lambda: g.generate([[1, 2]], sampling={"temperature": "hot"}), "temperature", "'hot'")
    _raises(lambda: g.generate([[1, 2]], eos_id="1"), "eos_id", "'1'")
    _raises(lambda: g.generate([[1, 2]], stream=3), "stream")


def test_generator_accepts_sampling_dict(model_a):
    g = Generator(model_a)
    kw = dict(max_new_tokens=3, seed=7, stop_at_eos=False)
    a = g.generate([[5, 6, 7]], sampling={"temperature": 0.8, "top_k": 5}, **kw)
    b = g.generate([[5, 6, 7]], sampling=SamplingParams(temperature=0.8, top_k=5), **kw)
    assert a[0].output_ids == b[0].output_ids and len(a[0].output_ids) == 3


def test_generator_checks_types_and_ranges(model_a):
    g = Generator(model_a, max_len=12)
    _raises(lambda: Generator("ckpt"), "model", "str")
    _raises(lambda: Generator(model_a, reuse_prefix="no"), "reuse_prefix", "'no'")
    _raises(lambda: Generator(model_a, share_prefix=1), "share_prefix", "1")
    _raises(lambda: Generator(model_a, prefill_chunk=17), "prefill_chunk", "17", "power of two")
    _raises(lambda: g.generate([[1, 2]], stop_at_eos="no"), "stop_at_eos", "'no'")
    _raises(lambda: g.generate([[1, 2]], seed=-1), "seed", "-1")
    _raises(lambda: g.generate([[1, 2]], seed=2 ** 32), "seed", str(2 ** 32))   # was the samples of seed 0
    _raises(lambda: g.generate([[1, 2]], first_row=2 ** 32), "first_row", "2**32")
    _raises(lambda: g.generate([[1, 2]], sampling={"temperature": -1.0}), "temperature", "-1.0", ">= 0")
    kw = dict(seed=3, stop_at_eos=False)
    # a budget beyond int32 is cut by the max length, as any budget past it is
    (huge,) = g.generate([[5, 6, 7]], max_new_tokens=10 ** 10, **kw)
    assert len(huge.output_ids) == 12 - 3 and huge.finish_reason == "length"
    # any top-k at or past the vocabulary is "no limit", also past int32
    s = dict(temperature=1.0)
    (a,) = g.generate([[5, 6, 7]], max_new_tokens=4, sampling={**s, "top_k": 2 ** 31}, **kw)
    (b,) = g.generate([[5, 6, 7]], max_new_tokens=4, sampling={**s, "top_k": model_a.cfg.vocab_size}, **kw)
    assert a.output_ids == b.output_ids
    # jax arrays are token ids like numpy's
    (c,) = g.generate(jax.numpy.array([[5, 6, 7]]), max_new_tokens=4, **kw)
    (d,) = g.generate([jax.numpy.array([5, 6, 7])], max_new_tokens=4, **kw)
    assert c.output_ids == d.output_ids == huge.output_ids[:4]


def test_numpy_scalars_and_arrays_are_taken_as_python_ones(model_a):
    """numpy booleans were refused by every True/False switch ("np.True_": numpy 2 renamed the
    class), jax arrays of stop ids and 0-d arrays inside a prompt were refused, and a string as
    ``chat`` applied the template."""
    g = Generator(model_a)
    kw = dict(max_new_tokens=3, stop_at_eos=np.False_)
    (a,) = g.generate([[5, 6, 7]], logprobs=np.True_, **kw)
    (b,) = g.generate([[jax.numpy.int32(5), np.int64(6), np.array(7)]], stop_token_ids=jax.numpy.array([250]),
                      logprobs=True, **kw)
    assert a.output_ids == b.output_ids and len(a.logprobs) == 3
    r = dj.loglikelihood(model_a, [([5, 6], [7])], share=np.False_)
    assert r[0].tokens == 1
    assert Generator(model_a, reuse_prefix=np.True_).reuse_prefix
    _raises(lambda: g.generate([[np.array([5, 6])]], **kw), "token 0")
    _raises(lambda: g.generate([[np.float32(5.0)]], **kw), "not an integer id")
    _raises(lambda: dj.load(dj.demo_checkpoint(), mtp="yes"), "mtp", "'yes'")
    from deepseek_jax.tokenizer import Tokenizer
    t = Generator(model_a, Tokenizer.from_dir(dj.demo_checkpoint()))
    _raises(lambda: t.encode_prompt("7+1", chat="no"), "chat", "'no'")
    _raises(lambda: t.generate_text("7+1", chat="no"), "chat", "'no'")
    _raises(lambda: t.generate_text("7+1", stream=5, max_new_tokens=3), "stream", "int")
    assert t.encode_prompt("7+1", chat=np.False_) == t.encode_prompt("7+1", chat=False)


def test_precision_checks_its_fields():
    """``dj.Precision`` took kernels="cuda" (a ValueError at the first trace) and a string for a
    switch; its checks raised ValueError."""
    for kw, needle in ((dict(kernels="cuda"), "unknown kernel impl 'cuda'"), (dict(fp8_mode="x"), "fp8_mode"),
                       (dict(weights_in_place="yes"), "weights_in_place"), (dict(dtype="int8"), "dtype"),
                       (dict(dtype="nope"), "dtype"), (dict(scan_unroll=0), "scan_unroll"),
                       (dict(ep_capacity=0.0), "ep_capacity"), (dict(prefill_attention="fast"), "prefill_attention")):
        _raises(lambda: dj.Precision(**kw), needle)
    assert dj.Precision(kernels=" REF ").kernels == "ref"
    assert dj.Precision(ep_capacity=np.int64(2)).ep_capacity == 2
    assert dj.Precision(weights_in_place=np.True_).weights_in_place is True


def test_context_mesh_must_be_the_models():
    """A model loaded on one mesh, run under another (jax.set_mesh), failed inside shard_map."""
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices")
    mesh = sharding.make_mesh({"expert": 2}, jax.devices()[:2])
    m = dj.load(dj.demo_checkpoint(), mesh=mesh)
    with jax.set_mesh(mesh):
        assert dj.logits(m, [[1, 2, 3]]).shape == (1, 3, 264)
    with jax.set_mesh(sharding.make_mesh({"data": 2}, jax.devices()[:2])):
        _raises(lambda: dj.logits(m, [[1, 2, 3]]), "not the one the model was loaded on", "expert=2")
        _raises(lambda: Generator(m).generate([[1, 2, 3]], max_new_tokens=2), "not the one the model was loaded on")


def test_init_random_and_scoring_switches(ckpt_a, model_a):
    cfg = dj.load_config(ckpt_a)
    _raises(lambda: dj.init_random(tiny_config()), "cfg", "DeepSeekConfig", "dict")
    _raises(lambda: dj.init_random(cfg, seed="x"), "seed", "'x'")
    _raises(lambda: dj.init_random(cfg, with_mtp="no"), "with_mtp", "'no'")
    _raises(lambda: dj.loglikelihood(model_a, [([5], [6])], share="no"), "share", "'no'")


def test_load_without_an_mtp_layer_says_so(tmp_path):
    from deepseek_jax.synthetic import random_hub_checkpoint
    d = random_hub_checkpoint(tmp_path / "no_mtp", tiny_config(num_hidden_layers=2), seed=4, include_mtp=False)
    _raises(lambda: dj.load(d, mtp=True), "has no MTP layer")
    assert dj.load(d).mtp is None
    # a config with fewer layers than the weights: not the first layers run as another model
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    for f in os.listdir(d):
        os.symlink(os.path.join(d, f), fewer / f)
    cfg = json.load(open(os.path.join(d, "config.json")))
    (fewer / "config.json").unlink()
    (fewer / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1, "first_k_dense_replace": 1}))
    _raises(lambda: dj.load(fewer), "holds tensor model.layers.1.", "(1 layers", "the config disagrees")
    from deepseek_jax.train import load_float_model
    _raises(lambda: load_float_model(fewer), "holds tensor model.layers.1.")
    # far more layers or experts than the files hold: said at once (the spec of every tensor the
    # config implies was built first: a minute and 7 GB for a million layers)
    for more, needle in (({"num_hidden_layers": 10 ** 6}, "model.layers.999999.input_layernorm.weight"),
                         ({"n_routed_experts": 10 ** 6, "n_group": 1, "topk_group": 1},
                          "model.layers.1.mlp.experts.999999.down_proj.weight")):
        (fewer / "config.json").unlink()
        (fewer / "config.json").write_text(json.dumps({**cfg, **more}))
        _raises(lambda: dj.load(fewer), f"missing tensor {needle}", "disagrees with the weights")
        from deepseek_jax.orbax_ckpt import convert
        _raises(lambda: convert(fewer, tmp_path / "out", progress=False), f"missing tensor {needle}")


def test_float_model_of_an_fp8_checkpoint_with_its_float_config(ckpt_a):
    """What `train --init` does: the FP8 checkpoint read with the config of the float model made of
    it (fp8=False) is the same model; the scales are the files' layout, not extra tensors."""
    from deepseek_jax.train import load_float_model
    cfg = dj.load_config(ckpt_a)
    assert cfg.fp8
    a, b = load_float_model(ckpt_a), load_float_model(ckpt_a, cfg=cfg.replace(fp8=False))
    for (pa, va), (pb, vb) in zip(nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b)), strict=True):
        assert pa == pb and np.array_equal(np.asarray(va[...]), np.asarray(vb[...]))


def test_make_mesh_axes():
    one = jax.devices()[:1]
    assert sharding.make_mesh({"expert": 1}, one).shape == {"data": 1, "expert": 1, "model": 1}
    _raises(lambda: sharding.make_mesh({"expert": 1, "pipe": 1}, one), "unknown axis", "'pipe'")
    _raises(lambda: sharding.make_mesh({"data": "1"}, one), "size of data", "'1'")
    _raises(lambda: sharding.make_mesh({"data": 0}, one), "size of data", "0")
    _raises(lambda: sharding.make_mesh([1, 1, 1], one), "mesh", "list")


def test_perplexity_of_ragged_rows():
    rows = [np.log(np.array([0.5, 0.25], np.float32)), np.log(np.array([0.1], np.float32))]
    np.testing.assert_allclose(dj.perplexity(rows), [np.sqrt(8.0), 10.0], rtol=1e-6)
    np.testing.assert_allclose(dj.perplexity(np.stack([rows[0], rows[0]])), [np.sqrt(8.0)] * 2, rtol=1e-6)
    _raises(lambda: dj.perplexity([rows[0], np.zeros(0, np.float32)]), "no log-probs")
    assert dj.perplexity([float(x) for x in rows[0]]) == pytest.approx(np.sqrt(8.0))   # one row as a list
    _raises(lambda: dj.perplexity([rows[0], "x"]), "perplexity: expected")
    _raises(lambda: dj.perplexity([["a"]]), "perplexity: the rows must hold numbers")
    _raises(lambda: dj.perplexity(np.zeros((2, 0), np.float32)), "at least one position")


# ---- Trainer -------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,needle", [
    ("grad_accum", 0, ">= 1"), ("grad_accum", 2.0, "2.0"), ("steps", -1, ">= 0"), ("lr", float("nan"), "nan"),
    ("b1", 2.0, "[0, 1)"), ("adam_eps", 0.0, "> 0"), ("warmup", -5, ">= 0"), ("clip_norm", float("nan"), "clip"),
    ("remat", "yes", "True or False"), ("trainable", 3, "regular expression"), ("min_lr_ratio", 1.5, "[0, 1]"),
])
def test_train_config_checked_up_front(field, value, needle):
    import dataclasses

    from deepseek_jax.train import TrainConfig
    _raises(lambda: dataclasses.replace(TrainConfig(), **{field: value}).validate(), f"TrainConfig.{field}", needle)


def test_trainer_checks_each_batch_before_a_step(tmp_path):
    from deepseek_jax.tasks import Batch
    from deepseek_jax.train import TrainConfig, Trainer
    cfg = DeepSeekConfig.from_hub_dict(tiny_config(num_hidden_layers=2))
    model = dj.init_random(cfg, with_mtp=False)
    _raises(lambda: Trainer(model, TrainConfig(grad_accum=0)), "grad_accum")
    _raises(lambda: Trainer("model"), "model", "str")
    t = Trainer(model, TrainConfig(steps=3, grad_accum=2))
    V = cfg.vocab_size
    ids = np.random.default_rng(0).integers(0, V, (2, 8)).astype(np.int32)
    mask, valid = np.ones((2, 8), np.float32), np.ones((2, 8), bool)
    bad = ids.copy()
    bad[1, 5] = V + 1000    # a NaN embedding row, and after one update NaN weights everywhere
    _raises(lambda: t.train_step(Batch(bad, mask, valid)), f"token id {V + 1000}", "[1, 5]")
    _raises(lambda: t.train_step(Batch(ids[:, :1], mask[:, :1], valid[:, :1])), "length >= 2", "[2, 1]")
    _raises(lambda: t.train_step(Batch(ids, mask[:, :5], valid)), "loss_mask", "[2, 5]")
    _raises(lambda: t.train_step(Batch(ids[0], mask[0], valid[0])), "ids", "[8]")
    _raises(lambda: t.train_step(Batch(ids.astype(np.float32), mask, valid)), "integer", "float32")
    _raises(lambda: t.train_step(Batch(ids, mask * np.nan, valid)), "loss_mask", "finite")
    _raises(lambda: t.train_step(Batch(np.tile(ids, (1, 40)), np.tile(mask, (1, 40)), np.tile(valid, (1, 40)))),
            "length 320", f"max_position_embeddings {cfg.max_position_embeddings}")
    _raises(lambda: t.train_step(Batch(ids[:1], mask[:1], valid[:1])), "batch size 1", "grad_accum 2")
    _raises(lambda: t.train_step(ids), "Batch", "ndarray")
    # ragged rows (numpy's "inhomogeneous shape"), a negative weight (the step would raise that
    # token's loss), a valid mask of strings (cast to True)
    _raises(lambda: t.train_step(([[1, 2, 3], [4, 5]], [[0, 1, 1], [0, 1]], [[1, 1, 1], [1, 1]])), "ids is ragged")
    _raises(lambda: t.train_step(Batch(ids, -mask, valid)), "loss_mask must be >= 0")
    _raises(lambda: t.train_step(Batch(ids, mask, np.full((2, 8), "a"))), "valid must be booleans")
    _raises(lambda: t.train_step(Batch(ids, mask, np.full((2, 8), 0.5))), "values other than 0 and 1")
    assert t._host_batch((ids, mask, np.ones((2, 8), np.float32))).valid.dtype == bool   # 0/1 floats: as before
    _raises(lambda: t.evaluate(None), "batch_at", "NoneType")
    _raises(lambda: t.evaluate([Batch(ids, mask, valid)]), "batch_at", "list")
    _raises(lambda: t.evaluate(None, n_batches=0), "n_batches", ">= 1")
    _raises(lambda: t.evaluate(None, n_batches=1.5), "n_batches", "1.5")
    _raises(lambda: t.evaluate(None, start=-1), "start", "-1")
    assert t.step == 0
    # checkpoints: metadata that is not JSON failed in Orbax's writer thread, leaving a half-written
    # step; a "step" key replaced the recorded step; a missing step was Orbax's FileNotFoundError
    d = tmp_path / "ck"
    _raises(lambda: t.save(d, metadata={"a": np.float32(1)}), "metadata is not JSON")
    _raises(lambda: t.save(d, metadata={"step": 999}), "'step'", "the checkpoint's own")
    assert not d.exists() or not list(d.iterdir())
    assert t.save(d, metadata={"note": "ok"}) == 0
    _raises(lambda: t.restore(d, step=999), "holds no step 999", "steps: 0")
    _raises(lambda: Trainer.read_metadata(d, step=7), "holds no step 7")
    _raises(lambda: t.restore(tmp_path / "nothing"), "no checkpoint to resume", "not a directory")
    assert t.restore(d)["note"] == "ok" and Trainer.read_metadata(d)["step"] == 0
    import types   # a NaN (a diverged loss) and any mapping were saved before these checks: still are
    t.save(tmp_path / "ck2", metadata=types.MappingProxyType({"loss": float("nan")}))
    assert np.isnan(Trainer.read_metadata(tmp_path / "ck2")["loss"])
    assert t._host_batch((ids, mask, valid)).ids.dtype == np.int32      # a plain (ids, mask, valid) tuple
    if len(jax.devices()) >= 2:   # the microbatch, not the batch, must divide the data axis
        on_mesh = Trainer(model, TrainConfig(grad_accum=2), mesh=sharding.make_mesh({"data": 2}, jax.devices()[:2]))
        _raises(lambda: on_mesh.train_step(Batch(ids, mask, valid)), "batch size 2 / grad_accum 2",
                "microbatches of 1 rows", "2 devices of mesh axis 'data'")


# ---- packaging -----------------------------------------------------------------------------------
def test_wheel_ships_presets_and_assets(tmp_path):
    """A non-editable install could not find the presets ("configs/ directory not found"): the
    wheel, built from a copy of the sources, carries the top-level configs/ as deepseek_jax/configs,
    the demo model's assets and the commands package."""
    import shutil
    import subprocess
    import sys
    import zipfile

    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "configs", "deepseek_jax", "kernels_pallas"):
        copy = shutil.copytree if os.path.isdir(os.path.join(REPO, name)) else shutil.copy
        copy(os.path.join(REPO, name), src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = sorted(f for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".json"))
    assert presets and all(f"deepseek_jax/configs/{f}" in names for f in presets), sorted(names)
    assert "deepseek_jax/commands/generate.py" in names and "kernels_pallas/fp8_gemm.py" in names
    assert any(n.startswith("deepseek_jax/assets/demo_model/") for n in names)
    assert any(n.startswith("deepseek_jax/assets/tiny_tokenizer/") for n in names)


def test_configs_dir_finds_installed_presets(tmp_path, monkeypatch):
    from deepseek_jax import config
    pkg = tmp_path / "site-packages" / "deepseek_jax"
    (pkg / "configs").mkdir(parents=True)
    (pkg / "configs" / "deepseek-v3-671b.json").write_text("{}")
    monkeypatch.setattr(config, "__file__", str(pkg / "config.py"))
    assert config.configs_dir() == str(pkg / "configs")
    monkeypatch.setattr(config, "__file__", str(tmp_path / "elsewhere" / "deepseek_jax" / "config.py"))
    _raises(config.configs_dir, "configs")
