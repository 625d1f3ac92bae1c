"""Unit tests of the pieces under the model: config, YaRN, router, FP8 quantization."""

from __future__ import annotations

import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax.config import DeepSeekConfig, load_config
from deepseek_jax.errors import DeepSeekError
from deepseek_jax.hub import dequantize_block_fp8_np, quantize_block_fp8_np
from deepseek_jax.moe import route
from deepseek_jax.quant import dequantize, quantize
from deepseek_jax.rope import Rope, inv_frequencies
from deepseek_jax.synthetic import tiny_config


# ---- config ---------------------------------------------------------------------------------
def test_671b_preset_matches_spec():
    c = load_config("deepseek-v3-671b")
    assert (c.hidden_size, c.num_hidden_layers, c.n_routed_experts, c.latent_dim) == (7168, 61, 256, 576)
    assert c.fp8 and c.num_dense_layers == 3 and c.num_moe_layers == 58
    assert c.yarn_mscale == pytest.approx(1.368888, abs=1e-6)
    assert c.softmax_scale == pytest.approx(0.1352338, abs=1e-7)


def test_rope_parameters_and_rope_scaling_read_alike():
    old = tiny_config()
    new = tiny_config()
    rs = new.pop("rope_scaling")
    new.pop("rope_theta")
    new["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0,
                              **{k: v for k, v in rs.items() if k != "type"}}
    a, b = DeepSeekConfig.from_hub_dict(old), DeepSeekConfig.from_hub_dict(new)
    assert a.rope_scaling == b.rope_scaling and a.rope_theta == b.rope_theta
    assert a.softmax_scale == b.softmax_scale


def test_q_lora_rank_null_and_roundtrip():
    c = DeepSeekConfig.from_hub_dict(tiny_config(q_lora_rank=None))
    assert c.q_lora_rank is None
    again = DeepSeekConfig.from_hub_dict(json.loads(json.dumps(c.to_hub_dict())))
    assert again == c


def test_hub_config_round_trip_keeps_eos_lists_and_quantization_keys():
    """Export wrote the first of an eos_token_id list and a quantization_config rebuilt from
    scratch (its modules_to_not_convert dropped): the exported config.json was not the source's."""
    d = tiny_config(eos_token_id=[1, 7], quantization_config={
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
        "modules_to_not_convert": ["lm_head"]})
    c = DeepSeekConfig.from_hub_dict(d)
    assert c.eos_token_id == 1 and c.fp8
    out = c.to_hub_dict()
    assert out["eos_token_id"] == [1, 7] and out["quantization_config"] == d["quantization_config"]
    assert "quantization_config" not in c.replace(fp8=False).to_hub_dict()
    assert c.replace(eos_token_id=7).to_hub_dict()["eos_token_id"] == 7   # another eos: not the list's


@pytest.mark.parametrize("field,value,needle", [
    ("model_type", "llama", "model_type"),
    ("scoring_func", "softmax", "scoring_func"),
    ("n_group", 3, "n_group"),
    ("topk_group", 9, "topk_group"),
    ("qk_rope_head_dim", 7, "qk_rope_head_dim"),
    ("hidden_size", "big", "hidden_size"),
    ("moe_layer_freq", 2, "moe_layer_freq"),
    # (accepted, then "holds tensor ...indexer..., which the config has no place for")
    ("model_type", "deepseek_v32", "'deepseek_v32' .DeepSeek-V3.2's sparse attention"),
    ("rope_interleave", False, "rope_interleave = False: only true"),   # (ignored: logits 0.41 off HF's)
    ("hidden_size", 10 ** 21, "hidden_size = 1000000000000000000000: too large"),   # (an OverflowError)
    ("vocab_size", 2 ** 31, "too large"),
    ("eos_token_id", [], r"eos_token_id = \[\]: give at least one id"),   # (read as [1])
    ("quantization_config", {"quant_method": "fp8", "weight_block_size": [64, 64]},
     r"quantization_config.weight_block_size = \[64, 64\]"),
])
def test_validation_names_the_field(field, value, needle):
    with pytest.raises(DeepSeekError, match=needle) as e:
        DeepSeekConfig.from_hub_dict(tiny_config(**{field: value}))
    assert "\n" not in str(e.value)


def test_missing_required_field():
    d = tiny_config()
    del d["kv_lora_rank"]
    with pytest.raises(DeepSeekError, match="kv_lora_rank"):
        DeepSeekConfig.from_hub_dict(d)


# ---- YaRN -----------------------------------------------------------------------------------
def test_yarn_ramp_boundaries_for_v3():
    """SPEC §4: for V3, low = 10 and high = 23: dims below keep theta^-2i/d, above are / factor."""
    c = load_config("deepseek-v3-671b")
    inv, mult = inv_frequencies(c)
    base = 1.0 / (10000.0 ** (np.arange(0, 64, 2) / 64))
    np.testing.assert_allclose(inv[:11], base[:11], rtol=1e-6)
    np.testing.assert_allclose(inv[23:], base[23:] / 40, rtol=1e-6)
    ramp = (np.arange(32) - 10) / 13
    np.testing.assert_allclose(inv[11:23], base[11:23] / 40 * ramp[11:23] + base[11:23] * (1 - ramp[11:23]),
                               rtol=1e-6)
    assert mult == 1.0


@pytest.mark.parametrize("mscale, all_dim", [(0.5, 1.0), (1.0, 0.707), (None, None), (1.0, None), (1.0, 0.0),
                                             (0.0, 1.0), (2.0, None), (None, 1.0), (0.0, 0.0)])
def test_yarn_cos_sin_multiplier_is_the_mscale_ratio(mscale, all_dim):
    """SPEC §4: cos/sin are scaled by mscale(f, mscale) / mscale(f, mscale_all_dim), with
    mscale(f, m) = 0.1 m ln f + 1, as DeepSeek's code reads them (an unset mscale 1, an unset
    mscale_all_dim 0, which leaves mscale(f, mscale)). HF transformers takes mscale(f, 1) unless both
    are non-zero: where the two readings differ the config is refused (it was read DeepSeek's way,
    and the logits were 0.18-0.29 relative off HF's), naming both multipliers."""
    f = 6.0
    rs = {"type": "yarn", "factor": f, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
          "mscale": mscale, "mscale_all_dim": all_dim}
    m = 1.0 if mscale is None else mscale
    want = (0.1 * m * math.log(f) + 1) / (0.1 * all_dim * math.log(f) + 1 if all_dim else 1.0)
    hf = want if mscale and all_dim else 0.1 * math.log(f) + 1
    if abs(hf - want) > 1e-9:
        with pytest.raises(DeepSeekError, match="DeepSeek's code and HF transformers read these differently"):
            DeepSeekConfig.from_hub_dict(tiny_config(rope_scaling=rs))
        return
    _, mult = inv_frequencies(DeepSeekConfig.from_hub_dict(tiny_config(rope_scaling=rs)))
    assert mult == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("rope_dim,theta,rs", [
    (64, 10000.0, {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                   "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),   # V3's
    (16, 10000.0, {"type": "yarn", "factor": 4, "original_max_position_embeddings": 16,
                   "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0}),
    (128, 50000.0, {"type": "yarn", "factor": 8.5, "original_max_position_embeddings": 8192,
                    "beta_fast": 16, "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.0}),
    (64, 10000.0, None), (32, 1e6, None),
], ids=["v3", "tiny", "wide", "plain64", "plain32_1e6"])
def test_rope_frequencies_equal_hf_to_the_bit(rope_dim, theta, rs):
    """Angles are ``p * inv_freq`` in float32: one ulp of ``inv_freq`` is 2.7e-4 relative error in
    the logits at p = 160K (NumPy's float32 ``pow`` was 1-2 ulp off torch's on 4 of V3's 32, and
    the logits 2.7e-4 off HF's there; now 5.8e-7, as at p = 0)."""
    torch = pytest.importorskip("torch")
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding
    d = tiny_config(qk_rope_head_dim=rope_dim, rope_theta=theta, rope_scaling=rs, max_position_embeddings=163840)
    inv, mult = inv_frequencies(DeepSeekConfig.from_hub_dict(d))
    hf = DeepseekV3RotaryEmbedding(DeepseekV3Config(**d))
    assert mult == pytest.approx(hf.attention_scaling, rel=1e-12)
    if theta == 10000.0:   # V3's base: torch's pow is correctly rounded there, as ours is
        np.testing.assert_array_equal(inv, hf.inv_freq.numpy())
    else:                  # elsewhere torch's own pow is 1 ulp off the correctly rounded value on some i
        np.testing.assert_array_max_ulp(inv, hf.inv_freq.numpy(), maxulp=1)
        return
    pos = jnp.array([0, 4095, 65536, 163839])
    cos, _ = Rope(DeepSeekConfig.from_hub_dict(d)).cos_sin(pos)
    hf_cos, _ = hf(torch.zeros(1), torch.tensor(np.asarray(pos))[None])
    np.testing.assert_allclose(np.asarray(cos), hf_cos[0, :, :rope_dim // 2].numpy(), atol=2e-6)


@pytest.mark.parametrize("change,needle", [
    ({"factor": 0.5}, "must be >= 1"), ({"beta_fast": 0}, "beta_fast = 0"), ({"beta_slow": -1}, "beta_slow = -1"),
    ({"truncate": False}, "truncate = False"), ({"attention_factor": 2.0}, "attention_factor = 2.0"),
    ({"factor": "drop"}, "factor is missing"),
    ({"original_max_position_embeddings": "drop"}, "original_max_position_embeddings is missing"),
    ({"mscale_all_dim": -20}, "mscale_all_dim = -20"), ({"mscale": -1e9}, "mscale = -1000000000.0: gives a scale"),
])
def test_yarn_settings_we_cannot_honour_are_refused(change, needle):
    """HF honours ``truncate: false`` and ``attention_factor``, and reads 0 betas as its defaults:
    each would give numbers other than HF's, so each is refused by name, as is a YaRN with no factor."""
    d = tiny_config()
    rs = dict(d["rope_scaling"], **change)
    rs = {k: v for k, v in rs.items() if v != "drop"}
    with pytest.raises(DeepSeekError, match=re.escape(needle)) as e:
        DeepSeekConfig.from_hub_dict(dict(d, rope_scaling=rs))
    assert "\n" not in str(e.value)


def test_yarn_attention_factor_equal_to_the_mscale_ratio_is_accepted():
    d = tiny_config()
    want = DeepSeekConfig.from_hub_dict(d).rope_scaling.cos_sin_multiplier
    d["rope_scaling"] = dict(d["rope_scaling"], attention_factor=want)
    assert DeepSeekConfig.from_hub_dict(d).rope_scaling.cos_sin_multiplier == want


def test_rope_rotates_interleaved_pairs():
    c = DeepSeekConfig.from_hub_dict(tiny_config(rope_scaling=None))
    rope = Rope(c)
    x = np.random.default_rng(0).normal(size=(3, c.qk_rope_head_dim)).astype(np.float32)
    pos = jnp.array([0, 5, 77])
    cos, sin = rope.cos_sin(pos)
    y = np.asarray(rope.apply(jnp.asarray(x), cos, sin))
    z = x[:, 0::2] + 1j * x[:, 1::2]
    ang = np.asarray(pos)[:, None] * rope.inv_freq[None]
    w = z * np.exp(1j * ang)
    np.testing.assert_allclose(y[:, 0::2], w.real, atol=1e-5)
    np.testing.assert_allclose(y[:, 1::2], w.imag, atol=1e-5)


# ---- router ---------------------------------------------------------------------------------
def _route_numpy(logits, bias, cfg):
    """Loop-by-loop reading of SPEC §5, written independently of moe.route."""
    T, E = logits.shape
    G = cfg.n_group
    per = E // G
    idx_out, w_out = [], []
    for t in range(T):
        s = 1 / (1 + np.exp(-logits[t].astype(np.float64)))
        sb = s + bias
        gscore = [np.sort(sb[g * per:(g + 1) * per])[-2:].sum() for g in range(G)]
        keep = np.argsort(gscore)[::-1][:cfg.topk_group]
        cand = [e for e in range(E) if e // per in keep]
        chosen = sorted(cand, key=lambda e: -sb[e])[:cfg.num_experts_per_tok]
        w = s[chosen]
        w = w / w.sum() * cfg.routed_scaling_factor
        idx_out.append(chosen)
        w_out.append(w)
    return np.array(idx_out), np.array(w_out)


def test_router_matches_independent_loop_with_negative_biases():
    cfg = DeepSeekConfig.from_hub_dict(tiny_config())
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(64, cfg.n_routed_experts)).astype(np.float32)
    bias = rng.uniform(-1.0, 0.2, size=cfg.n_routed_experts).astype(np.float32)
    r = route(jnp.asarray(logits), jnp.asarray(bias), cfg)
    idx, w = _route_numpy(logits, bias, cfg)
    got_idx = np.asarray(r.idx_TK)
    for t in range(64):
        order = np.argsort(got_idx[t])
        ref_order = np.argsort(idx[t])
        np.testing.assert_array_equal(got_idx[t][order], idx[t][ref_order])
        np.testing.assert_allclose(np.asarray(r.weight_TK)[t][order], w[t][ref_order], rtol=1e-5)


def test_group_mask_is_top_k_by_rank_with_ties():
    """The router's group selection by rank equals ``lax.top_k``'s pick, ties included (equal
    scores go to the lower index), on scores with many ties."""
    from kernels_pallas.moe_router import top_k_mask as _top_k_mask
    x = jnp.asarray(np.random.default_rng(5).integers(0, 4, size=(300, 8)).astype(np.float32))
    for k in (1, 3, 4, 8):
        _, top = jax.lax.top_k(x, k)
        want = np.zeros(x.shape, bool)
        np.put_along_axis(want, np.asarray(top), True, axis=1)
        np.testing.assert_array_equal(np.asarray(_top_k_mask(x, k)), want)


def test_masked_groups_get_minus_inf_not_zero():
    """All biased scores negative: with 0-masking the dropped group's experts would win."""
    cfg = DeepSeekConfig.from_hub_dict(tiny_config(n_routed_experts=4, n_group=2, topk_group=1,
                                                   num_experts_per_tok=2))
    logits = jnp.array([[1.0, 0.5, -2.0, -1.5]])
    bias = jnp.full((4,), -1.0)  # sb = sigmoid - 1 < 0 everywhere; group 0 wins
    r = route(logits, bias, cfg)
    assert sorted(np.asarray(r.idx_TK)[0].tolist()) == [0, 1]


# ---- FP8 blocks ------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(200, 130), (576, 64), (3, 96, 300)])
def test_jnp_quantization_matches_numpy_and_edge_blocks(shape):
    w = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    w[..., :128, :128] = 0.0  # an all-zero block: scale 1, no NaN
    wq, s = quantize(jnp.asarray(w))
    flat = w.reshape(-1, *shape[-2:])
    ref = [quantize_block_fp8_np(x) for x in flat]
    # XLA may divide by 448 as a multiply by 1/448: scales agree to 1 ulp, codes almost always.
    np.testing.assert_allclose(np.asarray(s).reshape(-1, *s.shape[-2:]), np.stack([r[1] for r in ref]), rtol=2e-7)
    same = np.asarray(wq).view(np.uint8).reshape(flat.shape) == np.stack([r[0] for r in ref]).view(np.uint8)
    assert same.mean() > 0.999
    back = np.asarray(dequantize(wq, s))
    assert np.isfinite(back).all()
    np.testing.assert_allclose(back.reshape(flat.shape), np.stack([dequantize_block_fp8_np(*r) for r in ref]),
                               rtol=0.07, atol=1e-6)
    assert np.abs(back - w).max() <= 0.07 * np.abs(w).max()
    assert s.shape[-2:] == (math.ceil(shape[-2] / 128), math.ceil(shape[-1] / 128))


def test_quantize_a_block_of_tiny_magnitudes_is_finite():
    """amax ~1e-37: amax / 448 is subnormal, which XLA flushes to 0 on a CPU, and w / 0 was NaN."""
    w = np.random.default_rng(2).normal(size=(256, 128)).astype(np.float32)
    w[:128] *= 1e-37
    wq, s = quantize(jnp.asarray(w))
    back = np.asarray(dequantize(wq, s))
    assert np.isfinite(back).all() and np.asarray(s)[0, 0] >= np.finfo(np.float32).tiny
    np.testing.assert_allclose(back[128:], w[128:], rtol=0.07, atol=1e-6)


@pytest.mark.parametrize("kw,needle", [(dict(prefill_attention="fast"), "prefill_attention"),
                                       (dict(fp8_mode="w4a16"), "fp8_mode"),
                                       (dict(ep_capacity=True), "ep_capacity"),   # was capacity 1.0
                                       (dict(ep_capacity=0), "ep_capacity")])
def test_precision_rejects_unknown_modes(kw, needle):
    from deepseek_jax.errors import DeepSeekError
    from deepseek_jax.quant import Precision
    with pytest.raises(DeepSeekError, match=needle):
        Precision(**kw)


# ---- MoE dispatch forms ------------------------------------------------------------------------
def _moe_case(seed, M=6, D=40, F=24, E=8, K=3, layers=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, D)).astype(np.float32)
    ws = [rng.standard_normal((layers * E, F, D)) * 0.2, rng.standard_normal((layers * E, F, D)) * 0.2,
          rng.standard_normal((layers * E, D, F)) * 0.2]
    idx = np.stack([rng.choice(E, K, replace=False) for _ in range(M)]).astype(np.int32)
    idx[0] = idx[1]  # two tokens on the same experts
    w = rng.random((M, K)).astype(np.float32)
    return x, [w_.astype(np.float32) for w_ in ws], idx, w


def test_every_expert_moe_matches_a_per_token_loop():
    """The dense all-experts form of the CPU MoE against a numpy loop over tokens and choices."""
    from deepseek_jax.moe import every_expert_moe
    from deepseek_jax.quant import Precision
    x, (wg, wu, wd), idx, w = _moe_case(0)
    y = every_expert_moe(((jnp.asarray(wg), None), (jnp.asarray(wu), None), (jnp.asarray(wd), None)),
                         jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), Precision(dtype=jnp.float32), 8)
    ref = np.zeros_like(x, dtype=np.float64)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = idx[t, k]
            g, u = wg[e] @ x[t].astype(np.float64), wu[e] @ x[t].astype(np.float64)
            ref[t] += w[t, k] * (wd[e] @ (g / (1 + np.exp(-g)) * u))
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [40, 20000])
def test_expert_counts_both_forms(n):
    """``moe.expert_counts``: the compare-and-sum form (decode sizes) and ``bincount`` (above
    2**22 compares) count the same, experts never chosen included."""
    from deepseek_jax.moe import expert_counts
    a = np.random.default_rng(n).integers(0, 250, n).astype(np.int32)   # experts 250..255 never chosen
    got = np.asarray(expert_counts(jnp.asarray(a), 256))
    assert got.dtype == np.int32 and (got == np.bincount(a, minlength=256)).all()


@pytest.mark.parametrize("tokens", [1, 5, 200])
def test_combine_gather_and_scatter_forms_agree(tokens):
    """``moe.combine``: one token a sum of its rows, below ``GATHER_COMBINE_MIN_TOKENS`` a
    scatter-add, from it on a gather of each token's rows; all against a numpy loop over tokens and choices, in bfloat16 (products
    rounded to bf16, sums in float32), with the assignments' sorted order as the dispatch makes it."""
    from deepseek_jax.moe import GATHER_COMBINE_MIN_TOKENS, combine
    assert (tokens >= GATHER_COMBINE_MIN_TOKENS) == (tokens == 200)
    rng = np.random.default_rng(9)
    K, D, E = 3, 24, 7
    idx = np.stack([rng.choice(E, K, replace=False) for _ in range(tokens)]).astype(np.int32)
    w = rng.random((tokens, K)).astype(np.float32)
    order = np.argsort(idx.reshape(-1), kind="stable")
    y_AD = jnp.asarray(rng.standard_normal((tokens * K, D)), jnp.bfloat16)   # rows in sorted order
    got = np.asarray(combine(y_AD, jnp.asarray(order), jnp.asarray(w), jnp.float32))
    y = np.asarray(y_AD.astype(jnp.float32))
    want = np.zeros((tokens, D))
    for slot, a in enumerate(order):
        t, k = divmod(a, K)
        want[t] += np.asarray((y_AD[slot] * jnp.asarray(w[t, k], jnp.bfloat16)).astype(jnp.float32), np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert not np.allclose(got, (y.reshape(tokens, K, D) * w[..., None]).sum(1), atol=1e-2)  # the order matters
    if tokens == 1:
        # the same bits as the scatter-add (a speculative pass's form for this token): 8 choices of
        # magnitudes e^±6, where another order of the float32 additions gives other bits
        K, D = 8, 512
        order = jnp.asarray(rng.permutation(K).astype(np.int32))
        w = jnp.asarray(rng.random((1, K)), jnp.float32)
        y_AD = jnp.asarray(rng.standard_normal((K, D)) * np.exp(rng.standard_normal((K, 1)) * 3), jnp.bfloat16)
        rows = (y_AD * w.reshape(-1)[order][:, None].astype(jnp.bfloat16)).astype(jnp.float32)
        scattered = jnp.zeros((1, D), jnp.float32).at[order // K].add(rows)
        got = combine(y_AD, order, w, jnp.float32)
        assert (np.asarray(got) == np.asarray(scattered)).all()
        assert (np.asarray(got) != np.asarray(rows[::-1].sum(0))).any()   # the check can fail


@pytest.mark.parametrize("fp8_mode", ["w8a16", "w8a8"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_every_expert_moe_rounds_like_the_sorted_form(dtype, fp8_mode):
    """FP8 experts read at a layer offset, in float32 and bfloat16, W8A16 and W8A8: the all-experts
    form (CPU, when the choices cover the experts) and the sorted grouped-GEMM form agree to
    rounding order; W8A8 (rows quantized 1x128 before each GEMM) differs measurably from W8A16."""
    from deepseek_jax.moe import every_expert_moe, sorted_moe
    from deepseek_jax.quant import Precision
    x, ws, idx, w = _moe_case(1, M=5, D=136, F=72, E=8, K=2, layers=2)
    arrays = tuple(quantize(jnp.asarray(a)) for a in ws)
    prec = Precision(dtype=dtype, fp8_mode=fp8_mode)
    args = (arrays, jnp.asarray(x, dtype), jnp.asarray(idx), jnp.asarray(w), prec, 8)
    a = np.asarray(every_expert_moe(*args, expert_offset=jnp.int32(8)), np.float32)
    b = np.asarray(sorted_moe(*args, expert_offset=jnp.int32(8)), np.float32)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())
    assert not np.allclose(a, np.asarray(sorted_moe(*args, expert_offset=jnp.int32(0)), np.float32), atol=1e-3)
    if fp8_mode == "w8a8" and dtype == jnp.float32:
        w16 = np.asarray(sorted_moe(arrays, *args[1:4], Precision(dtype=dtype), 8, expert_offset=jnp.int32(8)))
        assert np.abs(b - w16).max() > 1e-3 * np.abs(w16).max()


def test_a_folder_named_like_a_preset_does_not_hide_it(tmp_path, monkeypatch):
    """`mkdir tiny` in the working directory left `--config tiny` reading tiny/config.json (absent);
    a folder that does hold a config.json still wins, as an explicit path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    assert load_config("tiny") == load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.json"))
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(tiny_config(vocab_size=300)))
    assert load_config("tiny").vocab_size == 300
    (tmp_path / "mine.json").write_text(json.dumps(tiny_config(vocab_size=320)))
    assert load_config(str(tmp_path / "mine")).vocab_size == 320   # a path with .json left off


def test_what_processes_compare_leaves_out_hidden_files(tmp_path):
    """Hosts with their own copy of a checkpoint: a download tool's .cache holds timestamps whose
    lengths differ from host to host; the copies are the same checkpoint all the same."""
    from deepseek_jax.runtime import _path_digest
    a, b = tmp_path / "a", tmp_path / "b"
    for d, stamp in ((a, "1712345679.12345"), (b, "1712345678.1234567")):
        (d / ".cache" / "huggingface").mkdir(parents=True)
        (d / ".cache" / "huggingface" / "model.metadata").write_text(stamp)
        (d / "config.json").write_text("{}")
        (d / "w.value").mkdir()
        (d / "w.value" / ".zarray").write_text("{}")
    assert _path_digest(str(a)) == _path_digest(str(b))
    (b / "config.json").write_text('{"x": 1}')
    assert _path_digest(str(a)) != _path_digest(str(b))
    (b / "config.json").write_text("{}")
    (b / "v.value").mkdir()                    # another array folder
    assert _path_digest(str(a)) != _path_digest(str(b))
