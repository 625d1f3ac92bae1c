"""``dj.internals``: every layer's hidden states and every MoE layer's routing, against HF
transformers' ``deepseek_v3`` (float32, CPU) read through forward hooks on its own modules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_jax as dj
from deepseek_jax.checkpoint import load_hub
from deepseek_jax.config import DeepSeekConfig
from deepseek_jax.introspect import expert_histogram, logit_lens
from deepseek_jax.synthetic import tiny_config

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from tests import hf_ref  # noqa: E402


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def hf_internals(hf, ids):
    """HF's embeddings, each decoder layer's output, and each MoE gate's (logits, weights, indices)."""
    rec = {"layers": [], "gates": []}
    inner = hf.model
    hooks = [inner.embed_tokens.register_forward_hook(lambda m, i, o: rec.setdefault("emb", o))]
    for layer in inner.layers:
        hooks.append(layer.register_forward_hook(
            lambda m, i, o: rec["layers"].append(o[0] if isinstance(o, tuple) else o)))
        if hasattr(layer.mlp, "gate"):
            hooks.append(layer.mlp.gate.register_forward_hook(lambda m, i, o: rec["gates"].append(o)))
    hooks.append(inner.norm.register_forward_hook(lambda m, i, o: rec.setdefault("final", o)))
    try:
        with torch.no_grad():
            out = hf(input_ids=torch.from_numpy(ids.astype(np.int64)), output_attentions=True)
    finally:
        for h in hooks:
            h.remove()
    hidden = np.stack([rec["emb"].numpy()] + [h.numpy() for h in rec["layers"]])
    rec["attentions"] = np.stack([a.numpy() for a in out.attentions])
    return hidden, rec["final"].numpy(), out.logits.numpy(), [tuple(t.numpy() for t in g) for g in rec["gates"]], \
        rec["attentions"]


def case_head(case):
    """HF's final norm and lm_head on its own embeddings."""
    model, ids, _, (hidden, *_), hf = case
    with torch.no_grad():
        return hf.lm_head(hf.model.norm(torch.from_numpy(hidden[0]))).numpy()


@pytest.fixture(scope="module", params=["a", "b"])
def case(request, ckpt_a, ckpt_b):
    ckpt = {"a": ckpt_a, "b": ckpt_b}[request.param]
    model = load_hub(ckpt, with_mtp=False)
    hf, _ = hf_ref.hf_model(ckpt)
    ids = np.random.default_rng(11).integers(0, model.cfg.vocab_size, (2, 21)).astype(np.int32)
    return model, ids, dj.internals(model, ids, attention=True), hf_internals(hf, ids), hf


def test_hidden_states_match_hf_layer_by_layer(case):
    model, ids, ins, (hidden, final, logits, *_), _ = case
    cfg = model.cfg
    assert ins.hidden.shape == (cfg.num_hidden_layers + 1, *ids.shape, cfg.hidden_size) == hidden.shape
    for i in range(len(hidden)):      # 0: embeddings, then each layer: a wrong layer shows as its own index
        assert rel(ins.hidden[i], hidden[i]) <= 1e-5, i
    assert rel(ins.final_hidden, final) <= 1e-5
    assert rel(ins.logits, logits) <= 1e-4
    np.testing.assert_allclose(ins.logits, dj.logits(model, ids), rtol=0, atol=1e-5)
    # The logit lens of the last layer is the model's own output; of layer 0, HF's head on the embeddings.
    lens = logit_lens(model, ins)
    assert lens.shape == (cfg.num_hidden_layers + 1, *ids.shape, cfg.vocab_size)
    np.testing.assert_allclose(lens[-1], ins.logits, rtol=0, atol=1e-4)
    assert rel(lens[0], case_head(case)) <= 1e-4


def test_attention_weights_match_hf(case):
    model, ids, ins, (*_, attentions), _ = case
    cfg = model.cfg
    B, T = ids.shape
    assert ins.attention.shape == (cfg.num_hidden_layers, B, cfg.num_attention_heads, T, T) == attentions.shape
    for i in range(cfg.num_hidden_layers):
        np.testing.assert_allclose(ins.attention[i], attentions[i], rtol=0, atol=2e-6, err_msg=f"layer {i}")
    np.testing.assert_allclose(ins.attention.sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.triu(ins.attention, k=1) == 0)          # causal: nothing attends ahead


def test_routing_matches_hf_gates(case):
    model, ids, ins, (*_, gates, _), _ = case
    cfg = model.cfg
    B, T = ids.shape
    assert ins.moe_layers == tuple(range(cfg.first_k_dense_replace, cfg.num_hidden_layers)) and len(gates) == len(
        ins.moe_layers)
    assert ins.experts.shape == ins.expert_weights.shape == (len(gates), B, T, cfg.num_experts_per_tok)
    assert ins.expert_scores.shape == (len(gates), B, T, cfg.n_routed_experts)
    for j, (router_logits, w_ref, idx_ref) in enumerate(gates):
        np.testing.assert_allclose(ins.expert_scores[j].reshape(B * T, -1), 1 / (1 + np.exp(-router_logits)),
                                   rtol=1e-5, atol=1e-6)
        idx = ins.experts[j].reshape(B * T, -1)
        w = ins.expert_weights[j].reshape(B * T, -1)
        # HF's top-k is unsorted: compare as (expert -> weight) per token.
        o, o_ref = np.argsort(idx, -1), np.argsort(idx_ref, -1)
        np.testing.assert_array_equal(np.take_along_axis(idx, o, -1), np.take_along_axis(idx_ref, o_ref, -1))
        np.testing.assert_allclose(np.take_along_axis(w, o, -1), np.take_along_axis(w_ref, o_ref, -1),
                                   rtol=1e-5, atol=1e-6)
        # Ours come by decreasing weight, and sum to the scaling factor (norm_topk_prob).
        assert np.all(np.diff(w, axis=-1) <= 0)
        np.testing.assert_allclose(w.sum(-1), cfg.routed_scaling_factor, rtol=1e-5)
    hist = expert_histogram(ins)
    assert hist.shape == (len(gates), cfg.n_routed_experts)
    assert (hist.sum(-1) == B * T * cfg.num_experts_per_tok).all()
    assert hist[0, ins.experts[0, 1, 3, 0]] >= 1


def test_dense_only_model_and_bad_input():
    cfg = DeepSeekConfig.from_hub_dict(tiny_config(num_hidden_layers=1, first_k_dense_replace=1,
                                                  num_nextn_predict_layers=0))
    model = dj.init_random(cfg, seed=0)
    ins = dj.internals(model, [3, 1, 4])          # one row, given as a list
    assert ins.hidden.shape == (2, 1, 3, cfg.hidden_size) and ins.moe_layers == ()
    assert ins.experts.shape == (0, 1, 3, cfg.num_experts_per_tok) and ins.expert_scores.shape[0] == 0
    assert ins.attention is None
    assert dj.internals(model, [3, 1, 4], attention=True).attention.shape == (1, 1, cfg.num_attention_heads, 3, 3)
    assert expert_histogram(ins).shape == (0, cfg.n_routed_experts)
    with pytest.raises(dj.DeepSeekError, match="outside the vocab"):
        dj.internals(model, [[0, cfg.vocab_size]])
    with pytest.raises(dj.DeepSeekError, match="expected a DeepSeekV3"):
        dj.internals("model", [[0, 1]])
    with pytest.raises(dj.DeepSeekError, match="attention must be True or False"):
        dj.internals(model, [[0, 1]], attention="yes")
    with pytest.raises(dj.DeepSeekError, match="expected the Internals"):
        logit_lens(model, ins.hidden)
    with pytest.raises(dj.DeepSeekError, match="expected a DeepSeekV3"):
        logit_lens(None, ins)
    assert dj.internals(model, [3, 1], attention=np.True_).attention is not None
    with pytest.raises(dj.DeepSeekError, match="non-empty"):
        dj.internals(model, [])
    with pytest.raises(dj.DeepSeekError, match="outside jax.jit"):
        jax.jit(lambda i: dj.internals(model, i).hidden)(jnp.zeros((1, 2), jnp.int32))
    with pytest.raises(dj.DeepSeekError, match="expected the Internals"):
        expert_histogram(ins.experts)
    with pytest.raises(dj.DeepSeekError, match=r"ins.hidden must be a float \[L\+1, B, T, D\]"):
        logit_lens(model, ins._replace(hidden=ins.hidden[0]))
    bad = ins._replace(experts=np.full((1, 1, 3, cfg.num_experts_per_tok), cfg.n_routed_experts, np.int32),
                       expert_scores=np.zeros((1, 1, 3, cfg.n_routed_experts), np.float32))
    with pytest.raises(dj.DeepSeekError, match="expert ids must be in"):
        expert_histogram(bad)
    with pytest.raises(dj.DeepSeekError, match=r"ins.expert_scores must be a \[Lm, B, T, E\] array"):
        expert_histogram(ins._replace(expert_scores=None))   # (an IndexError)
    # hidden states as a jax array (refused as "must be a float [L+1, B, T, D] array", which it was)
    np.testing.assert_array_equal(logit_lens(model, ins._replace(hidden=jnp.asarray(ins.hidden))),
                                  logit_lens(model, ins))


def test_logit_lens_refuses_another_models_internals(case):
    """Same hidden size, other depth and vocab: caught, not silently projected."""
    model, ids, ins, _, _ = case
    cfg = model.cfg
    other = dj.init_random(DeepSeekConfig.from_hub_dict(tiny_config(
        hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size + 8, num_hidden_layers=cfg.num_hidden_layers + 1,
        first_k_dense_replace=1, num_nextn_predict_layers=0)))
    with pytest.raises(dj.DeepSeekError, match="another model's internals"):
        logit_lens(other, ins)
    with pytest.raises(dj.DeepSeekError, match="another model's internals"):   # depth alike, vocab not
        logit_lens(other, ins._replace(hidden=np.concatenate([ins.hidden, ins.hidden[:1]])))
