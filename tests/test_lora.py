"""LoRA adapters over a frozen FP8 checkpoint: the model unchanged at zero, the adapter on every
path (prefill, decode), merged weights equal to the adapters, training that moves only the
adapters with finite-difference-exact gradients, the CLI, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import deepseek_jax as dj
from deepseek_jax import lora
from deepseek_jax.errors import DeepSeekError
from deepseek_jax.quant import Linear
from deepseek_jax.synthetic import random_hub_checkpoint, tiny_config
from deepseek_jax.tasks import make_dataset
from deepseek_jax.train import TrainConfig, Trainer, param_path

CFG = tiny_config(vocab_size=512, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                  num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2,
                  q_lora_rank=32, kv_lora_rank=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                  topk_group=1, max_position_embeddings=64)
#: every target this config has (q-LoRA: no q_proj)
ALL_HERE = [t for t in lora.TARGET_NAMES if t != "q_proj"]
TCFG = TrainConfig(steps=20, lr=1e-2, warmup=2, trainable=lora.LORA_PATTERN, bias_gamma=0.01)


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory) -> str:
    return str(random_hub_checkpoint(tmp_path_factory.mktemp("fp8"), CFG, seed=4, fp8=True))


def adapted(path, rank=4, b_scale=0.0, **kw):
    model = dj.load(path, kernels="ref")
    lora.add_lora(model, rank=rank, **kw)
    if b_scale:
        for i, (_, node) in enumerate(nnx.iter_graph(model)):
            if isinstance(node, Linear) and getattr(node, "lora_b", None) is not None:
                shape = node.lora_b[...].shape
                node.lora_b = nnx.Param(b_scale * jax.random.normal(jax.random.PRNGKey(i), shape))
    return model


def test_adapters_on_every_path_and_merge(fp8_dir):
    ids = np.random.default_rng(0).integers(0, 512, (2, 11))
    base = dj.logits(dj.load(fp8_dir, kernels="ref"), ids)
    model = adapted(fp8_dir)
    np.testing.assert_array_equal(dj.logits(model, ids), base)       # B = 0: the model as loaded
    model = adapted(fp8_dir, b_scale=0.3, targets=ALL_HERE)
    got = dj.logits(model, ids)
    assert np.abs(got - base).max() > 0.1                              # the adapters act
    np.testing.assert_allclose(dj.logits(model, ids, mode="decode", prefill=4), got, rtol=0, atol=1e-4)
    merged = lora.merge_lora(model)
    assert not merged.cfg.fp8 and lora.lora_signature(merged) == ()
    np.testing.assert_allclose(dj.logits(merged, ids), got, rtol=0, atol=1e-4)
    # the routed experts take none; stacked layers get stacked adapters
    sig = lora.lora_signature(model)
    assert sig and not any("experts" == p[-2] for p, _, _ in sig)
    assert {p[-1] for p, _, _ in sig} == {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj", "gate_proj",
                                           "up_proj", "down_proj"}


def test_training_moves_only_the_adapters(fp8_dir):
    data = make_dataset("synthetic:addition", batch_size=16, seed=0)
    trainer = Trainer(adapted(fp8_dir), TCFG)
    params = {param_path(p) for p, _ in nnx.to_flat_state(trainer.state.params)}
    assert params and all(p.endswith(("/lora_a", "/lora_b")) for p in params)
    before = nnx.state(trainer.model())
    hist = [jax.device_get(trainer.train_step(data.batch_at(s))) for s in range(TCFG.steps)]
    loss = np.array([h["loss"] for h in hist])
    assert loss[-4:].mean() < 0.8 * loss[:2].mean(), loss
    after = nnx.state(trainer.model())
    changed = {param_path(p) for (p, a), (_, b) in zip(nnx.to_flat_state(before), nnx.to_flat_state(after))
               if not np.array_equal(np.asarray(a[...]), np.asarray(b[...]))}
    # only adapters moved: not the FP8 weights, not the norms, not the routers' biases (their gates are frozen)
    assert changed and all(p.endswith(("/lora_a", "/lora_b")) for p in changed), changed
    assert any(p.endswith("/lora_b") for p in changed)
    assert after["moe_layers"]["self_attn"]["q_b_proj"]["weight"][...].dtype == jnp.float8_e4m3fn


def test_adapter_gradients_match_finite_differences(fp8_dir):
    trainer = Trainer(adapted(fp8_dir, b_scale=0.05), TrainConfig(**{**TCFG.__dict__, "balance_alpha": 0.0}))
    batch = make_dataset("synthetic:addition", batch_size=16, seed=5).batch_at(0)
    _, _, grads = trainer.loss_and_grads(batch)
    p_leaves, treedef = jax.tree.flatten(trainer.state.params)
    g_leaves = jax.tree.leaves(grads)
    for i in (0, len(p_leaves) - 1):   # one lora_a and one lora_b
        g = np.asarray(g_leaves[i])
        j = np.unravel_index(int(np.argmax(np.abs(g))), g.shape)

        def loss_at(d):
            leaves = list(p_leaves)
            leaves[i] = leaves[i].at[j].add(d)
            return float(trainer.loss_and_grads(batch, jax.tree.unflatten(treedef, leaves))[0])

        fd = (loss_at(2e-3) - loss_at(-2e-3)) / 4e-3
        assert abs(fd - g[j]) <= 2e-2 * abs(g[j]) + 1e-3, (i, fd, g[j])


def test_gradients_through_the_kernels_equal_the_reference(fp8_dir):
    """The adapters' gradients with every Pallas kernel of the train step interpreted (FP8 GEMMs,
    grouped experts, router, RMSNorm; GPU and TPU versions) equal the jnp references' within 1e-5."""
    batch = make_dataset("synthetic:addition", batch_size=4, seed=5).batch_at(0)
    grads = {}
    for kernels in ("ref", "interpret_gpu", "interpret_tpu"):
        model = dj.load(fp8_dir, kernels=kernels)
        lora.add_lora(model, rank=4)
        for i, (_, node) in enumerate(nnx.iter_graph(model)):   # B != 0, so that A gets a gradient too
            if isinstance(node, Linear) and getattr(node, "lora_b", None) is not None:
                node.lora_b = nnx.Param(0.05 * jax.random.normal(jax.random.PRNGKey(i), node.lora_b[...].shape))
        _, _, g = Trainer(model, TrainConfig(trainable=lora.LORA_PATTERN)).loss_and_grads(batch)
        grads[kernels] = {param_path(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(g)}
    for kernels in ("interpret_gpu", "interpret_tpu"):
        for name, ref in grads["ref"].items():
            err = np.abs(grads[kernels][name] - ref).max() / np.abs(ref).max()
            assert err < 1e-5, (kernels, name, err)


def test_generator_applies_the_adapters(fp8_dir):
    """The Generator's default on CPU dequantizes FP8 weights once: the adapters are folded in, so
    greedy tokens are the adapted model's (as-is, plain and speculative, and dj.logits agree)."""
    from deepseek_jax.generate import Generator
    model = adapted(fp8_dir, b_scale=0.3)
    prompt = [[3, 17, 99, 4, 250]]
    auto = Generator(model).generate(prompt, max_new_tokens=6, stop_at_eos=False)[0].output_ids
    as_is = Generator(model, weights="as-is").generate(prompt, max_new_tokens=6, stop_at_eos=False)[0].output_ids
    spec = Generator(model).generate(prompt, max_new_tokens=6, stop_at_eos=False, speculative="mtp")[0].output_ids
    base = Generator(dj.load(fp8_dir)).generate(prompt, max_new_tokens=6, stop_at_eos=False)[0].output_ids
    ids = list(prompt[0])
    for _ in range(6):
        ids.append(int(dj.logits(model, [ids])[0, -1].argmax()))
    assert list(auto) == list(as_is) == list(spec) == ids[5:] != list(base)


def test_errors(fp8_dir):
    model = dj.load(fp8_dir, kernels="ref")
    with pytest.raises(DeepSeekError, match="FP8 weights, which are not trainable"):
        Trainer(model, TrainConfig())
    with pytest.raises(DeepSeekError, match="an FP8 weight or its block scale"):
        Trainer(model, TrainConfig(trainable="self_attn"))
    for kw, needle in (({"rank": 0}, "rank must be"), ({"targets": ("kv_b_proj",)}, "no adapter for kv_b_proj"),
                       ({"alpha": -1.0}, "alpha must be"), ({"rank": 100}, "exceeds")):
        with pytest.raises(DeepSeekError, match=needle):
            lora.add_lora(model, **kw)
    with pytest.raises(DeepSeekError, match="rank 17 exceeds the 32x16 weight"):   # nothing attached then
        lora.add_lora(model, rank=17, targets=ALL_HERE)
    assert lora.lora_signature(model) == ()
    with pytest.raises(DeepSeekError, match="no q_proj to adapt"):          # named explicitly, absent
        lora.add_lora(model, rank=2, targets=["q_proj", "o_proj"])
    with pytest.raises(DeepSeekError, match="targets must be a list"):
        lora.add_lora(model, rank=2, targets="o_proj")
    lora.add_lora(model, rank=2)
    assert lora.adapted_names(model) == ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"]
    with pytest.raises(DeepSeekError, match="already has LoRA"):
        lora.add_lora(model, rank=2, targets=["gate_proj"])


def test_train_cli_lora(fp8_dir, tmp_path, capsys):
    from deepseek_jax.cli import main

    out = tmp_path / "run"
    args = ["train", "--init", fp8_dir, "--data", "synthetic:addition", "--batch", "16", "--steps", "3",
            "--out", str(out), "--eval-batches", "0", "--lora-rank", "4", "--save-every", "2"]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert "LoRA: rank 4, alpha 8" in stdout and "training " in stdout
    assert json.load(open(out / "run.json"))["train_config"]["trainable"] == lora.LORA_PATTERN
    # OUT/hub: the adapters merged into BF16 weights, loadable as a plain model
    from deepseek_jax.train import Trainer as T
    trainer = T(adapted(fp8_dir), TCFG)
    trainer.restore(out / "ckpt")
    ids = np.random.default_rng(1).integers(0, 512, (2, 9))
    want = dj.logits(trainer.model(), ids)
    got = dj.logits(dj.load(str(out / "hub")), ids)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-2      # BF16 rounding of merged weights
    # resume with another rank is refused; bad flags are one line before anything loads
    assert main(args + ["--resume", "--lora-rank", "8"]) == 2
    assert "different LoRA setting" in capsys.readouterr().err
    i = args.index("--lora-rank")    # ... and without adapters (a TypeError before)
    assert main(args[:i] + args[i + 2:] + ["--resume"]) == 2
    assert "different LoRA setting" in capsys.readouterr().err
    # the checkpoints hold the adapters and their moments, not the frozen base (a copy of it per
    # checkpoint: for DeepSeek-V3 690 GB each); a resume takes the base from --init again
    saved = json.load(open(out / "ckpt" / "3" / "state" / "_METADATA"))["tree_metadata"]   # (Orbax's own index)
    assert any("lora_a" in k for k in saved) and not any(k.startswith("('rest.") for k in saved), sorted(saved)
    exported = {f.name: f.read_bytes() for f in (out / "hub").glob("*.safetensors")}
    # the default targets named, in another order and once twice, are the same setting
    assert main(args + ["--resume", "--lora-targets", "o_proj,q_b_proj,q_a_proj,kv_a_proj_with_mqa,o_proj"]) == 0
    assert {f.name: f.read_bytes() for f in (out / "hub").glob("*.safetensors")} == exported   # restored alike
    other = str(random_hub_checkpoint(tmp_path / "other", CFG, seed=5, fp8=True))   # same shapes, other weights
    i = args.index("--init")
    assert main(args[:i + 1] + [other] + args[i + 2:] + ["--resume"]) == 2
    assert "is not the checkpoint this run started from" in capsys.readouterr().err
    # a run whose OUT lies inside --init resumes (its own files are not --init's)
    inner = Path(other) / "lora"
    at = args.index("--out")
    inner_args = args[:i + 1] + [other] + args[i + 2:at] + ["--out", str(inner)] + args[at + 2:]
    assert main(inner_args + ["--steps", "1"]) == 0 and main(inner_args + ["--steps", "2", "--resume"]) == 0
    # a --trainable pattern that matches nothing is refused with adapters too (it was joined to theirs)
    assert main(args + ["--trainable", "nrom", "--out", str(tmp_path / "t")]) == 2
    assert "'nrom' matches no parameter" in capsys.readouterr().err
    for extra, needle in ((["--lora-targets", "kv_b_proj"], "--lora-targets: no adapter for 'kv_b_proj'"),
                          (["--lora-rank", "0"], "--lora-rank must be >= 1")):
        assert main(args + extra + ["--out", str(tmp_path / "x")]) == 2
        assert needle in capsys.readouterr().err
    assert main([a for a in args if a != "--lora-rank" and a != "4"] + ["--lora-alpha", "3",
                                                                        "--out", str(tmp_path / "y")]) == 2
    assert "need --lora-rank" in capsys.readouterr().err
    assert main(args + ["--config", fp8_dir, "--out", str(tmp_path / "z")]) == 2
    assert "--config does not apply with --lora-rank" in capsys.readouterr().err
    # --trainable adds to the adapters
    assert main(args[:-2] + ["--trainable", "norm", "--out", str(tmp_path / "n")]) == 0
    trained = json.load(open(tmp_path / "n" / "run.json"))["train_config"]["trainable"]
    assert trained == lora.LORA_PATTERN + "|norm"


def test_export_merges_tensor_by_tensor(fp8_dir, tmp_path):
    """``export_hub`` over FP8 weights with adapters merges them tensor by tensor: the BF16 export
    equals that of :func:`lora.merge_lora`'s float model (up to one BF16 rounding step, two float32
    summation orders), and loads with the adapted model's logits; with ``fp8=True`` the weights
    without an adapter keep the checkpoint's e4m3 bytes and scales exactly, and the logits are
    those of quantizing ``merge_lora``'s model."""
    from deepseek_jax.hub import HubReader
    from deepseek_jax.train import export_hub

    model = adapted(fp8_dir, b_scale=0.3)          # MLA's projections adapted, the MLPs not
    ids = np.random.default_rng(2).integers(0, 512, (2, 9))
    want = dj.logits(model, ids)
    streamed = HubReader(export_hub(model, tmp_path / "bf16", tokenizer_dir=None))
    merged = HubReader(export_hub(lora.merge_lora(model), tmp_path / "merged", tokenizer_dir=None))
    assert sorted(streamed.names()) == sorted(merged.names())
    for name in merged.names():
        a, b = streamed.get(name).astype(np.float32), merged.get(name).astype(np.float32)
        np.testing.assert_allclose(a, b, rtol=2 ** -7, atol=1e-30, err_msg=name)
    fp8 = HubReader(export_hub(model, tmp_path / "fp8", fp8=True, tokenizer_dir=None))
    src = HubReader(fp8_dir)
    kept = [n for n in src.names() if n.endswith("mlp.gate_proj.weight") or n.endswith("kv_b_proj.weight")]
    assert kept and all(src.info(n).dtype == fp8.info(n).dtype == np.dtype(ml_dtypes.float8_e4m3fn) for n in kept)
    for n in kept + [n + "_scale_inv" for n in kept]:
        np.testing.assert_array_equal(fp8.get(n).view(np.uint8) if n in kept else fp8.get(n),
                                      src.get(n).view(np.uint8) if n in kept else src.get(n), err_msg=n)
    q = "model.layers.0.self_attn.q_a_proj.weight"       # adapted: merged, then quantized again
    assert fp8.info(q).dtype == np.dtype(ml_dtypes.float8_e4m3fn)
    assert not np.array_equal(fp8.get(q).view(np.uint8), src.get(q).view(np.uint8))
    got = dj.logits(dj.load(str(tmp_path / "bf16"), kernels="ref"), ids)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-2      # BF16 rounding of merged weights
    # FP8: the adapted weights' new blocks cost what quantizing merge_lora's model does
    export_hub(lora.merge_lora(model), tmp_path / "merged8", fp8=True, tokenizer_dir=None)
    got, ref = (dj.logits(dj.load(str(tmp_path / d), kernels="ref"), ids) for d in ("fp8", "merged8"))
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-3
