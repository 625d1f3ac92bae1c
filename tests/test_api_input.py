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
from deepseek_jax.config import DeepSeekConfig, configs_dir
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
